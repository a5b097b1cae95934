"""Held-out quality of a (pruned) model.

Pure metrics on tensors:

* :func:`accuracy` - fraction of argmax(logits) == label, for classifiers;
* :func:`embedding_fidelity` - for embedding models, the mean cosine similarity
  between pruned and dense embeddings of the same held-out texts, and the
  nearest-neighbour agreement: for each text, is its top-1 neighbour among the
  other held-out texts the same under dense and pruned embeddings;
* :func:`stride_windows` / :func:`perplexity` - stride-based perplexity of a causal LM on a
  held-out token stream: each window of at most ``max_length`` tokens scores the next ``stride``
  tokens, so every token t >= 1 is scored exactly once, with at least ``max_length - stride``
  tokens of context (once past the start).
  perplexity = exp(sum of token NLL / number of scored tokens).

Model-running helpers split the samples (or windows) evenly over the ranks, run the
model under ``torch.no_grad`` (the caller puts the model in eval mode) and combine the
ranks' parts through :mod:`dist_chita.distributed.comm`, so every rank returns the same value; at
world size 1 they run alone. When the model's parameters are partitioned (DeepSpeed ZeRO-3,
:mod:`dist_chita.io.params`) a forward pass is collective, so a rank with fewer micro-batches than
another runs padding forwards (outputs discarded) until every rank ran the same number.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.distributed.partition import even_counts, ranges_from_counts
from dist_chita.io import models, params
from dist_chita.io.data import Samples, iter_microbatches, to_device

METRICS = ("accuracy", "perplexity", "embedding_fidelity", "none")
Forward = Callable[[nn.Module, str, dict], torch.Tensor]


# --------------------------------------------------------------------------- pure metrics


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` (N, C) whose argmax equals ``labels`` (N,)."""
    if logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need as many labels as logits rows (> 0), got {logits.shape[0]} and {labels.shape[0]}")
    return int((logits.argmax(-1) == labels).sum()) / int(labels.shape[0])


def nearest_neighbours(z: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar *other* row for each row of ``z`` (N, d) -> (N,)."""
    z = torch.nn.functional.normalize(z.float(), dim=-1)
    sim = z @ z.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(1)


def embedding_fidelity(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """How close pruned embeddings stay to dense ones, both (N, d) for the same N texts.

    cosine: mean_i cos(dense_i, pruned_i); nn_agreement: fraction of i whose nearest other
    text (cosine) is the same under both embeddings (needs N >= 2).
    """
    if dense.shape != pruned.shape or dense.dim() != 2 or dense.shape[0] < 2:
        raise ValueError(f"need two (N, d) embedding matrices with N >= 2, got {tuple(dense.shape)} and "
                         f"{tuple(pruned.shape)}")
    cos = torch.nn.functional.cosine_similarity(dense.float(), pruned.float(), dim=-1)
    agree = nearest_neighbours(dense) == nearest_neighbours(pruned)
    return {"cosine": float(cos.mean()), "nn_agreement": float(agree.float().mean())}


def stride_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, first_scored) over a stream of ``num_tokens`` tokens.

    The scored ranges [first_scored, end) are consecutive chunks of ``stride`` tokens tiling
    [1, num_tokens) (token 0 has no context); each window feeds the model the ``max_length``
    tokens [begin, end) = [max(0, end - max_length), end), so every scored token sees at least
    ``max_length - stride`` tokens before it (or all tokens from the start). 1 <= stride < max_length.
    """
    if not 1 <= stride < max_length:
        raise ValueError(f"need 1 <= stride < max_length, got stride {stride}, max_length {max_length}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens for perplexity, got {num_tokens}")
    out = []
    for first in range(1, num_tokens, stride):
        end = min(first + stride, num_tokens)
        out.append((max(0, end - max_length), end, first))
    return out


# --------------------------------------------------------------------------- running the model


def _my_range(total: int) -> tuple[int, int]:
    return ranges_from_counts(even_counts(total, comm.world_size()))[comm.rank()]


def _padding_steps(model: nn.Module, total: int, per_step: int) -> int:
    """Forward calls this rank adds after its own when the forward pass is collective (ZeRO-3): the most
    micro-batches of ``per_step`` items any rank has for an even split of ``total`` items, minus this rank's."""
    if not params.any_partitioned(model):
        return 0
    steps = [math.ceil((hi - lo) / per_step) for lo, hi in ranges_from_counts(even_counts(total, comm.world_size()))]
    return max(steps) - steps[comm.rank()]


def _my_batches(model: nn.Module, samples: Samples, batch_size: int):
    """This rank's micro-batches ``(batch, indices)`` of its even share, longest first (:func:`iter_microbatches`);
    ``indices`` None marks a padding batch (:func:`_padding_steps`; its output must be discarded)."""
    lo, hi = _my_range(len(samples))
    device = models.device_of(model)
    for b, idx in iter_microbatches(samples, lo, hi, batch_size, longest_first=True):
        yield to_device(b, device), idx
    for _ in range(_padding_steps(model, len(samples), batch_size)):
        yield to_device(samples.batch(torch.arange(min(batch_size, len(samples)))), device), None


@torch.no_grad()
def collect_outputs(
    model: nn.Module, task: str, samples: Samples, batch_size: int, forward: Forward = models.forward
) -> torch.Tensor:
    """``forward(model, task, batch)`` for all samples, in sample order, float32, on every rank.

    Rank r computes an even contiguous share; the shares are all-gathered (so the result is
    (N, C) logits or (N, d) embeddings; per-token outputs of unequal lengths are not supported).
    """
    parts, indices = [], []
    for b, idx in _my_batches(model, samples, batch_size):
        out = forward(model, task, b)
        if idx is not None:
            parts.append(out.float().cpu())
            indices.append(idx)
    mine = torch.cat(parts)[torch.argsort(torch.cat(indices))] if parts else None  # back in sample order
    gathered = [p for p in comm.all_gather_object(mine) if p is not None]
    return torch.cat(gathered)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, task: str, samples: Samples, batch_size: int, forward: Forward = models.forward
) -> float:
    """Accuracy over all ``samples`` (they need ``labels``), each rank scoring its share."""
    if "labels" not in samples.fields:
        raise ValueError("accuracy needs labelled samples (no label column was given)")
    correct = total = 0.0
    for b, idx in _my_batches(model, samples, batch_size):
        pred = forward(model, task, b).argmax(-1)
        if idx is None:
            continue
        correct, total = correct + float((pred == b["labels"]).sum()), total + float(len(pred))
    counts = comm.all_reduce_floats([correct, total])
    return float(counts[0] / counts[1])


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    max_length: int,
    stride: int | None = None,
    forward: Forward = models.forward,
) -> dict[str, float]:
    """Stride-based perplexity of a causal LM on ``tokens`` (T,) (see :func:`stride_windows`;
    ``stride`` None: max_length // 2). Windows are split over ranks; NLL sums are all-reduced.

    Returns {"perplexity", "nll" (mean per token), "tokens" (number scored)}.
    """
    stride = max(1, max_length // 2) if stride is None else stride
    windows = stride_windows(int(tokens.numel()), max_length, stride)
    lo, hi = _my_range(len(windows))
    tokens = tokens.to(models.device_of(model))
    nll_sum = scored = 0.0
    padding = [None] * _padding_steps(model, len(windows), 1)  # forwards of window 0, discarded (ZeRO-3)
    for window in windows[lo:hi] + padding:
        begin, end, first = window or windows[0]
        ids = tokens[begin:end].unsqueeze(0)
        logits = forward(model, "causal-lm", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0].float()
        if window is None:
            continue
        # logits[j] predicts token begin + j + 1; score targets first..end-1
        pred = logits[first - begin - 1 : end - begin - 1]
        target = tokens[first:end]
        nll = torch.nn.functional.cross_entropy(pred, target, reduction="sum")
        nll_sum, scored = nll_sum + float(nll), scored + float(end - first)
    sums = comm.all_reduce_floats([nll_sum, scored])
    mean = float(sums[0] / sums[1])
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": float(sums[1])}


def evaluate(
    model: nn.Module,
    task: str,
    metric: str,
    *,
    samples: Samples | None = None,
    tokens: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    batch_size: int = 32,
    max_length: int = 512,
    stride: int | None = None,
    forward: Forward = models.forward,
) -> dict[str, float]:
    """One metric of :data:`METRICS` as a dict of floats (same on every rank).

    accuracy: ``samples`` with labels -> {"accuracy"}; perplexity: ``tokens`` (T,) ->
    {"perplexity", "nll", "tokens"}; embedding_fidelity: ``samples`` and ``reference`` = the dense
    model's embeddings of them (from :func:`collect_outputs` before pruning) -> {"cosine",
    "nn_agreement"}; none -> {}.
    """
    if metric == "none":
        return {}
    if metric == "accuracy":
        if samples is None:
            raise ValueError("accuracy needs samples")
        return {"accuracy": evaluate_accuracy(model, task, samples, batch_size, forward)}
    if metric == "perplexity":
        if tokens is None:
            raise ValueError("perplexity needs a token stream")
        return perplexity(model, tokens, max_length, stride, forward)
    if metric == "embedding_fidelity":
        if samples is None or reference is None:
            raise ValueError("embedding_fidelity needs samples and the dense reference embeddings")
        return embedding_fidelity(reference, collect_outputs(model, task, samples, batch_size, forward))
    raise ValueError(f"unknown metric {metric!r} (one of {', '.join(METRICS)})")


class Evaluator:
    """The held-out metric of one run at its stages (the ``evaluate`` of :func:`dist_chita.prune`): called with
    ``"before"`` (the dense model; for ``embedding_fidelity`` this collects the dense embeddings, the reference,
    and returns nothing), ``"magnitude"`` and ``"after"``. ``samples`` (accuracy, embedding fidelity) or ``tokens``
    (perplexity) are the held-out data. Collective, like :func:`evaluate`."""

    def __init__(self, model: nn.Module, task: str, metric: str, *, samples: Samples | None = None,
                 tokens: torch.Tensor | None = None, batch_size: int = 32, max_length: int = 512,
                 stride: int | None = None):
        self.model, self.task, self.metric = model, task, metric
        self.samples, self.tokens, self.batch_size = samples, tokens, batch_size
        self.max_length, self.stride = max_length, stride
        self.reference: torch.Tensor | None = None

    def __call__(self, stage: str) -> dict[str, float]:
        if self.metric == "embedding_fidelity" and self.reference is None:
            if stage != "before":
                raise ValueError("embedding_fidelity needs the dense embeddings: evaluate 'before' first")
            self.reference = collect_outputs(self.model, self.task, self.samples, self.batch_size)
            return {}
        return evaluate(self.model, self.task, self.metric, samples=self.samples, tokens=self.tokens,
                        reference=self.reference, batch_size=self.batch_size, max_length=self.max_length,
                        stride=self.stride)

    def probe_batches(self) -> list[dict[str, torch.Tensor]]:
        """The largest batch an evaluation runs (what its forward adds to memory)."""
        if self.samples is not None:
            return [self.samples.largest_batch(self.batch_size)]
        if self.tokens is not None:
            ids = self.tokens[: self.max_length][None]
            return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
        return []
