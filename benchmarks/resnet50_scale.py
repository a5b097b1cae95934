"""ResNet-50 at scale: CHITA on the full (global, no block approximation) Fisher factor, 1 and 2 processes.

    python benchmarks/resnet50_scale.py [--n 64] [--world-sizes 1 2] [--max-iter 3]

The model is ``ResNetForImageClassification(ResNetConfig())`` (ResNet-50, random weights, seed 0); its
prunable weights are every convolution (the classifier head stays dense): p = 23,454,912, so the factor A
(n x p) is n * p * 4 bytes = 6.0 GB at n = 64 in float32. The calibration data are a builtin random-image
source: sample i is a (3, S, S) standard normal image drawn from a generator seeded with i, with a random
label, the same on any world size (the factor's size does not depend on the image size S; S = 128 by default
keeps the per-sample gradient pass short on a 2-core CPU). The loss is the empirical Fisher cross-entropy.

For each world size R the script launches itself R times (``accelerate launch``, gloo) in worker mode. Each
rank records: the memory estimate of :func:`dist_chita.planning.memory.estimate` (printed before the run starts, as
launch/prune.py does), the Python/torch baseline RSS measured before anything large is allocated, seconds
per phase (model build, per-sample gradients + exchange, solver, backsolve, write-back) and the peak RSS
(``ru_maxrss``). Results: benchmarks/results/resnet50_scale.json. The solver is capped (``--max-iter``):
this measures memory and the time per phase, not the quality of a 6 GB solve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "resnet50_scale.json"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="calibration samples (rows of A)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--max-iter", type=int, default=3, help="solver.max_iter cap")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per backward pass")
    ap.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tiny", action="store_true", help="a small ResNet (smoke test of the script)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def build_model(tiny: bool):
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(hidden_sizes=[16, 32, 64, 128], embedding_size=16, depths=[1, 1, 1, 1]) if tiny else (
        ResNetConfig())
    return ResNetForImageClassification(config).eval()


def random_images(start: int, stop: int, size: int, num_labels: int, batch_size: int):
    """Micro-batches ``({"pixel_values", "labels"}, range)`` of samples start..stop-1; sample i from seed i."""
    import torch

    for lo in range(start, stop, batch_size):
        hi = min(stop, lo + batch_size)
        gens = [torch.Generator().manual_seed(i) for i in range(lo, hi)]
        x = torch.stack([torch.randn(3, size, size, generator=g) for g in gens])
        y = torch.stack([torch.randint(0, num_labels, (), generator=g) for g in gens])
        yield {"pixel_values": x, "labels": y}, range(lo, hi)


def worker(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_env))
    handlers = [InitProcessGroupKwargs(backend="gloo")] if world_env > 1 else []
    Accelerator(cpu=True, kwargs_handlers=handlers)
    from dist_chita import prunable
    from dist_chita.api import largest_forward_bytes
    from dist_chita.distributed import comm
    from dist_chita.distributed.partition import sample_ranges
    from dist_chita.fisher import driver as fisher_driver
    from dist_chita.fisher import losses
    from dist_chita.io import models
    from dist_chita.planning import memory

    dev = torch.device("cpu")
    world, rank = comm.world_size(), comm.rank()
    t0 = time.perf_counter()
    model = build_model(args.tiny)
    modules = prunable.prunable_modules(model)
    baseline = memory.peak_bytes(dev)  # interpreter + torch + transformers + one model copy
    t_load = time.perf_counter() - t0
    p = sum(m.weight.numel() for _, m in modules)
    lo, hi = sample_ranges(args.n, world)[rank]
    forward = lambda m, b: models.forward(m, "image-classification", b)  # noqa: E731
    micro, _ = next(random_images(lo, hi, args.image_size, model.config.num_labels, args.batch_size))
    model_params = sum(x.numel() for x in model.parameters())
    base = memory.baseline_bytes(dev, 4 * model_params)
    # the estimate the tool prints before a Fisher prune (dist_chita.api): its activation term measured on one
    # calibration micro-batch with autograd's saved activations, as the per-sample gradients' backward needs
    activations = largest_forward_bytes(lambda b: forward(model, b), micro, [], dev, grad=True)
    est = memory.estimate_run(objective="fisher", p=p, n=args.n, world_size=world,
                              sizes=[m.weight.numel() for _, m in modules], model_params=model_params,
                              micro_batch=args.batch_size, storage_dtype=args.storage_dtype,
                              mean_sparsity=args.sparsity, activations=activations, baseline=base)
    if comm.is_main():
        print(f"R = {world}: p = {p:,}, n = {args.n}; memory estimate per rank {est.total / 2**30:.2f} GiB "
              f"(factor {est.factor / 2**30:.2f} GiB), baseline RSS {baseline / 2**30:.2f} GiB", flush=True)
    last = {"t": time.perf_counter()}

    def progress(name: str, done: int, total: int) -> None:
        if comm.is_main() and time.perf_counter() - last["t"] > 30:
            last["t"] = time.perf_counter()
            print(f"  {name}: {done}/{total}", flush=True)

    t1 = time.perf_counter()
    outcome = fisher_driver.prune(
        model, modules, "chita", args.sparsity,
        make_batches=lambda: random_images(lo, hi, args.image_size, model.config.num_labels, args.batch_size),
        loss_fn=losses.cross_entropy(forward), n=args.n, lam=1e-3,
        storage_dtype=models.torch_dtype(args.storage_dtype),
        solver_options=dict(max_iter=args.max_iter, tol=1e-7, rounds=1, escape_trials=0), progress=progress,
    )
    t_prune = time.perf_counter() - t1
    st = outcome.stages[0]
    kept = sum(int(m.sum()) for m in outcome.masks.values())
    mine = {"rank": rank, "peak_rss_bytes": memory.peak_bytes(dev), "baseline_rss_bytes": baseline,
            "phase_seconds": {"load": t_load, **st.seconds, "prune_total": t_prune},
            "bytes_sent": st.bytes_sent}
    per_rank = comm.all_gather_object(mine)
    if comm.is_main():
        out = {"world_size": world, "threads_per_rank": torch.get_num_threads(), "p": p, "n": args.n,
               "kept": kept, "sparsity": 1 - kept / p, "solver_iterations": st.iterations,
               "objective": st.objective, "magnitude_objective": st.magnitude_objective,
               "estimate_bytes": est.as_dict(), "ranks": per_rank,
               "peak_over_estimate": [r["peak_rss_bytes"] / est.total for r in per_rank]}
        Path(os.environ["RESNET50_SCALE_PART"]).write_text(json.dumps(out, indent=2))
    comm.shutdown()


def launch(args: argparse.Namespace, world: int, part: Path) -> dict:
    flags = ["--n", str(args.n), "--image-size", str(args.image_size), "--sparsity", str(args.sparsity),
             "--max-iter", str(args.max_iter), "--batch-size", str(args.batch_size),
             "--storage-dtype", args.storage_dtype, "--worker", *(["--tiny"] if args.tiny else [])]
    script = str(Path(__file__).resolve())
    if world == 1:
        cmd = [sys.executable, script, *flags]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / f"launch/accelerate/cpu_{world}.yaml"), script, *flags]
    env = {**os.environ, "RESNET50_SCALE_PART": str(part)}
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    res = json.loads(part.read_text())
    res["wall_seconds"] = time.perf_counter() - t
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.world_sizes:
            runs.append(launch(args, world, Path(tmp) / f"r{world}.json"))
            r = runs[-1]
            print(f"R = {world}: peak RSS per rank {[round(x['peak_rss_bytes'] / 2**30, 2) for x in r['ranks']]} "
                  f"GiB vs estimate {r['estimate_bytes']['total'] / 2**30:.2f} GiB "
                  f"(ratio {[round(x, 2) for x in r['peak_over_estimate']]}), wall {r['wall_seconds']:.0f} s",
                  flush=True)
    settings = {k: getattr(args, k) for k in ("n", "image_size", "sparsity", "max_iter", "batch_size",
                                               "storage_dtype", "tiny")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "runs": runs}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
