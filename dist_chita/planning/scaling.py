"""Scaling tables and plots from the ``prune_report.json`` of one prune run at several world sizes R.

Per run (one row of the CSV), with every per-rank quantity reduced by its max over ranks:

* the objective (``fisher`` or ``layerwise``; a report without one ran the Fisher objective), which sets the
  phases the plots show (:func:`phases_of`);
* time per phase T_phase: curvature = the layerwise calibration passes (forwards and H = X^T X); fisher = the
  report's "fisher", the wall time of ``fisher_block`` (per-sample
  gradients of A = grad l_i(w_bar) / sqrt(n) AND the row -> column exchange of A, which it contains); exchange =
  the report's "exchange", the part of "fisher" spent exchanging (shown apart, never added to fisher: fisher minus
  exchange is the gradient computation); solver; backsolve; writeback; save; total;
* bytes sent per phase the same way: "fisher" holds all bytes of the fisher collectives (the exchange included);
  "exchange" is whatever a report records under that name (recorded reports have none, so 0);
* speedup and parallel efficiency of the total time against the smallest world size R_0:
  strong scaling (same n): speedup = T_0 / T_R, efficiency = T_0 R_0 / (R T_R);
  weak scaling (n grows with R): efficiency = T_0 / T_R, speedup = (R / R_0) T_0 / T_R;
* peak memory per rank and the estimate printed before the run (its total, ``memory_estimate_bytes``), bytes per
  solver iteration.

Also the mask comparison: every world size must produce the same mask (``mask_sha256``).
"""

from __future__ import annotations

import copy
import csv
import statistics
from pathlib import Path

TIME_PHASES = ("curvature", "fisher", "exchange", "solver", "backsolve", "writeback", "save", "total")
BYTE_PHASES = ("curvature", "fisher", "exchange", "solver", "backsolve", "writeback")
OBJECTIVE_PHASES = {"fisher": ("fisher", "exchange", "solver", "backsolve", "writeback", "save"),
                    "layerwise": ("curvature", "solver", "writeback", "save")}
COLUMNS = (
    ["world_size", "threads_per_rank", "oversubscribed", "mode", "objective", "n", "p"]
    + [f"time_{ph}" for ph in TIME_PHASES]
    + ["ideal_speedup", "speedup", "efficiency", "peak_memory_per_rank", "memory_estimate_per_rank"]
    + [f"bytes_{ph}" for ph in BYTE_PHASES]
    + ["solver_iterations", "bytes_per_solver_iteration", "mask_sha256"]
)


def _max(values: list[float]) -> float:
    """Max over ranks (0 when missing)."""
    return float(max(values)) if values else 0.0


def per_rank(section: dict, phase: str) -> list[float]:
    """Per-rank values of ``phase`` in a report section (``phase_seconds`` or ``bytes_sent``), as recorded.

    No phase is added to another: "fisher" already contains "exchange" (the exchange runs inside ``fisher_block``).
    """
    vals = section.get(phase)
    if vals is None:
        return []
    if isinstance(vals, (int, float)):
        vals = [vals]
    return [float(v) for v in vals]


def report_objective(report: dict) -> str:
    """``layerwise`` or ``fisher`` (a report without an objective, or magnitude pruning's null, counts as Fisher's:
    its phases are Fisher's)."""
    return "layerwise" if report.get("objective") == "layerwise" else "fisher"


def phases_of(table: list[dict]) -> tuple[str, ...]:
    """The time phases of the table's objective (:data:`OBJECTIVE_PHASES`; both objectives' when it mixes them)."""
    objectives = {row.get("objective", "fisher") for row in table}
    if len(objectives) == 1:
        return OBJECTIVE_PHASES[objectives.pop()]
    return tuple(ph for ph in TIME_PHASES[:-1] if any(ph in OBJECTIVE_PHASES[o] for o in objectives))


def rows(reports: list[dict], mode: str = "strong", cores: int | None = None) -> list[dict]:
    """One row per report (sorted by world size), columns :data:`COLUMNS`.

    Args:
        reports: ``prune_report.json`` dicts, one per world size (docs/report-format.md).
        mode: "strong" (fixed n) or "weak" (n proportional to R); sets the speedup / efficiency formulas.
        cores: cores of the machine the runs shared; ``oversubscribed`` is R * threads_per_rank > cores
            (None when unknown).
    """
    if mode not in ("strong", "weak"):
        raise ValueError(f"mode must be 'strong' or 'weak', got {mode!r}")
    if not reports:
        raise ValueError("no reports")
    reports = sorted(reports, key=lambda r: int(r["world_size"]))
    sizes = [int(r["world_size"]) for r in reports]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"duplicate world sizes in reports: {sizes}")
    out = []
    for rep in reports:
        R, t = int(rep["world_size"]), int(rep.get("threads_per_rank") or 1)
        ps = rep.get("phase_seconds") or {}
        bs = rep.get("bytes_sent") or {}
        row = {
            "world_size": R,
            "threads_per_rank": t,
            "oversubscribed": None if cores is None else R * t > cores,
            "mode": mode,
            "objective": report_objective(rep),
            "n": int(rep["n"]),
            "p": int(rep["p"]),
        }
        row.update({f"time_{ph}": _max(per_rank(ps, ph)) for ph in TIME_PHASES})
        row["peak_memory_per_rank"] = int(_max(rep.get("peak_memory_bytes")))
        estimate = (rep.get("memory_estimate_bytes") or {}).get("total")
        row["memory_estimate_per_rank"] = None if estimate is None else int(estimate)
        row.update({f"bytes_{ph}": int(_max(per_rank(bs, ph))) for ph in BYTE_PHASES})
        row["solver_iterations"] = int(rep.get("solver_iterations") or 0)
        row["bytes_per_solver_iteration"] = float(rep.get("bytes_per_solver_iteration") or 0.0)
        row["mask_sha256"] = rep.get("mask_sha256")
        out.append(row)
    r0, t0 = out[0]["world_size"], out[0]["time_total"]
    for row in out:
        R, tr = row["world_size"], row["time_total"]
        row["ideal_speedup"] = R / r0
        if tr > 0 and t0 > 0:
            ratio = t0 / tr
            row["speedup"] = ratio if mode == "strong" else ratio * R / r0
            row["efficiency"] = ratio * r0 / R if mode == "strong" else ratio
        else:
            row["speedup"] = row["efficiency"] = None
    return [{c: row[c] for c in COLUMNS} for row in out]


def mask_statement(reports: list[dict]) -> tuple[bool, str]:
    """(all equal, statement): "all N world sizes produced the same mask (sha256 ...)" or which differ. Repeated
    runs of a world size (:func:`median_of_runs`) may be passed together: "all M runs of the N world sizes ..."."""
    by_size = sorted(((int(r["world_size"]), r.get("mask_sha256") or None) for r in reports), key=lambda x: x[0])
    sizes = sorted({R for R, _ in by_size})
    runs = "" if len(sizes) == len(by_size) else f"{len(by_size)} runs of the "
    digests = {d for _, d in by_size}
    if len(by_size) and len(digests) == 1 and None not in digests:
        d = by_size[0][1]
        return True, f"all {runs}{len(sizes)} world sizes produced the same mask (sha256 {d[:16]}...)"
    if None in digests:
        missing = sorted({R for R, d in by_size if d is None})
        return False, f"mask digest missing for world size(s) {missing}; masks cannot be compared"
    ref_size, ref = by_size[0]
    differ = sorted({R for R, d in by_size if d != ref})
    same = sorted({R for R, d in by_size if d == ref})
    return False, (f"masks differ: world size(s) {differ} produced a different mask from world size(s) {same} "
                   f"({len(digests)} distinct digests)")


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def median_of_runs(reports: list[dict]) -> dict:
    """One report standing for repeated runs of the same prune (same world size, n and p): the first run's report
    with every time replaced by its median over the runs, per rank and phase (``phase_seconds``) and per CHITA++
    stage and phase (``stages[t]["seconds"]``) and the peak memory per rank by its max. Also records ``repeats``
    (the number of runs) and ``total_seconds_runs`` (each run's total, max over ranks), so the spread stays visible.

    On a shared or virtualised machine a single run's phase can be off by tens of percent (page faults served by
    the hypervisor, another process on a core); the median of 3 runs is what the tables and the cost model use.
    """
    if not reports:
        raise ValueError("no reports")
    first = reports[0]
    for key in ("world_size", "n", "p"):
        vals = sorted({int(r[key]) for r in reports})
        if len(vals) > 1:
            raise ValueError(f"repeated runs differ in {key}: {vals}")
    if len(reports) == 1:
        return first
    out = copy.deepcopy(first)
    phases = sorted({ph for r in reports for ph in (r.get("phase_seconds") or {})})
    out["phase_seconds"] = {}
    for ph in phases:
        runs = [per_rank(r.get("phase_seconds") or {}, ph) for r in reports]
        runs = [v for v in runs if v]
        if len({len(v) for v in runs}) != 1:
            raise ValueError(f"repeated runs record phase {ph!r} for different numbers of ranks")
        out["phase_seconds"][ph] = [_median([v[i] for v in runs]) for i in range(len(runs[0]))]
    stages = [r.get("stages") or [] for r in reports]
    if len({len(s) for s in stages}) != 1:
        raise ValueError(f"repeated runs have different numbers of stages: {[len(s) for s in stages]}")
    for t, stage in enumerate(out.get("stages") or []):
        secs = [s[t].get("seconds") or {} for s in stages]
        stage["seconds"] = {ph: _median([s[ph] for s in secs if ph in s]) for ph in secs[0]}
    peaks = [r.get("peak_memory_bytes") or [] for r in reports]
    if all(len(v) == len(peaks[0]) for v in peaks):
        out["peak_memory_bytes"] = [max(v[i] for v in peaks) for i in range(len(peaks[0]))]
    out["repeats"] = len(reports)
    out["total_seconds_runs"] = [_max(per_rank(r.get("phase_seconds") or {}, "total")) for r in reports]
    return out


def write_csv(table: list[dict], path: str | Path) -> Path:
    """Write the :func:`rows` table (header :data:`COLUMNS`) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in table:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The CSV back, as strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _Figures:
    """Axes labelling and saving shared by the plots of one table."""

    def __init__(self, table: list[dict], out_dir: Path, title: str, plt) -> None:
        self.table, self.out_dir, self.title, self.plt = table, out_dir, title, plt
        self.x = list(range(len(table)))
        self.labels = [str(row["world_size"]) + ("*" if row["oversubscribed"] else "") for row in table]
        self.mode = table[0]["mode"] if table else "strong"
        self.note = " (* oversubscribed cores)" if any(row["oversubscribed"] for row in table) else ""
        self.paths: list[Path] = []

    def label_axes(self, ax, ylabel: str, subtitle: str = "") -> None:
        ax.set_xticks(self.x, self.labels)
        ax.set_xlabel("world size R (ranks)" + self.note)
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle or f"{self.title} {self.mode} scaling".strip(), fontsize=10)

    def finish(self, fig, ax, name: str, ylabel: str) -> None:
        if ax is not None:
            self.label_axes(ax, ylabel)
        fig.tight_layout()
        fig.savefig(self.out_dir / name, dpi=100)
        self.plt.close(fig)
        self.paths.append(self.out_dir / name)

    def grouped_bars(self, ax, phases, values, label) -> None:
        """One bar per phase side by side at each world size: ``values(row, phase)``, ``label(phase)``."""
        width = 0.8 / len(phases)
        for i, ph in enumerate(phases):
            ax.bar([xi + (i - (len(phases) - 1) / 2) * width for xi in self.x],
                   [values(row, ph) for row in self.table], width, label=label(ph))


def _plot_time_per_phase(f: _Figures) -> None:
    """Time per phase: stacked (linear), and grouped per phase (log scale, so that small phases show). In the
    stack, fisher is drawn as fisher - exchange (the gradient computation) with exchange on top: together
    time_fisher."""
    table, x = f.table, f.x
    phases = phases_of(table)
    fig, (ax, ax2) = f.plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(table)
    for ph in phases:
        vals = [row[f"time_{ph}"] for row in table]
        label = ph
        if ph == "fisher":
            vals = [max(0.0, v - row["time_exchange"]) for v, row in zip(vals, table, strict=True)]
            label = "fisher (per-sample gradients)"
        ax.bar(x, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    other = [max(0.0, row["time_total"] - b) for row, b in zip(table, bottom, strict=True)]
    ax.bar(x, other, bottom=bottom, label="other (load, eval)", color="lightgray")
    ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    f.label_axes(ax, "seconds (max over ranks)", f"{f.title} {f.mode} scaling: time per phase (stacked)".strip())
    f.grouped_bars(ax2, phases, lambda row, ph: max(row[f"time_{ph}"], 1e-4),
                   lambda ph: "fisher (incl. exchange)" if ph == "fisher" else ph)
    ax2.set_yscale("log")
    ax2.legend(fontsize=7, framealpha=0.6)
    f.label_axes(ax2, "seconds (max over ranks, log)", "per phase (log scale)")
    f.finish(fig, None, "time_per_phase.png", "")


def plot(table: list[dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write time_per_phase.png, speedup_efficiency.png, peak_memory.png and bytes_per_phase.png into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f = _Figures(table, out_dir, title, plt)
    _plot_time_per_phase(f)

    # speedup and efficiency vs ideal
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(f.x, [row["ideal_speedup"] for row in table], "k--", label="ideal speedup")
    ax.plot(f.x, [row["speedup"] or 0.0 for row in table], "o-", label="speedup")
    ax.plot(f.x, [row["efficiency"] or 0.0 for row in table], "s-", label="parallel efficiency")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    f.finish(fig, ax, "speedup_efficiency.png", "speedup / efficiency (total time)")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(f.x, [row["peak_memory_per_rank"] / 2**20 for row in table], label="measured peak")
    estimates = [row.get("memory_estimate_per_rank") for row in table]
    if all(e is not None for e in estimates):
        for i, (xi, e) in enumerate(zip(f.x, estimates, strict=True)):
            ax.hlines(e / 2**20, xi - 0.4, xi + 0.4, colors="k", linewidth=2,
                      label="estimate before the run" if i == 0 else None)
        ax.legend(fontsize=8, loc="lower right")
    f.finish(fig, ax, "peak_memory.png", "peak memory per rank (MiB, max over ranks)")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    f.grouped_bars(ax, tuple(ph for ph in phases_of(table) if ph in BYTE_PHASES),
                   lambda row, ph: row[f"bytes_{ph}"] / 2**20,
                   lambda ph: "fisher (incl. exchange)" if ph == "fisher" else ph)
    ax.legend(fontsize=8)
    f.finish(fig, ax, "bytes_per_phase.png", "MiB sent per rank (max over ranks)")
    return f.paths
