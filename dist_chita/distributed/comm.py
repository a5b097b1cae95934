"""Every ``torch.distributed`` call of dist-chita lives in this module.

At world size 1 (no process group initialised) each function is a no-op or an
identity, so the same library code runs under ``python`` and under
``accelerate launch`` / ``torchrun``. The process group itself is created by
``launch/`` (or by tests), never by the library.

Tensors passed in must already be on the backend's device (CPU for gloo, the
rank's GPU for NCCL); nothing here moves data between devices.

Every collective records the bytes this rank contributes (the payload size,
not the algorithm's wire traffic, which for a ring all-reduce is
2 (R - 1) / R times that) under the current *phase*, so reports can show
communication per phase and per solver iteration.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

_phase = "other"
_bytes: dict[str, int] = defaultdict(int)
_calls: dict[str, int] = defaultdict(int)


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_world_size() -> int:
    """Ranks on this node (the launcher's ``LOCAL_WORLD_SIZE``; all of them when it does not say)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_main() -> bool:
    """The one gate for all output: only rank 0 prints and writes."""
    return rank() == 0


def device() -> torch.device:
    """The device whose tensors the collectives take: the current CUDA device under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _count(t: torch.Tensor) -> None:
    _bytes[_phase] += t.numel() * t.element_size()
    _calls[_phase] += 1


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Attribute the bytes of the collectives run inside to ``name``."""
    global _phase
    previous, _phase = _phase, name
    try:
        yield
    finally:
        _phase = previous


def bytes_by_phase() -> dict[str, int]:
    """Payload bytes this rank sent, per phase, since the last reset."""
    return dict(_bytes)


def calls_by_phase() -> dict[str, int]:
    return dict(_calls)


def reset_stats() -> None:
    _bytes.clear()
    _calls.clear()


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` with ``op`` in {"sum", "max", "min"}; returns ``t``."""
    if op not in _OPS:
        raise ValueError(f"unknown reduce op {op!r}")
    if is_distributed():
        _count(t)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]))
    return t


def all_reduce_floats(values: Sequence[float], op: str = "sum") -> list[float]:
    """All-reduce a few Python numbers (as float64, on :func:`device`); returns them reduced."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    return [float(v) for v in all_reduce(t, op).tolist()]


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of ``t`` from rank ``src``; returns ``t``."""
    if is_distributed():
        if rank() == src:
            _count(t)
        dist.broadcast(t, src=src)
    return t


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Gather a same-shaped tensor from every rank, in rank order."""
    if not is_distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    _count(t)
    dist.all_gather(out, t.contiguous())
    return out


def all_to_all(
    send: torch.Tensor, send_counts: list[int], recv_counts: list[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Exchange slices of dim 0: rows ``send[sum(send_counts[:q]) : ... + send_counts[q]]``
    go to rank q; the result holds, in rank order, the ``recv_counts[q]`` rows from q.

    Uneven splits are allowed. At world size 1 ``send`` is returned as is. ``out``: optional contiguous
    destination of exactly ``sum(recv_counts)`` rows (a reused buffer: a fresh allocation of tens of MB
    costs more in first-touch page faults on CPU than the transfer itself).
    """
    if not is_distributed():
        return send
    rows = sum(recv_counts)
    if out is None:
        recv = send.new_empty((rows, *send.shape[1:]))
    elif out.shape != (rows, *send.shape[1:]) or out.dtype != send.dtype or not out.is_contiguous():
        raise ValueError(f"all_to_all out must be a contiguous {send.dtype} tensor of shape {(rows, *send.shape[1:])}")
    else:
        recv = out
    _count(send)
    dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts)
    return recv


def shutdown() -> None:
    """Tear down the process group, if any (the launcher calls this once at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank and return it."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    if rank() == src:
        _bytes[_phase] += len(pickle.dumps(obj))
        _calls[_phase] += 1
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Gather a picklable object from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    _bytes[_phase] += len(pickle.dumps(obj))
    _calls[_phase] += 1
    dist.all_gather_object(out, obj)
    return out
