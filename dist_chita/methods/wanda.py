"""Wanda (Sun et al., *A Simple and Effective Pruning Approach for Large Language Models*, ICLR 2024): the score
S_ij = |W_ij| ||X_j||_2 of every weight, the input feature's norm over the calibration tokens; the largest scores
of every output row are kept (per layer or N:M on request) and nothing is updated. A baseline on the inputs the
layerwise objective sees: ||X_j||_2 = sqrt(N H_jj) with H = X^T X / N, and a factor per layer leaves every mask
unchanged, so sqrt(diag H) serves. OWL (:mod:`dist_chita.layerwise.allocation`) scores weights the same way."""

from __future__ import annotations

import torch

from dist_chita.methods.base import LayerProblem, ScoreMethod, register


def wanda_scores(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| * sqrt(sq_norms) (r, d) for W (r, d) and the inputs' squared norms (d,) (diag H, or ||X_j||^2), in
    the dtype the two give."""
    return W.abs() * sq_norms.clamp_min(0.0).sqrt()[None, :]


@register
class Wanda(ScoreMethod):
    """S = |W_bar| sqrt(diag H_j) on the rows of part j (:func:`wanda_scores`), on the inputs of the already pruned
    model (as Wanda's own code runs it, block after block)."""

    name = "wanda"

    def scores(self, layer: LayerProblem) -> torch.Tensor:
        return torch.cat([wanda_scores(layer.W_bar[lo:hi], h.diagonal().float())
                          for (lo, hi), h in zip(layer.parts, layer.H, strict=True)])
