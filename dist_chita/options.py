"""What to prune and how: the typed options of :func:`dist_chita.prune`.

Three frozen dataclasses, each with the defaults users get (the run config's sections are these classes, so a
default lives in one place):

* :class:`Target`: which weights and to what sparsity (``prune:`` in a run config);
* :class:`Layerwise`: the layerwise objective, each layer's reconstruction curvature H = X^T X solved row by row
  (``layerwise:``);
* :class:`Fisher`: the CHITA paper's objective, the empirical Fisher of the loss from n per-sample gradients, one
  problem over all layers (``fisher:``).

Methods per objective: :func:`layerwise_methods` (those registered in :mod:`dist_chita.methods`) and
:data:`FISHER_METHODS`. ``problems()`` says what is wrong with an option's values, their types first
(:func:`field_problems`, in the words the run config uses); :func:`dist_chita.prune` and the run config refuse the
first.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

Granularity = Literal["row", "layer", "global"]
Auto = Literal["auto"]
StorageDtype = Literal["float32", "bfloat16", "float16"]
FISHER_METHODS = ("chita", "chita++", "magnitude")


def layerwise_methods() -> list[str]:
    """The layerwise methods: every method registered in :mod:`dist_chita.methods` (one module each)."""
    from dist_chita.methods.base import method_names

    return method_names()


def type_name(tp: Any) -> str:
    """How an option's type reads in messages: ``one of 'row', 'layer'``, ``float or null``, ``list of str``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def field_problems(options: Any) -> list[str]:
    """The fields of the dataclass ``options`` whose values are not of their declared type, each named as in YAML
    (``lambda_``: ``lambda``) with what it takes, in the run config's words (``granularity: expected one of 'row',
    'layer', 'global', got 'rows'``). A list or tuple is taken for a tuple, an int for a float, never a bool for
    a number."""
    hints = typing.get_type_hints(type(options))
    return [msg for f in dataclasses.fields(options)
            for msg in _type_problems(hints[f.name], getattr(options, f.name), f.name.rstrip("_"))]


def _type_problems(tp: Any, value: Any, name: str) -> list[str]:
    """What is wrong with ``value`` as a ``tp`` named ``name`` (a dataclass: the problems of its fields)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            return [f"{name}: expected {tp.__name__}, got {type(value).__name__}"]
        return [f"{name}.{msg}" for msg in field_problems(value)]
    if origin is Literal:
        return [] if value in typing.get_args(tp) else [f"{name}: expected {type_name(tp)}, got {value!r}"]
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return []
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _type_problems(inner[0], value, name)
        if any(not _type_problems(a, value, name) for a in inner):  # e.g. float | Literal["auto"]: one takes it
            return []
        return [f"{name}: expected {type_name(tp)}, got {value!r}"]
    if origin in (list, tuple):  # any collection but a string or a mapping (a set, a range)
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Collection):
            return [f"{name}: expected {type_name(tp)}, got {type(value).__name__}"]
        return [msg for i, x in enumerate(value) for msg in _type_problems(typing.get_args(tp)[0], x, f"{name}[{i}]")]
    if tp is bool:  # (numpy's bool too)
        ok = isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"
    elif tp is str:  # (a path for a directory option)
        ok = isinstance(value, str | os.PathLike)
    elif tp in (int, float):  # never a bool for a number
        ok = isinstance(value, numbers.Integral if tp is int else numbers.Real) and not isinstance(value, bool) \
            and getattr(getattr(value, "dtype", None), "kind", None) != "b"
    else:
        ok = True
    return [] if ok else [f"{name}: expected {tp.__name__}, got {type(value).__name__}"]


_NM = re.compile(r"^(\d+):(\d+)$")


def parse_nm(nm: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive weights, 1 <= N < M."""
    m = _NM.match(nm)
    if not m or not 1 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"nm: expected 'N:M' with 1 <= N < M, got {nm!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class LayerSparsity:
    """The sparsity of the prunable layers whose names match ``pattern`` (fnmatch, e.g. ``"*.attention.*"``)."""

    pattern: str
    sparsity: float


@dataclass(frozen=True)
class Target:
    """Which weights are pruned and to what sparsity.

    ``sparsity`` is the share of zeros and ``granularity`` where it holds: ``row`` (every output row of every layer,
    ``weight[i]``, keeps the same share: Wanda's comparison group), ``layer`` (each layer) or ``global`` (over all
    prunable weights, k = (1 - sparsity) p: the CHITA paper's on the Fisher objective; on the layerwise objective
    the layers' shares of k follow their reconstruction-error curves, :mod:`dist_chita.layerwise.budgets`, and each
    layer's rows share its count); None: the model family's recipe when no objective is given
    (:mod:`dist_chita.recipes`), else ``row``. ``nm`` ("N:M") keeps N of every M consecutive weights of a row
    instead (``sparsity`` and ``granularity`` are then unused). ``layer_sparsity`` gives the layers whose name
    matches a pattern their own target (the first match wins); ``allocation: owl`` sets every block's sparsity from
    the dense model's outliers (OWL, Yin et al. 2024: layers whose |W_ij| ||X_j|| exceed ``owl_m`` times the
    block's mean keep more, spread 2 ``owl_lambda``, mean ``sparsity``); ``allocation: reconstruction`` sets every
    layer's sparsity as ``granularity: global`` does on the layerwise objective, with ``granularity`` row or layer
    holding inside each layer. The candidates are the weights of Linear, Conv and transformers' Conv1D layers;
    ``include`` (None: all) and ``exclude`` are fnmatch patterns on module names, and ``exclude_head`` leaves an
    output head dense (embeddings are never pruned).
    """

    sparsity: float = 0.5
    granularity: Granularity | None = None
    nm: str | None = None
    layer_sparsity: tuple[LayerSparsity, ...] = ()
    allocation: Literal["uniform", "owl", "reconstruction"] = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    exclude_head: bool = True

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when nothing), each naming its field: their types
        (:func:`field_problems`), then their values."""
        out = field_problems(self)
        if out:
            return out
        if not 0.0 <= self.sparsity < 1.0:
            out.append(f"sparsity: must be in [0, 1), got {self.sparsity}")
        if self.nm is not None:
            try:
                parse_nm(self.nm)
            except ValueError as e:
                out.append(str(e))
        for i, rule in enumerate(self.layer_sparsity):
            if not rule.pattern:
                out.append(f"layer_sparsity[{i}].pattern: must not be empty")
            if not 0.0 <= rule.sparsity < 1.0:
                out.append(f"layer_sparsity[{i}].sparsity: must be in [0, 1), got {rule.sparsity}")
        if self.layer_sparsity and self.nm is not None:
            out.append("layer_sparsity: sets per-layer sparsities, which N:M (nm) does not use")
        if self.layer_sparsity and self.granularity == "global":
            out.append("layer_sparsity: needs granularity row or layer (a global budget has one sparsity)")
        if self.allocation == "owl":
            if self.layer_sparsity:
                out.append("allocation: owl sets every layer's sparsity; drop layer_sparsity")
            if self.nm is not None or self.granularity == "global":
                out.append("allocation: owl needs granularity row or layer (no N:M)")
            if not self.owl_m > 0.0:
                out.append(f"owl_m: must be > 0, got {self.owl_m}")
            if not self.owl_lambda >= 0.0:
                out.append(f"owl_lambda: must be >= 0, got {self.owl_lambda}")
        if self.allocation == "reconstruction":
            if self.layer_sparsity:
                out.append("allocation: reconstruction sets every layer's sparsity; drop layer_sparsity")
            if self.nm is not None or self.granularity == "global":
                out.append("allocation: reconstruction needs granularity row or layer (no N:M); granularity: global "
                           "allocates by reconstruction error on the layerwise objective by itself")
        if self.include is not None and not self.include:
            out.append("include: must list at least one pattern (or be null)")
        return out

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        """``nm`` as (N, M), or None."""
        return parse_nm(self.nm) if self.nm else None


@dataclass(frozen=True)
class Layerwise:
    """The layerwise objective: each layer's output reconstruction over every calibration token,
    1/(2N) ||X (W - W_bar)^T||^2 with H = X^T X (the curvature of SparseGPT and OBS), pruned block after block on
    the inputs of the already pruned model. Needs no per-sample gradients: memory is the model plus one block's H.

    ``damp``: the ridge lambda of a layer is ``damp`` times the mean of diag H (SparseGPT's damping too);
    ``max_iter``: IHT steps of CHITA per chunk of rows; ``tol``: a row stops when its objective decreases by less
    than ``tol`` times itself in a step; ``moves``: local-search swap moves per step before its back-solve (0: the
    warm start alone).
    """

    damp: float = 0.01
    max_iter: int = 200
    tol: float = 1e-3
    moves: int = 4

    def problems(self, method: str) -> list[str]:
        """What is wrong with these values for ``method`` (empty when nothing), each naming its field: their types
        (:func:`field_problems`), then the method and the values."""
        out = field_problems(self)
        if out:
            return out
        if method not in layerwise_methods():
            out.append(f"method: {method!r} is not a layerwise method (one of {', '.join(layerwise_methods())})")
        if not self.damp > 0.0:
            out.append(f"damp: must be > 0, got {self.damp}")
        if self.max_iter < 1:
            out.append(f"max_iter: must be >= 1, got {self.max_iter}")
        if not self.tol >= 0.0:
            out.append(f"tol: must be >= 0, got {self.tol}")
        if self.moves < 0:
            out.append(f"moves: must be >= 0, got {self.moves}")
        return out


@dataclass(frozen=True)
class Fisher:
    """The CHITA paper's objective: the local quadratic model of the loss from n per-sample gradients,
    min 1/2 ||y - A w||^2 + lambda/2 ||w - w_bar||^2 subject to the budget, one problem over all layers.

    ``loss``: the per-sample loss l_i whose gradients are the rows of A: ``ce`` (labels), ``causal_lm``,
    ``sampled`` (labels drawn from the model's own predictive distribution) or ``gn_probe`` (models without
    labels: g_i = grad of v_i . f(x_i) with seeded random v_i, whose expectation is the Gauss-Newton matrix).
    ``lambda_`` (``lambda`` in YAML) and ``ridge``: the ridge term (``lambda_``: one lambda for every stage, a list of
    one lambda per CHITA++ stage, as long as ``stages``, e.g. the ``validation.lambda`` a ``lambda: auto`` run
    chose, to run that configuration again without its search, or ``auto``), ``identity`` (the paper's
    lambda/2 ||w - w_bar||^2), ``fisher_diagonal`` (lambda/2 (w - w_bar)^T D (w - w_bar), D = diag(A^T A) + 1e-3 of
    its mean, which keeps each weight's curvature when n << p) or ``auto`` (the Fisher diagonal below 1e-3
    calibration samples per prunable weight, else the identity). ``first_order_term``: keep the gradient term
    (y = A w_bar - 1/sqrt(n)); CHITA++'s later stages start from pruned weights, where the loss's gradient is not
    zero. CHITA++ (method ``chita++``) prunes in ``stages`` steps from ``base_sparsity``
    along a ``schedule`` (polynomial of degree ``exponent``, or linear), recomputing the gradients at the pruned
    weights.

    Settings chosen on validation samples (held out of the calibration data, see :func:`dist_chita.prune`'s
    ``validation``): ``lambda: auto`` scores every stage's solution for each lambda of ``lambda_path`` and keeps
    the lowest validation score (:mod:`dist_chita.validation`): with ``lambda_search: warm_start`` each lambda is
    judged at the solver's back-solved warm start (one back-solve each) and the chosen one solved in full, with
    ``solve`` each is solved in full (warm-started from the previous one's support); with ``lambda_walk`` every
    CHITA++ stage after the first judges only a walk along the path from the previous stage's choice (towards
    smaller lambdas while the score falls, else towards larger ones: a local minimum, fewer back-solves) instead of
    the whole path. ``lambda_rule``: which judged lambda is kept, ``min`` the lowest validation score, ``one_se``
    the largest lambda within one standard error (of the paired per-sample difference) of the lowest score, the
    one-standard-error rule: among lambdas the validation samples cannot tell apart, the nearest to the dense
    weights; ``schedule_rule`` the same for CHITA++'s schedule (``one_se``: the simplest candidate within one
    standard error, the fewest stages first; ``significant``: the simplest candidate unless the lowest score is
    more than two standard errors below it, else as ``one_se``). ``stages: auto`` tries each
    of ``stage_candidates``, ``base_sparsity: auto`` each of ``base_candidates`` (shares of the target
    sparsity), ``first_order_term: auto`` both, every combination a whole CHITA++ run judged by its final
    validation score.

    ``group_size``: prune consecutive groups of layers of at most this many weights one at a time (the
    budget split among them by ``group_criterion``), so memory is set by the largest group's factor; None: all at
    once. ``storage_dtype``: the factor's storage. Solver: ``max_iter`` IHT iterations over the whole solve, stop
    when f decreases by less than ``tol`` f, an active set of ``active_set_factor`` k coordinates, ``backsolve``
    the ridge problem exactly on the support, ``escape_trials`` candidate supports tried (one back-solve each) when
    IHT stalls, and among them the ``pair_swaps``^2 single swaps of the support's cheapest weights (OBS) with the
    best outside ones (0: none). ``seed``: the seed of sampled labels and probe vectors. ``resume``: continue a
    CHITA++ run from the last stage saved in ``resume_dir`` (None: beside the output directory);
    ``resume_save_factor`` also saves each rank's factor after its gradient phase.
    """

    loss: Literal["ce", "sampled", "gn_probe", "causal_lm"] = "gn_probe"
    lambda_: float | tuple[float, ...] | Auto = 1e-3
    lambda_path: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    lambda_search: Literal["warm_start", "solve"] = "warm_start"
    lambda_walk: bool = False
    lambda_rule: Literal["min", "one_se"] = "min"
    schedule_rule: Literal["min", "one_se", "significant"] = "min"
    ridge: Literal["auto", "fisher_diagonal", "identity"] = "auto"
    first_order_term: bool | Auto = False
    stages: int | Auto = 1
    stage_candidates: tuple[int, ...] = (2, 4, 8)
    schedule: Literal["polynomial", "linear"] = "polynomial"
    exponent: float = 3.0
    base_sparsity: float | Auto = 0.0
    base_candidates: tuple[float, ...] = (0.0, 0.5, 0.8)
    group_size: int | None = None
    group_criterion: Literal["magnitude", "obs"] = "magnitude"
    storage_dtype: StorageDtype = "float32"
    max_iter: int = 200
    tol: float = 1e-4
    active_set_factor: float = 1.5
    backsolve: bool = True
    escape_trials: int = 0
    pair_swaps: int = 4
    seed: int = 0
    resume: bool = False
    resume_dir: str | None = None
    resume_save_factor: bool = False

    def __post_init__(self):
        # one lambda per stage given as a list (Python callers) is the tuple the YAML parser makes of it
        if isinstance(self.lambda_, list):
            object.__setattr__(self, "lambda_", tuple(self.lambda_))

    @property
    def tuned(self) -> tuple[str, ...]:
        """The settings set to ``auto`` (chosen on validation samples), in YAML spelling."""
        names = {"lambda_": "lambda", "stages": "stages", "base_sparsity": "base_sparsity",
                 "first_order_term": "first_order_term"}
        return tuple(key for name, key in names.items() if getattr(self, name) == "auto")

    def problems(self, method: str, target: Target) -> list[str]:
        """What is wrong with these values for ``method`` and ``target`` (empty when nothing), each naming its field:
        their types (:func:`field_problems`), then the method and the values."""
        out = field_problems(self)
        if out:
            return out
        if method not in FISHER_METHODS:
            out.append(f"method: {method!r} is not a Fisher-objective method (one of {', '.join(FISHER_METHODS)})")
        auto = self.tuned
        checks = [(_auto_or(self.lambda_, float, lambda x: x >= 0.0) or _stage_lambdas_ok(self.lambda_),
                   f"lambda: must be >= 0, a list of lambdas >= 0 (one per stage) or auto, got {self.lambda_}"),
                  (bool(self.lambda_path) and all(x >= 0.0 for x in self.lambda_path),
                   f"lambda_path: must list lambdas >= 0, got {list(self.lambda_path)}"),
                  (_auto_or(self.stages, int, lambda x: x >= 1), f"stages: must be >= 1 or auto, got {self.stages}"),
                  (bool(self.stage_candidates) and all(t >= 1 for t in self.stage_candidates),
                   f"stage_candidates: must list stage counts >= 1, got {list(self.stage_candidates)}"),
                  (self.exponent > 0.0, f"exponent: must be > 0, got {self.exponent}"),
                  (_auto_or(self.base_sparsity, float, lambda x: 0.0 <= x <= target.sparsity),
                   f"base_sparsity: must be in [0, sparsity = {target.sparsity}] or auto, got {self.base_sparsity}"),
                  (bool(self.base_candidates) and all(0.0 <= b < 1.0 for b in self.base_candidates),
                   f"base_candidates: must list shares of the sparsity in [0, 1), got {list(self.base_candidates)}"),
                  (not (set(auto) & {"stages", "base_sparsity"}) or method == "chita++",
                   f"{' and '.join(sorted(set(auto) & {'stages', 'base_sparsity'}))}: auto needs method chita++"),
                  (self.group_size is None or not auto,
                   f"group_size: layer groups do not take auto settings ({', '.join(auto)})"),
                  (self.group_size is None or self.group_size >= 1,
                   f"group_size: must be >= 1 (or null), got {self.group_size}"),
                  (self.max_iter >= 1, f"max_iter: must be >= 1, got {self.max_iter}"),
                  (self.tol >= 0.0, f"tol: must be >= 0, got {self.tol}"),
                  (self.active_set_factor >= 1.0, f"active_set_factor: must be >= 1, got {self.active_set_factor}"),
                  (self.escape_trials >= 0, f"escape_trials: must be >= 0, got {self.escape_trials}"),
                  (self.pair_swaps >= 0, f"pair_swaps: must be >= 0, got {self.pair_swaps}")]
        out += [msg for ok, msg in checks if not ok]
        out += self._stage_lambda_problems(method)
        if self.group_size is not None and (target.layer_sparsity or target.allocation == "owl"):
            out.append("group_size: layer groups share one global budget; per-layer targets are not supported")
        return out

    def _stage_lambda_problems(self, method: str) -> list[str]:
        """What is wrong with a per-stage lambda list (none when ``lambda`` is one number or auto)."""
        if not isinstance(self.lambda_, tuple):
            return []
        stages = self.stages if method == "chita++" else 1
        if stages == "auto":
            return ["lambda: a list of one lambda per stage needs a stage count (stages: auto chooses one)"]
        out = []
        if len(self.lambda_) != stages:
            out.append(f"lambda: {len(self.lambda_)} lambdas for {stages} stage(s); give one per stage")
        if self.group_size is not None:
            out.append("group_size: layer groups take one lambda, not a list per stage")
        return out


def _stage_lambdas_ok(value) -> bool:
    """Whether ``value`` is a non-empty tuple of numbers >= 0 (a per-stage lambda list)."""
    return isinstance(value, tuple) and bool(value) and all(
        isinstance(x, int | float) and not isinstance(x, bool) and x >= 0.0 for x in value)


def _auto_or(value, kind: type, ok) -> bool:
    """Whether ``value`` is ``"auto"`` or a number of ``kind`` (an int for a float too; no bool) that is ``ok``."""
    if value == "auto":
        return True
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and (kind is float or isinstance(value, int)) and bool(ok(value))


AUTO_RIDGE_SAMPLES_PER_WEIGHT = 1e-3  # ``ridge: auto``: the Fisher diagonal below n / p = 1e-3, the identity above


def resolve_ridge(ridge: str, n: int, p: int) -> str:
    """The ridge metric the solver gets: ``ridge``, with ``auto`` resolved from n calibration samples and p prunable
    weights: ``fisher_diagonal`` when n < 1e-3 p (then the back-solve fits the rank-n Fisher term exactly on almost
    any support, and with the identity ridge the best support is magnitude's), else ``identity`` (the paper's)."""
    if ridge != "auto":
        return ridge
    return "fisher_diagonal" if n < AUTO_RIDGE_SAMPLES_PER_WEIGHT * p else "identity"


def objective_name(objective: Layerwise | Fisher) -> str:
    """``"layerwise"`` or ``"fisher"``."""
    return "fisher" if isinstance(objective, Fisher) else "layerwise"

