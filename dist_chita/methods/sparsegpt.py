"""SparseGPT (Frantar & Alistarh, *SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot*, ICML
2023, Algorithm 1), one layer at a time: a baseline on the same curvature as the layerwise objective.

Paper's letters: W (rows, d) the layer's weights, H = X^T X the inputs' curvature, lambda the damping (a share of
mean(diag H)), H^-1 = U^T U with U upper triangular (the Cholesky factor of the inverse), B_s the block of columns
whose mask is chosen at once (128), M the mask, E the block's errors. Columns are processed left to right; at the
start of each block the mask is chosen over the whole block (the ``sparsity`` share of its smallest w^2 / U_jj^2
over all rows; with ``per_row``, every row's own share of the block, the comparison group Wanda uses); with N:M,
instead, at every M-th column the M - N smallest of the next M columns of every row, on
the already updated weights. Each column's error (w_j - q_j) / U_jj is spread onto the later columns through row j
of U (the OBS update), inside the block at once and to the later blocks in one product.

In the layerwise driver (:class:`SparseGPT`): the masks of a block of columns are chosen over all rows of a part of
the layer (with ``per_layer``, as in the paper) or per row; a part's rows are not independent problems, so every part
goes whole to one rank (:func:`sparsegpt_owners`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dist_chita.methods.base import (
    LayerMethod,
    LayerProblem,
    LayerResult,
    held_rows_bytes,
    reconstruction_objective,
    register,
)
from dist_chita.sparsity import kept_count

BLOCK = 128  # columns B_s whose mask is chosen together (the paper's and its code's)


def sparsegpt_rows(W: torch.Tensor, H: torch.Tensor, sparsity: float, *, damp: float = 0.01,
                   nm: tuple[int, int] | None = None, allowed: torch.Tensor | None = None,
                   per_row: bool = False, block: int = BLOCK, pruned_total: int | None = None) -> torch.Tensor:
    """Prune W (r, d) on H (d, d) (any positive scale; float64 arithmetic) to ``sparsity`` of every block of
    ``block`` columns (over all rows), or N:M with ``nm`` = (N, M). ``per_row``: every row loses exactly
    d - kept_count(d, sparsity) weights, spread over the blocks in proportion to their widths (the mask of each
    block chosen per row). ``allowed`` (r, d) bool: False for weights
    fixed at zero, which are pruned first and stay zero. Inputs whose diag H is 0 (never active) are pruned.
    ``pruned_total``: the weights of W to prune (a part's share of its layer's count), spread over the blocks in
    proportion to their widths, instead of ``sparsity`` of every block (rounded down in each).
    Damping: lambda = ``damp`` * mean(diag H). Returns the pruned, updated W (r, d) in W's dtype."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if damp <= 0:
        raise ValueError(f"damp must be > 0, got {damp}")
    out_dtype = W.dtype
    W, H = W.double().clone(), H.double().clone()
    fixed = torch.zeros_like(W, dtype=torch.bool) if allowed is None else ~allowed.to(W.device)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U
    d = W.shape[1]
    if nm is not None:  # whole groups of M in every block, aligned with the layer's groups
        if d % nm[1]:
            raise ValueError(f"N:M needs the input size ({d}) to be a multiple of M = {nm[1]}")
        block = max(nm[1], block // nm[1] * nm[1])
    pruned_per_row = d - kept_count(d, sparsity)

    def up_to(col: int) -> int:  # weights of a row pruned in columns [0, col) (per_row): sums to pruned_per_row
        return (pruned_per_row * col + d // 2) // d

    for a in range(0, d, block):
        b = min(a + block, d)
        W1, U1 = W[:, a:b].clone(), U[a:b, a:b]
        E1 = torch.zeros_like(W1)
        pruned = fixed[:, a:b].clone(memory_format=torch.contiguous_format)  # W may be a transposed view
        if nm is None:  # the block's mask at once: its smallest w^2 / U_jj^2 over all rows (fixed zeros first)
            score = (W1.pow(2) / U1.diagonal().pow(2)[None, :]).masked_fill(pruned, -1.0)
            if per_row:
                cut = up_to(b) - up_to(a)
                pruned.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :cut], True)
            else:
                cut = int(W1.numel() * sparsity) if pruned_total is None else \
                    (pruned_total * b + d // 2) // d - (pruned_total * a + d // 2) // d
                pruned.view(-1)[torch.argsort(score.reshape(-1), stable=True)[:cut]] = True
        for j in range(b - a):
            if nm is not None and j % nm[1] == 0:
                group = W1[:, j:j + nm[1]].pow(2) / U1.diagonal()[j:j + nm[1]].pow(2)[None, :]
                group = group.masked_fill(fixed[:, a + j:a + j + nm[1]], -1.0)
                pruned[:, j:j + nm[1]].scatter_(1, torch.argsort(group, dim=1, stable=True)[:, :nm[1] - nm[0]], True)
            w = W1[:, j]
            q = torch.where(pruned[:, j], torch.zeros_like(w), w)
            err = (w - q) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            W1[:, j] = q
            E1[:, j] = err
        W[:, a:b] = W1
        W[:, b:] -= E1 @ U[a:b, b:]
    return W.to(out_dtype)


def sparsegpt_owners(shapes: Mapping[tuple[int, int], tuple[int, int]], world: int) -> dict[tuple[int, int], int]:
    """The rank that runs SparseGPT on part j (a grouped Conv2d's group of rows, else all rows) of layer i, for
    every (i, j) of a block (``shapes``: (i, j) -> (rows r, inputs d) of the part): largest first, by the cost
    d (r + d) of a part (a column loop of d steps over the r rows, and the factorisation of a (d, d) matrix), each
    to the least loaded rank (ties: the earlier layer and part, the lower rank), so every rank derives the same
    owners."""
    items = sorted(((d * (r + d), i, j) for (i, j), (r, d) in shapes.items()), key=lambda t: (-t[0], t[1], t[2]))
    load, owners = [0] * world, {}
    for cost, i, j in items:
        rank = min(range(world), key=lambda q: (load[q], q))
        owners[(i, j)] = rank
        load[rank] += cost
    return owners


@register
class SparseGPT(LayerMethod):
    """:func:`sparsegpt_rows` on every part of the layer this rank owns, on the part's H with the driver's damping;
    per row unless ``per_layer`` (then the masks of each block of 128 columns over all the part's rows)."""

    name = "sparsegpt"

    def owners(self, shapes: Mapping[tuple[int, int], tuple[int, int]], world: int) -> dict[tuple[int, int], int]:
        return sparsegpt_owners(shapes, world)

    def solve_bytes(self, dims: Sequence[tuple[int, int]], blocks: Sequence[Sequence[int]]) -> int:
        """Four float64 (d, d) matrices (H, its factor, the inverse, U) and three float64 copies of the weights,
        plus the pruned rows of every layer of the largest block (float32), kept until the block is written
        back."""
        return max(32 * d * d + 24 * r * d for r, d in dims) + held_rows_bytes(dims, blocks)

    def prune(self, layer: LayerProblem) -> LayerResult:
        W = torch.zeros_like(layer.W_bar)
        g = len(layer.parts)
        # a layer budget over the equal parts of a grouped convolution: the layer's count, shared out among them
        pruned = layer.W_bar.numel() - kept_count(layer.W_bar.numel(), layer.sparsity)
        for j, lo, hi in layer.runs:
            share = (pruned * (j + 1) + g // 2) // g - (pruned * j + g // 2) // g
            W[lo:hi] = sparsegpt_rows(layer.W_bar[lo:hi], layer.H[j], layer.sparsity, damp=layer.damp, nm=layer.nm,
                                      allowed=layer.allowed[lo:hi], per_row=not layer.per_layer,
                                      pruned_total=share if g > 1 and layer.per_layer and layer.nm is None else None)
        return LayerResult(W=W, objective=reconstruction_objective(layer, W))
