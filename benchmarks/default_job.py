"""The embedded default job as a user runs it, on 2 processes and on 1: held-out fidelity, memory per rank against
the estimate printed before the run, seconds per phase, and whether both runs give the same mask.

    python benchmarks/default_job.py [--world-sizes 2 1]

World size 2 runs ``accelerate launch --config_file launch/accelerate/cpu_2.yaml launch/prune.py``, world size 1
``python launch/prune.py threads_per_rank=1``, each into a temporary output directory; the fields of each run's
``prune_report.json`` that say how it went (docs/report-format.md) go into benchmarks/results/default_job.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "default_job.json"
KEPT = ("world_size", "threads_per_rank", "streaming_stores", "method", "objective", "ridge", "n", "p", "global",
        "metric", "solver_iterations", "phase_seconds", "peak_memory_bytes", "memory_estimate_bytes", "mask_sha256")


def command(world_size: int, output_dir: Path) -> list[str]:
    """How a user runs the default job on ``world_size`` processes (one thread each on one process)."""
    out = [f"output.dir={output_dir}"]
    if world_size == 1:
        return [sys.executable, "launch/prune.py", "threads_per_rank=1", *out]
    return ["accelerate", "launch", "--config_file", f"launch/accelerate/cpu_{world_size}.yaml", "launch/prune.py",
            *out]


def run(world_size: int, work: Path) -> dict:
    output_dir = work / f"ws{world_size}"
    argv = command(world_size, output_dir)
    print(" ".join(argv), flush=True)
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"default_job.py: the run on {world_size} process(es) failed:\n{res.stderr[-3000:]}")
    report = json.loads((output_dir / "prune_report.json").read_text())
    shown = [a.replace(str(output_dir), "<out>").replace(sys.executable, "python") for a in argv]
    stage = (report.get("stages") or [{}])[-1]
    return {"command": shown, **{k: report[k] for k in KEPT if k in report},
            "stage": {k: stage.get(k) for k in ("objective", "magnitude_objective", "iterations")}}


def machine() -> dict:
    """The machine facts the results page shows: CPU model, cores this process may use, torch's version."""
    import os

    import torch

    model = None
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), None)
    return {"cpu_model": model, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="default_job_") as work:
        runs = [run(R, Path(work)) for R in args.world_sizes]
    masks = {r["mask_sha256"] for r in runs}
    result = {"machine": machine(), "runs": runs, "same_mask": len(masks) == 1}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        total = max(r["phase_seconds"]["total"])
        print(f"{r['world_size']} process(es): metric {r.get('metric')}, total {total:.1f} s, "
              f"peak {max(r['peak_memory_bytes']) / 2**30:.2f} GiB per rank against an estimate of "
              f"{r['memory_estimate_bytes']['total'] / 2**30:.2f} GiB")
    print(f"same mask on every run: {result['same_mask']}\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
