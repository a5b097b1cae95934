"""The MLPNet back-solve's pieces, timed in the run, against the cost model's count of them.

    python benchmarks/backsolve_pieces.py [--world-sizes 1,2] [--repeats 3]

Runs the MLPNet strong-scaling study's configuration (``configs/mlpnet_mnist.yaml``, Fisher objective, identity
ridge, global budget, 1 thread per process; ``accelerate launch`` as the study does) at each world size,
``--repeats`` times interleaved, with timers around the pieces of its backsolves (``dist_chita/fisher/backsolve.py``):
the float32 Gram products (``_syrk``), the float64 Cholesky factorisations (``_cholesky``), the preconditioner's
triangular solves (``torch.cholesky_solve``), the passes over the kept rows (``_Rows``' gather and products) and the
all-reduces inside a backsolve (the n x n Gram matrix, the n-vectors, the scalars), with their call counts. Next to
them: the report's ``backsolve_work`` and the seconds :func:`dist_chita.planning.costmodel.backsolve_terms` gives
that work at the hardware file's rates (e_a = 1, the link's latency), and measured / model per piece (the inverse of
the efficiency it ran at, every piece measured in the same run). Per rank the pieces of rank 0 are kept (ranks
wait for each other in the all-reduces). Writes benchmarks/results/backsolve_pieces.json with the 1-minute load
before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dist_chita.planning import costmodel as cm  # noqa: E402

OVERRIDES = ["prune.objective=fisher", "fisher.ridge=identity", "prune.granularity=global", "threads_per_rank=1"]
HARDWARE = "configs/hardware/cpu_this_machine.yaml"
GRAM_ENTRIES = 10_000  # an all-reduced tensor this large inside a backsolve is the Gram matrix (n^2 >= 40,000 here)


def _install_timers(acc: dict) -> None:
    """Wrap the backsolve's pieces with timers that add [seconds, calls] into ``acc`` (this process only)."""
    import torch

    from dist_chita.distributed import comm
    from dist_chita.fisher import backsolve as bs
    from dist_chita.fisher import solver

    def timed(name, f):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                entry = acc.setdefault(name, [0.0, 0])
                entry[0] += time.perf_counter() - t0
                entry[1] += 1
        return wrapper

    inside = [False]
    solve = timed("backsolve", bs.backsolve)

    def backsolve(*a, **kw):
        inside[0] = True
        try:
            return solve(*a, **kw)
        finally:
            inside[0] = False

    all_reduce = comm.all_reduce

    def counted_all_reduce(t, *a, **kw):
        if not inside[0]:
            return all_reduce(t, *a, **kw)
        kind = "allreduce_gram" if t.numel() > GRAM_ENTRIES else "allreduce_vector" if t.numel() > 8 else \
            "allreduce_scalar"
        return timed(kind, all_reduce)(t, *a, **kw)

    bs.backsolve = solver.ridge_backsolve = backsolve
    comm.all_reduce = counted_all_reduce
    bs._syrk = timed("gram", bs._syrk)
    bs._cholesky = timed("cholesky", bs._cholesky)
    torch.cholesky_solve = timed("precond", torch.cholesky_solve)
    for method in ("__init__", "mv", "rmv", "normal_mv"):
        setattr(bs._Rows, method, timed("rows", getattr(bs._Rows, method)))


def child(out: str, argv: list[str]) -> None:
    """One rank of a timed prune (``--child``): the prune of ``launch/prune.py`` with the timers, written to ``out``."""
    from launch import prune

    acc: dict = {}
    _install_timers(acc)
    code = prune.main(argv)
    Path(f"{out}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(acc))
    sys.stdout.flush()
    os._exit(code)  # as launch/prune.py ends a multi-process run


def _run(world: int, tmp: Path) -> tuple[dict, dict]:
    """One timed prune at ``world`` ranks: (rank 0's pieces {name: [seconds, calls]}, the report)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out, run_dir = tmp / f"pieces_ws{world}", tmp / f"run_ws{world}"
    subprocess.run(["accelerate", "launch", "--config_file", f"launch/accelerate/cpu_{world}.yaml", __file__,
                    "--child", str(out), "--", "--config", "configs/mlpnet_mnist.yaml", *OVERRIDES,
                    f"output.dir={run_dir}", "output.overwrite=true", f"world_size={world}"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pieces = json.loads(Path(f"{out}.rank0.json").read_text())
    return pieces, json.loads((run_dir / "prune_report.json").read_text())


def _record(world: int, pieces: dict, report: dict, hw: cm.Hardware, load: tuple[float, float]) -> dict:
    terms = cm.predict(cm.workload_from_report(report), world, hw, cm.Rates(fixed={})).terms
    model = {k: terms[f"backsolve_{k}"] for k in cm.BACKSOLVE_TERMS}
    measured = {k: pieces.get(k, [0.0, 0])[0] for k in ("gram", "cholesky", "precond", "rows")}
    measured["allreduce"] = sum(v[0] for k, v in pieces.items() if k.startswith("allreduce_"))
    return {"world_size": world, "pieces_rank0": pieces, "model_seconds_at_hardware_rates": model,
            "measured_over_model": {k: measured[k] / model[k] for k in model if model[k] > 0},
            "backsolve_phase_seconds": max(report["phase_seconds"]["backsolve"]),
            "backsolves": [st["backsolves"] for st in report["stages"]],
            "backsolve_work": [st["backsolve_work"] for st in report["stages"]],
            "kept": [st["kept"] for st in report["stages"]], "n": report["n"],
            "load_average_1min": {"before": load[0], "after": load[1]}}


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        child(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    worlds = [int(x) for x in args.world_sizes.split(",")]
    hw = cm.Hardware.from_dict(yaml.safe_load((ROOT / HARDWARE).read_text()))
    runs = []
    for i in range(args.repeats):
        for world in worlds:
            before = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as tmp:
                pieces, report = _run(world, Path(tmp))
            runs.append(_record(world, pieces, report, hw, (before, os.getloadavg()[0])))
            r = runs[-1]
            print(f"R = {world} run {i + 1}: backsolve {r['backsolve_phase_seconds']:.3f} s; "
                  + ", ".join(f"{k} {v[0]:.3f} s / {v[1]}" for k, v in sorted(pieces.items()))
                  + "; measured / model: " + ", ".join(f"{k} {v:.2f}" for k, v in r["measured_over_model"].items())
                  + f"; load {before:.2f} -> {r['load_average_1min']['after']:.2f}")
    result = {"command": f"python benchmarks/backsolve_pieces.py --world-sizes {args.world_sizes} --repeats "
                         f"{args.repeats}",
              "config": "configs/mlpnet_mnist.yaml " + " ".join(OVERRIDES), "hardware": HARDWARE, "runs": runs}
    out = ROOT / "benchmarks" / "results" / "backsolve_pieces.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
