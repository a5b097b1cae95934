"""Plain torch model factories usable as ``model.factory`` (``"dist_chita.zoo:mlpnet"``)."""

from __future__ import annotations

import torch
from torch import nn


class MLPNet(nn.Module):
    """The MLPNet of the CHITA paper (and WoodFisher / CBS): 784-40-20-10, ReLU, no biases.

    Input (B, 784) or (B, 1, 28, 28) normalised MNIST pixels, output (B, 10) logits.
    Parameters ``fc1.weight`` (40, 784), ``fc2.weight`` (20, 40), ``fc3.weight`` (10, 20): p = 32,360,
    as in the official checkpoint shipped as ``builtin:mlpnet-mnist`` (``dist_chita/checkpoints/mlpnet-mnist``).
    """

    def __init__(self, sizes: tuple[int, ...] = (784, 40, 20, 10)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1], bias=False)
        self.fc2 = nn.Linear(sizes[1], sizes[2], bias=False)
        self.fc3 = nn.Linear(sizes[2], sizes[3], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlpnet() -> MLPNet:
    """MLPNet with the official layer sizes (weights uninitialised for loading: random init)."""
    return MLPNet()
