"""The layerwise cost model (:mod:`dist_chita.planning.layerwise`) fitted to measured prunes of any model.

A layerwise ``prune_report.json`` (docs/report-format.md) gives the work (:class:`LayerwiseWork`, from
:func:`work_from_report`): the prunable layers' weight shapes, grouped into blocks as the library groups them
(:func:`dist_chita.layerwise.curvature.blocks_in_order`: the name prefix up to the first numeric component), the
method, R ranks with t threads each, n calibration samples in micro-batches of B (``calibration.batch_size``) of
T tokens each (``calibration.max_length``; 1 for a model without tokens), and whether ZeRO-3 partitioned the
parameters. A layer of weight shape (r, c, ...) has r rows and d_in = c k (a convolution's kernel folded in); a
block b has P_b weights and L blocks run in order.

Per phase, seconds of the busiest rank (the one the plan predicts) as ``given + sum_j c_j x_j``: ``given`` and the
features x_j are the plan's formulas at the hardware file's rates, the coefficients c_j are fitted:

* curvature: x_1 = the forward and product FLOPs, sum_b f_b N_r 2 P_b / F + N_r sum_(layers) d_in^2 / F32, with
  f_b = 2 forwards of block b (its H, then its outputs; the last block 1) or, under ZeRO-3, L (every block's pass
  runs the whole model); x_2 = the block forwards of a micro-batch, sum_b f_b m_r (hooks and the small-batch
  overhead); given: the all-reduce of every layer's H in float64, 8 d_in^2 bytes per layer over the link. N_r and
  m_r: the busiest rank's tokens and micro-batches, the micro-batches dealt as
  :func:`dist_chita.layerwise.curvature.dealt_to` deals them, each counted at T tokens (padding included, an upper
  bound). Layers that share an input (q, k and v) are counted apart: an upper bound of the products and the
  all-reduce by a constant factor of the model, which the fitted scale takes up.
* solver, CHITA: :func:`dist_chita.planning.layerwise.chita_layer_seconds` over the layers, linear in the mean
  IHT steps per row s and in u = (s + 2) o (o: seconds per chunk step): given the warm starts and the set-up
  (s = 0), x_1 = the products of one step per row (c_1 = s), x_2 = the busiest rank's chunks (c_2 = u).
  SparseGPT: x_1 = :func:`~dist_chita.planning.layerwise.sparsegpt_layer_seconds` of each block's most loaded rank
  (the layers dealt by :func:`~dist_chita.methods.sparsegpt.sparsegpt_owners`), x_2 its columns. Other methods
  (no solve of H): x_1 = one pass over the busiest rank's rows, 4 r d_in bytes at M.
* writeback: given each layer's rows written, 8 r d_in bytes at M; x_1 = each layer's all-reduce of its rows,
  4 r d_in bytes over the link (latency included), fitted only when some fitted run has R > 1, else given at the
  link's rate (c_1 = 1). ZeRO-3's gathers of the written weights
  (:func:`~dist_chita.planning.layerwise.zero3_write_seconds`) are not counted: the report does not give the
  parameters' dtype, and the studies run without ZeRO-3.

Compute runs at the rank's share of the cores (:meth:`~dist_chita.planning.costmodel.Hardware.compute_share`).
On shared CPU cores the fit also gives the cores the ranks effectively had, C' (:func:`fit`, when the runs have more
than one R and more runs than R values): a rank's share is then min(t, C' / R).
The fit (:func:`fit`) is non-negative least squares per phase, each run weighted by 1 / max(measured, 0.5 s) so that
relative errors count; only as many leading features are fitted as the runs tell apart (one run, or features in
the same ratio in every run: a scale of x_1), the others keep 0. Measured seconds are the phases of the rank with
the most solver seconds (the others wait for it in the writeback's all-reduce; the rank the plan predicts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dist_chita.layerwise.curvature import blocks_in_order, dealt_to
from dist_chita.methods.sparsegpt import sparsegpt_owners
from dist_chita.planning import layerwise as lw
from dist_chita.planning.costmodel import Hardware, allreduce_seconds

PHASES = lw.PHASES  # curvature, solver, writeback
WEIGHT_FLOOR_SECONDS = 0.5
FEATURES = {"curvature": ("compute_scale", "seconds_per_block_forward"),
            "solver": ("steps", "chunk_seconds"),
            "writeback": ("allreduce_scale",)}


@dataclass(frozen=True)
class LayerwiseWork:
    """What a layerwise prune computes (module docstring): ``blocks`` the (r, d_in) of each block's layers, in
    order."""

    blocks: tuple[tuple[tuple[int, int], ...], ...]
    method: str
    ranks: int
    threads: int
    n: int
    micro_batch: int
    tokens: int
    zero3: bool = False

    def rank_batches(self) -> tuple[int, int]:
        """(samples, micro-batches) of the rank with the most samples."""
        batches = math.ceil(self.n / self.micro_batch)
        samples, counts = [0] * self.ranks, [0] * self.ranks
        for j in range(batches):
            q = dealt_to(j, self.ranks)
            samples[q] += min(self.micro_batch, self.n - j * self.micro_batch)
            counts[q] += 1
        busiest = max(range(self.ranks), key=lambda q: (samples[q], counts[q]))
        return samples[busiest], counts[busiest]


def _rows_inputs(shape: list[int]) -> tuple[int, int]:
    """(r, d_in) of a weight of ``shape``: rows = outputs, inputs the rest folded."""
    if len(shape) < 2:
        raise ValueError(f"layerwise work: a prunable weight needs 2 or more dimensions, got shape {shape}")
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def work_from_report(report: dict) -> LayerwiseWork:
    """The :class:`LayerwiseWork` of a layerwise ``prune_report.json`` dict."""
    if report.get("objective") != "layerwise":
        raise ValueError(f"not a layerwise report (objective {report.get('objective')!r})")
    layers = report.get("layers") or []
    if not layers:
        raise ValueError("layerwise report lists no layers")
    dims = [_rows_inputs(layer["shape"]) for layer in layers]
    blocks = [[dims[i] for i in group] for group in blocks_in_order([(str(x["name"]), None) for x in layers])]
    calib = (report.get("config") or {}).get("calibration") or {}
    n = int(report["n"])
    return LayerwiseWork(blocks=tuple(tuple(b) for b in blocks), method=str(report.get("method")),
                         ranks=int(report["world_size"]), threads=int(report.get("threads_per_rank") or 1), n=n,
                         micro_batch=max(1, int(calib.get("batch_size") or n)),
                         tokens=max(1, int(calib.get("max_length") or 1)), zero3=report.get("zero_stage") == 3)


def _shared(hw: Hardware, w: LayerwiseWork, cores: float | None = None) -> Hardware:
    """``hw`` with its FLOP rates at the rank's share of the cores: min(t, C / R), C = ``cores`` (the cores the
    ranks effectively had) or the hardware's (:meth:`~dist_chita.planning.costmodel.Hardware.compute_share`)."""
    s = hw.compute_share(w.ranks, w.threads) if cores is None else min(float(w.threads), cores / w.ranks)
    f32, f64 = hw.flops_float32 or hw.flops, hw.flops_float64 or hw.flops / 2
    return replace(hw, flops=hw.flops * s, flops_float32=f32 * s, flops_float64=f64 * s)


def _curvature(w: LayerwiseWork, hw: Hardware) -> tuple[float, list[float]]:
    samples, batches = w.rank_batches()
    tokens, L = samples * w.tokens, len(w.blocks)
    f32 = hw.flops_float32 or hw.flops
    compute = calls = allreduce = 0.0
    bw, lat = hw.link(w.ranks)
    for b, dims in enumerate(w.blocks):
        forwards = L if w.zero3 else (1 if b == L - 1 else 2)
        compute += forwards * tokens * 2 * sum(r * d for r, d in dims) / hw.flops
        compute += tokens * sum(d * d for _, d in dims) / f32
        calls += forwards * batches
        allreduce += sum(allreduce_seconds(8 * d * d, w.ranks, bw, lat) for _, d in dims)
    return allreduce, [compute, calls]


def _solver(w: LayerwiseWork, hw: Hardware) -> tuple[float, list[float]]:
    layers = [rd for dims in w.blocks for rd in dims]
    if w.method in ("chita", "chita++"):
        def at(**kw) -> float:
            rates = lw.LayerwiseRates(**kw)
            return sum(lw.chita_layer_seconds(r, d, w.ranks, hw, rates) for r, d in layers)

        zero = at(steps=0)
        return zero, [at(steps=1) - zero, (at(steps=0, chunk_step_seconds=1.0) - zero) / 2]
    if w.method == "sparsegpt":
        seconds = columns = 0.0
        for dims in w.blocks:
            owners = sparsegpt_owners({(j, 0): rd for j, rd in enumerate(dims)}, w.ranks)
            load, cols = [0.0] * w.ranks, [0] * w.ranks
            for j, (r, d) in enumerate(dims):
                load[owners[(j, 0)]] += lw.sparsegpt_layer_seconds(r, d, hw, lw.LayerwiseRates())
                cols[owners[(j, 0)]] += d
            busiest = max(range(w.ranks), key=lambda q: load[q])
            seconds, columns = seconds + load[busiest], columns + cols[busiest]
        return 0.0, [seconds, columns]
    rows = sum(math.ceil(r / w.ranks) * d for r, d in layers)
    return 0.0, [4 * rows / hw.memory_bandwidth]


def _writeback(w: LayerwiseWork, hw: Hardware) -> tuple[float, list[float]]:
    bw, lat = hw.link(w.ranks)
    layers = [rd for dims in w.blocks for rd in dims]
    return (sum(8 * r * d for r, d in layers) / hw.memory_bandwidth,
            [sum(allreduce_seconds(4 * r * d, w.ranks, bw, lat) for r, d in layers)])


def phase_features(w: LayerwiseWork, hw: Hardware,
                   cores: float | None = None) -> dict[str, tuple[float, list[float]]]:
    """Per phase (``given`` seconds, features x_j) of the module docstring; ``cores``: the effective cores C'."""
    hws = _shared(hw, w, cores)
    return {"curvature": _curvature(w, hws), "solver": _solver(w, hws), "writeback": _writeback(w, hw)}


@dataclass(frozen=True)
class LayerwiseFit:
    """Fitted coefficients c_j per phase (module docstring; names in :data:`FEATURES`)."""

    coefficients: dict[str, tuple[float, ...]]
    cores: float | None = None

    def predict(self, w: LayerwiseWork, hw: Hardware) -> dict[str, float]:
        """Seconds per phase of the busiest rank, and their ``sum``."""
        out = {}
        for ph, (given, x) in phase_features(w, hw, self.cores).items():
            out[ph] = given + sum(c * v for c, v in zip(self.coefficients[ph], x, strict=False))
        return {**out, "sum": sum(out.values())}

    def as_dict(self) -> dict[str, float]:
        """Named coefficients; for CHITA also ``chunk_step_seconds`` o = u / (s + 2)."""
        out = {f"{ph}_{name}": c for ph, cs in self.coefficients.items()
               for name, c in zip(FEATURES[ph], cs, strict=False)}
        if "solver_chunk_seconds" in out:
            out["chunk_step_seconds"] = out["solver_chunk_seconds"] / (out["solver_steps"] + 2)
        out["effective_cores"] = self.cores
        return out


def measured_seconds(report: dict) -> dict[str, float]:
    """The layerwise phases of the rank with the most solver seconds (0 when missing)."""
    ps = report.get("phase_seconds") or {}
    solver = [float(v) for v in ps.get("solver") or [0.0]]
    q = max(range(len(solver)), key=lambda i: solver[i])
    return {ph: float(ps[ph][q]) if ps.get(ph) and len(ps[ph]) > q else 0.0 for ph in PHASES}


def _nnls(rows: list[list[float]], target: list[float], measured: list[float]) -> list[float]:
    """min ||W (X c - y)|| s.t. c >= 0, W = diag(1 / max(measured, WEIGHT_FLOOR_SECONDS))."""
    import numpy as np
    from scipy.optimize import nnls

    X, y = np.array(rows, dtype=float), np.array(target, dtype=float)
    wts = 1.0 / np.maximum(np.array(measured, dtype=float), WEIGHT_FLOOR_SECONDS)
    X, y = X * wts[:, None], y * wts
    scale = np.where(np.abs(X).max(axis=0) > 0, np.abs(X).max(axis=0), 1.0)
    c, _ = nnls(X / scale, y)
    return [float(v) for v in c / scale]


def _independent(feats: list[dict], phase: str, k: int) -> int:
    """The number of leading features of ``phase`` that the runs tell apart (the rank of their first columns; e.g.
    a study of one model whose chunks split evenly gives rows and chunks in the same ratio at every R)."""
    import numpy as np

    while k > 1:
        X = np.array([f[phase][1][:k] for f in feats], dtype=float)
        X = X / np.where(np.abs(X).max(axis=0) > 0, np.abs(X).max(axis=0), 1.0)
        if np.linalg.matrix_rank(X, tol=1e-9) == k:
            break
        k -= 1
    return k


def _fit_phases(works: list[LayerwiseWork], feats: list[dict],
                times: list[dict[str, float]]) -> tuple[dict[str, tuple[float, ...]], float]:
    """(coefficients per phase, the weighted squared residual of the compute phases, curvature and solver)."""
    coefficients, residual = {}, 0.0
    for ph in PHASES:
        width = len(feats[0][ph][1])
        k = _independent(feats, ph, min(width, len(works)))
        fixed = [0.0] * (width - k)
        if ph == "writeback" and not any(w.ranks > 1 for w in works):
            k, fixed = 0, [1.0]  # the all-reduce is not observed: given at the link's rate
        rows = [f[ph][1][:k] for f in feats]
        target = [max(0.0, t[ph] - f[ph][0] - sum(c * v for c, v in zip(fixed, f[ph][1][k:], strict=True)))
                  for f, t in zip(feats, times, strict=True)]
        coefficients[ph] = tuple((_nnls(rows, target, [t[ph] for t in times]) if k else []) + fixed)
        if ph != "writeback":
            for f, t in zip(feats, times, strict=True):
                pred = f[ph][0] + sum(c * v for c, v in zip(coefficients[ph], f[ph][1], strict=True))
                residual += ((pred - t[ph]) / max(t[ph], WEIGHT_FLOOR_SECONDS)) ** 2
    return coefficients, residual


def fit(reports: list[dict], hw: Hardware, grid: int = 41) -> LayerwiseFit:
    """Coefficients fitted to ``reports`` (layerwise, one method; module docstring). On shared cores
    (``hw.shared_cores`` C > 0) with runs at more than one R and more runs than R values, also the cores the ranks
    effectively had, C' in [1, C] (``grid`` points; the least residual of the compute phases, the most cores on a
    tie): on a machine shared with other work R ranks get less than min(t, C / R) each, and the runs at different R
    tell how much less. With one run per R (a strong study on 1 and 2 ranks) C' would take up what the per-row work
    should, so it is not fitted."""
    if not reports:
        raise ValueError("layerwise fit needs at least one report")
    works = [work_from_report(r) for r in reports]
    if len({w.method for w in works}) > 1:
        raise ValueError(f"layerwise fit: reports of different methods {sorted({w.method for w in works})}")
    times = [measured_seconds(r) for r in reports]
    candidates: list[float | None] = [None]
    if hw.shared_cores > 0 and 1 < len({w.ranks for w in works}) < len(works):
        C = float(hw.shared_cores)
        candidates = [C - (C - 1.0) * i / (grid - 1) for i in range(grid)]
    best = None
    for cores in candidates:
        coefficients, residual = _fit_phases(works, [phase_features(w, hw, cores) for w in works], times)
        if best is None or residual < best[0] * (1 - 1e-9):
            best = (residual, LayerwiseFit(coefficients, cores))
    return best[1]


def compare(reports: list[dict], hw: Hardware, fitted: LayerwiseFit) -> list[dict]:
    """Predicted vs measured seconds per phase (and their ``sum``), rows as
    :func:`dist_chita.planning.costmodel.compare` gives them: world_size, n, phase, measured, predicted,
    rel_error (None at 0); a sum row also ``largest_part``."""
    rows = []
    for r in sorted(reports, key=lambda r: (int(r["world_size"]), int(r["n"]))):
        pred = fitted.predict(work_from_report(r), hw)
        meas = measured_seconds(r)
        meas["sum"] = sum(meas.values())
        for ph in (*PHASES, "sum"):
            m, p = meas[ph], pred[ph]
            row = {"world_size": int(r["world_size"]), "n": int(r["n"]), "phase": ph, "measured": m,
                   "predicted": p, "rel_error": (p - m) / m if m > 0 else None}
            if ph == "sum":
                row["largest_part"] = max(meas[q] for q in PHASES)
            rows.append(row)
    return rows


def compare_held_out(reports: list[dict], hw: Hardware) -> list[dict]:
    """Leave-one-out: each report predicted from coefficients fitted to the others (rows as :func:`compare`)."""
    if len(reports) < 2:
        raise ValueError("held-out comparison needs at least two reports")
    rows = []
    for i, rep in enumerate(reports):
        rows += compare([rep], hw, fit(reports[:i] + reports[i + 1:], hw))
    return sorted(rows, key=lambda row: (row["world_size"], row["n"]))
