"""Layer groups: prune one group of layers at a time when even the sharded Fisher factor is too large.

The global problem (paper eq. (4)) over all p prunable weights needs the factor A (n x p). With layer groups (the
run config's ``prune.block_mode``) the layers (in the global flat order of :mod:`dist_chita.distributed.layout`) are
packed into consecutive groups of at most ``block_size`` weights (a layer larger than that is a group of its own),
and each group g is pruned on its own block-diagonal piece of the Fisher, A_g (n x p_g), with the weights of the
other groups fixed:

1. a cheap global criterion scores every weight (``"magnitude"``: |w_bar_j|; ``"obs"``: the diagonal OBS
   saliency w_bar_j^2 (F_jj + lambda) with F_jj = sum_i g_ij^2 / n from one streaming pass of per-sample
   gradients, O(p) memory, no factor stored);
2. the global budget k = (1 - s) p is split by it: group g gets k_g = the number of its weights among the
   global top-k scores, so sum_g k_g = k exactly;
3. the groups are pruned in order by :func:`dist_chita.fisher.driver.prune` (CHITA / CHITA++) with budget k_g,
   each with fresh per-sample gradients at the current weights (earlier groups already pruned).

Peak memory is that of the largest group's factor, n * max_g p_g / R entries per rank. The price is one
forward/backward pass over the calibration data per group, and the cross-group curvature is ignored.
Per-layer and N:M budgets need no allocation (each group keeps its layers' own budgets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.distributed.layout import ColumnLayout
from dist_chita.fisher.driver import PruneOutcome, StageReport, prune
from dist_chita.fisher.factor import gradients_only
from dist_chita.fisher.persample import PerSampleGrads
from dist_chita.io.data import to_device
from dist_chita.prunable import named_shapes
from dist_chita.sparsity import kept_count

CRITERIA = ("magnitude", "obs")


def layer_groups(sizes: Sequence[int], block_size: int) -> list[list[int]]:
    """Consecutive layer indices packed greedily into groups of at most ``block_size`` weights in total;
    a layer with more than ``block_size`` weights forms a group alone."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= block_size:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def diagonal_fisher(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    batches: Iterable[tuple[object, object]],
    n: int,
    loss_fn: Callable,
) -> list[torch.Tensor]:
    """diag(F) = sum_i g_i^2 / n per layer (float64, the layer's weight shape flattened), summed over all
    ranks' samples; per-sample gradients streamed from :class:`~dist_chita.fisher.persample.PerSampleGrads`, never
    stored. ``batches``: this rank's ``(batch, indices)`` micro-batches. Collective."""
    diag = [torch.zeros(m.weight.numel(), dtype=torch.float64, device="cpu") for _, m in modules]  # host memory

    def add(g: int, grads: torch.Tensor) -> None:
        diag[g] += grads.double().pow(2).sum(0).cpu()

    device = modules[0][1].weight.device if modules else torch.device("cpu")
    with gradients_only(model), PerSampleGrads(modules, add) as psg:  # nothing written to .grad
        for batch, idx in batches:
            idx = torch.as_tensor(idx, dtype=torch.long, device="cpu").to(device)
            psg.backward(loss_fn(model, to_device(batch, device), idx))
    for d in diag:  # summed over the ranks on the collectives' device, one layer at a time
        d.copy_(comm.all_reduce(d.to(comm.device())))
        d /= n
    return diag


def criterion_scores(
    modules: Sequence[tuple[str, nn.Module]], criterion: str, lam: float = 0.0,
    diag: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Global scores (p,) float64 in the flat order: |w_bar| (magnitude) or w_bar^2 (diag F + lambda) (obs)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown block criterion {criterion!r} (one of {', '.join(CRITERIA)})")
    w = torch.cat([m.weight.detach().reshape(-1).double().cpu() for _, m in modules])
    if criterion == "magnitude":
        return w.abs()
    if diag is None:
        raise ValueError("the obs criterion needs the diagonal Fisher")
    return w.pow(2) * (torch.cat(list(diag)) + lam)


def allocate(scores: torch.Tensor, group_sizes: Sequence[int], k: int) -> list[int]:
    """k_g = how many of the global top-k ``scores`` (p,) fall in each group (groups are consecutive runs of
    ``group_sizes`` coordinates); sum_g k_g = k. Zero scores (weights already zero) are taken last."""
    if sum(group_sizes) != scores.numel():
        raise ValueError(f"group sizes cover {sum(group_sizes)} weights, the scores {scores.numel()}")
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k = {k} outside [0, {scores.numel()}]")
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    # stable order: ties are broken by position, so every rank allocates the same budgets
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    keep[order] = True
    return [int(part.sum()) for part in torch.split(keep, list(group_sizes))]


def prune_in_blocks(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    method: str,
    sparsity: float,
    *,
    block_size: int,
    criterion: str = "magnitude",
    make_batches: Callable[[], Iterable] | None = None,
    loss_fn: Callable | None = None,
    n: int = 0,
    lam: float = 1e-3,
    per_layer: bool = False,
    nm: tuple[int, int] | None = None,
    per_row: bool = False,
    base_sparsity: float = 0.0,
    progress: Callable[[str, int, int], None] | None = None,
    **prune_kwargs,
) -> PruneOutcome:
    """Prune ``modules`` group by group (module docstring); same arguments as :func:`dist_chita.fisher.driver.prune`
    plus ``block_size`` (weights per group) and ``criterion`` ("magnitude" or "obs"). Returns the outcome
    over all layers: the full layout, the stage reports of every group in order (their ``kept`` are the
    k_g) and the masks. Collective (every rank calls it with the same arguments)."""
    if method == "magnitude":  # nothing to gain from groups
        return prune(model, modules, method, sparsity, per_layer=per_layer, nm=nm, per_row=per_row,
                     progress=progress)
    sizes = [m.weight.numel() for _, m in modules]
    groups = layer_groups(sizes, block_size)
    group_sizes = [sum(sizes[i] for i in g) for g in groups]
    if per_layer or per_row or nm is not None:  # every group keeps its layers' own budgets
        budgets = [None] * len(groups)
    else:
        budgets = _group_budgets(model, modules, sparsity, criterion, make_batches, loss_fn, n, lam, group_sizes)
    stages: list[StageReport] = []
    for gi, (group, k_g, p_g) in enumerate(zip(groups, budgets, group_sizes, strict=True)):
        sub = [modules[i] for i in group]
        if k_g is not None and k_g == 0:  # the whole group goes
            with torch.no_grad():
                for _, m in sub:
                    m.weight.zero_()
            stages.append(StageReport(sparsity=1.0, kept=0))
            continue
        s_g = sparsity if k_g is None else 1.0 - k_g / p_g
        sub_progress = None if progress is None else (
            lambda name, done, total, gi=gi: progress(f"block {gi + 1}/{len(groups)} {name}", done, total))
        out = prune(model, sub, method, s_g, make_batches=make_batches, loss_fn=loss_fn, n=n, lam=lam,
                    per_layer=per_layer, nm=nm, per_row=per_row, base_sparsity=min(base_sparsity, s_g),
                    progress=sub_progress, **prune_kwargs)
        if k_g is not None and out.stages[-1].kept != k_g:
            raise RuntimeError(f"block {gi}: kept {out.stages[-1].kept}, allocated {k_g}")
        stages.extend(out.stages)
    layout = ColumnLayout.build(named_shapes(modules), comm.world_size(), align=nm[1] if nm else 1, rows=per_row)
    masks = {name: m.weight.detach() != 0 for name, m in modules}
    return PruneOutcome(layout, stages, masks)


def _group_budgets(model, modules, sparsity: float, criterion: str, make_batches, loss_fn, n: int, lam: float,
                   group_sizes: Sequence[int]) -> list[int]:
    """k_g of every group for the global budget k = (1 - s) p, split by the criterion's global top-k (the obs
    criterion's diagonal Fisher takes one pass over the calibration data). Collective."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    diag = None
    if criterion == "obs":
        if make_batches is None or loss_fn is None or n < 1:
            raise ValueError("the obs criterion needs calibration batches, a loss and n >= 1")
        diag = diagonal_fisher(model, modules, make_batches(), n, loss_fn)
    k = kept_count(sum(group_sizes), sparsity)
    return allocate(criterion_scores(modules, criterion, lam, diag), group_sizes, k)


def largest_group(sizes: Sequence[int], block_size: int) -> int:
    """Weights in the largest group: the p that sets the factor size with layer groups (memory estimate)."""
    return max(sum(sizes[i] for i in g) for g in layer_groups(sizes, block_size)) if sizes else 0

