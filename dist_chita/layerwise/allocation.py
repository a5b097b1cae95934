"""Non-uniform layer sparsities from the dense model: OWL (outlier-weighted layer-wise sparsity, Yin et al., ICML 2024).

Layers whose weights meet large inputs hold more "outliers" and lose more when pruned. OWL scores every weight as
Wanda does, |W_ij| ||X_j||_2 (X_j: input feature j over all calibration tokens of the dense model), and measures each
block's outlier ratio D_b: the share of its weights scoring above M times the block's mean score. The keep ratios
1 - s_b are then D_b rescaled linearly onto a range of width 2 lambda and shifted so that their mean is 1 - S:

    keep_b = 2 lambda (D_b - min D) / (max D - min D) - mean(...) + 1 - S,     s_b = 1 - keep_b,

every layer of block b taking s_b (blocks: :func:`dist_chita.layerwise.curvature.blocks_in_order`, the layers up to the
first numeric component of their names, a transformer layer). OWL's mean is over blocks, which is the mean over weights
when the blocks are the same size; here it is weighted by the blocks' sizes, so that S is the share of zeros over
all prunable weights also when a small block stands apart (MiniLM's pooler). OWL's defaults: M = 5, lambda = 0.08.

:func:`input_norms` runs the calibration samples through the dense model once (no pruning, no curvature): one
float64 (d,) sum of squares per layer, summed exactly over ranks like
:func:`dist_chita.layerwise.curvature.layer_curvature`, so every rank derives the same targets. Nothing here parses a
config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.io import params
from dist_chita.layerwise.curvature import blocks_in_order, collective_batches
from dist_chita.layerwise.geometry import input_rows, input_size, weight_rows
from dist_chita.methods.wanda import wanda_scores


def input_norms(modules: Sequence[tuple[str, nn.Module]], forward: Callable[[object], object],
                batches: Iterable) -> list[torch.Tensor]:
    """||X_j||^2 of every input feature j of every module over all ranks' calibration rows: (d,) float64 each (a
    dict batch's ``attention_mask`` marks the tokens that count; Conv2d: unfolded patches). ``batches`` yields this
    rank's ``(batch, indices)`` (:func:`~dist_chita.layerwise.curvature.my_microbatches`); each micro-batch's sums are
    formed in float32 and added in float64, the same bits on any number of ranks. Collective (one all-reduce; under
    ZeRO-3 the forwards too: a rank with fewer micro-batches runs padding forwards that add nothing)."""
    for name, m in modules:
        if isinstance(m, nn.Conv2d | nn.Conv1d) and m.groups != 1:
            raise ValueError(f"{name}: OWL scores need an ungrouped layer ({type(m).__name__} with "
                             f"groups={m.groups})")
    device = modules[0][1].weight.device
    sums: list[torch.Tensor | None] = [None] * len(modules)
    state: dict = {"mask": None, "record": True}

    def hook(i: int):
        def fn(module, args, out):
            if state["record"]:
                part = input_rows(module, args[0].detach(), state["mask"]).pow(2).sum(0).double()
                sums[i] = part if sums[i] is None else sums[i] + part
        return fn

    mine = [batch for batch, _ in batches]
    partitioned = any(params.is_partitioned(m.weight) for _, m in modules)
    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch, state["record"] in collective_batches(mine, device, partitioned):
                state["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
                forward(batch)
    finally:
        for h in handles:
            h.remove()
    sizes = [input_size(m, tuple(params.shape(m.weight))) for _, m in modules]  # no gather under ZeRO-3
    flat = torch.cat([torch.zeros(d, dtype=torch.float64, device=device) if s is None else s
                      for s, d in zip(sums, sizes, strict=True)])
    return list(comm.all_reduce(flat).split(sizes))


def outlier_ratios(modules: Sequence[tuple[str, nn.Module]], norms: Sequence[torch.Tensor],
                   blocks: Sequence[Sequence[int]], m: float) -> list[float]:
    """D_b of every block (lists of indices into ``modules``): the share of the block's weights whose score
    |W_ij| sqrt(norms_j) exceeds ``m`` times the mean score over the block."""
    ratios = []
    for block in blocks:
        scores = torch.cat([wanda_scores(weight_rows(modules[i][1], params.read(modules[i][1].weight)).double(),
                                         norms[i]).reshape(-1) for i in block])
        ratios.append(float((scores > m * scores.mean()).double().mean()))
    return ratios


def owl_targets(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """Block sparsities s_b from the outlier ratios D_b of blocks of ``sizes`` weights (module docstring): mean S
    over the weights, spread 2 lambda, more outliers -> lower sparsity. Equal ratios give S everywhere. Raises
    ValueError when a target leaves [0, 1)."""
    D = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    spread = float(D.max() - D.min())
    keep = (D - D.min()) * (2 * lam / spread) if spread > 0 else torch.zeros_like(D)
    keep = keep - (keep * n).sum() / n.sum() + (1.0 - sparsity)
    targets = [1.0 - float(k) for k in keep]
    if not all(0.0 <= s < 1.0 for s in targets):
        raise ValueError(f"OWL targets leave [0, 1) (sparsity {sparsity}, lambda {lam}: "
                         f"{min(targets):.3f}..{max(targets):.3f}); lower the lambda")
    return targets


def owl_layer_targets(modules: Sequence[tuple[str, nn.Module]], norms: Sequence[torch.Tensor], sparsity: float,
                      m: float = 5.0, lam: float = 0.08) -> list[float]:
    """One sparsity per module: its block's OWL target (:func:`owl_targets` of :func:`outlier_ratios`)."""
    blocks = blocks_in_order(modules)
    sizes = [sum(params.numel(modules[i][1].weight) for i in block) for block in blocks]
    block_targets = owl_targets(outlier_ratios(modules, norms, blocks, m), sizes, sparsity, lam)
    targets = [0.0] * len(modules)
    for block, s in zip(blocks, block_targets, strict=True):
        for i in block:
            targets[i] = s
    return targets
