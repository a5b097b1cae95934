"""BatchNorm re-estimation after pruning: every BatchNorm layer's running statistics recomputed on the calibration
data, without gradients.

Pruning changes the distribution of every activation after the pruned layers, while a BatchNorm layer in
evaluation mode keeps normalising with the mean and variance of the dense model's activations: at high sparsity
that mismatch alone can cost most of a CNN's accuracy. :func:`reestimate` replaces, for each BatchNorm layer in the
order of the forward pass, ``running_mean`` and ``running_var`` by the per-channel mean and unbiased variance of
its input over all n calibration samples, with the model in evaluation mode and the earlier BatchNorm layers
already re-estimated: the statistics the layer would see at evaluation time, not an average over micro-batches
of batch statistics (what a training-mode pass gives). One forward pass per BatchNorm layer, each stopped once that
layer has seen its input.

Every rank takes every R-th of one global sequence of micro-batches and contributes each micro-batch's per-channel
sums (float64) in that micro-batch's own slot; one all-reduce (every slot holds one rank's value and zeros) and a
sum over the slots in order give the same bits on any number of ranks. Nothing here parses a config or prints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.io import params
from dist_chita.io.data import Samples, iter_microbatches, to_device

__all__ = ["batchnorm_layers", "buffers", "reestimate", "restore"]


class _Seen(Exception):
    """Raised in a forward pass once the layer being re-estimated has seen its input (the rest is not needed)."""


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm layer (1d, 2d, 3d, SyncBatchNorm) that keeps running statistics, in
    registration order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every BatchNorm layer's (running_mean, running_var) (to :func:`restore` them)."""
    return [(m.running_mean.clone(), m.running_var.clone()) for _, m in batchnorm_layers(model)]


def restore(model: nn.Module, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put back the statistics :func:`buffers` copied."""
    for (_, m), (mean, var) in zip(batchnorm_layers(model), saved, strict=True):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


def _channel_sums(x: torch.Tensor) -> torch.Tensor:
    """(2 C + 1,) float64: per-channel sum, per-channel sum of squares and the count of values of one input
    (B, C, ...) of a BatchNorm layer."""
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    return torch.cat([x.sum(1), x.pow(2).sum(1), torch.tensor([float(x.shape[1])], dtype=torch.float64,
                                                               device=x.device)])


def forward_order(model: nn.Module, forward: Callable[[object], object], batch) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` in the order one forward pass of ``batch`` first calls them (layers it
    does not call are left out)."""
    layers = batchnorm_layers(model)
    order: list[int] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: order.append(i) if i not in order else None)
               for i, (_, m) in enumerate(layers)]
    try:
        with torch.no_grad():
            forward(batch)
    finally:
        for h in handles:
            h.remove()
    return [layers[i] for i in order]


def _layer_sums(layer: nn.Module, forward: Callable[[object], object], mine: list[tuple[int, object]],
                slots: int, stop_early: bool) -> torch.Tensor:
    """Sum over all ranks' micro-batches of :func:`_channel_sums` of ``layer``'s input: (2 C + 1,) float64, the
    micro-batches' values added in their global order. ``mine``: this rank's (global index, batch) pairs, index
    ``slots`` marking a padding forward that does not count; ``slots``: micro-batches of all ranks. Collective."""
    channels = layer.running_mean.numel()
    table = torch.zeros(slots + 1, 2 * channels + 1, dtype=torch.float64, device=layer.running_mean.device)
    current = [0]

    def record(module, args):
        table[current[0]] += _channel_sums(args[0])
        if stop_early:
            raise _Seen

    handle = layer.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for j, batch in mine:
                current[0] = j
                try:
                    forward(batch)
                except _Seen:
                    pass
    finally:
        handle.remove()
    table = comm.all_reduce(table[:slots])
    total = torch.zeros(2 * channels + 1, dtype=torch.float64, device=table.device)
    for row in table:  # in order: the same bits however the slots were shared among the ranks
        total += row
    return total


def reestimate(model: nn.Module, forward: Callable[[object], object], samples: Samples, batch_size: int,
               progress: Callable[[str, int, int], None] | None = None) -> int:
    """Recompute the running mean and (unbiased) variance of every BatchNorm layer of ``model`` (in evaluation
    mode) over all ``samples`` (module docstring), in place; returns how many layers were re-estimated (0 for a
    model without BatchNorm, which is left untouched). ``forward(batch)`` runs the model on one micro-batch of
    ``batch_size`` samples. Every rank calls it with the same samples. Collective."""
    if not batchnorm_layers(model):
        return 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = [b for b, _ in iter_microbatches(samples, 0, len(samples), batch_size)]
    world, rank = comm.world_size(), comm.rank()
    mine = [(j, to_device(b, device)) for j, b in enumerate(batches) if j % world == rank]
    partitioned = params.any_partitioned(model)
    if partitioned:  # a forward is collective: every rank runs as many, the padding ones in the slot that is not summed
        most = -(-len(batches) // world)
        mine += [(len(batches), mine[0][1] if mine else to_device(batches[0], device))] * (most - len(mine))
    layers = forward_order(model, forward, to_device(batches[0], device))
    for done, (_, m) in enumerate(layers):
        sums = _layer_sums(m, forward, mine, len(batches), stop_early=not partitioned)
        c = m.running_mean.numel()
        count = float(sums[-1])
        mean = sums[:c] / count
        var = (sums[c:2 * c] - count * mean.pow(2)).clamp_min(0.0) / max(count - 1.0, 1.0)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        if progress is not None:
            progress("batchnorm", done + 1, len(layers))
    return len(layers)
