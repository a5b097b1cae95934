"""Held-out validation of the cost model over the runs of several scaling studies.

    python launch/validate_costmodel.py docs/scaling/mlpnet/reports docs/scaling/mlpnet_weak/reports \\
        [--hardware configs/hardware/cpu_this_machine.yaml] [--out docs/scaling/costmodel_validation.json] \\
        [--min-seconds 0.5] [--target 0.3]

Pools the ``prune_report.json`` files of the given directories (every run in ``<dir>/runs`` when a study repeated
its runs, else ``<dir>/ws<R>.json``), groups them by model and objective (name, p, fisher or layerwise: each
objective's phases have their own formulas, dist_chita.planning.costmodel and dist_chita.planning.layerwise_fit),
merges the runs of one *condition* (world
size, n, threads per rank, storage dtype, method, budget granularity and per-stage work: e.g. R = 2, n = 32 in both
a strong and a weak study) into their median (:func:`dist_chita.planning.scaling.median_of_runs`), and predicts every
condition from rates fitted to the *other* conditions of its group (leave-one-out,
:func:`dist_chita.planning.costmodel.compare_held_out`): a held-out condition never has a twin among the runs its rates
were fitted to. Pooling a strong and a weak study gives conditions that differ in both R and n, so each is predicted
from rates fitted over both. Prints the table and, per phase, the worst absolute relative error over the phases that
took at least ``--min-seconds`` (shorter phases are timer and launch noise; the "sum" of a run counts only when one of
its phases does, :func:`dist_chita.planning.costmodel.scored`), and whether it is within ``--target``. Exit status 0
when every such phase is within the target, 1 when not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from dist_chita.planning import costmodel, layerwise_fit, scaling  # noqa: E402

DEFAULT_HARDWARE = "configs/hardware/cpu_this_machine.yaml"


def load_reports(dirs: list[Path]) -> list[dict]:
    """Every run recorded in ``dirs``: <dir>/runs/ws*.json where a study kept its repeated runs, else
    <dir>/ws<R>.json."""
    reports = []
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"not a directory of reports: {d}")
        paths = sorted((d / "runs").glob("ws*.json")) or sorted(d.glob("ws*.json"))
        if not paths:
            raise ValueError(f"no ws<R>.json reports in {d}")
        for p in paths:
            reports.append(json.loads(p.read_text()))
    return reports


def condition(rep: dict) -> tuple:
    """What makes two runs of one model the same measurement: world size, n, threads per rank, storage dtype,
    method, budget granularity (what the solver's selections communicate), and per CHITA++ stage the weights kept,
    IHT iterations and backsolves (what the cost model's workload is read from)."""
    stages = tuple((s.get("kept"), s.get("iterations"), s.get("backsolves")) for s in rep.get("stages") or [])
    return (int(rep["world_size"]), int(rep["n"]), int(rep.get("threads_per_rank") or 1),
            str(rep.get("storage_dtype")), str(rep.get("method")), costmodel.report_granularity(rep), stages)


def pool(reports: list[dict]) -> list[dict]:
    """One report per :func:`condition` (the median of its runs), in the order conditions first appear."""
    runs: dict[tuple, list[dict]] = {}
    for rep in reports:
        runs.setdefault(condition(rep), []).append(rep)
    return [scaling.median_of_runs(reps) for reps in runs.values()]


def validate(reports: list[dict], hw: costmodel.Hardware, min_seconds: float) -> dict:
    """Leave-one-out rows per model group (name, p and objective) and the worst |error| per phase over phases >=
    ``min_seconds``. A Fisher group is predicted by :mod:`dist_chita.planning.costmodel` and needs 3 conditions, a
    layerwise one by :mod:`dist_chita.planning.layerwise_fit` and needs 2 (its fit takes what one run tells)."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for rep in reports:
        key = (str(rep.get("name", "")), int(rep["p"]), scaling.report_objective(rep))
        groups.setdefault(key, []).append(rep)
    out = {"groups": [], "worst": {}}
    for (name, p, objective), reps in sorted(groups.items()):
        conditions = pool(reps)
        need = 2 if objective == "layerwise" else 3
        if len(conditions) < need:
            raise ValueError(f"model {name!r} (p = {p}, {objective}) has {len(conditions)} distinct run condition(s); "
                             f"leave-one-out needs at least {need}")
        rows = (layerwise_fit.compare_held_out(conditions, hw) if objective == "layerwise"
                else costmodel.compare_held_out(conditions, hw))
        worst = costmodel.worst_errors(rows, min_seconds)
        out["groups"].append({"name": name, "p": p, "objective": objective, "runs": len(reps),
                              "conditions": len(conditions),
                              "runs_per_condition": [int(c.get("repeats") or 1) for c in conditions],
                              "rows": rows, "worst": worst})
        for ph, e in worst.items():
            out["worst"][ph] = max(out["worst"].get(ph, 0.0), e)
    return out


def format_result(result: dict, min_seconds: float, target: float) -> str:
    lines = []
    for g in result["groups"]:
        lines.append(f"{g['name']} (p = {g['p']}, {g.get('objective', 'fisher')}): {g['runs']} runs in "
                     f"{g['conditions']} conditions (medians of "
                     f"{'/'.join(map(str, g['runs_per_condition']))} runs), each condition predicted from rates "
                     "fitted to the others")
        lines.append(f"{'R':>3} {'n':>6} {'phase':<10} {'measured s':>11} {'predicted s':>12} {'error':>9}")
        for row in g["rows"]:
            if row["phase"] in ("writeback", "save") and g.get("objective", "fisher") == "fisher":
                continue
            err = "-" if row["rel_error"] is None else f"{100 * row['rel_error']:+.0f}%"
            mark = "" if costmodel.scored(row, min_seconds) else (
                " (short)" if row["measured"] < min_seconds else " (short phases)")
            lines.append(f"{row['world_size']:>3} {row['n']:>6} {row['phase']:<10} {row['measured']:>11.3f} "
                         f"{row['predicted']:>12.3f} {err:>9}{mark}")
    worst = ", ".join(f"{ph} {100 * e:.0f}%" for ph, e in sorted(result["worst"].items()))
    ok = all(e <= target for e in result["worst"].values())
    lines.append(f"worst held-out |error| over phases >= {min_seconds:g} s: {worst or 'none'} "
                 f"({'all within' if ok else 'NOT all within'} {100 * target:.0f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="directories of ws<R>.json reports (e.g. docs/scaling/*/reports)")
    ap.add_argument("--hardware", default=DEFAULT_HARDWARE)
    ap.add_argument("--out", default=None, help="write the rows and worst errors as JSON")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="phases shorter than this are not scored")
    ap.add_argument("--target", type=float, default=0.3, help="largest acceptable |relative error|")
    args = ap.parse_args(argv)
    try:
        hw = costmodel.Hardware.from_dict(yaml.safe_load(Path(args.hardware).read_text()))
        result = validate(load_reports([Path(d) for d in args.reports]), hw, args.min_seconds)
    except (ValueError, OSError, KeyError, yaml.YAMLError, json.JSONDecodeError) as e:
        print(f"validate_costmodel.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_result(result, args.min_seconds, args.target))
    if args.out:
        result.update(hardware=hw.name, min_seconds=args.min_seconds, target=args.target)
        Path(args.out).write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {args.out}")
    return 0 if all(e <= args.target for e in result["worst"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
