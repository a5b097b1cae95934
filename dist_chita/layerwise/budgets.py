"""Cross-layer budgets for the layerwise objective: how many weights each layer keeps when one budget holds over all
prunable weights (``granularity: global``, or ``allocation: reconstruction`` with per-row budgets inside a layer).

The criterion, comparable between layers: each layer's relative reconstruction error against its sparsity,

    e_l(s) = mean over the rows i with w_i != 0 of  (w_i - w^_i)^T H_l (w_i - w^_i) / (w_i^T H_l w_i),

w^_i the row after SparseGPT (:func:`~dist_chita.methods.sparsegpt.sparsegpt_rows`, the layer's masks over all its
rows) prunes the layer alone to s, H_l = X^T X / N over the dense model's inputs to the layer. The denominator is the
row's output energy: e_l is the share of each output's signal the pruning destroys, the quantity a following
BatchNorm or LayerNorm sees, and it does not depend on the layer's scale. Each curve is measured on a grid of
sparsities (:data:`GRID`) and replaced by its lower convex hull over the number of weights removed; the budget then
goes where a removed weight costs least:

    minimise sum_l e_l(s_l)   subject to   sum_l size_l s_l = S p,

solved exactly on the convexified curves by taking the hull segments of all layers in order of their cost per
removed weight, the last one in part (:func:`allocate`): integer counts per layer, the total exact.

H of every block comes from :func:`~dist_chita.layerwise.curvature.block_curvatures` on the dense model; each rank
measures every R-th layer and one all-reduce of a table with zeros elsewhere gives every rank the same curves (so the
same budgets on any number of ranks). Nothing here parses a config or prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.io import params
from dist_chita.layerwise.curvature import block_curvatures
from dist_chita.layerwise.geometry import groups, weight_rows
from dist_chita.methods.sparsegpt import sparsegpt_rows

GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)

__all__ = ["GRID", "allocate", "error_curve", "error_curves", "global_targets"]


def error_curve(W: torch.Tensor, H: torch.Tensor, grid: Sequence[float] = GRID, damp: float = 0.01) -> torch.Tensor:
    """e(s) for every s of ``grid``: (G,) float64, for one layer's rows W (r, d) and the curvature H (g, d, d) of
    its g parts (consecutive equal shares of the rows; g > 1 for a grouped Conv2d). Rows that are all zero, or see
    no input, do not count; a layer without any row that counts has e = 0."""
    W = W.double()
    parts = H.shape[0]
    per = W.shape[0] // parts
    ratios = []
    for s in grid:
        total, rows = 0.0, 0
        for j in range(parts):
            Wj, Hj = W[j * per:(j + 1) * per], H[j].double()
            energy = (Wj @ Hj * Wj).sum(1)
            live = energy > 0
            if not bool(live.any()):
                continue
            D = Wj - sparsegpt_rows(Wj, Hj, s, damp=damp).double() if s > 0 else torch.zeros_like(Wj)
            err = (D @ Hj * D).sum(1)
            total += float((err[live] / energy[live]).sum())
            rows += int(live.sum())
        ratios.append(total / rows if rows else 0.0)
    return torch.tensor(ratios, dtype=torch.float64)


def error_curves(model: nn.Module, modules: Sequence[tuple[str, nn.Module]], forward: Callable[[object], object],
                 make_batches: Callable[[], Iterable], grid: Sequence[float] = GRID, damp: float = 0.01,
                 progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """(L, G) float64: :func:`error_curve` of every module on the dense model's H (the model is not changed).
    ``forward`` and ``make_batches`` as for :func:`~dist_chita.layerwise.driver.prune_layerwise`. Collective."""
    world, rank = comm.world_size(), comm.rank()
    device = modules[0][1].weight.device
    curves = torch.zeros(len(modules), len(grid), dtype=torch.float64, device=device)
    done = 0
    for group, Hs in block_curvatures(model, modules, forward, make_batches):
        for i, H in zip(group, Hs, strict=True):
            if i % world == rank:
                m = modules[i][1]
                curves[i] = error_curve(weight_rows(m, params.read(m.weight)), H.reshape(groups(m), *H.shape[-2:]),
                                        grid, damp).to(device)
        done += len(group)
        if progress is not None:
            progress("allocation", done, len(modules))
    return comm.all_reduce(curves)


def _hull(removed: Sequence[int], cost: Sequence[float]) -> list[tuple[int, float]]:
    """The lower convex hull of the points (removed, cost), removed increasing: its vertices from the first point."""
    hull: list[tuple[int, float]] = []
    for x, y in zip(removed, cost, strict=True):
        if hull and x == hull[-1][0]:
            if y < hull[-1][1]:
                hull.pop()
            else:
                continue
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (x - x0) >= (y - y0) * (x1 - x0):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append((x, y))
    return hull


def allocate(curves: torch.Tensor, sizes: Sequence[int], kept: int, grid: Sequence[float] = GRID) -> list[int]:
    """Weights kept per layer: ``kept`` in all, layer l at most ``sizes[l]`` and at least what the grid's largest
    sparsity leaves, chosen to minimise the sum of the convexified curves (module docstring). ``curves`` (L, G): the
    cost of layer l at sparsity ``grid[g]``, grid[0] = 0. Ties go to the earlier layer. ValueError when ``kept``
    is below what the grid allows."""
    removed = [[min(round(n * s), n - 1) for s in grid] for n in sizes]  # every layer keeps a weight
    segments = []  # (cost per removed weight, layer, order on the layer, weights)
    for layer, (xs, ys) in enumerate(zip(removed, curves.tolist(), strict=True)):
        hull = _hull(xs, ys)
        for order, ((x0, y0), (x1, y1)) in enumerate(zip(hull, hull[1:], strict=False)):
            segments.append(((y1 - y0) / (x1 - x0), layer, order, x1 - x0))
    to_remove = sum(sizes) - kept
    most = sum(r[-1] for r in removed)
    if not 0 <= to_remove <= most:
        raise ValueError(f"cannot keep {kept} of {sum(sizes)} weights with at most {grid[-1]} of every layer pruned")
    out = list(sizes)
    for _, layer, _, width in sorted(segments):
        if to_remove == 0:
            break
        take = min(width, to_remove)
        out[layer] -= take
        to_remove -= take
    return out


def global_targets(model: nn.Module, modules: Sequence[tuple[str, nn.Module]], forward: Callable[[object], object],
                   make_batches: Callable[[], Iterable], sparsity: float, damp: float = 0.01,
                   progress: Callable[[str, int, int], None] | None = None) -> list[float]:
    """One sparsity per module such that the modules keep kept_count(p, ``sparsity``) weights in all (each target
    is exactly kept / size of its layer), allocated by :func:`allocate` on :func:`error_curves`. Collective."""
    from dist_chita.sparsity import kept_count

    sizes = [params.numel(m.weight) for _, m in modules]
    curves = error_curves(model, modules, forward, make_batches, GRID, damp, progress)
    kept = allocate(curves, sizes, kept_count(sum(sizes), sparsity))
    return [1.0 - k / n if k < n else 0.0 for k, n in zip(kept, sizes, strict=True)]

