"""Per-sample losses l_i whose gradients at w_bar are the rows of the Fisher factor A.

Every loss here is a callable ``loss_fn(model, batch, indices) -> (b,) tensor``:

* ``model``: the network at the dense weights w_bar;
* ``batch``: a micro-batch (a dict of tensors, or whatever ``forward`` accepts);
* ``indices``: (b,) int64 GLOBAL sample indices of the rows of ``batch``.

Row i of A is grad l_i(w_bar) / sqrt(n); backward of ``losses.sum()`` yields all
of them at once (:mod:`dist_chita.fisher.persample`). How a batch maps to model
outputs is the caller's ``forward(model, batch) -> tensor`` (default
:func:`model_output`).

Losses that draw random numbers (sampled Fisher, Gauss-Newton probe) draw them
per sample from a ``torch.Generator`` seeded with ``seed * 1_000_003 + index``
(:func:`sample_generator`), so A does not depend on the world size, the
micro-batch size or the padding of a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Forward = Callable[[nn.Module, Any], torch.Tensor]
LossFn = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]

IGNORE_INDEX = -100
SEED_STRIDE = 1_000_003


def model_output(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default ``forward``: ``model(**inputs)`` with inputs = ``batch`` without the ``labels`` key; a single input
    (e.g. ``{"x": x, "labels": y}``) and a non-dict batch are passed positionally. Returns the output if it is a
    tensor, else its ``.logits``, else its ``.last_hidden_state``, else ``output[0]``."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(*inputs.values()) if len(inputs) == 1 else model(**inputs)
    else:
        out = model(batch)
    if torch.is_tensor(out):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if value is not None:
            return value
    return out[0]


def mean_pooled(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embedding f(x): (b, d) mean of ``last_hidden_state`` over tokens with ``attention_mask`` 1
    (sentence-transformers pooling); independent of how much padding the batch has."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of global sample ``index``: a function of (seed, index) only."""
    return torch.Generator().manual_seed(int(seed) * SEED_STRIDE + int(index))


def _check(losses: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if losses.shape != (len(indices),):
        raise ValueError(f"expected {len(indices)} per-sample losses, got shape {tuple(losses.shape)}")
    return losses


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Categorical draws: probs (m, V), u (m,) uniform in [0, 1) -> (m,) class indices."""
    cdf = probs.double().cumsum(-1)
    y = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return y.clamp_(max=probs.shape[-1] - 1)


def cross_entropy(forward: Forward = model_output, label_key: str = "labels") -> LossFn:
    """Classification, empirical Fisher: l_i = CE(logits_i, y_i). logits (b, C), ``batch[label_key]`` (b,)."""

    def loss_fn(model, batch, indices):
        if label_key not in batch:
            raise ValueError(f"the loss ce needs labels: the calibration samples have no {label_key!r} (give a "
                             "label column, or a loss without labels: gn_probe, sampled)")
        logits = forward(model, batch)
        labels, classes = batch[label_key], logits.shape[-1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(f"labels must lie in [0, {classes}) for a model of {classes} outputs; the calibration "
                             f"labels run {int(labels.min())}..{int(labels.max())}")
        return _check(F.cross_entropy(logits.float(), labels, reduction="none"), indices)

    return loss_fn


def lm_labels(batch: Mapping[str, torch.Tensor], label_key: str = "labels") -> torch.Tensor:
    """(b, T) next-token labels before the shift: ``batch[label_key]`` if present, else ``input_ids``;
    positions with ``attention_mask`` 0 become -100 (ignored)."""
    labels = batch[label_key] if label_key in batch else batch["input_ids"]
    if "attention_mask" in batch:
        labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return labels


def _token_mean(token_losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(b, T) token losses, (b, T) bool -> (b,) mean over valid tokens (0 for a sequence without any)."""
    token_losses = token_losses.masked_fill(~valid, 0.0)
    return token_losses.sum(1) / valid.sum(1).clamp(min=1)


def causal_lm(forward: Forward = model_output, label_key: str = "labels") -> LossFn:
    """Causal LM, empirical Fisher: l_i = mean over valid positions t of CE(logits[i, t], labels[i, t + 1]).

    logits (b, T, V); labels from :func:`lm_labels` (-100 and attention_mask 0 are ignored)."""

    def loss_fn(model, batch, indices):
        logits = forward(model, batch)[:, :-1].float()
        targets = lm_labels(batch, label_key)[:, 1:]
        valid = targets != IGNORE_INDEX
        tok = F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~valid, 0), reduction="none")
        return _check(_token_mean(tok, valid), indices)

    return loss_fn


def sampled_fisher(
    seed: int, forward: Forward = model_output, causal: bool = False, label_key: str = "labels"
) -> LossFn:
    """True (sampled) Fisher: labels y drawn from the model's own predictive distribution p_w_bar(y | x_i),
    l_i = CE(logits_i, y_i), so E_y[g_i g_i^T] is the Fisher information of sample i.

    Classification: logits (b, C), one draw per sample. ``causal=True``: logits (b, T, V), one draw per valid
    next-token position (as in :func:`causal_lm`), in position order; l_i is the mean over those positions.
    The uniforms come from :func:`sample_generator` (seed, global index), so draws do not depend on batching
    or padding."""

    def loss_fn(model, batch, indices):
        logits = forward(model, batch)
        if causal:
            logits = logits[:, :-1]
            valid = lm_labels(batch, label_key)[:, 1:] != IGNORE_INDEX
        else:
            valid = torch.ones(logits.shape[0], 1, dtype=torch.bool, device=logits.device)
            logits = logits.unsqueeze(1)
        logits = logits.float()
        probs = logits.detach().softmax(-1)
        targets = torch.zeros(valid.shape, dtype=torch.long, device=logits.device)
        for row, index in enumerate(torch.as_tensor(indices, device="cpu").tolist()):
            pos = valid[row].nonzero().squeeze(-1)
            u = torch.rand(len(pos), generator=sample_generator(seed, index), dtype=torch.float64, device="cpu")
            targets[row, pos] = _inverse_cdf(probs[row, pos], u.to(logits.device))
        tok = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return _check(_token_mean(tok, valid), indices)

    return loss_fn


def gauss_newton_probe(seed: int, forward: Forward = mean_pooled) -> LossFn:
    """Gauss-Newton probe for embedding models: l_i = v_i . f_w(x_i), v_i ~ N(0, I) drawn from
    :func:`sample_generator` (seed, global index), with f the model output of shape (b, ...) (default
    :func:`mean_pooled`, (b, d)).

    grad l_i = J_i^T v_i with J_i = d f_w(x_i) / dw, so E_v[g_i g_i^T] = J_i^T J_i, the Gauss-Newton matrix of
    1/2 ||f_w(x_i) - f_w_bar(x_i)||^2 at w = w_bar. The shape of f(x_i) must not depend on the batch (pool
    over tokens), otherwise v_i would."""

    def loss_fn(model, batch, indices):
        f = forward(model, batch)
        v = torch.stack(
            [
                torch.randn(f.shape[1:], generator=sample_generator(seed, i), dtype=torch.float32, device="cpu")
                for i in torch.as_tensor(indices, device="cpu").tolist()
            ]
        ).to(f.device)
        return _check((f.float() * v).flatten(1).sum(1), indices)

    return loss_fn
