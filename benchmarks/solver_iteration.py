"""Benchmark of one CHITA IHT iteration (dist_chita.fisher.solver): time, scaling over processes, bytes communicated.

Prints the figures and writes benchmarks/results/solver_iteration.json. Three parts:

1. Time per IHT iteration on A of n x p float32 (default n=1000, p=1e6: 4 GB) at 90% sparsity, against the
   memory-bandwidth bound 2 * bytes(A) / bandwidth (the textbook iteration reads A for g = A^T r and again for
   u = A g_S; the solver fuses both into one pass over A, so it can beat this bound), the bandwidth being
   measured in the same run by a large copy (bytes read + bytes written per second, 1 thread).
2. The same problem on 2 processes x 1 thread, 1 process x 1 thread and 1 process x 2 threads (gloo), in alternating
   rounds (--rounds, the best round of each configuration counts); each round also times one plain read of A
   (At @ r) on 1 process and on 2 processes at once, the memory system's own two-core scaling, which bounds the
   speed-up of a memory-bound iteration. Every process
   builds its own column block from a seeded generator (chunk c of rows of A^T is drawn from seed (seed, c)), so no
   rank ever holds all of A and every split sees the same A.
3. Payload bytes per IHT iteration (2 processes) for p = 1e5, 1e6, 1e7 at a fixed n (default 64).

An "iteration" is the time between two consecutive accepted IHT steps (the solver's progress callback), with the
active set disabled so that every iteration works on all p columns. Use --quick on a shared machine.

    python benchmarks/solver_iteration.py --quick
    python benchmarks/solver_iteration.py            # full sizes, about 4-5 GB of RAM per part
    python benchmarks/solver_iteration.py --parts 2  # one part: the others keep their figures in the JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dist_chita.distributed import comm  # noqa: E402
from dist_chita.distributed.partition import column_blocks  # noqa: E402
from dist_chita.fisher.budget import Budget  # noqa: E402
from dist_chita.fisher.solver import solve  # noqa: E402
from tests.multiproc import run  # noqa: E402

CHUNK = 10_000  # rows of A^T per seeded chunk


def make_block(p: int, n: int, lo: int, hi: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [lo, hi) of A^T (float32, (hi - lo, n)) and of w_bar, identical whatever the split."""
    At = torch.empty(hi - lo, n)
    w_bar = torch.empty(hi - lo)
    for c in range(lo // CHUNK, (hi + CHUNK - 1) // CHUNK):
        a, b = c * CHUNK, min((c + 1) * CHUNK, p)
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        rows = torch.empty(b - a, n).uniform_(-1.0, 1.0, generator=g)
        wb = torch.randn(b - a, generator=g)
        s, e = max(a, lo), min(b, hi)
        At[s - lo : e - lo] = rows[s - a : e - a]
        w_bar[s - lo : e - lo] = wb[s - a : e - a]
    At /= n**0.5
    return At, w_bar


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best (read + write) bytes per second of a large tensor copy, in GB/s."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.zeros_like(src)  # touched: no page faults in the timed copies
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t0))
    del src, dst
    return best / 1e9


def iteration_run(p: int, n: int, sparsity: float, iters: int, seed: int, threads: int, first_order: bool = False
                  ) -> dict:
    """Solve (IHT only, no active set, no backsolve) on this rank's block; per-iteration time and bytes."""
    torch.set_num_threads(threads)
    R, r = comm.world_size(), comm.rank()
    lo, hi = column_blocks(p, R)[r]
    At, w_bar = make_block(p, n, lo, hi, seed)
    k = int(round((1 - sparsity) * p))
    stamps: list[tuple[float, int]] = []

    def progress(info: dict) -> None:
        stamps.append((time.perf_counter(), comm.bytes_by_phase().get("solver", 0),
                       comm.calls_by_phase().get("solver", 0), info["entered"]))

    comm.barrier()
    comm.reset_stats()
    res = solve(At, w_bar, 0.1, Budget.global_topk(hi - lo, k), first_order=first_order, max_iter=iters, tol=0.0,
                active_set_factor=None, backsolve=False, progress=progress)
    dts = [b[0] - a[0] for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    dbytes = [b[1] - a[1] for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    dcalls = [b[2] - a[2] for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    changing = [dt for dt, b in zip(dts, stamps[1:], strict=True) if b[3] > 0]
    return {
        "rank": r,
        "iterations": res.iterations,
        "seconds_per_iteration": statistics.median(dts) if dts else float("nan"),
        "support_changing_iterations": len(changing),
        "seconds_per_support_changing_iteration": statistics.median(changing) if changing else None,
        "bytes_per_iteration": statistics.median(dbytes) if dbytes else 0,
        "bytes_per_iteration_mean": statistics.mean(dbytes) if dbytes else 0,
        "bytes_per_iteration_max": max(dbytes) if dbytes else 0,
        "collectives_per_iteration_mean": statistics.mean(dcalls) if dcalls else 0,
        "bytes_A_local": At.numel() * At.element_size(),
        "threads": torch.get_num_threads(),
    }


def read_run(p: int, n: int, seed: int, repeats: int = 5) -> dict:
    """The hardware's share of an iteration: one product At @ r over this rank's block (a single read of A_r, the
    memory-bound core of an IHT iteration), ranks started together by a barrier; best of ``repeats``."""
    torch.set_num_threads(1)
    R, r = comm.world_size(), comm.rank()
    lo, hi = column_blocks(p, R)[r]
    At, _ = make_block(p, n, lo, hi, seed)
    v = torch.randn(n)
    best = float("inf")
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        At @ v
        best = min(best, time.perf_counter() - t0)
    return {"rank": r, "seconds": best}


def part1(args) -> dict:
    torch.set_num_threads(1)
    bw = copy_bandwidth(args.copy_gib)
    gc.collect()
    (out,) = run(iteration_run, 1, args.p, args.n, args.sparsity, args.iters, args.seed, 1, args.first_order,
                 threads=1, timeout=3600)
    bytes_A = out["bytes_A_local"]
    bound = 2 * bytes_A / (bw * 1e9)
    res = {"n": args.n, "p": args.p, "sparsity": args.sparsity, "first_order": args.first_order, "threads": 1,
           "bytes_A": bytes_A,
           "copy_bandwidth_GBps": bw, "bound_seconds": bound, "seconds_per_iteration": out["seconds_per_iteration"],
           "ratio_to_bound": out["seconds_per_iteration"] / bound,
           "iterations_timed": out["iterations"] - 1,
           "support_changing_iterations": out["support_changing_iterations"],
           "seconds_per_support_changing_iteration": out["seconds_per_support_changing_iteration"]}
    print(f"[part 1] n={args.n} p={args.p:.0e} float32 ({bytes_A / 1e9:.2f} GB), {args.sparsity:.0%} sparsity, "
          f"1 thread: copy bandwidth {bw:.2f} GB/s (read+write), bound 2*bytes(A)/bw = {bound * 1e3:.1f} ms, "
          f"iteration {out['seconds_per_iteration'] * 1e3:.1f} ms (median), ratio {res['ratio_to_bound']:.2f} "
          f"(target <= 1.5); {out['support_changing_iterations']} of the timed iterations changed the support")
    if out["seconds_per_support_changing_iteration"] is not None:
        print(f"[part 1] support-changing iterations (tau_c trials): "
              f"{out['seconds_per_support_changing_iteration'] * 1e3:.1f} ms (median)")
    return res


def part2(args) -> dict:
    """1x1, 1x2 and 2x1 in alternating rounds; each configuration's best round counts (noise from other processes
    on a shared machine only ever adds time), and every round's figure is recorded."""
    configs = (("1x1", 1, 1), ("1x2", 1, 2), ("2x1", 2, 1))
    reads = (("read 1x1", 1), ("read 2x1", 2))
    rounds: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    read_rounds: dict[str, list[float]] = {name: [] for name, _ in reads}
    for rnd in range(args.rounds):
        for name, R in reads:
            gc.collect()
            t = max(o["seconds"] for o in run(read_run, R, args.p, args.n, args.seed, threads=1, timeout=3600))
            read_rounds[name].append(t)
            print(f"[part 2] round {rnd + 1}/{args.rounds} {name}: one read of A (At @ r) on {R} process(es) x 1 "
                  f"thread: {t * 1e3:.1f} ms", flush=True)
        for name, R, threads in configs:
            gc.collect()
            out = run(iteration_run, R, args.p, args.n, args.sparsity, args.iters, args.seed, threads,
                      threads=threads, timeout=3600)
            t = max(o["seconds_per_iteration"] for o in out)  # ranks are in lock step; the slower one counts
            rounds[name].append(t)
            print(f"[part 2] round {rnd + 1}/{args.rounds} {name}: {R} process(es) x {threads} thread(s): "
                  f"{t * 1e3:.1f} ms per iteration", flush=True)
    res = {name: {"processes": R, "threads_per_process": threads, "seconds_per_iteration": min(rounds[name]),
                  "rounds": rounds[name]} for name, R, threads in configs}
    res["read"] = {name: {"processes": R, "seconds": min(read_rounds[name]), "rounds": read_rounds[name]}
                   for name, R in reads}
    # what the memory system gives two cores streaming at once: the ceiling of a memory-bound iteration's speed-up
    res["read_speedup_2x1_over_1x1"] = res["read"]["read 1x1"]["seconds"] / res["read"]["read 2x1"]["seconds"]
    res["speedup_2x1_over_1x1"] = res["1x1"]["seconds_per_iteration"] / res["2x1"]["seconds_per_iteration"]
    res["speedup_2x1_over_1x2"] = res["1x2"]["seconds_per_iteration"] / res["2x1"]["seconds_per_iteration"]
    res["speedup_1x2_over_1x1"] = res["1x1"]["seconds_per_iteration"] / res["1x2"]["seconds_per_iteration"]
    print(f"[part 2] one read of A, 2 processes vs 1 (the memory system's two-core scaling): "
          f"{res['read_speedup_2x1_over_1x1']:.2f}x")
    print(f"[part 2] best of {args.rounds} rounds: 2x1 vs 1x1: {res['speedup_2x1_over_1x1']:.2f}x (target >= 1.7); "
          f"2x1 vs 1x2: {res['speedup_2x1_over_1x2']:.2f}x (target >= 1.0); "
          f"1x2 vs 1x1 (what 2 threads give): {res['speedup_1x2_over_1x1']:.2f}x")
    return res


def part3(args) -> dict:
    res = {}
    for p in args.bytes_p:
        gc.collect()
        out = run(iteration_run, 2, p, args.bytes_n, args.sparsity, min(args.iters, 6), args.seed, 1, threads=1,
                  timeout=3600)
        o = out[0]
        res[str(p)] = {"n": args.bytes_n, **{key: o[key] for key in ("bytes_per_iteration", "bytes_per_iteration_mean",
                                                                        "bytes_per_iteration_max",
                                                                        "collectives_per_iteration_mean")}}
        print(f"[part 3] p={p:.0e} n={args.bytes_n}: bytes sent per IHT iteration by rank 0 (2 processes): median "
              f"{o['bytes_per_iteration']:.0f}, mean {o['bytes_per_iteration_mean']:.0f}, max "
              f"{o['bytes_per_iteration_max']:.0f}; {o['collectives_per_iteration_mean']:.1f} collectives")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a shared machine")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--p", type=int, default=1_000_000)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--first-order", action="store_true", help="y = A w_bar - 1/sqrt(n) (part 1)")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copy-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of part 2 (best counts)")
    ap.add_argument("--bytes-n", type=int, default=64)
    ap.add_argument("--bytes-p", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "solver_iteration.json"))
    args = ap.parse_args()
    if args.quick:
        args.n, args.p, args.iters, args.copy_gib = 256, 200_000, 6, 0.25
        args.bytes_p = [10_000, 100_000, 1_000_000]
    out = Path(args.out)
    result = {"args": vars(args)}
    if set(args.parts) != {1, 2, 3} and out.exists():  # parts not run keep their earlier figures in the file
        result = {**json.loads(out.read_text()), "args_" + "_".join(map(str, args.parts)): vars(args)}
    if 1 in args.parts:
        result["iteration_vs_bandwidth"] = part1(args)
    if 2 in args.parts:
        result["processes_vs_threads"] = part2(args)
    if 3 in args.parts:
        result["bytes_per_iteration"] = part3(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
