"""A layer's weights as rows: the shape in which the layerwise objective sees every prunable layer.

Row i of a layer is the weights of output i, over its d inputs: w_bar_i (d,) of W_bar (r, d). The inputs X (N, d) that
the rows see are built here too (:func:`input_rows`), so that X W_bar^T is the layer's own output and H = X^T X / N
is the curvature of exactly these rows. A grouped Conv2d has g groups of r / g rows, group j seeing only its own
d inputs (its own H). Nothing here computes or communicates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_chita.prunable import conv1d_types


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, conv1d_types())


def weight_rows(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The layer's weights as (outputs, inputs): Linear as is, transformers' Conv1D transposed, Conv2d flattened
    over (in_channels, kh, kw) in unfold's order."""
    if _is_conv1d(module):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def input_size(module: nn.Module, shape: tuple[int, ...]) -> int:
    """d, the length of a row of :func:`weight_rows` for a weight of ``shape``."""
    return shape[0] if _is_conv1d(module) else math.prod(shape[1:])


def from_rows(module: nn.Module, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The weight of ``shape`` whose :func:`weight_rows` are ``rows`` (r, d): the inverse of :func:`weight_rows`."""
    return rows.T.contiguous() if _is_conv1d(module) else rows.reshape(shape)


def _is_conv(module: nn.Module) -> bool:
    """torch's Conv2d and Conv1d: rows are unfolded patches (a Conv1d is a Conv2d of height 1)."""
    return isinstance(module, nn.Conv2d | nn.Conv1d)


def check_zero_padding(module: nn.Module, name: str = "a Conv2d layer") -> None:
    """Raise ValueError for a convolution whose padding is not zeros (its unfolded inputs would not be its
    inputs)."""
    if _is_conv(module) and module.padding_mode != "zeros":
        raise ValueError(f"{name}: objective layerwise supports Conv1d and Conv2d with zero padding only "
                         f"(padding_mode={module.padding_mode!r}); "
                         "leave it out of the prunable layers or use the Fisher objective")


def groups(module: nn.Module) -> int:
    """g: a grouped Conv2d's output rows form g groups, group j seeing only its own inputs (its own H); else 1."""
    return module.groups if _is_conv(module) else 1


def input_rows(module: nn.Module, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of X that ``module`` sees in this forward: (N_batch, inputs) float32. Sequences: one row per
    token where ``token_mask`` (b, T) is set; Conv2d and Conv1d: one row per output position (unfolded patch, all
    channels: with g groups, columns [j d, (j + 1) d) are group j's inputs, d = :func:`input_size`)."""
    if _is_conv(module):
        check_zero_padding(module)
        kernel, dilation, stride, padding = module.kernel_size, module.dilation, module.stride, module.padding
        if isinstance(module, nn.Conv1d):  # a Conv2d of height 1: (b, C, L) -> (b, C, 1, L)
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
            padding = padding if isinstance(padding, str) else (0, *padding)
        if padding == "valid":
            padding = 0
        elif padding == "same":  # stride 1; torch puts the odd pixel of an even total at the end
            total = [dil * (k - 1) for dil, k in zip(dilation, kernel, strict=True)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = 0
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (b, Cin*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).float()
    if x.dim() == 3 and token_mask is not None and token_mask.shape == x.shape[:2]:
        return x[token_mask.bool()].float()
    return x.reshape(-1, x.shape[-1]).float()
