"""Reading and writing model parameters, whole on every rank or partitioned by DeepSpeed ZeRO stage 3.

Under ZeRO-3 each rank holds only a 1/R slice of every parameter (``param.ds_tensor``); ``param.data`` is an
empty tensor between uses and ``param.ds_shape`` is the real shape. DeepSpeed gathers a module's parameters
for its forward and backward passes (hooks), which is all the per-sample gradients need (layer inputs and
output gradients, :mod:`dist_chita.fisher.persample`). Everything else that touches the values of a weight (reading
w_bar, writing the pruned w back, masks, saving) goes through this module, which gathers ONE parameter at a
time with ``deepspeed.zero.GatheredParameters`` and falls back to the plain tensor when a parameter is not a
ZeRO-3 parameter (then nothing here communicates).

Collective rule: for partitioned parameters :func:`read`, :func:`write` and :func:`full_state_dict` are
collective -- every rank must call them for the same parameters in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from dist_chita.distributed import comm


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (it has ``ds_id`` / ``ds_shape`` / ``ds_tensor``)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_shape")


def any_partitioned(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is partitioned: its forward pass is then collective (every rank
    must run the same number of forward calls, in the same order)."""
    return any(is_partitioned(p) for p in model.parameters())


def shape(param: torch.Tensor) -> torch.Size:
    """The full shape of ``param`` (``ds_shape`` under ZeRO-3, where ``param.shape`` is (0,))."""
    return torch.Size(param.ds_shape) if is_partitioned(param) else param.shape


def numel(param: torch.Tensor) -> int:
    """Number of elements of the full ``param``."""
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


def resident_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of parameter values held by this rank now: for a ZeRO-3 parameter its local partition
    (``ds_tensor``) plus the gathered full value if it is currently gathered (``param.data``, else empty),
    for others the whole tensor. Shared (tied) parameters count once."""
    total, seen = 0, set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = (p.ds_tensor, p.data) if is_partitioned(p) else (p,)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


def full_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the full (unpartitioned) parameters; shared parameters count once."""
    unique = {id(p): p for p in params}.values()
    return sum(numel(p) * p.element_size() for p in unique)


@contextlib.contextmanager
def _gathered(param: torch.Tensor, modify: bool) -> Iterator[None]:
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None):
        yield


def read(param: torch.Tensor) -> torch.Tensor:
    """The full value of ``param`` (shape :func:`shape`), detached.

    Under ZeRO-3 a fresh copy, gathered from all ranks (collective); otherwise the parameter's own storage
    (no copy: do not modify it, clone what must outlive a later :func:`write`)."""
    if not is_partitioned(param):
        return param.detach()
    with _gathered(param, modify=False):
        return param.data.detach().clone()


def write(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` to ``value`` (full shape, any dtype: cast to the parameter's).

    Under ZeRO-3 collective: ``value`` must be the same on every rank (rank 0's is the one kept; every rank's
    partition is re-cut from it)."""
    full = shape(param)
    if tuple(value.shape) != tuple(full):
        raise ValueError(f"cannot write a value of shape {tuple(value.shape)} into a parameter of shape {tuple(full)}")
    with torch.no_grad():
        if not is_partitioned(param):
            param.copy_(value.to(param.dtype))
            return
        with _gathered(param, modify=True):
            if comm.rank() == 0:
                param.data.copy_(value.to(device=param.data.device, dtype=param.data.dtype))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's complete ``state_dict`` (full, unpartitioned tensors on CPU) on the main rank, gathering one
    parameter at a time (collective under ZeRO-3); an empty dict on the other ranks. Tied parameters map to one
    tensor under each of their names, as in ``model.state_dict()``."""
    main = comm.is_main()
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in done:
            value = read(t) if is_partitioned(t) else t.detach()
            done[id(t)] = value.cpu().clone() if main else value[:0]
        if main:
            out[name] = done[id(t)]
    return out
