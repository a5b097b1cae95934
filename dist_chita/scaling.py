"""Scaling tables and plots from the ``prune_report.json`` of one prune run at several world sizes R.

Per run (one row of the CSV), with every per-rank quantity reduced by its max over ranks:

* time per phase T_phase: fisher = the report's "fisher", the wall time of ``fisher_block`` (per-sample
  gradients of A = grad l_i(w_bar) / sqrt(n) AND the row -> column exchange of A, which it contains); exchange =
  the report's "exchange", the part of "fisher" spent exchanging (shown apart, never added to fisher: fisher minus
  exchange is the gradient computation); solver; backsolve; writeback; save; total;
* bytes sent per phase the same way: "fisher" holds all bytes of the fisher collectives (the exchange included);
  "exchange" is whatever a report records under that name (recorded reports have none, so 0);
* speedup and parallel efficiency of the total time against the smallest world size R_0:
  strong scaling (same n): speedup = T_0 / T_R, efficiency = T_0 R_0 / (R T_R);
  weak scaling (n grows with R): efficiency = T_0 / T_R, speedup = (R / R_0) T_0 / T_R;
* peak memory per rank, bytes per solver iteration.

Also the mask comparison: every world size must produce the same mask (``mask_sha256``).
"""

from __future__ import annotations

import csv
from pathlib import Path

TIME_PHASES = ("fisher", "exchange", "solver", "backsolve", "writeback", "save", "total")
BYTE_PHASES = ("fisher", "exchange", "solver", "backsolve", "writeback")
COLUMNS = (
    ["world_size", "threads_per_rank", "oversubscribed", "mode", "n", "p"]
    + [f"time_{ph}" for ph in TIME_PHASES]
    + ["ideal_speedup", "speedup", "efficiency", "peak_memory_per_rank"]
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
            "n": int(rep["n"]),
            "p": int(rep["p"]),
        }
        row.update({f"time_{ph}": _max(per_rank(ps, ph)) for ph in TIME_PHASES})
        row["peak_memory_per_rank"] = int(_max(rep.get("peak_memory_bytes")))
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
    """(all equal, statement): "all N world sizes produced the same mask (sha256 ...)" or which differ."""
    by_size = sorted((int(r["world_size"]), r.get("mask_sha256")) for r in reports)
    digests = {d for _, d in by_size}
    if len(by_size) and len(digests) == 1 and None not in digests:
        d = by_size[0][1]
        return True, f"all {len(by_size)} world sizes produced the same mask (sha256 {d[:16]}...)"
    if None in digests:
        missing = [R for R, d in by_size if d is None]
        return False, f"mask digest missing for world size(s) {missing}; masks cannot be compared"
    ref_size, ref = by_size[0]
    differ = [R for R, d in by_size if d != ref]
    same = [R for R, d in by_size if d == ref]
    return False, (f"masks differ: world size(s) {differ} produced a different mask from world size(s) {same} "
                   f"({len(digests)} distinct digests)")


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


def plot(table: list[dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write time_per_phase.png, speedup_efficiency.png, peak_memory.png and bytes_per_phase.png into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = [row["world_size"] for row in table]
    labels = [str(R) + ("*" if row["oversubscribed"] else "") for R, row in zip(sizes, table, strict=True)]
    x = list(range(len(sizes)))
    mode = table[0]["mode"] if table else "strong"
    note = " (* oversubscribed cores)" if any(row["oversubscribed"] for row in table) else ""
    paths = []

    def label_axes(ax, ylabel: str, subtitle: str = "") -> None:
        ax.set_xticks(x, labels)
        ax.set_xlabel("world size R (ranks)" + note)
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle or f"{title} {mode} scaling".strip(), fontsize=10)

    def finish(fig, ax, name: str, ylabel: str) -> None:
        if ax is not None:
            label_axes(ax, ylabel)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)

    # time per phase: stacked (linear), and grouped per phase (log scale, so that small phases show). In the stack,
    # fisher is drawn as fisher - exchange (the gradient computation) with exchange on top: together time_fisher.
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(table)
    for ph in TIME_PHASES[:-1]:
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
    label_axes(ax, "seconds (max over ranks)", f"{title} {mode} scaling: time per phase (stacked)".strip())
    phases = TIME_PHASES[:-1]
    width = 0.8 / len(phases)
    for i, ph in enumerate(phases):
        label = "fisher (incl. exchange)" if ph == "fisher" else ph
        ax2.bar([xi + (i - (len(phases) - 1) / 2) * width for xi in x],
                [max(row[f"time_{ph}"], 1e-4) for row in table], width, label=label)
    ax2.set_yscale("log")
    ax2.legend(fontsize=7, framealpha=0.6)
    label_axes(ax2, "seconds (max over ranks, log)", "per phase (log scale)")
    finish(fig, None, "time_per_phase.png", "")

    # speedup and efficiency vs ideal
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [row["ideal_speedup"] for row in table], "k--", label="ideal speedup")
    ax.plot(x, [row["speedup"] or 0.0 for row in table], "o-", label="speedup")
    ax.plot(x, [row["efficiency"] or 0.0 for row in table], "s-", label="parallel efficiency")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    finish(fig, ax, "speedup_efficiency.png", "speedup / efficiency (total time)")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(x, [row["peak_memory_per_rank"] / 2**20 for row in table])
    finish(fig, ax, "peak_memory.png", "peak memory per rank (MiB, max over ranks)")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(BYTE_PHASES)
    for i, ph in enumerate(BYTE_PHASES):
        label = "fisher (incl. exchange)" if ph == "fisher" else ph
        ax.bar([xi + (i - (len(BYTE_PHASES) - 1) / 2) * width for xi in x],
               [row[f"bytes_{ph}"] / 2**20 for row in table], width, label=label)
    ax.legend(fontsize=8)
    finish(fig, ax, "bytes_per_phase.png", "MiB sent per rank (max over ranks)")
    return paths
