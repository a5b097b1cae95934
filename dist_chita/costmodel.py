"""Cost model: time per phase and memory per rank of a distributed CHITA prune.

Symbols: the Fisher factor A is n x p (n calibration samples, p prunable
weights), split into R column blocks of p_R = ceil(p / R) columns; k weights
are kept; b is the storage dtype's bytes per entry; P is the model's parameter
count. Hardware is described per *device* (one rank's GPU, or one CPU core):
F FLOP/s, M B/s of memory bandwidth, and a link of bandwidth L B/s and latency
l s (within a node when all R ranks fit on one node, across nodes otherwise).

Phases (what ``launch/prune.py`` reports in ``phase_seconds``):

* fisher: per-sample gradients of this rank's n / R samples, written into rows,
  then exchanged so that every rank holds its column block, once per solve (CHITA++: every stage)::

      t = solves * ( c_g * f * (n / R) / (F s e_g)   (f = forward + backward FLOPs per sample, ~6 P)
        + (n / R) * p * b / (M s e_m)                 (writing the rows)
        + n p b (R - 1) / R^2 / L + m (R - 1) l       (all_to_all; m = micro-batches x layers)
        + (R - 1) x )                                 (x: exchange overhead per extra rank and stage, fitted:
                                                       buffers, copies and waiting that a single rank, writing
                                                       its rows straight into its block, does not have)

* solver, per IHT iteration::

      t_it = r * n p_R b / (M s e_m)                  (r block reads: A^T r and A g_S)
           + 2 (R - 1) / R * 8 n / L + 2 log2(R) l    (all-reduce of an n-vector)
           + q * 2 log2(R) l                          (q rounds of the collective top-k)
           + o / s'                                   (fixed per-iteration overhead)

  plus, once per solve (one per CHITA++ stage), c block reads outside the iterations (y = A w_bar, the
  active set's gathered rows, exact recomputations): c * n p_R b / (M s e_m).

* backsolve, per round: the Gram matrix of the k kept columns, its all-reduce
  and a Cholesky factorisation::

      t = 2 n^2 k / R / (F s e_a) + 2 (R - 1) / R * 8 n^2 / L + 2 log2(R) l + n^3 / 3 / (F e_a)

* writeback: 2 * 4 p_R / (M s); save: 4 P / disk bandwidth.

Every phase also gets a fixed term (``Rates.fixed``; launch and Python
overhead, waiting, work that does not shrink with R), fitted by :func:`calibrate`;
it is not scaled by the core share (ranks that wait do not compete for cores). ``s`` is the share of a device one rank
gets (:meth:`Hardware.compute_share`): 1 on GPUs; on a CPU node with C shared
cores and t threads per rank, min(t, C / R), so ranks that oversubscribe the
cores slow down; ``s'`` (:meth:`Hardware.time_slice`) is the share of one core
for single-threaded overhead, min(1, C / (R t)).

Memory per rank is :func:`dist_chita.memory.estimate` (factor n p_R b, model,
gradient buffers, solver vectors, backsolve Gram), compared with the device's
memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dist_chita.memory import MemoryEstimate, estimate

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PHASES = ("fisher", "solver", "backsolve", "writeback", "save")


@dataclass(frozen=True)
class Hardware:
    """A device and its links.

    Attributes:
        name: label.
        memory_bytes: usable memory per device (bytes).
        memory_bandwidth: M, B/s per device.
        flops: F, FLOP/s per device (effective, at the arithmetic precision used).
        link_bandwidth: L across nodes, B/s per rank per direction.
        link_latency: l across nodes, s per message.
        devices_per_node: ranks that share a node (and its faster links).
        node_bandwidth, node_latency: the link within a node (None: same as across).
        shared_cores: CPU only: cores shared by all ranks (one node; 0: one device per rank).
        disk_bandwidth: B/s for saving the pruned model.
    """

    name: str
    memory_bytes: float
    memory_bandwidth: float
    flops: float
    link_bandwidth: float
    link_latency: float
    devices_per_node: int = 1
    node_bandwidth: float | None = None
    node_latency: float | None = None
    shared_cores: int = 0
    disk_bandwidth: float = 1e9

    def __post_init__(self) -> None:
        for f in ("memory_bytes", "memory_bandwidth", "flops", "link_bandwidth", "disk_bandwidth"):
            if not getattr(self, f) > 0:
                raise ValueError(f"hardware {f} must be > 0, got {getattr(self, f)}")
        if self.link_latency < 0 or (self.node_latency is not None and self.node_latency < 0):
            raise ValueError("hardware latency must be >= 0")
        if self.devices_per_node < 1 or self.shared_cores < 0:
            raise ValueError("hardware devices_per_node must be >= 1 and shared_cores >= 0")

    @classmethod
    def from_dict(cls, data: dict) -> Hardware:
        """Build from a plain dict (e.g. a parsed YAML file); unknown or missing keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"hardware description must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown hardware key {unknown[0]!r}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing hardware key {missing[0]!r}")
        ints = {"devices_per_node", "shared_cores"}
        values = {}
        try:
            for k, v in data.items():
                values[k] = v if k == "name" or v is None else (int(v) if k in ints else float(v))
        except (TypeError, ValueError):
            raise ValueError(f"hardware {k}: expected a number, got {v!r}") from None
        return cls(**values)

    def link(self, ranks: int) -> tuple[float, float]:
        """(bandwidth B/s, latency s) of the links a collective over ``ranks`` ranks uses."""
        if ranks <= self.devices_per_node and self.node_bandwidth is not None:
            lat = self.node_latency if self.node_latency is not None else self.link_latency
            return self.node_bandwidth, lat
        return self.link_bandwidth, self.link_latency

    def compute_share(self, ranks: int, threads_per_rank: int = 1) -> float:
        """s: devices' worth of compute one rank gets (1 on GPUs; min(t, C / R) on C shared cores)."""
        if self.shared_cores <= 0:
            return 1.0
        return min(float(threads_per_rank), self.shared_cores / ranks)

    def time_slice(self, ranks: int, threads_per_rank: int = 1) -> float:
        """s': share of one core a rank's single-threaded code gets, min(1, C / (R t)) (1 on GPUs)."""
        if self.shared_cores <= 0:
            return 1.0
        return min(1.0, self.shared_cores / (ranks * threads_per_rank))


@dataclass(frozen=True)
class Rates:
    """Machine rates, assumed or fitted by :func:`calibrate` (see the module docstring for the formulas).

    Attributes:
        persample_factor: c_g, cost of a per-sample gradient pass relative to 6 P FLOPs per sample.
        grad_efficiency: e_g, fraction of F the per-sample gradient pass achieves.
        memory_efficiency: e_m, fraction of M the solver's block reads (and row writes) achieve.
        linalg_efficiency: e_a, fraction of F the backsolve's Gram / Cholesky achieve.
        collective_latency, collective_bandwidth: override the hardware link's l and L (None: hardware).
        block_reads: r, passes over the rank's block per solver iteration.
        setup_reads: c, passes over the rank's block per solve outside the iterations.
        backsolve_row_passes: passes over the kept rows A_{r,S} (n k / R entries) per backsolve: the gather and the
            preconditioned CG's exact products, memory-bound.
        selection_rounds: q, all-reduce rounds of the collective top-k per iteration.
        iteration_overhead: o, fixed seconds per solver iteration.
        backsolve_rounds: backsolves per prune.
        exchange_overhead: x, seconds per extra rank and stage of the row -> column exchange beyond its bytes.
        fixed: fixed seconds per phase (launch / Python overhead).
    """

    persample_factor: float = 2.0
    grad_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    linalg_efficiency: float = 1.0
    collective_latency: float | None = None
    collective_bandwidth: float | None = None
    block_reads: float = 2.0
    setup_reads: float = 2.0
    backsolve_row_passes: float = 0.0
    selection_rounds: int = 4
    iteration_overhead: float = 0.0
    backsolve_rounds: int = 1
    exchange_overhead: float = 0.0
    fixed: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Workload:
    """What is pruned.

    Attributes:
        p: prunable weights; n: calibration samples; model_params: P (all parameters).
        storage_dtype: the factor's storage (b = 4 or 2 bytes).
        iterations: solver (IHT) iterations.
        kept: k, weights kept (default p // 2).
        largest_layer: weights of the largest prunable layer (default p).
        micro_batch: samples per backward pass; layers: prunable layers (messages of the exchange).
        active_fraction: |W| / p of the solver's active set; model_sharded: ZeRO-3.
        threads_per_rank: t (CPU).
        backsolves: ridge backsolves run by the solver (counted in the report); None: ``Rates.backsolve_rounds``.
        solves: solver calls (CHITA++: one per stage).
        flops_per_sample: forward + backward FLOPs of one sample (default 6 P; a causal LM on T tokens:
            6 P T; a convolutional net: 3x its forward FLOPs, since weights are reused across positions).
    """

    p: int
    n: int
    model_params: int
    storage_dtype: str = "float32"
    iterations: int = 100
    kept: int | None = None
    largest_layer: int | None = None
    micro_batch: int = 1
    layers: int = 1
    active_fraction: float = 0.0
    model_sharded: bool = False
    threads_per_rank: int = 1
    backsolves: int | None = None
    solves: int = 1
    flops_per_sample: float | None = None

    def __post_init__(self) -> None:
        if self.storage_dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown storage dtype {self.storage_dtype!r}")
        for f in ("p", "n", "model_params", "micro_batch", "layers", "threads_per_rank"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")

    @property
    def k(self) -> int:
        return self.kept if self.kept is not None else self.p // 2

    @property
    def sample_flops(self) -> float:
        return self.flops_per_sample if self.flops_per_sample is not None else 6.0 * self.model_params

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.storage_dtype]


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds per phase (``seconds``), their terms (``terms``), memory per rank and whether it fits."""

    ranks: int
    seconds: dict[str, float]
    terms: dict[str, float]
    memory: MemoryEstimate
    memory_available: float
    solver_bytes_per_iteration: float

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_available


def allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring/tree all-reduce of ``nbytes``: 2 (R - 1) / R * nbytes / L + 2 log2(R) l (0 at R = 1)."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * math.log2(ranks) * latency


def exchange_bytes(n: int, p: int, ranks: int, dtype_bytes: int) -> float:
    """Bytes one rank sends in the row -> column exchange: its n / R rows, (R - 1) / R of their p columns,
    n p b (R - 1) / R^2."""
    return n * p * dtype_bytes * (ranks - 1) / ranks**2


def memory_per_rank(w: Workload, ranks: int) -> MemoryEstimate:
    """Bytes per rank by part: :func:`dist_chita.memory.estimate` (factor n ceil(p / R) b, model, buffers)."""
    return estimate(
        p=w.p,
        n=w.n,
        world_size=ranks,
        storage_dtype=w.storage_dtype,
        model_params=w.model_params,
        largest_layer=w.largest_layer if w.largest_layer is not None else w.p,
        micro_batch=w.micro_batch,
        active_fraction=w.active_fraction,
        model_sharded=w.model_sharded,
    )


def solver_iteration_terms(w: Workload, ranks: int, hw: Hardware, rates: Rates) -> dict[str, float]:
    """Seconds of one solver iteration by term: block reads, n-vector all-reduce, selection, overhead."""
    bw, lat = hw.link(ranks)
    bw = rates.collective_bandwidth or bw
    lat = rates.collective_latency if rates.collective_latency is not None else lat
    s = hw.compute_share(ranks, w.threads_per_rank)
    p_r = math.ceil(w.p / ranks)
    hops = 2 * math.log2(ranks) if ranks > 1 else 0.0
    return {
        "reads": rates.block_reads * w.n * p_r * w.dtype_bytes / (hw.memory_bandwidth * s * rates.memory_efficiency),
        "allreduce": allreduce_seconds(8 * w.n, ranks, bw, lat),
        "selection": rates.selection_rounds * hops * lat,
        "overhead": rates.iteration_overhead / hw.time_slice(ranks, w.threads_per_rank),
    }


def predict(w: Workload, ranks: int, hw: Hardware, rates: Rates | None = None) -> Prediction:
    """Seconds per phase and memory per rank for ``w`` on ``ranks`` ranks of ``hw`` (formulas: module docstring)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    rates = rates or Rates()
    bw, lat = hw.link(ranks)
    bw = rates.collective_bandwidth or bw
    lat = rates.collective_latency if rates.collective_latency is not None else lat
    s = hw.compute_share(ranks, w.threads_per_rank)
    n, p, b, R = w.n, w.p, w.dtype_bytes, ranks
    p_r = math.ceil(p / R)
    mem_bw = hw.memory_bandwidth * s * rates.memory_efficiency
    fixed = rates.fixed

    micro_batches = math.ceil(n / R / w.micro_batch)
    grad_flops = rates.persample_factor * w.sample_flops * (n / R)
    exchange = (exchange_bytes(n, p, R, b) / bw + micro_batches * w.layers * (R - 1) * lat
                + (R - 1) * rates.exchange_overhead) if R > 1 else 0.0
    terms = {
        "fisher_gradients": w.solves * grad_flops / (hw.flops * s * rates.grad_efficiency),
        "fisher_write": w.solves * (n / R) * p * b / mem_bw,
        "fisher_exchange": w.solves * exchange,
    }
    it = solver_iteration_terms(w, R, hw, rates)
    terms.update({f"solver_{k}": w.iterations * v for k, v in it.items()})
    terms["solver_setup"] = w.solves * rates.setup_reads * n * p_r * b / mem_bw
    linalg = hw.flops * rates.linalg_efficiency
    m = w.backsolves if w.backsolves is not None else rates.backsolve_rounds
    terms["backsolve_gram"] = m * 2 * n * n * w.k / R / (linalg * s)
    terms["backsolve_allreduce"] = m * allreduce_seconds(8 * n * n, R, bw, lat)
    terms["backsolve_cholesky"] = m * n**3 / 3 / (linalg * s)
    terms["backsolve_rows"] = m * rates.backsolve_row_passes * n * math.ceil(w.k / R) * b / mem_bw

    seconds = {
        "fisher": terms["fisher_gradients"] + terms["fisher_write"] + terms["fisher_exchange"],
        "solver": sum(terms[f"solver_{k}"] for k in it) + terms["solver_setup"],
        "backsolve": (terms["backsolve_gram"] + terms["backsolve_allreduce"] + terms["backsolve_cholesky"]
                      + terms["backsolve_rows"]),
        "writeback": 2 * 4 * p_r / (hw.memory_bandwidth * s),
        "save": 4 * w.model_params / hw.disk_bandwidth,
    }
    seconds = {ph: seconds[ph] + fixed.get(ph, 0.0) for ph in PHASES}
    return Prediction(
        ranks=R,
        seconds=seconds,
        terms=terms,
        memory=memory_per_rank(w, R),
        memory_available=hw.memory_bytes,
        solver_bytes_per_iteration=8 * n * (1 + rates.selection_rounds) if R > 1 else 0.0,
    )


def smallest_fitting_ranks(
    w: Workload, hw: Hardware, power_of_two: bool = False, max_ranks: int = 1 << 20
) -> int | None:
    """Smallest R whose memory per rank fits ``hw.memory_bytes`` (any integer R >= 1, or only powers of two).

    Memory per rank is non-increasing in R, so a binary search is exact. None if even ``max_ranks`` does not fit.
    """

    def fits(r: int) -> bool:
        return memory_per_rank(w, r).total <= hw.memory_bytes

    if not fits(max_ranks):
        return None
    if power_of_two:
        r = 1
        while not fits(r):
            r *= 2
        return r
    lo, hi = 1, max_ranks
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---------------------------------------------------------------- calibration from measured reports


def workload_from_report(report: dict) -> Workload:
    """The :class:`Workload` of a ``prune_report.json`` dict (format: docs/report-format.md)."""
    cfg = report.get("config") or {}
    layers = report.get("layers") or []
    largest = max((int(layer["size"]) for layer in layers), default=int(report["p"]))
    micro = int((cfg.get("calibration") or {}).get("batch_size") or report["n"])
    kept = (report.get("global") or {}).get("kept")
    stages = report.get("stages") or []
    backsolves = sum(int(st["backsolves"]) for st in stages) if stages and all(
        "backsolves" in st for st in stages) else None
    return Workload(
        p=int(report["p"]),
        n=int(report["n"]),
        model_params=int(report.get("model_params") or report["p"]),
        storage_dtype=str(report.get("storage_dtype", "float32")),
        iterations=int(report.get("solver_iterations") or 0),
        kept=int(kept) if kept is not None else None,
        largest_layer=largest,
        micro_batch=max(1, micro),
        layers=max(1, len(layers)),
        threads_per_rank=int(report.get("threads_per_rank") or 1),
        backsolves=backsolves,
        solves=max(1, len(stages)),
    )


def measured_seconds(report: dict) -> dict[str, float]:
    """Max over ranks of each phase of ``phase_seconds`` (0 when missing); fisher includes the report's separate
    "exchange" phase (summed per rank), as the model's fisher phase does."""
    ps = report.get("phase_seconds") or {}
    out = {}
    for ph in PHASES:
        vals = [float(v) for v in ps.get(ph) or []]
        if ph == "fisher" and ps.get("exchange"):
            ex = [float(v) for v in ps["exchange"]]
            vals = [a + b for a, b in zip(vals or [0.0] * len(ex), ex, strict=True)]
        out[ph] = max(vals) if vals else 0.0
    return out


def _nnls(columns: list[list[float]], target: list[float]) -> list[float]:
    """Non-negative least squares min ||X c - y|| s.t. c >= 0 (X given by columns); scipy when available."""
    import numpy as np

    X = np.array(columns, dtype=float).T
    y = np.array(target, dtype=float)
    scale = np.where(np.abs(X).max(axis=0) > 0, np.abs(X).max(axis=0), 1.0)
    try:
        from scipy.optimize import nnls

        c, _ = nnls(X / scale, y)
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        c = np.clip(np.linalg.lstsq(X / scale, y, rcond=None)[0], 0.0, None)
    return [float(v) for v in c / scale]


def calibrate(reports: list[dict], hw: Hardware, base: Rates | None = None) -> Rates:
    """Fit the machine rates to measured runs (non-negative least squares per phase, over all reports).

    * solver: t = I (r n p_R b / (M s) * 1/e_m + 2 (R - 1) / R * 8 n / L + h l + o / s')
      + solves * c n p_R b / (M s) * 1/e_m with h = (2 + 2 q) log2 R latency hops, fitting 1/e_m, l, o and c / e_m
      (L from the hardware);
    * fisher: t = solves (c_g f n / R / (F s) * 1/e_g + row write + exchange at the fitted e_m, l + (R - 1) x)
      + f_fisher, fitting 1/e_g, the exchange overhead x and the fixed term f_fisher;
    * backsolve: t = m (2 n^2 k / R / (F s) + n^3 / 3 / (F s)) * 1/e_a + f_backsolve, fitting 1/e_a and
      f_backsolve; m = the report's count of backsolves (per report); for reports without it, the payload bytes
      of the backsolve phase / 8 n^2 (one n x n float64 Gram all-reduce each), median over the multi-rank reports,
      else the base value;
    * writeback, save: the mean measured time becomes the fixed term.

    A rate whose feature never varies (e.g. latency when every report has R = 1) keeps its base value.
    """
    if not reports:
        raise ValueError("calibrate needs at least one report")
    base = base or Rates()
    loads = [(workload_from_report(r), int(r["world_size"]), measured_seconds(r)) for r in reports]

    # solver
    cols: list[list[float]] = [[], [], [], []]
    y: list[float] = []
    for w, R, t in loads:
        s, s1 = hw.compute_share(R, w.threads_per_rank), hw.time_slice(R, w.threads_per_rank)
        it = w.iterations
        block = w.n * math.ceil(w.p / R) * w.dtype_bytes / (hw.memory_bandwidth * s)  # one read of the block at M s
        cols[0].append(it * base.block_reads * block)
        cols[1].append(it * (2 + 2 * base.selection_rounds) * math.log2(R) if R > 1 else 0.0)
        cols[2].append(it / s1)
        cols[3].append(w.solves * block)
        link_bw = base.collective_bandwidth or hw.link(R)[0]
        y.append(max(0.0, t["solver"] - it * allreduce_seconds(8 * w.n, R, link_bw, 0.0)))
    inv_em, lat, overhead, setup = _nnls(cols, y)
    mem_eff = 1.0 / inv_em if inv_em > 0 else base.memory_efficiency
    if not any(cols[1]):
        lat = base.collective_latency if base.collective_latency is not None else hw.link(1)[1]
    rates = dataclasses.replace(base, memory_efficiency=mem_eff, collective_latency=lat, iteration_overhead=overhead,
                                setup_reads=setup * mem_eff)

    # fisher: gradient efficiency, exchange overhead and fixed term; the write and exchange bytes at the fitted rates
    cols, y = [[], [], []], []
    for w, R, t in loads:
        pred = predict(dataclasses.replace(w, iterations=0), R, hw,
                       dataclasses.replace(rates, grad_efficiency=1.0, exchange_overhead=0.0))
        cols[0].append(pred.terms["fisher_gradients"])
        cols[1].append(1.0)
        cols[2].append(w.solves * (R - 1))
        y.append(max(0.0, t["fisher"] - pred.terms["fisher_write"] - pred.terms["fisher_exchange"]))
    inv_eg, fixed_fisher, x_over = _nnls(cols, y)
    grad_eff = 1.0 / inv_eg if inv_eg > 0 else base.grad_efficiency
    if not any(cols[2]):  # every report at R = 1: the exchange overhead is not observed
        x_over = base.exchange_overhead
    rates = dataclasses.replace(rates, exchange_overhead=x_over)

    # backsolve: the number of backsolves as counted in the reports; older reports without the count: from the
    # bytes of their n x n float64 Gram all-reduces (multi-rank runs)
    counts = [float(w.backsolves) for w, _, _ in loads if w.backsolves is not None]
    for rep in reports if not counts else []:
        sent = (rep.get("bytes_sent") or {}).get("backsolve")
        if int(rep["world_size"]) > 1 and sent:
            counts.append(max(float(v) for v in sent) / (8.0 * int(rep["n"]) ** 2))
    if counts:
        rates = dataclasses.replace(rates, backsolve_rounds=max(1, round(sorted(counts)[len(counts) // 2])))
    cols, y = [[], [], []], []
    for w, R, t in loads:
        pred = predict(w, R, hw, dataclasses.replace(rates, linalg_efficiency=1.0, fixed={}, backsolve_row_passes=1.0))
        cols[0].append(pred.terms["backsolve_gram"] + pred.terms["backsolve_cholesky"])
        cols[1].append(1.0)
        cols[2].append(pred.terms["backsolve_rows"])  # one pass over the kept rows at the fitted e_m
        y.append(max(0.0, t["backsolve"] - pred.terms["backsolve_allreduce"]))
    inv_ea, fixed_back, row_passes = _nnls(cols, y)
    lin_eff = 1.0 / inv_ea if inv_ea > 0 else base.linalg_efficiency
    rates = dataclasses.replace(rates, backsolve_row_passes=row_passes)

    fixed = {"fisher": fixed_fisher, "backsolve": fixed_back}
    for ph in ("writeback", "save"):
        fixed[ph] = sum(t[ph] for _, _, t in loads) / len(loads)
    # the modelled writeback / save terms are subsumed in the fixed time
    rates = dataclasses.replace(rates, grad_efficiency=grad_eff, linalg_efficiency=lin_eff, fixed=fixed)
    return rates


def compare(reports: list[dict], hw: Hardware, rates: Rates) -> list[dict]:
    """Predicted vs measured seconds per phase and world size: rows of
    {world_size, n, phase, measured, predicted, rel_error} (rel_error = (predicted - measured) / measured, None at 0).
    Phase "sum" is the sum of the modelled phases (fisher, solver, backsolve, writeback, save), not the run's
    total (which also holds loading and evaluation)."""
    rows = []
    for r in sorted(reports, key=lambda r: int(r["world_size"])):
        R = int(r["world_size"])
        pred = predict(workload_from_report(r), R, hw, rates)
        meas = measured_seconds(r)
        pairs = [(ph, meas[ph], pred.seconds[ph]) for ph in PHASES]
        pairs.append(("sum", sum(meas.values()), pred.total))
        for ph, m, pr in pairs:
            rel = (pr - m) / m if m > 0 else None
            rows.append({"world_size": R, "n": int(r["n"]), "phase": ph, "measured": m, "predicted": pr,
                         "rel_error": rel})
    return rows


def worst_errors(rows: list[dict], min_seconds: float) -> dict[str, float]:
    """Largest |rel_error| per phase of :func:`compare` rows, over rows measured at ``min_seconds`` or more."""
    out: dict[str, float] = {}
    for row in rows:
        if row["rel_error"] is not None and row["measured"] >= min_seconds:
            out[row["phase"]] = max(out.get(row["phase"], 0.0), abs(row["rel_error"]))
    return out


def compare_held_out(reports: list[dict], hw: Hardware, base: Rates | None = None) -> list[dict]:
    """Leave-one-out validation: each report predicted with rates fitted to the *other* reports
    (rows as :func:`compare`). Needs at least two reports; with few reports some rates are poorly determined
    (e.g. latency when only one multi-rank run remains), so expect larger errors than in-sample."""
    if len(reports) < 2:
        raise ValueError("held-out comparison needs at least two reports")
    rows = []
    for i, rep in enumerate(reports):
        rates = calibrate(reports[:i] + reports[i + 1:], hw, base)
        rows += compare([rep], hw, rates)
    return sorted(rows, key=lambda row: row["world_size"])


def format_comparison(rows: list[dict], noise_seconds: float = 0.05) -> str:
    """The :func:`compare` rows as a text table; errors of phases under ``noise_seconds`` are marked "*"."""
    lines = [f"{'R':>3} {'phase':<10} {'measured s':>11} {'predicted s':>12} {'error':>9}"]
    marked = False
    for row in rows:
        err = "-" if row["rel_error"] is None else f"{100 * row['rel_error']:+.0f}%"
        if row["rel_error"] is not None and row["measured"] < noise_seconds:
            err, marked = err + "*", True
        lines.append(f"{row['world_size']:>3} {row['phase']:<10} {row['measured']:>11.3f} {row['predicted']:>12.3f} "
                     f"{err:>9}")
    if marked:
        lines.append(f"  * measured under {noise_seconds * 1000:.0f} ms: timer noise, not a model error")
    return "\n".join(lines)
