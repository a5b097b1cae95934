"""Defaults per model family: what :func:`dist_chita.prune` runs when no objective is given (``prune.objective:
auto``, the default).

The family is read from the model's modules and task (:func:`model_family`):

* ``causal-lm``: the task ``causal-lm``;
* ``encoder``: a model with token embeddings (``nn.Embedding``) and any other task: transformer encoders, sentence
  embedders, sequence classifiers;
* ``cnn``: convolutional layers (``nn.Conv1d``, ``nn.Conv2d``) and no embeddings, with BatchNorm or without;
* ``mlp``: only ``nn.Linear`` layers;
* ``other``: anything else.

Each family has a :class:`Recipe` (:data:`RECIPES`): the objective, method and granularity measured best on it
(``benchmarks/resnet_mnist.py`` for the CNN and the MLP, ``benchmarks/minilm_baselines.py`` for the encoder), and
why. Transformers keep every output row at the target (a layer sees every calibration token, so its curvature is
well determined, and a row left with nothing kills an output); CNNs and MLPs get one budget over all layers whose
shares follow each layer's reconstruction error (per-row or per-layer budgets starve the small, sensitive layers:
the stem, the shortcuts, the last hidden layer). Given settings win over the recipe (:func:`resolve`): a method that
only one objective has picks that objective. After pruning, BatchNorm statistics are re-estimated by default
(:mod:`dist_chita.batchnorm`) whatever the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dist_chita.options import FISHER_METHODS, layerwise_methods

FAMILIES = ("cnn", "mlp", "encoder", "causal-lm", "other")


@dataclass(frozen=True)
class Recipe:
    """What a family of models is pruned with by default, and why (one line a person reads)."""

    objective: str
    method: str
    granularity: str
    why: str


_GLOBAL_WHY = ("one budget over all layers, each layer's share set by its reconstruction error against its sparsity "
               "(per-row budgets starve the small, sensitive layers)")
RECIPES = {
    "cnn": Recipe("layerwise", "chita", "global", "a convolutional network: " + _GLOBAL_WHY),
    "mlp": Recipe("layerwise", "chita", "global", "a multilayer perceptron: " + _GLOBAL_WHY),
    "encoder": Recipe("layerwise", "chita", "row", "a transformer encoder: every layer sees all calibration tokens "
                      "(H well determined), and every output row keeps the target share"),
    "causal-lm": Recipe("layerwise", "chita", "row", "a causal language model: every layer sees all calibration "
                        "tokens (H well determined), and every output row keeps the target share (as SparseGPT "
                        "and Wanda are measured)"),
    "other": Recipe("layerwise", "chita", "row", "a model of no known family: the layerwise objective with "
                    "per-row budgets, which needs no labels and holds every output"),
}


def model_family(model: nn.Module, task: str) -> str:
    """The family of :data:`FAMILIES` (module docstring) of ``model`` used for ``task``."""
    if task == "causal-lm":
        return "causal-lm"
    kinds = {type(m) for m in model.modules()}
    if any(issubclass(k, nn.Embedding) for k in kinds):
        return "encoder"
    if any(issubclass(k, nn.Conv1d | nn.Conv2d) for k in kinds):
        return "cnn"
    weighted = [m for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]
    if weighted and all(isinstance(m, nn.Linear | nn.LayerNorm | nn.modules.batchnorm._BatchNorm) for m in weighted):
        return "mlp"
    return "other"


@dataclass(frozen=True)
class Resolved:
    """The settings a run uses: ``objective`` (layerwise or fisher), ``method``, ``granularity``; ``line``: what
    was chosen and why, when anything was left to the recipe (else None)."""

    objective: str
    method: str
    granularity: str
    line: str | None


def resolve(model: nn.Module, task: str, objective: str | None = None, method: str | None = None,
            granularity: str | None = None) -> Resolved:
    """The run's objective, method and granularity: those given (None: not given), the rest from the family's
    recipe when the objective is not given (``"auto"`` counts as not given); with an objective given, method
    ``chita`` and granularity ``row`` (the options' defaults). A method of one objective only (``chita++``:
    fisher; ``sparsegpt``, ``wanda``, ``obd``: layerwise) sets the objective."""
    objective = None if objective == "auto" else objective
    if objective is not None:
        return Resolved(objective, method or "chita", granularity or "row", None)
    family = model_family(model, task)
    recipe = RECIPES[family]
    chosen = recipe.objective
    if method is not None and method not in (FISHER_METHODS if chosen == "fisher" else layerwise_methods()):
        chosen = "fisher" if method in FISHER_METHODS else "layerwise"
    given = {"method": method, "granularity": granularity}
    method = method or recipe.method
    granularity = granularity or (recipe.granularity if chosen == recipe.objective else "row")
    settings = [f"objective auto: {chosen}" + ("" if chosen == recipe.objective else
                                               f" (for method {method}; the recipe's: {recipe.objective})")]
    for name, value, recipe_value in (("method", method, recipe.method),
                                      ("granularity", granularity, recipe.granularity)):
        if given[name] is not None:
            note = " (given)" if value == recipe_value else f" (given; the recipe's: {recipe_value})"
        else:  # a method of the other objective takes that objective's default
            note = "" if value == recipe_value else f" (the {chosen} objective's default; the recipe's: {recipe_value})"
        settings.append(f"{name} {value}{note}")
    line = f"  {', '.join(settings)} ({family}: {recipe.why})"
    return Resolved(chosen, method, granularity, line)
