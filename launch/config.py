"""The run configuration: parsed once from YAML into typed, frozen dataclasses.

``load_config(path, overrides)`` reads a YAML file, applies ``key=value``
command-line overrides (dotted paths, values parsed as YAML scalars), then
converts the nested dict into a :class:`RunConfig`, rejecting a key given twice in one mapping
(``duplicate key 'prune.sparsity' on lines 3 and 5``), unknown keys
(``unknown key 'fisher.max_iterz' (did you mean 'fisher.max_iter'?)``), missing ones
(``prune.layer_sparsity[0]: missing key 'sparsity'``), wrong types (``fisher.max_iter: expected
int, got str``) and invalid values, each with a one-line ``ConfigError``.

The dataclass <-> dict conversion is generic (:func:`from_dict`,
:func:`to_dict`): fields are declared once, with their type and default. A
field named ``lambda_`` is spelled ``lambda`` in YAML (trailing underscores are
dropped from keys). The defaults of :class:`RunConfig` are the embedded
default run (``configs/default.yaml``): all-MiniLM-L6-v2 pruned to 50% on Python documentation paragraphs, by the
recipe ``prune.objective: auto`` chooses for it (layerwise CHITA, per-row budgets).

Relative paths in a config are relative to the working directory the run is
started from (the repository root).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dist_chita.options import FISHER_METHODS, Fisher, Layerwise, Target, layerwise_methods, type_name
from dist_chita.options import parse_nm as _parse_nm

Dtype = Literal["float32", "bfloat16", "float16"]
Task = Literal["causal-lm", "sequence-classification", "image-classification", "embedding"]
DataFormat = Literal["hub", "builtin", "parquet", "json", "csv", "text", "imagefolder", "disk"]


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key."""


@dataclass(frozen=True)
class ModelConfig:
    """The dense model to prune.

    ``source: hf``: ``path`` is a local checkpoint directory, a hub id, or
    ``builtin:all-MiniLM-L6-v2``; loaded with the Auto class matching ``task``.
    ``source: torch``: ``factory`` ("module:function") builds the module and
    ``weights`` (a .safetensors file) fills it; ``task`` says how its output is used.
    ``init: random`` (hf only): the model is built from ``path``'s config.json (a directory, or the file) and its
    weights drawn with ``seed`` (N(0, initializer_range^2) weights, unit norm scales, zero biases: the same on
    any number of ranks and under ZeRO-3), for cost and scale runs of an architecture without its weights; a
    tokenizer beside the config is loaded with it.
    """

    source: Literal["hf", "torch"] = "hf"
    path: str | None = "builtin:all-MiniLM-L6-v2"
    task: Task = "embedding"
    factory: str | None = None
    weights: str | None = None
    trust_remote_code: bool = False
    dtype: Dtype = "float32"
    init: Literal["pretrained", "random"] = "pretrained"
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Calibration data: the n samples the prune is fitted on (the layerwise objective's X^T X, or the Fisher
    objective's per-sample gradients, the rows of A).

    ``source`` is a hub dataset name, a local file or directory (``format``
    parquet/json/csv/text/imagefolder, or ``disk`` for ``save_to_disk``
    output), or ``builtin:mnist`` / ``builtin:digits`` / ``builtin:pydoc``.
    ``format: null`` infers it from the source. Samples are drawn without
    replacement with ``seed``. Columns left null are inferred from ``model.task`` (an image task reads the image
    column and no text; a text task the text column; classification tasks the labels:
    dist_chita.io.data.infer_columns). Images go through the model's image processor unless ``image_size`` (square
    resize), ``mean`` or ``std`` (one value, or one per channel) is set: then pixels / 255 (8-bit), resized,
    minus ``mean``, over ``std``; they are converted to the channels the model takes. ``windows: true`` (text
    only) makes the n samples windows of exactly ``max_length`` tokens cut from the texts joined in the seeded
    order by the tokenizer's end-of-text token, as language models are calibrated
    (SparseGPT, Wanda); the held-out data must then come from another source or split. ``validation``: a
    share in (0, 1) or a count of the n samples held out (seeded with ``seed``, left out of the calibration) to
    choose the Fisher objective's ``auto`` settings on; null: 0.2 when a setting is auto, else none.
    """

    source: str = "builtin:pydoc"
    format: DataFormat | None = None
    config_name: str | None = None
    split: str = "train"
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    n: int = 128
    seed: int = 0
    max_length: int = 128
    padding: Literal["max_length", "longest"] = "longest"
    flatten_images: bool = True
    windows: bool = False
    batch_size: int = 16
    validation: int | float | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation. ``source: null`` means the rest of the calibration
    source (same split, disjoint from the calibration samples); ``n: null`` means
    all of it. Column names, ``max_length`` and ``split`` default to the calibration ones.
    ``stride`` (perplexity windows) defaults to max_length // 2; ``compare_magnitude`` also
    evaluates magnitude pruning at the same sparsity as a baseline."""

    metric: Literal["accuracy", "perplexity", "embedding_fidelity", "none"] = "embedding_fidelity"
    source: str | None = None
    format: DataFormat | None = None
    config_name: str | None = None
    split: str | None = None
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    n: int | None = None
    max_length: int | None = None
    stride: int | None = None
    batch_size: int = 32
    compare_magnitude: bool = True


@dataclass(frozen=True)
class PruneConfig(Target):
    """What to prune and to what sparsity (:class:`dist_chita.options.Target`), with which quadratic model and
    method. ``objective``: ``layerwise`` (each layer's reconstruction curvature; settings in ``layerwise:``),
    ``fisher`` (the CHITA paper's empirical Fisher of the loss; settings in ``fisher:``) or ``auto`` (the model
    family's recipe, :mod:`dist_chita.recipes`, printed with why; with ``method`` and ``granularity`` left unset
    the recipe chooses them too). ``method``: on the layerwise objective ``chita``, ``sparsegpt``, ``wanda``,
    ``magnitude`` or ``obd``; on the Fisher objective ``chita``, ``chita++`` or ``magnitude``; null: the recipe's
    (``chita`` with an objective given). ``reestimate_batchnorm``: after pruning, recompute every BatchNorm
    layer's running statistics on the calibration data (:mod:`dist_chita.batchnorm`; models without BatchNorm are
    not touched)."""

    objective: Literal["auto", "layerwise", "fisher"] = "auto"
    method: str | None = None
    reestimate_batchnorm: bool = True


@dataclass(frozen=True)
class OutputConfig:
    """Where and how the result is written. ``format``: ``dense`` (every weight stored, zeros included: what
    transformers and vLLM load) or ``compressed-tensors`` (Hugging Face models: the pruned layers stored as their
    non-zero values and a bitmask, ``sparse-bitmask`` or for 2:4 ``sparse-24-bitmask``, with the
    ``sparsity_config`` in config.json; see dist_chita/io/compressed.py for who reads it). ``dtype``: the saved
    weights' dtype; ``auto``: the checkpoint's (its config's ``dtype``, or its weights'), whatever ``model.dtype``
    the prune computed in (a kept weight never rounds to zero)."""

    dir: str = "runs/default"
    overwrite: bool = False
    save_model: bool = True
    format: Literal["dense", "compressed-tensors"] = "dense"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass(frozen=True)
class RunConfig:
    """A whole run. ``world_size``: the processes the run expects (a note when the launcher started another
    number; results do not depend on it). ``threads_per_rank``: torch threads of each process, 1 by default, so
    that a run gives the same bits on any number of processes (on CPU, float32 matrix products change bits with
    the thread count); null: torch's count (every core for one process; under Accelerate the cores shared among
    the processes of a node). ``timeout_seconds``: how long a collective may wait for another rank."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    layerwise: Layerwise = field(default_factory=Layerwise)
    fisher: Fisher = field(default_factory=Fisher)
    output: OutputConfig = field(default_factory=OutputConfig)
    world_size: int | None = 2
    threads_per_rank: int | None = 1
    timeout_seconds: int = 1800

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-ready) that :func:`parse_config` turns back into an equal object."""
        return to_dict(self)

    @property
    def objective(self) -> Layerwise | Fisher:
        """The options of the objective ``prune.objective`` names (``auto``: those of the layerwise objective until
        the recipe is resolved, :func:`resolve_auto`)."""
        return self.fisher if self.prune.objective == "fisher" else self.layerwise

    def sections(self) -> tuple[str, ...]:
        """The top-level keys this run reads: the objective's section and not the other's (``fisher:`` also for
        ``method: obd``, whose saliency is the Fisher diagonal of ``fisher.loss``; both with ``objective: auto``)."""
        auto = self.prune.objective == "auto"
        uses_fisher = auto or self.prune.objective == "fisher" or self.prune.method == "obd"
        skip = {"fisher"} if not uses_fisher else set()
        if self.prune.objective == "fisher":
            skip.add("layerwise")
        return tuple(_key(f) for f in dataclasses.fields(self) if _key(f) not in skip)


# Keys that moved to another section, and where each went: a config that uses one fails naming the new key.
MOVED = {
    **{f"prune.{k}": f"fisher.{k}" for k in ("loss", "lambda", "ridge", "stages", "schedule", "exponent",
                                               "base_sparsity", "first_order_term")},
    "prune.block_mode": "fisher.group_size (an int: prune layer groups of at most that many weights)",
    "prune.block_size": "fisher.group_size", "prune.block_criterion": "fisher.group_criterion",
    "prune.damp": "layerwise.damp",
    "solver.max_iter": "fisher.max_iter or layerwise.max_iter", "solver.tol": "fisher.tol or layerwise.tol",
    **{f"solver.{k}": f"fisher.{k}" for k in ("active_set_factor", "storage_dtype", "backsolve", "escape_trials",
                                                "seed")},
    **{k: f"fisher.{k}" for k in ("resume", "resume_dir", "resume_save_factor")},
}


# --------------------------------------------------------------------------- generic conversion


def _key(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Convert ``data`` to type ``cls`` (a dataclass, int, float, str, bool,
    Optional, list, tuple[X, ...] or Literal; a single number is a list of one number), raising ConfigError
    naming ``path`` (unknown keys, keys a dataclass has no default for left out, wrong types)."""
    where = path or "<root>"
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {_key(f): f for f in dataclasses.fields(cls)}
        for k in data:
            if k not in fields:
                near = difflib.get_close_matches(str(k), list(fields), n=1)
                hint = f" (did you mean '{path + '.' if path else ''}{near[0]}'?)" if near else ""
                raise ConfigError(f"unknown key '{path + '.' if path else ''}{k}'{hint}")
        missing = [k for k, f in fields.items() if k not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(k) for k in missing)}")
        kwargs = {
            f.name: from_dict(hints[f.name], data[k], f"{path + '.' if path else ''}{k}")
            for k, f in fields.items()
            if k in data
        }
        return cls(**kwargs)
    if origin is Literal:
        if data not in typing.get_args(cls):
            raise ConfigError(f"{where}: expected {type_name(cls)}, got {data!r}")
        return data
    if origin in (Union, types.UnionType):
        args = typing.get_args(cls)
        if data is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            if data is None:
                raise ConfigError(f"{where}: expected {type_name(cls)}, got null")
            return from_dict(inner[0], data, path)
        for alternative in inner:  # e.g. float | Literal["auto"]: the first that takes the value
            try:
                return from_dict(alternative, data, path)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {type_name(cls)}, got {data!r}")
    if origin in (list, tuple):
        if typing.get_args(cls)[0] in (int, float) and isinstance(data, int | float) and not isinstance(data, bool):
            data = [data]  # one number where numbers are expected (calibration.mean=0.286): a list of one
        if not isinstance(data, list | tuple):
            raise ConfigError(f"{where}: expected {type_name(cls)}, got {type(data).__name__}")
        items = [from_dict(typing.get_args(cls)[0], x, f"{path}[{i}]") for i, x in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if cls is bool:
        if not isinstance(data, bool):
            raise ConfigError(f"{where}: expected bool, got {type(data).__name__}")
        return data
    if cls is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ConfigError(f"{where}: expected int, got {type(data).__name__}")
        return data
    if cls is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise ConfigError(f"{where}: expected float, got {type(data).__name__}")
        return float(data)
    if cls is str:
        if not isinstance(data, str):
            raise ConfigError(f"{where}: expected str, got {type(data).__name__}")
        return data
    raise TypeError(f"unsupported config type {cls}")


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: dataclasses become dicts (keys without trailing
    underscores), tuples become lists."""
    if dataclasses.is_dataclass(obj):  # a class's own fields first, then those it inherits
        own = set(type(obj).__dict__.get("__annotations__", {}))
        fields = sorted(dataclasses.fields(obj), key=lambda f: f.name not in own)
        return {_key(f): to_dict(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, list | tuple):
        return [to_dict(x) for x in obj]
    return obj


# --------------------------------------------------------------------------- overrides and validation


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``"a.b.c=value"`` applied; value parsed as YAML
    (``sparsity=0.9`` -> 0.9, ``nm=null`` -> None, ``include=[fc1*]`` -> list)."""
    out = _deepcopy_dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml_load(raw, key) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy_dict(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy_dict(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy_dict(v) for v in d]
    return d


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without sexagesimal numbers, so ``nm: 2:4`` stays the string "2:4" (not 124)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def yaml_load(text: str, root: str = "") -> Any:
    """Parse YAML like ``yaml.safe_load`` but keep ``a:b`` scalars as strings, read ``1e-3`` as a float and refuse a
    key given twice in one mapping (a yaml.YAMLError naming its dotted path under ``root``, and its lines)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, root, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_unique_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    """Raise a yaml.YAMLError for the first mapping under ``node`` that holds a key twice (YAML forbids it; a
    loader would keep the last value)."""
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            name, line = f"{path}.{key.value}" if path else key.value, key.start_mark.line + 1
            if (key.tag, key.value) in lines:
                first = lines[key.tag, key.value]
                raise yaml.YAMLError(f"duplicate key '{name}' on line{f's {first} and' if first != line else ''} "
                                     f"{line}")
            lines[key.tag, key.value] = line
            _check_unique_keys(value, name, seen)


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def parse_nm(nm: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4) (:func:`dist_chita.options.parse_nm`), a ConfigError naming ``prune.nm`` otherwise."""
    try:
        return _parse_nm(nm)
    except ValueError as e:
        raise ConfigError(f"prune.{e}") from None


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _validate_data(cfg: RunConfig) -> None:
    m, c, e = cfg.model, cfg.calibration, cfg.eval
    if m.source == "hf":
        _need(bool(m.path), "model.path: required when model.source is 'hf'")
    else:
        _need(m.factory is not None and bool(_FACTORY.match(m.factory)),
              f"model.factory: expected 'module:function' when model.source is 'torch', got {m.factory!r}")
        _need(bool(m.weights), "model.weights: required when model.source is 'torch'")
        _need(m.init == "pretrained", "model.init: random needs a Hugging Face config (model.source: hf)")
    _need(bool(c.source), "calibration.source: must not be empty")
    _need(c.n >= 1, f"calibration.n: must be >= 1, got {c.n}")
    _need(c.max_length >= 1, f"calibration.max_length: must be >= 1, got {c.max_length}")
    _need(c.batch_size >= 1, f"calibration.batch_size: must be >= 1, got {c.batch_size}")
    if c.validation is not None:
        from dist_chita.io.data import validation_count

        try:
            validation_count(c.n, c.validation)
        except ValueError as err:
            raise ConfigError(f"calibration.{err}") from None
    _need(c.image_size is None or c.image_size >= 1, f"calibration.image_size: must be >= 1, got {c.image_size}")
    _need(c.std is None or all(v > 0 for v in c.std), f"calibration.std: must be > 0, got {c.std}")
    if c.windows:
        _need(m.task != "image-classification" and c.image_column is None and c.label_column is None,
              "calibration.windows: needs text (windows of tokens; no image task, image_column or label_column)")
        from dist_chita.io.data import rows_identity

        held = rows_identity(e.source or c.source, e.format or c.format, e.config_name or c.config_name,
                             e.split or c.split)
        _need(e.metric == "none" or held != rows_identity(c.source, c.format, c.config_name, c.split),
              "calibration.windows: the held-out data must come from another eval.source or eval.split (the "
              "windows take a variable number of the calibration rows)")
    _need(e.n is None or e.n >= 1, f"eval.n: must be >= 1, got {e.n}")
    _need(e.max_length is None or e.max_length >= 1, f"eval.max_length: must be >= 1, got {e.max_length}")
    window = e.max_length or c.max_length
    _need(e.stride is None or 1 <= e.stride < window,
          f"eval.stride: must be in [1, max_length = {window}), got {e.stride}")
    _need(e.batch_size >= 1, f"eval.batch_size: must be >= 1, got {e.batch_size}")


def _validate_prune(cfg: RunConfig) -> None:
    """The prune section and its objective's; with ``objective: auto``, the method is checked to exist and each
    objective's settings as far as they do not depend on the method (the rest once the recipe is resolved)."""
    p = cfg.prune
    problems = [f"prune.{msg}" for msg in p.problems()]
    if p.objective == "auto":
        known = [*layerwise_methods(), *(m for m in FISHER_METHODS if m not in layerwise_methods())]
        if p.method is not None and p.method not in known:
            problems.append(f"prune.method: {p.method!r} is neither a layerwise nor a Fisher-objective method (one "
                            f"of {', '.join(known)})")
        problems += [f"layerwise.{msg}" for msg in cfg.layerwise.problems("chita")]
        problems += [f"fisher.{msg}" for msg in cfg.fisher.problems("chita", p)]
    elif p.objective == "layerwise":
        problems += [f"{'prune' if msg.startswith('method') else 'layerwise'}.{msg}"
                     for msg in cfg.layerwise.problems(p.method or "chita")]
    else:
        problems += [f"{'prune' if msg.startswith('method') else 'fisher'}.{msg}"
                     for msg in cfg.fisher.problems(p.method or "chita", p)]
    _need(not problems, problems[0] if problems else "")


def resolve_auto(cfg: RunConfig, model, task: str) -> tuple[RunConfig, str | None]:
    """``cfg`` with ``prune.objective``, ``prune.method`` and ``prune.granularity`` set as the run uses them (the
    recipe of ``model``'s family for those left unset, :func:`dist_chita.recipes.resolve`), validated again; and
    the line saying what the recipe chose and why (None when nothing was left to it)."""
    from dist_chita.recipes import resolve

    p = cfg.prune
    chosen = resolve(model, task, p.objective, p.method, p.granularity)
    prune = dataclasses.replace(p, objective=chosen.objective, method=chosen.method, granularity=chosen.granularity)
    return validate(dataclasses.replace(cfg, prune=prune)), chosen.line


def validate(cfg: RunConfig) -> RunConfig:
    """Check value ranges and cross-field consistency; return ``cfg`` unchanged."""
    _validate_data(cfg)
    _validate_prune(cfg)
    _need(bool(cfg.output.dir), "output.dir: must not be empty")
    _need(cfg.output.format == "dense" or cfg.model.source == "hf",
          "output.format: compressed-tensors needs a Hugging Face model (model.source: hf); use dense")
    _need(cfg.world_size is None or cfg.world_size >= 1, f"world_size: must be >= 1, got {cfg.world_size}")
    _need(cfg.timeout_seconds >= 1, f"timeout_seconds: must be >= 1, got {cfg.timeout_seconds}")
    _need(cfg.threads_per_rank is None or cfg.threads_per_rank >= 1,
          f"threads_per_rank: must be >= 1, got {cfg.threads_per_rank}")
    return cfg


def _check_moved(data: dict[str, Any]) -> None:
    """A key of the earlier flat layout (:data:`MOVED`) fails with its new name."""
    for old, new in MOVED.items():
        section, _, key = old.rpartition(".")
        node = data.get(section) if section else data
        if isinstance(node, dict) and key in node:
            raise ConfigError(f"'{old}' moved to '{new}' (each objective's settings have their own section)")
    if isinstance(data.get("solver"), dict):
        raise ConfigError("the 'solver' section was split into 'fisher' and 'layerwise' (each objective's settings)")


def parse_config(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Nested dict (e.g. from YAML) + overrides -> validated RunConfig."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    _check_moved(data)
    return validate(from_dict(RunConfig, data))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (``None``: the built-in defaults) and return the validated RunConfig."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            data = yaml_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_config(data, overrides)


# --------------------------------------------------------------------------- config -> library arguments


def model_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of ``dist_chita.io.models.load_model``."""
    m = cfg.model
    return {"kind": m.source, "task": m.task, "path": m.path, "factory": m.factory, "weights": m.weights,
            "dtype": m.dtype, "trust_remote_code": m.trust_remote_code, "init": m.init, "seed": m.seed}


def calibration_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of ``dist_chita.io.data.load_samples`` for the calibration samples
    (add ``tokenizer`` / ``image_processor`` / ``channels``); samples perm[0:n] of the seeded permutation."""
    c = cfg.calibration
    return {"source": c.source, "fmt": c.format, "config_name": c.config_name, "split": c.split, "n": c.n,
            "seed": c.seed, "offset": 0, "text_column": c.text_column, "image_column": c.image_column,
            "label_column": c.label_column, "task": cfg.model.task, "max_length": c.max_length, "padding": c.padding,
            "flatten_images": c.flatten_images, "image_size": c.image_size, "mean": c.mean, "std": c.std}


def eval_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of ``dist_chita.io.data.load_samples`` for the held-out samples.

    Unset eval fields inherit the calibration ones. When the held-out data come from the same
    rows as the calibration data (same source, format, config and split), ``offset`` is
    calibration.n with the same seed, so the two sets are disjoint; otherwise offset is 0.
    For ``dist_chita.io.data.load_texts`` keep source, fmt, config_name, split, text_column, n, seed, offset.
    """
    c, e = cfg.calibration, cfg.eval
    out = calibration_kwargs(cfg)
    pick = {"source": e.source, "fmt": e.format, "config_name": e.config_name, "split": e.split,
            "text_column": e.text_column, "image_column": e.image_column, "label_column": e.label_column,
            "max_length": e.max_length}
    out.update({k: v for k, v in pick.items() if v is not None})
    from dist_chita.io.data import rows_identity

    same_rows = rows_identity(out["source"], out["fmt"], out["config_name"], out["split"]) == rows_identity(
        c.source, c.format, c.config_name, c.split)
    out.update(n=e.n, offset=c.n if same_rows else 0)
    return out


def config_yaml(cfg: RunConfig, applicable: bool = False) -> str:
    """The resolved config as YAML: every key, in declaration order (what :func:`load_config` reads back); with
    ``applicable`` only the sections this run reads (:meth:`RunConfig.sections`)."""
    d = cfg.to_dict()
    if applicable:
        d = {k: v for k, v in d.items() if k in cfg.sections()}
    return yaml.safe_dump(d, sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(config_yaml(cfg))
