"""The validation split's score of a model: what settings left to the user (the ridge lambda, CHITA++'s schedule)
are chosen by, on samples held out of the calibration data (never the evaluation data).

:func:`dist_chita.io.data.split_validation` carves the validation samples out of the n calibration samples (seeded,
disjoint from those the Fisher factor is built from). A :class:`Validation` scores a model on them:

* ``loss``: the mean per-sample loss of the model on its labels (cross-entropy, or a causal LM's next-token loss),
  1/m sum_i l_i(w);
* ``output``: for models without labels, the mean squared distance of the outputs to the dense model's,
  1/m sum_i ||f_w(x_i) - f_w_bar(x_i)||^2 / (1/m sum_i ||f_w_bar(x_i)||^2), the quantity whose Gauss-Newton matrix
  the probe loss's factor holds.

A score is collective and the same number on any world size: the validation samples are cut into one global
sequence of micro-batches, each rank evaluates a share (each micro-batch holds the same samples on any number of
ranks, so each per-sample value has the same bits), the per-sample values are all-reduced into one m-vector (one
non-zero contribution per entry: exact) and summed in sample order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.io import models
from dist_chita.io.data import Samples, iter_microbatches
from dist_chita.layerwise.curvature import collective_batches, my_microbatches

PerSample = Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]  # (model, batch, indices) -> (b,)
Forward = Callable[[nn.Module, dict], torch.Tensor]  # (model, batch) -> (b, ...) outputs
KINDS = ("loss", "output")
RULES = ("min", "one_se")
SCHEDULE_RULES = (*RULES, "significant")  # CHITA++'s schedule also takes the significance rule
SIGNIFICANT_SE = 2.0  # ``significant``: a candidate beats the simplest when its score is this many paired
# standard errors below (the conventional two-sigma level, about 2.3% one-sided under a normal difference)


def within_one_se(values: Sequence[torch.Tensor]) -> list[int]:
    """The candidates (indices) whose score, the mean of their per-sample validation values ``values[i]`` (m,), is
    within one standard error of the lowest score: mean_i - mean_best <= sd(v_i - v_best) / sqrt(m), the standard
    error of the paired difference (the same m samples score every candidate). The best is always among them."""
    means = [float(v.sum()) / v.numel() for v in values]
    best = min(range(len(means)), key=means.__getitem__)
    m = values[best].numel()

    def se(i: int) -> float:
        d = (values[i] - values[best]).double()
        return math.sqrt(float((d - d.mean()).pow(2).sum()) / (m - 1) / m) if m > 1 else 0.0

    return [i for i in range(len(means)) if means[i] <= means[best] + se(i)]


def standard_errors_below(values: Sequence[torch.Tensor], ref: int) -> list[float]:
    """(mean_ref - mean_i) / sd(v_i - v_ref) * sqrt(m) for every candidate i: how many standard errors of the paired
    difference its score lies below candidate ``ref``'s (0 for ``ref``; +-inf for a constant non-zero difference,
    0 for none)."""
    out = []
    for v in values:
        d = (values[ref] - v).double()
        m = d.numel()
        gap = float(d.sum()) / m
        sd = math.sqrt(float((d - d.mean()).pow(2).sum()) / (m - 1)) if m > 1 else 0.0
        out.append(gap * math.sqrt(m) / sd if sd > 0 else math.copysign(math.inf, gap) if gap else 0.0)
    return out


class Validation:
    """The score s(w) of a model on m validation samples (module docstring); lower is better.

    Args:
        samples: the m validation samples.
        per_sample: ``per_sample(model, batch, indices) -> (b,)`` values whose mean is the score (a per-sample loss;
            :meth:`output_distance` builds the ``output`` kind's).
        batch_size: samples per forward pass.
        kind: ``loss`` or ``output`` (what the report calls the score).
        partitioned: the model's parameters are partitioned (ZeRO-3): forwards are collective, so every rank runs
            as many.
        normaliser: the score is the mean divided by this (the ``output`` kind's dense output energy).
    """

    def __init__(self, samples: Samples, per_sample: PerSample, batch_size: int, kind: str = "loss",
                 partitioned: bool = False, normaliser: float = 1.0):
        if kind not in KINDS:
            raise ValueError(f"unknown validation score {kind!r} (one of {', '.join(KINDS)})")
        if len(samples) < 1:
            raise ValueError("the validation split is empty")
        self.samples, self.per_sample, self.batch_size = samples, per_sample, batch_size
        self.kind, self.partitioned, self.normaliser = kind, partitioned, normaliser

    def __len__(self) -> int:
        return len(self.samples)

    def values(self, model: nn.Module, fn: PerSample | None = None) -> torch.Tensor:
        """The per-sample values (m,) float64 of ``fn`` (default the score's), the same on every rank. Collective."""
        fn = fn or self.per_sample
        m = len(self.samples)
        out = torch.zeros(m, dtype=torch.float64, device=comm.device())
        mine = list(my_microbatches(iter_microbatches(self.samples, 0, m, self.batch_size)))
        device = next(model.parameters()).device
        with models.eval_mode(model), torch.no_grad():
            for (batch, idx), counts in collective_batches(mine, device, self.partitioned):
                vals = fn(model, batch, idx).double().reshape(-1)
                if vals.shape != (len(idx),):
                    raise ValueError(f"expected {len(idx)} per-sample validation values, got {tuple(vals.shape)}")
                if counts:
                    out[idx.to(out.device)] = vals.to(out.device)
        return comm.all_reduce(out)

    def score(self, model: nn.Module) -> float:
        """s(w): the mean of the per-sample values over the validation samples (in sample order), divided by the
        normaliser. Collective; the same on every rank and world size."""
        vals = self.values(model).cpu()
        return float(vals.sum()) / len(vals) / self.normaliser

    @classmethod
    def output_distance(cls, samples: Samples, forward: Forward, model: nn.Module, batch_size: int,
                        partitioned: bool = False) -> Validation:
        """The ``output`` kind: ||f_w(x_i) - f_w_bar(x_i)||^2 against the outputs of ``model`` now (the dense
        model), normalised by their mean squared norm. The dense outputs of a rank's validation samples stay on
        that rank. Collective (one pass over the validation samples)."""
        dense: dict[int, torch.Tensor] = {}

        def record(model, batch, idx):
            f = forward(model, batch).float().flatten(1)
            for row, i in enumerate(idx.tolist()):
                dense[int(i)] = f[row].clone()
            return f.pow(2).sum(1)

        def distance(model, batch, idx):
            f = forward(model, batch).float().flatten(1)
            ref = torch.stack([dense[int(i)] for i in idx.tolist()]).to(f.device)
            return (f - ref).pow(2).sum(1)

        v = cls(samples, distance, batch_size, "output", partitioned)
        energy = float(v.values(model, record).cpu().sum()) / len(samples)
        v.normaliser = energy if energy > 0 else 1.0
        return v
