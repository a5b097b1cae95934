"""Scaling study: the same prune at several world sizes, its CSV, plots, mask check and cost-model validation.

    python launch/scaling_study.py --config configs/mlpnet_mnist.yaml --world-sizes 1,2,4 \\
        [--mode strong|weak] [--launcher accelerate|torchrun|python] [--threads-per-rank 1] \\
        [--out docs/scaling/<name>] [--hardware configs/hardware/cpu_this_machine.yaml] \\
        [--prune-script launch/prune.py] [--work-dir DIR] [--repeats N] [key=value ...]

For every world size R it runs (on CPU, gloo)

    accelerate launch --config_file launch/accelerate/cpu_<R>.yaml launch/prune.py --config <run>.yaml \\
        [key=value ...] output.dir=<work>/ws<R> output.overwrite=true world_size=<R> threads_per_rank=<t> \\
        [calibration.n=<n R>  (weak scaling)]

(``--launcher torchrun``: ``torchrun --standalone --nproc_per_node R ...``; ``--launcher python``: one plain
process, for dry runs of a stand-in script) with OMP_NUM_THREADS = MKL_NUM_THREADS = t, collects each run's
prune_report.json (copied to <out>/reports/ws<R>.json), and writes <out>/scaling.csv, the PNG plots, and
<out>/summary.json; prints the table, the mask statement (every world size must give the same mask), the
oversubscription note (R t > cores: ranks share cores, so times do not show what one device per rank would),
and the cost model's predicted vs measured seconds per phase, with rates fitted to these runs and, for each world
size, fitted to the others. The phases and the cost model follow the runs' objective: Fisher's (fisher, exchange,
solver, backsolve; dist_chita.planning.costmodel) or the layerwise one's (curvature, solver, writeback;
dist_chita.planning.layerwise_fit).

Strong scaling keeps the config's n; weak scaling runs n R samples at world size R (n per rank fixed).
``--repeats N`` runs every world size N times, interleaved (1, 2, 4, 1, 2, 4, ...); the table, plots and cost model
then use each world size's median per rank and phase (reports/ws<R>.json), every run is kept in reports/runs/, and
the mask check covers all runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from dist_chita.planning import costmodel, layerwise_fit, scaling  # noqa: E402

LAUNCHERS = ("accelerate", "torchrun", "python")
DEFAULT_HARDWARE = "configs/hardware/cpu_this_machine.yaml"


class StudyError(RuntimeError):
    """A failed run or a bad argument; the message is one line."""


def parse_world_sizes(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4] (distinct, >= 1, kept in the given order sorted ascending)."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise StudyError(f"--world-sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise StudyError(f"--world-sizes: need distinct integers >= 1, got {text!r}")
    return sorted(sizes)


def study_n(mode: str, base_n: int, world_size: int) -> int | None:
    """calibration.n at world size R: None (the config's n) for strong scaling, n R for weak scaling."""
    if mode == "strong":
        return None
    if mode == "weak":
        return base_n * world_size
    raise StudyError(f"--mode must be strong or weak, got {mode!r}")


def prune_command(
    launcher: str,
    world_size: int,
    config: str,
    prune_script: str,
    output_dir: str,
    threads_per_rank: int,
    overrides: list[str] = (),
    n: int | None = None,
    python: str = sys.executable,
    accelerate_configs: str = "launch/accelerate",
) -> list[str]:
    """The argv that runs the prune at ``world_size`` ranks (pure: no files are checked or written).

    Args:
        launcher: "accelerate" (``accelerate launch --config_file <accelerate_configs>/cpu_<R>.yaml``),
            "torchrun" (``torchrun --standalone --nproc_per_node R``) or "python" (one plain process).
        world_size: R; config: the run config path; prune_script: launch/prune.py or a stand-in.
        output_dir: output.dir of this run; threads_per_rank: t.
        overrides: extra key=value overrides, placed before the study's own (output.dir, world_size,
            threads_per_rank and the weak-scaling calibration.n, which must win).
        n: calibration.n override (weak scaling: n R, with n from the config after ``overrides``), None to keep it.
    """
    if launcher == "accelerate":
        head = ["accelerate", "launch", "--config_file", f"{accelerate_configs}/cpu_{world_size}.yaml"]
    elif launcher == "torchrun":
        head = ["torchrun", "--standalone", "--nproc_per_node", str(world_size)]
    elif launcher == "python":
        head = [python]
    else:
        raise StudyError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    args = [prune_script, "--config", config, *overrides, f"output.dir={output_dir}", "output.overwrite=true",
            f"world_size={world_size}", f"threads_per_rank={threads_per_rank}"]
    if n is not None:
        args.append(f"calibration.n={n}")
    return head + args


def rank_env(threads_per_rank: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a run: ``base`` (default os.environ) with OMP/MKL threads set to t per rank."""
    env = dict(os.environ if base is None else base)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads_per_rank)
    return env


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def config_n(config: str, overrides: list[str]) -> int:
    """calibration.n of the run config (after overrides)."""
    from launch.config import load_config

    return load_config(config, overrides).calibration.n


def git_state() -> dict:
    """Commit and locally modified files of the checkout the runs use (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    head, status = git("rev-parse", "HEAD"), git("status", "--short", "--untracked-files=no")
    return {"commit": head.strip() if head else None,
            "modified": [ln[3:] for ln in status.splitlines()] if status else []}


def run_one(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StudyError(f"run timed out after {timeout:.0f} s (log: {log_path})") from None
        except FileNotFoundError as e:
            raise StudyError(f"cannot start {cmd[0]!r}: {e.strerror}") from None
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise StudyError(f"{' '.join(cmd[:4])} ... exited with status {proc.returncode} (log: {log_path})")


def collect_report(output_dir: Path, world_size: int, launcher: str) -> dict:
    path = Path(output_dir) / "prune_report.json"
    if not path.is_file():
        raise StudyError(f"no prune_report.json in {output_dir}")
    rep = json.loads(path.read_text())
    if int(rep.get("world_size", -1)) != world_size and launcher != "python":
        raise StudyError(f"{path}: the prune ran on {rep.get('world_size')} process(es), expected {world_size}")
    return rep


def cost_model_check(reports: list[dict], hardware: costmodel.Hardware, objective: str) -> tuple[dict, list, list]:
    """(fitted rates, in-sample rows, held-out rows) of the objective's cost model: the Fisher phases of
    :mod:`dist_chita.planning.costmodel`, or the layerwise ones of :mod:`dist_chita.planning.layerwise_fit`."""
    if objective == "layerwise":
        fitted = layerwise_fit.fit(reports, hardware)
        held_out = layerwise_fit.compare_held_out(reports, hardware) if len(reports) >= 2 else []
        return fitted.as_dict(), layerwise_fit.compare(reports, hardware, fitted), held_out
    rates = costmodel.calibrate(reports, hardware)
    held_out = costmodel.compare_held_out(reports, hardware) if len(reports) >= 2 else []
    return rates.as_dict(), costmodel.compare(reports, hardware, rates), held_out


def summarize(
    reports: list[dict], mode: str, cores: int, hardware: costmodel.Hardware, title: str = "",
    runs: list[dict] | None = None,
) -> dict:
    """The study's summary (pure): table rows, mask statement, oversubscription note, fitted rates,
    predicted vs measured seconds per phase. ``reports``: one per world size (the median of its repeated runs,
    :func:`dist_chita.planning.scaling.median_of_runs`); ``runs``: every run, repeats included, for the mask comparison
    (default: ``reports``)."""
    table = scaling.rows(reports, mode, cores=cores)
    same, statement = scaling.mask_statement(runs or reports)
    ns = sorted({int(r["n"]) for r in reports})
    if mode == "weak" and len(ns) > 1:  # a different n is a different problem: masks need not agree
        same = None
        statement = (f"not compared: weak scaling prunes with a different n at each world size ({ns}), so the masks "
                     f"are different problems' ({statement})")
    over = [row["world_size"] for row in table if row["oversubscribed"]]
    notes = []
    if over:
        t = table[0]["threads_per_rank"]
        notes.append(f"world size(s) {over} x {t} thread(s) per rank oversubscribe the {cores} shared cores: ranks "
                     "time-share cores, so their times show the cost of sharing, not of one device per rank")
    objective = table[0]["objective"]
    if {row["objective"] for row in table} != {objective}:
        raise StudyError(f"the runs prune with different objectives: {sorted({row['objective'] for row in table})}")
    rates, comparison, held_out = cost_model_check(reports, hardware, objective)

    repeats = sorted({int(r.get("repeats") or 1) for r in reports})
    if repeats != [1]:
        notes.append(f"times are medians over {'/'.join(map(str, repeats))} runs per world size (per rank and "
                     "phase; peak memory: the max); reports/runs holds every run")
    return {
        "name": title or reports[0].get("name", ""),
        "mode": mode,
        "objective": objective,
        "repeats": repeats[-1],
        "world_sizes": [row["world_size"] for row in table],
        "threads_per_rank": sorted({row["threads_per_rank"] for row in table}),
        "cores": cores,
        "oversubscribed_world_sizes": over,
        "notes": notes,
        "per_rank_seconds": {str(r["world_size"]): {ph: scaling.per_rank(r.get("phase_seconds") or {}, ph)
                                                     for ph in scaling.phases_of(table)} for r in reports},
        "masks_equal": same,
        "mask_statement": statement,
        "rows": table,
        "hardware": hardware.name,
        "rates": rates,
        "comparison": comparison,
        "max_abs_rel_error_by_phase": costmodel.worst_errors(comparison, 0.05),  # ignore sub-50 ms phases
        "comparison_held_out": held_out,
        "max_abs_rel_error_by_phase_held_out": costmodel.worst_errors(held_out, 0.05),
        "comparison_note": "comparison: rates fitted to these same runs (in-sample); comparison_held_out: each world "
                           "size predicted from rates fitted to the others; phases under 50 ms are left out of the "
                           "max errors" + ("; layerwise: the formulas of dist_chita.planning.layerwise fitted by "
                                           "dist_chita.planning.layerwise_fit, the phases of the rank with the most "
                                           "solver seconds" if objective == "layerwise" else ""),
    }


def format_summary(summary: dict) -> str:
    phases = scaling.phases_of(summary["rows"])
    head = (f"{'R':>3} {'t':>2} " + " ".join(f"{ph[:9]:>9}" for ph in phases)
            + f" {'total':>8} {'speedup':>7} {'eff':>5} {'peak MiB':>9} {'est MiB':>8}")
    lines = [f"scaling study {summary['name']}: {summary['mode']} scaling on {summary['cores']} cores, objective "
             f"{summary.get('objective', 'fisher')}", head]
    for r in summary["rows"]:
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        ef = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        est = "-" if r.get("memory_estimate_per_rank") is None else f"{r['memory_estimate_per_rank'] / 2**20:.0f}"
        lines.append(f"{r['world_size']:>3} {r['threads_per_rank']:>2} "
                     + " ".join(f"{r[f'time_{ph}']:9.2f}" for ph in phases)
                     + f" {r['time_total']:8.2f} {sp:>7} {ef:>5} {r['peak_memory_per_rank'] / 2**20:9.0f} {est:>8}")
    lines.append(f"mask: {summary['mask_statement']}")
    lines += [f"note: {note}" for note in summary["notes"]]
    lines.append(f"cost model on {summary['hardware']}: predicted vs measured, rates fitted to these runs:")
    lines.append(costmodel.format_comparison(summary["comparison"]))
    if summary["comparison_held_out"]:
        lines.append("held out (each world size predicted from rates fitted to the other runs):")
        lines.append(costmodel.format_comparison(summary["comparison_held_out"]))
    return "\n".join(lines)


def strict_json(value):
    """``value`` with every non-finite float replaced by None, so that the file is strict JSON (a rate the fit could
    not pin down comes out infinite; ``null`` says so to any parser)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_outputs(summary: dict, reports: list[dict], out: Path, runs: dict[str, dict] | None = None) -> list[Path]:
    """The CSV, plots and summary.json; reports/ws<R>.json (one per world size) and, for repeated runs,
    reports/runs/<run>.json (``runs``: name -> report)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    for rep in reports:
        (out / "reports" / f"ws{rep['world_size']}.json").write_text(json.dumps(rep, indent=2, default=float))
    if runs:
        (out / "reports" / "runs").mkdir(exist_ok=True)
        for name, rep in runs.items():
            (out / "reports" / "runs" / f"{name}.json").write_text(json.dumps(rep, indent=2, default=float))
    paths = [scaling.write_csv(summary["rows"], out / "scaling.csv")]
    paths += scaling.plot(summary["rows"], out, title=f"{summary['name']} ({summary.get('objective', 'fisher')})")
    (out / "summary.json").write_text(json.dumps(strict_json(summary), indent=2, default=float, allow_nan=False))
    return paths + [out / "summary.json"]


def rebuild(reports_dir: Path, out: Path, mode: str, hardware: costmodel.Hardware, sizes: list[int]) -> int:
    """Outputs from recorded reports (<reports_dir>/ws<R>.json and, if there, the repeated runs in
    <reports_dir>/runs), without running anything."""
    paths = sorted(reports_dir.glob("ws*.json"))
    reports = [json.loads(p.read_text()) for p in paths]
    reports = [r for r in reports if int(r["world_size"]) in sizes]
    runs = [json.loads(p.read_text()) for p in sorted((reports_dir / "runs").glob("ws*.json"))]
    runs = [r for r in runs if int(r["world_size"]) in sizes] or None
    if not reports:
        print(f"scaling_study.py: error: no ws<R>.json reports for {sizes} in {reports_dir}", file=sys.stderr)
        return 2
    old = out / "summary.json"
    previous = json.loads(old.read_text()) if old.is_file() else {}
    summary = summarize(reports, mode, machine_cores(), hardware, title=reports[0].get("name", ""), runs=runs)
    for key in ("launcher", "commands", "load_average_1min", "git"):
        if key in previous:
            summary[key] = previous[key]
    summary["notes"] += [n for n in previous.get("notes", []) if n not in summary["notes"]]
    out_paths = write_outputs(summary, reports, out)
    print(format_summary(summary))
    print("wrote " + ", ".join(str(p) for p in out_paths))
    return 1 if summary["masks_equal"] is False else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", required=True, help="run config (configs/<run>.yaml)")
    ap.add_argument("--world-sizes", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    ap.add_argument("--mode", default="strong", choices=("strong", "weak"))
    ap.add_argument("--launcher", default="accelerate", choices=LAUNCHERS)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--out", default=None, help="output directory (default docs/scaling/<config name>)")
    ap.add_argument("--hardware", default=DEFAULT_HARDWARE, help="hardware YAML for the cost model")
    ap.add_argument("--prune-script", default="launch/prune.py", help="the prune script (or a stand-in)")
    ap.add_argument("--work-dir", default=None, help="where the runs write (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per world size, interleaved (1, 2, 4, 1, 2, 4, ...); times are the medians")
    ap.add_argument("--from-reports", default=None,
                    help="skip the runs: rebuild the outputs from a directory of recorded reports (ws<R>.json)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides passed to every run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done and all masks equal (or not comparable: weak scaling); 1 a run failed or masks differ;
    2 bad arguments."""
    args = parse_args(argv)
    try:
        sizes = parse_world_sizes(args.world_sizes)
        if args.threads_per_rank < 1:
            raise StudyError(f"--threads-per-rank must be >= 1, got {args.threads_per_rank}")
        if args.repeats < 1:
            raise StudyError(f"--repeats must be >= 1, got {args.repeats}")
        for path in (args.config, args.hardware, args.prune_script):
            if not Path(path).is_file():
                raise StudyError(f"file not found: {path}")
        hardware = costmodel.Hardware.from_dict(yaml.safe_load(Path(args.hardware).read_text()))
        base_n = config_n(args.config, args.overrides) if args.mode == "weak" else 0
    except (StudyError, ValueError, OSError, yaml.YAMLError) as e:
        print(f"scaling_study.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out = Path(args.out or f"docs/scaling/{Path(args.config).stem}")
    if args.from_reports:
        return rebuild(Path(args.from_reports), out, args.mode, hardware, sizes)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="scaling_"))
    commands, loads, states = {}, {}, {}
    try:
        runs: dict[str, dict] = {}
        for j in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every world size
            for R in sizes:
                name = f"ws{R}" if args.repeats == 1 else f"ws{R}.run{j + 1}"
                run_dir = (work / name).resolve()
                n = study_n(args.mode, base_n, R)
                cmd = prune_command(args.launcher, R, args.config, args.prune_script, str(run_dir),
                                    args.threads_per_rank, args.overrides, n)
                commands[f"ws{R}"] = prune_command(args.launcher, R, args.config, args.prune_script,
                                                   f"<work>/{name}", args.threads_per_rank, args.overrides, n)
                print(f"[{name}] {' '.join(cmd)}", flush=True)
                states[name] = git_state()
                load_before = os.getloadavg()[0]
                run_one(cmd, rank_env(args.threads_per_rank), work / "logs" / f"{name}.log", args.timeout)
                loads[name] = {"before": load_before, "after": os.getloadavg()[0]}
                runs[name] = collect_report(run_dir, R, args.launcher)
                print(f"[{name}] done: total {max(runs[name]['phase_seconds']['total']):.2f} s", flush=True)
        reports = [scaling.median_of_runs([rep for rep in runs.values() if int(rep["world_size"]) == R])
                   for R in sizes]
        summary = summarize(reports, args.mode, machine_cores(), hardware, title=reports[0].get("name", ""),
                            runs=list(runs.values()))
        summary["launcher"] = args.launcher
        summary["commands"] = commands
        summary["load_average_1min"] = loads
        summary["git"] = states
        modified = sorted({f for st in states.values() for f in st["modified"]})
        if modified:
            summary["notes"].append(f"runs used a checkout with uncommitted changes to {', '.join(modified)}")
        busy = {k: v for k, v in loads.items() if max(v.values()) > summary["cores"]}
        if busy:
            summary["notes"].append(f"the machine was shared during the runs (1-minute load average above the "
                                    f"{summary['cores']} cores for {', '.join(busy)}): absolute times include "
                                    "contention from other processes")
        paths = write_outputs(summary, reports, out, runs if args.repeats > 1 else None)
    except (StudyError, ValueError, OSError) as e:
        print(f"scaling_study.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(format_summary(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if summary["masks_equal"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
