"""Optimal Brain Damage (LeCun, Denker & Solla, *Optimal Brain Damage*, NeurIPS 1990), one layer at a time: the
saliency of weight w_j is s_j = h_jj w_j^2 / 2, the loss's increase when w_j alone is set to zero under a diagonal
quadratic model of the loss; the largest of every row are kept (or of the layer, or N of every M) and nothing is
updated.

h_jj, the diagonal of the loss's Hessian, is taken as F_jj = (1/n) sum_i (dl_i/dw_j)^2, the diagonal of the
empirical Fisher of the run's loss l_i over the n calibration samples at the dense weights (its Gauss-Newton
approximation; :func:`dist_chita.fisher.groups.diagonal_fisher`, computed once on the dense model by the driver,
``prune_layerwise(loss_fn=...)``). Not the layer's own curvature H = X^T X / N: with h_jj = H_jj, w_ij^2 H_jj =
(|w_ij| sqrt(H_jj))^2 ranks every row exactly as Wanda's score does. F is summed over the samples in float64 in
rank order, so its last bits, and a mask between two scores that equal within that rounding, can depend on the
number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_chita.methods.base import LayerProblem, ScoreMethod, register


@register
class OBD(ScoreMethod):
    """S_ij = F_ij w_bar_ij^2 / 2 (float64), F in the rows' layout (``layer.fisher``)."""

    name = "obd"
    needs_curvature = False
    needs_fisher_diagonal = True

    def solve_bytes(self, dims: Sequence[tuple[int, int]], blocks: Sequence[Sequence[int]]) -> int:
        """The default bound plus F of every layer, float64, held from the start."""
        return super().solve_bytes(dims, blocks) + sum(8 * r * d for r, d in dims)

    def scores(self, layer: LayerProblem) -> torch.Tensor:
        if layer.fisher is None:
            raise ValueError("OBD needs the Fisher diagonal of the loss (layer.fisher)")
        return 0.5 * layer.W_bar.double().pow(2) * layer.fisher
