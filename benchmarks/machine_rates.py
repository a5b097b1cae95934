"""The rates the cost model takes from the hardware description, measured on this machine.

Prints and writes benchmarks/results/machine_rates.json:

* flops: float32 matmul (1024 x 1024, 1 thread), FLOP/s;
* memory_bandwidth: A @ v over a 1 GiB float32 matrix (1 thread), bytes read per second -- the solver's block read;
* link_latency: median time of an 8-byte all-reduce between 2 gloo processes on loopback (1 thread each);
* link_bandwidth: bytes each rank sends per second in an all_to_all of 64 MiB per rank (2 processes), the row ->
  column exchange's collective (all-reduce bandwidth is also recorded);
* gram_half_width: n_h of the Gram matrix's rate F n / (n + n_h): R^T R for tall float32 R (m x n, 64 MiB) at
  n = 16 ... 512 (1 thread), fitted by least squares on the relative rates (``Hardware.gram_half_width``);
* page_population_bandwidth: bytes per second at which a fresh process maps and faults in a factor block of just
  under 1 GiB (``dist_chita.fisher.factor.empty_block``, populated at allocation, small pages) -- paid once per prune.

Each figure is the best of several repeats (other processes on a shared machine only ever slow a repeat down),
except the page population: the median of 3 fresh processes (it depends on the kernel's and the hypervisor's
memory state).
``configs/hardware/cpu_this_machine.yaml`` records these numbers for ``launch/scaling_study.py`` and
``launch/plan.py``.

    python benchmarks/machine_rates.py
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dist_chita.distributed import comm  # noqa: E402
from tests.multiproc import run  # noqa: E402


def _best(f, repeats: int) -> float:
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


GRAM_WIDTHS = (16, 32, 64, 128, 256, 512)


def gram_rates(sweeps: int = 3) -> dict:
    """FLOP/s of R^T R (the backsolve's Gram matrix) for R of 64 MiB float32 and width n (the best of ``sweeps``
    interleaved sweeps over the widths, 8 products each), and the fitted n_h."""
    torch.set_num_threads(1)
    mats = {n: torch.randn(2**24 // n, n) for n in GRAM_WIDTHS}
    rates = dict.fromkeys(GRAM_WIDTHS, 0.0)
    for _ in range(sweeps):
        for n, R in mats.items():
            rates[n] = max(rates[n], 2 * n * n * R.shape[0] / _best(lambda R=R: R.T @ R, 8))
    return {"gram_flops_by_width": rates, "gram_half_width": fit_half_width(rates)}


def fit_half_width(rates: dict[int, float]) -> float:
    """n_h minimising sum_n (log r_n - log(c n / (n + n_h)))^2 over n_h in 0, 0.5, ..., 512 (c: its best scale)."""
    best, best_err = 0.0, math.inf
    for h in (i / 2 for i in range(1025)):
        logs = [math.log(r * (n + h) / n) for n, r in rates.items()]
        mean = sum(logs) / len(logs)
        err = sum((v - mean) ** 2 for v in logs)
        if err < best_err:
            best, best_err = h, err
    return best


def local_rates() -> dict:
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    flops = 2 * 1024**3 / _best(lambda: a @ b, 10)
    A, v = torch.randn(2**28 // 1024, 1024), torch.randn(1024)
    bandwidth = A.numel() * 4 / _best(lambda: A @ v, 8)
    return {"flops": flops, "memory_bandwidth": bandwidth}


def population_seconds(gib: float) -> float:
    """Seconds to allocate (and fault in) a ``gib`` GiB factor block in this (fresh) process."""
    from dist_chita.fisher.factor import empty_block

    t0 = time.perf_counter()
    block = empty_block((int(gib * 2**30) // 4096, 1024), torch.float32, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    del block
    return seconds


def link_rates(mib: int) -> dict:
    """On every rank of a 2-process gloo group: latency of tiny all-reduces, bandwidth of all_to_all / all_reduce."""
    torch.set_num_threads(1)
    R = comm.world_size()
    tiny = torch.zeros(1, dtype=torch.float64)
    lat = []
    for _ in range(300):
        comm.barrier()
        t0 = time.perf_counter()
        comm.all_reduce(tiny)
        lat.append(time.perf_counter() - t0)
    rows = mib * 2**20 // 4 // 1024
    send = torch.randn(rows, 1024)
    counts = [rows // R] * (R - 1) + [rows - (rows // R) * (R - 1)]

    def a2a():
        comm.barrier()
        comm.all_to_all(send, counts, counts)

    t_a2a = _best(a2a, 5)
    buf = torch.randn(rows * 1024 // 4)

    def ar():
        comm.barrier()
        comm.all_reduce(buf)

    t_ar = _best(ar, 5)
    sent = send.numel() * 4 * (R - 1) / R  # bytes that leave the rank
    return {"latency": statistics.median(lat), "all_to_all_bytes_per_s": sent / t_a2a,
            "all_reduce_seconds": t_ar, "all_reduce_bytes": buf.numel() * 4,
            "all_reduce_algbw": buf.numel() * 4 / t_ar}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help: nothing run
    local = local_rates()
    local.update(gram_rates())
    # 1 GiB less one 2 MiB page: the small-page path of empty_block (blocks from 1 GiB get huge pages), which
    # every block of the scaling studies takes; seconds per GiB
    gib = 1.0 - 1 / 512
    fresh = [run(population_seconds, 1, gib, threads=1, timeout=600)[0] / gib for _ in range(3)]
    local["page_population_bandwidth"] = 2**30 / statistics.median(fresh)
    local["page_population_seconds_per_gib"] = fresh
    links = run(link_rates, 2, 64, threads=1, timeout=600)
    link = {k: max(o[k] for o in links) if k == "latency" or k == "all_reduce_seconds" else min(o[k] for o in links)
            for k in links[0]}
    res = {"cpu": local, "gloo_2_processes": link, "torch": torch.__version__}
    print(f"float32 matmul (1 thread): {local['flops'] / 1e9:.1f} GFLOP/s")
    print(f"A @ v block read (1 thread): {local['memory_bandwidth'] / 1e9:.2f} GB/s")
    print("Gram R^T R (1 thread), GFLOP/s by width n: "
          + ", ".join(f"{n}: {r / 1e9:.1f}" for n, r in local["gram_flops_by_width"].items())
          + f"; fitted F n / (n + n_h) with n_h = {local['gram_half_width']:.1f}")
    print(f"fresh 1 GiB factor block, mapped and populated: {local['page_population_bandwidth'] / 1e9:.2f} GB/s "
          f"(median of {', '.join(f'{t:.2f}' for t in fresh)} s)")
    print(f"gloo loopback, 2 processes: 8-byte all-reduce {link['latency'] * 1e6:.0f} us (median); all_to_all "
          f"{link['all_to_all_bytes_per_s'] / 1e9:.2f} GB/s sent per rank; all-reduce of "
          f"{link['all_reduce_bytes'] / 2**20:.0f} MiB {link['all_reduce_algbw'] / 1e9:.2f} GB/s (algorithm bandwidth)")
    out = ROOT / "benchmarks" / "results" / "machine_rates.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
