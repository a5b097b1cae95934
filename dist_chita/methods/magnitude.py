"""Magnitude pruning (Han et al., *Learning both Weights and Connections for Efficient Neural Networks*, NeurIPS
2015), one layer at a time: the score of weight w_ij is |w_ij|; the largest of every row are kept (or of the layer,
or N of every M) and nothing is updated. Needs no calibration data: no H, no passes."""

from __future__ import annotations

import torch

from dist_chita.methods.base import LayerProblem, ScoreMethod, register


@register
class Magnitude(ScoreMethod):
    """S_ij = |w_bar_ij|."""

    name = "magnitude"
    needs_curvature = False

    def scores(self, layer: LayerProblem) -> torch.Tensor:
        return layer.W_bar.abs()
