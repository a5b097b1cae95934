"""Which weight tensors of a model are pruned.

The prunable weights are the ``.weight`` of the selected modules; their order
here is the global flat order of w (length p, see :mod:`dist_chita.distributed.layout`).

Default selection: every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and
``transformers.pytorch_utils.Conv1D`` (weight stored (in, out)), except

* the output head. For Hugging Face models (those with
  ``get_output_embeddings``): the module returned by
  ``get_output_embeddings()`` and every module under a name component
  ``classifier``, ``lm_head`` or ``score``. For plain torch models: the last
  ``nn.Linear`` in registration order. ``exclude_head=False`` keeps the head.
* any module whose weight *is* an input embedding matrix (tied weights), i.e.
  ``get_input_embeddings().weight`` or the weight of any ``nn.Embedding``;
* ``nn.MultiheadAttention.out_proj``: that module computes with
  ``F.linear(..., out_proj.weight)`` without calling the submodule, so its
  per-sample gradients cannot be hooked.

Shared (tied) parameters are listed once, under the first module name that
owns them in registration order.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from dist_chita.io import params

HEAD_NAMES = ("classifier", "lm_head", "score")


def conv1d_types() -> tuple[type, ...]:
    """transformers' ``Conv1D`` (weight stored (in, out)), or () without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


def default_types() -> tuple[type, ...]:
    """Module types whose ``.weight`` is prunable by default."""
    return (nn.Linear, nn.Conv1d, nn.Conv2d, *conv1d_types())


def _is_hf(model: nn.Module) -> bool:
    return callable(getattr(model, "get_output_embeddings", None)) and callable(
        getattr(model, "get_input_embeddings", None)
    )


def head_module_names(model: nn.Module) -> set[str]:
    """Names of the modules treated as the output head (see the module docstring)."""
    names = {name for name, _ in model.named_modules()}
    if _is_hf(model):
        heads = set()
        try:
            out = model.get_output_embeddings()
        except NotImplementedError:
            out = None
        if out is not None:
            heads |= {name for name, m in model.named_modules() if m is out}
        for name in names:
            if any(part in HEAD_NAMES for part in name.split(".")):
                heads.add(name)
        return heads
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return {last} if last is not None else set()


def _embedding_weights(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if _is_hf(model):
        try:
            emb = model.get_input_embeddings()
        except NotImplementedError:
            emb = None
        if emb is not None and getattr(emb, "weight", None) is not None:
            ids.add(id(emb.weight))
    return ids


def prunable_modules(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    exclude_head: bool = True,
    extra_types: Sequence[type] = (),
) -> list[tuple[str, nn.Module]]:
    """Ordered (module name, module) pairs whose ``.weight`` is pruned.

    include: fnmatch patterns on module names; when given, only matching
        candidates are kept. exclude: patterns removed afterwards.
    extra_types: further module types whose ``.weight`` is prunable (their
        per-sample gradients use the torch.func fallback of
        :mod:`dist_chita.fisher.persample`).

    Raises ValueError if a pattern matches no candidate layer or nothing is left.
    """
    types = (*default_types(), *extra_types)
    heads = head_module_names(model) if exclude_head else set()
    embeddings = _embedding_weights(model)
    mha_out = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    candidates, seen = [], set()
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, types) or not isinstance(w, nn.Parameter):
            continue
        if name in heads or id(w) in embeddings or id(m) in mha_out or id(w) in seen:
            continue
        seen.add(id(w))
        candidates.append((name, m))
    for pat in [*(include or ()), *exclude]:
        if not any(fnmatch.fnmatchcase(name, pat) for name, _ in candidates):
            raise ValueError(f"pattern {pat!r} matches no prunable layer (candidates: {len(candidates)} layers)")
    out = [
        (name, m)
        for name, m in candidates
        if (include is None or any(fnmatch.fnmatchcase(name, p) for p in include))
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    if not out:
        raise ValueError("no prunable layer selected")
    return out


def layer_targets(names: Sequence[str], default: float, rules: Sequence[tuple[str, float]]) -> list[float]:
    """One sparsity per layer of ``names``: that of the first (fnmatch pattern, sparsity) rule whose pattern
    matches the layer's name, else ``default``. Raises ValueError for a pattern that matches none of them."""
    for pat, _ in rules:
        if not any(fnmatch.fnmatchcase(name, pat) for name in names):
            raise ValueError(f"pattern {pat!r} matches no prunable layer (of {len(names)} layers)")
    return [next((s for pat, s in rules if fnmatch.fnmatchcase(name, pat)), default) for name in names]


def named_shapes(modules: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, tuple[int, ...]]]:
    """[(name, weight shape)] in the input for :meth:`dist_chita.distributed.layout.ColumnLayout.build`."""
    return [(name, tuple(params.shape(m.weight))) for name, m in modules]
