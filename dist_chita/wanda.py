"""Wanda (Sun et al., *A Simple and Effective Pruning Approach for Large Language Models*, ICLR 2024): the score
S_ij = |W_ij| ||X_j||_2 of every weight, the input feature's norm over the calibration tokens; the largest scores
of every output row are kept (per layer or N:M on request) and nothing is updated. A baseline on the inputs the
layerwise objective sees: ||X_j||_2 = sqrt(N H_jj) with H = X^T X / N, and a factor per layer leaves every mask
unchanged, so sqrt(diag H) serves."""

from __future__ import annotations

import torch


def wanda_scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """S = |W| * sqrt(diag H) (r, d), float32, for W (r, d) and H (d, d)."""
    return W.float().abs() * H.diagonal().float().clamp_min(0.0).sqrt()[None, :]
