"""Run a function on R real gloo processes and collect what each rank returns.

``run(fn, world_size, *args)`` forks ``world_size`` processes, initialises a
gloo process group in each (TCP rendezvous on a free loopback port), calls
``fn(*args)`` and returns the list of per-rank results in rank order. An
exception on any rank fails the call with that rank's traceback. At world size
1 no process group is created, so the library's no-op paths are exercised.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, args, rank, world_size, port, queue, threads):
    try:
        torch.set_num_threads(threads)
        if world_size > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        result = fn(*args)
        # Plain pickle: torch's shared-memory reductions would need this process alive.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - forwarded to the parent verbatim
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn, world_size: int, *args, threads: int = 1, timeout: float = 300.0):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, args, r, world_size, port, queue, threads))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
