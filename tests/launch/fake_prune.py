"""Stand-in for launch/prune.py in the scaling-study tests: writes a plausible prune_report.json, nothing else.

    fake_prune.py --config <yaml> output.dir=<dir> world_size=<R> threads_per_rank=<t> [calibration.n=<n>] ...

World size and rank come from the launcher's environment (WORLD_SIZE, RANK), else from ``world_size=``; only rank 0
writes. Phase times shrink like 1 / R (fisher like n / R); the mask digest is fixed unless FAKE_PRUNE_BAD_MASK_AT
names this world size; with FAKE_PRUNE_JITTER set, repeated runs' solver times differ (run 2: 3x, run 3: 0.5x).
The report records OMP_NUM_THREADS as threads_per_rank, so tests can check the environment.
No torch import: it must start fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
    if "--config" not in argv or "output.dir" not in overrides:
        print("fake_prune: need --config and output.dir=", file=sys.stderr)
        return 2
    R = int(os.environ.get("WORLD_SIZE", overrides.get("world_size", 1)))
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    n = int(overrides.get("calibration.n", 1000))
    p, iters = 32360, 20
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    exchange = [0.01 * (R - 1)] * R
    fisher = [2.0e-3 * n / R + e for e in exchange]  # like fisher_block's wall time: the exchange is inside it
    solver = [4.0 / R + 0.05 * (R - 1)] * R
    if os.environ.get("FAKE_PRUNE_JITTER"):  # repeated runs (output.dir .../ws<R>.run<j>): run j's solver times f_j
        run = overrides["output.dir"].rsplit(".run", 1)
        f = {"2": 3.0, "3": 0.5}.get(run[1], 1.0) if len(run) == 2 else 1.0
        solver = [f * (s + 0.01 * r) for r, s in enumerate(solver)]
    seconds = {"load": [0.5] * R, "fisher": fisher, "exchange": exchange, "solver": solver,
               "backsolve": [0.2] * R, "writeback": [0.01] * R, "save": [0.1] + [0.0] * (R - 1)}
    seconds["total"] = [sum(v[r] for ph, v in seconds.items() if ph != "exchange") for r in range(R)]
    bad = os.environ.get("FAKE_PRUNE_BAD_MASK_AT")
    report = {
        "version": 1, "name": "fake", "config": {"calibration": {"n": n, "batch_size": 250}},
        "world_size": R, "threads_per_rank": threads, "device": "cpu", "backend": "gloo", "method": "chita",
        "n": n, "p": p, "model_params": p, "storage_dtype": "float32",
        "global": {"p": p, "kept": p // 10, "sparsity": 0.9},
        "layers": [{"name": "fc1", "shape": [40, 784], "size": 31360, "kept": 3000, "sparsity": 0.9}],
        "phase_seconds": seconds,
        "bytes_sent": {"fisher": [n * p * 4 * (R - 1) // R**2] * R, "solver": [4000 * iters if R > 1 else 0] * R,
                       "backsolve": [8 * n * n if R > 1 else 0] * R, "writeback": [0] * R},
        "solver_iterations": iters,
        "bytes_per_solver_iteration": 4000.0 if R > 1 else 0.0,
        "peak_memory_bytes": [200_000_000 + n * p * 4 // R] * R,
        "mask_sha256": ("f" if bad and int(bad) == R else "0") * 64,
        "argv": argv,
    }
    out = Path(overrides["output.dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
