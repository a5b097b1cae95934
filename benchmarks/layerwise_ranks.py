"""Layerwise CHITA, SparseGPT and Wanda side by side on 1 and 2 processes: time per phase, objective, fidelity, masks.

The default job (configs/default.yaml: all-MiniLM-L6-v2, layerwise objective, per row, n = 128) pruned through the
real launcher, ``launch/prune.py`` under ``torchrun --standalone`` (or ``accelerate launch``, gloo), one thread per
process, with ``prune.method`` = chita, sparsegpt, wanda at every setting (unstructured 50% and 70%, 2:4), on 1 and
2 processes. The runs of one (setting, method) follow each other, the order of the world sizes alternating from one
pair to the next (1, 2, then 2, 1, ...), so a busy spell of the shared machine hits both. Per run, from its
``prune_report.json``:

* each phase's seconds per rank (curvature passes, solve, write-back; load, evaluation, save, total) and the max over
  ranks; the prune time: the max over ranks of curvature + solve + write-back (the write-back's all-reduce is where
  a rank waits for a slower one, so the solve phase's max is the ranks' own work);
* the speed-up of every phase and of the prune time, 1 process over 2;
* the summed reconstruction objective and the held-out fidelity (cosine / nearest-neighbour agreement);
* whether the 2-process run gave the same mask digest AND bit-identical weights (every tensor of the saved
  ``model.safetensors``) as the 1-process run;
* the 1-minute load average before and after;
* before the runs, a concurrency check of the machine: the solve of one block of the default job's layer shapes
  (four 384 x 384, 1536 x 384, 384 x 1536; synthetic curvature) by CHITA and by SparseGPT, in one process alone and
  in two processes at once (1 thread each, started together): wall and CPU seconds of each. Two processes on two
  cores can be faster than one by at most 2 x (alone / together): the ceiling this machine puts on the solve
  phase's speed-up, whatever the sharing of the work.

    python benchmarks/layerwise_ranks.py [--quick] [--settings 0.5 0.7 2:4] [--methods chita sparsegpt wanda]
        [--launcher torchrun|accelerate] [--work-dir DIR] [--timeout 1800] [--out FILE] [key=value ...]

``--quick``: only 50%, for a short check of the script (6 launches: 12 minutes at a load average of 8 on this
machine's 2 cores, CHITA's two runs two thirds of it). Each launch also loads the model, runs the held-out
evaluation before and after and saves the model (20-50 s besides the prune). The full run is 18 launches, about
three times the quick one. Writes benchmarks/results/layerwise_ranks.json at the end (and every finished run to
<work>/runs.json as it goes). Exit status 1 when a run failed or the masks or weights of 1 and 2 processes
differ.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launch.scaling_study import StudyError, collect_report, git_state, prune_command, rank_env, run_one  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "layerwise_ranks.json"
CONFIG = "configs/default.yaml"
PRUNE_PHASES = ("curvature", "solver", "writeback")
OTHER_PHASES = ("load", "eval_before", "eval_after", "save", "total")
WORLD_SIZES = (1, 2)


BLOCK_SHAPES = ((384, 384),) * 4 + ((1536, 384), (384, 1536))  # (rows, inputs) of one MiniLM block's layers


def block_problems(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W_bar, H) of every layer of :data:`BLOCK_SHAPES`: H = X^T X / N of N = 2048 correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, d in BLOCK_SHAPES:
        X = torch.randn(2048, d, generator=g) @ (torch.eye(d) + torch.randn(d, d, generator=g) / d**0.5)
        out.append((0.05 * torch.randn(r, d, generator=g), X.T @ X / 2048))
    return out


def solve_block(method: str, barrier, results) -> None:
    """Solve :func:`block_problems` at 50% per row with ``method`` on 1 thread, after ``barrier``; put
    (wall seconds, CPU seconds) on ``results``."""
    from dist_chita.layerwise.row_solver import solve_rows
    from dist_chita.methods.sparsegpt import sparsegpt_rows

    torch.set_num_threads(1)
    problems = block_problems()
    barrier.wait()
    t, c = time.perf_counter(), time.process_time()
    for W, H in problems:
        if method == "chita":
            solve_rows(W, H, 0.01 * float(H.diagonal().mean()), k=W.shape[1] // 2)
        else:
            sparsegpt_rows(W, H, 0.5, damp=0.01, per_row=True)
    results.put((time.perf_counter() - t, time.process_time() - c))


def concurrency_check(methods: tuple[str, ...] = ("chita", "sparsegpt")) -> dict:
    """Per method: wall and CPU seconds of :func:`solve_block` alone and (the mean of) two copies at once, the
    slow-downs together over alone, and the ceiling 2 x alone / together on a 2-process speed-up."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for method in methods:
        timed = {}
        for copies in (1, 2):
            barrier, results = ctx.Barrier(copies), ctx.Queue()
            procs = [ctx.Process(target=solve_block, args=(method, barrier, results)) for _ in range(copies)]
            for p in procs:
                p.start()
            got = [results.get(timeout=600) for _ in procs]
            for p in procs:
                p.join()
            timed[copies] = [sum(x[i] for x in got) / copies for i in (0, 1)]
        (wall1, cpu1), (wall2, cpu2) = timed[1], timed[2]
        out[method] = {"alone_wall": wall1, "alone_cpu": cpu1, "together_wall": wall2, "together_cpu": cpu2,
                       "wall_slowdown": wall2 / wall1, "cpu_slowdown": cpu2 / cpu1, "ceiling": 2 * wall1 / wall2}
        print(f"concurrency: {method} alone {wall1:.2f} s (CPU {cpu1:.2f}), two at once {wall2:.2f} s (CPU "
              f"{cpu2:.2f}): a 2-process speed-up of at most {2 * wall1 / wall2:.2f}x", flush=True)
    return out


def setting_overrides(method: str, setting: str) -> list[str]:
    """The launcher's overrides of one run: the method, the sparsity or N:M pattern, no magnitude baseline (a
    second pruning of every layer that is not what is compared here)."""
    target = f"prune.nm={setting}" if ":" in setting else f"prune.sparsity={float(setting):g}"
    return [f"prune.method={method}", target, "eval.compare_magnitude=false"]


def phase_figures(report: dict) -> dict:
    """Seconds per rank and their max over ranks for every phase, and the prune time (the max over ranks of
    curvature + solve + write-back)."""
    ps = report["phase_seconds"]
    ranks = int(report["world_size"])
    per_rank = {ph: [float(v) for v in ps.get(ph, [0.0] * ranks)] for ph in (*PRUNE_PHASES, *OTHER_PHASES)}
    prune = [sum(per_rank[ph][q] for ph in PRUNE_PHASES) for q in range(ranks)]
    return {"seconds_per_rank": per_rank, "seconds": {ph: max(v) for ph, v in per_rank.items()},
            "prune_seconds": max(prune), "prune_seconds_per_rank": prune}


def run_record(report: dict, load_before: float, load_after: float) -> dict:
    """What the JSON keeps of one run's report."""
    stage = report["stages"][-1]
    metric = report["metric"]
    return {"world_size": int(report["world_size"]), "threads_per_rank": int(report["threads_per_rank"]),
            **phase_figures(report), "objective": stage["objective"], "cosine": metric.get("after"),
            "nn_agreement": metric.get("after_nn_agreement"), "sparsity": report["global"]["sparsity"],
            "mask_sha256": report["mask_sha256"], "load_before": load_before, "load_after": load_after}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two saved models hold the same tensors, bit for bit."""
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def speedups(one: dict, two: dict) -> dict:
    """1-process seconds over 2-process seconds (max over ranks) of every prune phase and of the prune time."""
    out = {ph: one["seconds"][ph] / two["seconds"][ph] if two["seconds"][ph] > 0 else None for ph in PRUNE_PHASES}
    out["prune"] = one["prune_seconds"] / two["prune_seconds"]
    return out


class Runner:
    """Launches the runs into ``work`` and keeps every finished one in ``work``/runs.json."""

    def __init__(self, launcher: str, work: Path, timeout: float, extra: list[str]):
        self.launcher, self.work, self.timeout, self.extra = launcher, work, timeout, extra
        self.done: dict[str, dict] = {}
        self.commands: dict[str, list[str]] = {}

    def run(self, method: str, setting: str, world: int) -> tuple[dict, Path]:
        name = f"{setting.replace(':', '-')}_{method}_ws{world}"
        out = (self.work / name).resolve()
        overrides = [*setting_overrides(method, setting), *self.extra]
        cmd = prune_command(self.launcher, world, CONFIG, "launch/prune.py", str(out), 1, overrides)
        self.commands[name] = prune_command(self.launcher, world, CONFIG, "launch/prune.py", f"<work>/{name}", 1,
                                            overrides)
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        run_one(cmd, rank_env(1), self.work / "logs" / f"{name}.log", self.timeout)
        record = run_record(collect_report(out, world, self.launcher), load_before, os.getloadavg()[0])
        record["wall_seconds"] = time.perf_counter() - t
        self.done[name] = record
        (self.work / "runs.json").write_text(json.dumps(self.done, indent=2) + "\n")
        print(f"  {name:24s} prune {record['prune_seconds']:6.1f} s ("
              + ", ".join(f"{ph} {record['seconds'][ph]:.1f}" for ph in PRUNE_PHASES)
              + f")  objective {record['objective']:.6g}  cosine {record['cosine']:.4f}  "
              f"load {load_before:.1f} -> {record['load_after']:.1f}", flush=True)
        return record, out

    def pair(self, method: str, setting: str, first: int) -> dict:
        """Both world sizes of one (setting, method), ``first`` first; the saved models are removed after the
        comparison."""
        order = WORLD_SIZES if first == WORLD_SIZES[0] else WORLD_SIZES[::-1]
        runs = {world: self.run(method, setting, world) for world in order}
        (one, dir1), (two, dir2) = runs[1], runs[2]
        same = same_weights(dir1, dir2)
        for d in (dir1, dir2):
            (d / "model.safetensors").unlink(missing_ok=True)
        return {"processes": {str(w): runs[w][0] for w in WORLD_SIZES}, "order": list(order),
                "speedup": speedups(one, two), "same_mask": one["mask_sha256"] == two["mask_sha256"],
                "same_weights": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only 50%%: a short check of the script")
    ap.add_argument("--settings", nargs="+", default=None, help="sparsities or N:M (default 0.5 0.7 2:4)")
    ap.add_argument("--methods", nargs="+", default=["chita", "sparsegpt", "wanda"])
    ap.add_argument("--launcher", default="torchrun", choices=("torchrun", "accelerate"))
    ap.add_argument("--work-dir", default=None, help="where the runs write (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--out", default=str(RESULTS), help="the JSON written at the end (default %(default)s)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the default config, for every run")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()  # paths given relative to where the script was started
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="layerwise_ranks_"))
    os.chdir(ROOT)  # the commands name the config and the launcher relative to the checkout
    settings = args.settings or (["0.5"] if args.quick else ["0.5", "0.7", "2:4"])
    runner = Runner(args.launcher, work, args.timeout, args.overrides)
    results: dict[str, dict] = {}
    t0, load0, state = time.perf_counter(), os.getloadavg()[0], git_state()
    load_check = os.getloadavg()[0]
    concurrency = {**concurrency_check(), "load_before": load_check, "load_after": os.getloadavg()[0]}
    try:
        j = 0
        for setting in settings:
            results[setting] = {}
            for method in args.methods:
                results[setting][method] = runner.pair(method, setting, WORLD_SIZES[j % 2])
                j += 1
                p = results[setting][method]
                print(f"{setting} {method}: 2 processes over 1: "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in p["speedup"].items() if v is not None)
                      + f"; same mask {p['same_mask']}, same weights {p['same_weights']}", flush=True)
    except (StudyError, OSError, KeyError, ValueError) as e:
        print(f"layerwise_ranks.py: error: {' '.join(str(e).split())} (finished runs: {work / 'runs.json'})",
              file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": "all-MiniLM-L6-v2", "config": CONFIG, "quick": args.quick, "settings_run": settings,
        "methods": args.methods, "world_sizes": list(WORLD_SIZES), "threads_per_process": 1,
        "launcher": args.launcher, "overrides": args.overrides, "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__, "machine": platform.machine(), "git": state,
        "commands": runner.commands, "wall_seconds": time.perf_counter() - t0, "load_before": load0,
        "load_after": os.getloadavg()[0], "concurrency": concurrency, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    same = all(p["same_mask"] and p["same_weights"] for s in results.values() for p in s.values())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
