"""The run configuration: parsed once from YAML into typed, frozen dataclasses.

``load_config(path, overrides)`` reads a YAML file, applies ``key=value``
command-line overrides (dotted paths, values parsed as YAML scalars), then
converts the nested dict into a :class:`RunConfig`, rejecting unknown keys
(``unknown key 'solver.max_iterz' (did you mean 'solver.max_iter'?)``), wrong types (``solver.max_iter: expected
int, got str``) and invalid values, each with a one-line ``ConfigError``.

The dataclass <-> dict conversion is generic (:func:`from_dict`,
:func:`to_dict`): fields are declared once, with their type and default. A
field named ``lambda_`` is spelled ``lambda`` in YAML (trailing underscores are
dropped from keys). The defaults of :class:`RunConfig` are the embedded
default run (``configs/default.yaml``): all-MiniLM-L6-v2 pruned to 50% with the
Gauss-Newton probe loss on Python documentation paragraphs.

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
    """

    source: Literal["hf", "torch"] = "hf"
    path: str | None = "builtin:all-MiniLM-L6-v2"
    task: Task = "embedding"
    factory: str | None = None
    weights: str | None = None
    trust_remote_code: bool = False
    dtype: Dtype = "float32"


@dataclass(frozen=True)
class DataConfig:
    """Calibration data: the n samples whose per-sample gradients form the rows of A.

    ``source`` is a hub dataset name, a local file or directory (``format``
    parquet/json/csv/text/imagefolder, or ``disk`` for ``save_to_disk``
    output), or ``builtin:mnist`` / ``builtin:digits`` / ``builtin:pydoc``.
    ``format: null`` infers it from the source. Samples are drawn without
    replacement with ``seed``. ``windows: true`` (text only) makes the n samples windows of exactly
    ``max_length`` tokens cut from the texts joined in the seeded order, as language models are calibrated
    (SparseGPT, Wanda); the held-out data must then come from another source or split.
    """

    source: str = "builtin:pydoc"
    format: DataFormat | None = None
    config_name: str | None = None
    split: str = "train"
    text_column: str | None = "text"
    image_column: str | None = None
    label_column: str | None = None
    n: int = 128
    seed: int = 0
    max_length: int = 128
    padding: Literal["max_length", "longest"] = "longest"
    flatten_images: bool = True
    windows: bool = False
    batch_size: int = 16


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
class LayerSparsity:
    """The sparsity of the prunable layers whose names match ``pattern`` (fnmatch, e.g. ``"*.attention.*"``)."""

    pattern: str
    sparsity: float


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and to what sparsity.

    ``sparsity`` is the fraction of zeros, and ``granularity`` where it holds:
    ``row`` (default: every output of every layer, ``weight[i]``, keeps the same
    share, the comparison group of Wanda and SparseGPT), ``layer`` (each layer)
    or ``global`` (over all prunable weights, k = (1 - sparsity) p, the CHITA
    paper's). ``layer_sparsity`` (a list of ``{pattern, sparsity}``) sets other
    targets for some layers: the first pattern a layer's name matches gives its
    sparsity (with granularity row or layer; chita++ takes every layer along its
    own schedule). ``allocation: owl`` sets every block's sparsity from the dense
    model's outliers instead (OWL: :mod:`dist_chita.layerwise.allocation`, threshold ``owl_m``,
    spread 2 ``owl_lambda``, mean ``sparsity``; granularity row or layer).
    ``nm`` ("N:M") keeps N of every M consecutive weights instead (then
    ``sparsity`` and ``granularity`` are ignored). The candidates are
    the weights of Linear/Conv layers (:mod:`dist_chita.prunable`); ``include``
    (null: all) / ``exclude`` are fnmatch patterns on module names, and
    ``exclude_head`` leaves the output head dense. ``lambda`` is the ridge
    weight lambda of the CHITA objective and ``ridge`` its metric: ``fisher_diagonal``
    (lambda/2 (w - w_bar)^T D (w - w_bar) with D = diag of the empirical Fisher + 1e-3 of its mean, a
    Levenberg-Marquardt damping that keeps each weight's curvature when n << p; :func:`dist_chita.fisher.solver.solve`),
    ``identity`` (the paper's lambda/2 ||w - w_bar||^2), or ``auto`` (default, :func:`solver_ridge`): the Fisher
    diagonal when there are fewer than 1e-3 calibration samples per prunable weight, else the identity. chita++
    prunes in ``stages`` steps from ``base_sparsity`` to ``sparsity`` along a polynomial schedule of
    degree ``exponent`` (or a linear one). ``block_mode`` prunes consecutive groups of
    layers of at most ``block_size`` weights one at a time, the global budget split among them by
    ``block_criterion`` (:mod:`dist_chita.fisher.groups`): memory is set by the largest group's factor.

    ``objective`` is the quadratic model pruned: ``layerwise`` (default: each layer's output reconstruction over
    every calibration token, H = X^T X, its rows solved by CHITA one block of layers after another on the inputs of
    the already pruned model, :mod:`dist_chita.layerwise.driver`; ridge ``damp`` times the mean of diag H; granularity
    ``row``, ``layer`` (the layer's budget shared among its rows by the OBS saliency) or ``nm``, method ``chita``,
    or the baselines ``wanda`` and ``sparsegpt`` (with ``layer`` its masks are chosen over all rows of 128-column
    blocks, as in its paper; with ``row`` every row's share of each block) on the same inputs; ``loss``,
    ``lambda`` and ``ridge`` are unused) or ``fisher`` (the CHITA paper's: the empirical Fisher of the model's loss
    from n per-sample gradients, one problem over all layers; needed for global budgets, chita++ and block mode).
    """

    method: Literal["chita", "chita++", "magnitude", "wanda", "sparsegpt"] = "chita"
    sparsity: float = 0.5
    granularity: Literal["row", "layer", "global"] = "row"
    layer_sparsity: tuple[LayerSparsity, ...] = ()
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    nm: str | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    exclude_head: bool = True
    loss: Literal["ce", "sampled", "gn_probe", "causal_lm"] = "gn_probe"
    lambda_: float = 1e-3
    ridge: Literal["auto", "fisher_diagonal", "identity"] = "auto"
    stages: int = 1
    schedule: Literal["polynomial", "linear"] = "polynomial"
    exponent: float = 3.0
    base_sparsity: float = 0.0
    first_order_term: bool = False
    block_mode: bool = False
    block_size: int = 4_000_000
    block_criterion: Literal["magnitude", "obs"] = "magnitude"
    objective: Literal["layerwise", "fisher"] = "layerwise"
    damp: float = 0.01


@dataclass(frozen=True)
class SolverConfig:
    """Iterative hard thresholding with active-set refinement and back-solve. ``escape_trials``: candidate
    supports tried (one back-solve each) when IHT stalls; 0 (default) skips these escapes, which cost minutes
    on a factor of millions of columns (:func:`dist_chita.fisher.solver.solve`)."""

    max_iter: int = 200
    tol: float = 1e-4
    active_set_factor: float = 1.5
    storage_dtype: Dtype = "float32"
    backsolve: bool = True
    escape_trials: int = 0
    seed: int = 0


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    overwrite: bool = False
    save_model: bool = True


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    world_size: int | None = 2
    threads_per_rank: int | None = None
    timeout_seconds: int = 1800
    resume: bool = False  # chita++: continue from the last complete stage saved in resume_dir
    resume_dir: str | None = None  # stage checkpoints of chita++; null: <output.dir>.state
    resume_save_factor: bool = False  # also save each rank's Fisher factor after the gradient phase

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-ready) that :func:`parse_config` turns back into an equal object."""
        return to_dict(self)


# --------------------------------------------------------------------------- generic conversion


def _key(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Convert ``data`` to type ``cls`` (a dataclass, int, float, str, bool,
    Optional, list, tuple[X, ...] or Literal), raising ConfigError naming ``path``."""
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
        kwargs = {
            f.name: from_dict(hints[f.name], data[k], f"{path + '.' if path else ''}{k}")
            for k, f in fields.items()
            if k in data
        }
        return cls(**kwargs)
    if origin is Literal:
        if data not in typing.get_args(cls):
            raise ConfigError(f"{where}: expected {_type_name(cls)}, got {data!r}")
        return data
    if origin in (Union, types.UnionType):
        args = typing.get_args(cls)
        if data is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            if data is None:
                raise ConfigError(f"{where}: expected {_type_name(cls)}, got null")
            return from_dict(inner[0], data, path)
        raise TypeError(f"unsupported union type {cls}")
    if origin in (list, tuple):
        if not isinstance(data, list | tuple):
            raise ConfigError(f"{where}: expected {_type_name(cls)}, got {type(data).__name__}")
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
    if dataclasses.is_dataclass(obj):
        return {_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
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
            value = yaml_load(raw) if raw.strip() else ""
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


def yaml_load(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load`` but keep ``a:b`` scalars as strings and read ``1e-3`` as a float."""
    return yaml.load(text, Loader=_Loader)


_NM = re.compile(r"^(\d+):(\d+)$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def parse_nm(nm: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive weights, 1 <= N < M."""
    m = _NM.match(nm)
    if not m or not 1 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"prune.nm: expected 'N:M' with 1 <= N < M, got {nm!r}")
    return int(m.group(1)), int(m.group(2))


def validate(cfg: RunConfig) -> RunConfig:
    """Check value ranges and cross-field consistency; return ``cfg`` unchanged."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    m, c, e, p, s = cfg.model, cfg.calibration, cfg.eval, cfg.prune, cfg.solver
    if m.source == "hf":
        need(bool(m.path), "model.path: required when model.source is 'hf'")
    else:
        need(m.factory is not None and bool(_FACTORY.match(m.factory)),
             f"model.factory: expected 'module:function' when model.source is 'torch', got {m.factory!r}")
        need(bool(m.weights), "model.weights: required when model.source is 'torch'")
    need(bool(c.source), "calibration.source: must not be empty")
    need(c.n >= 1, f"calibration.n: must be >= 1, got {c.n}")
    need(c.max_length >= 1, f"calibration.max_length: must be >= 1, got {c.max_length}")
    need(c.batch_size >= 1, f"calibration.batch_size: must be >= 1, got {c.batch_size}")
    need(c.text_column is not None or c.image_column is not None,
         "calibration: one of text_column / image_column must be set")
    if c.windows:
        need(c.text_column is not None and c.image_column is None and c.label_column is None,
             "calibration.windows: needs text_column only (windows of tokens; no image_column or label_column)")
        held = (e.source or c.source, e.format or c.format, e.config_name or c.config_name, e.split or c.split)
        need(e.metric == "none" or held != (c.source, c.format, c.config_name, c.split),
             "calibration.windows: the held-out data must come from another eval.source or eval.split (the "
             "windows take a variable number of the calibration rows)")
    need(e.n is None or e.n >= 1, f"eval.n: must be >= 1, got {e.n}")
    need(e.max_length is None or e.max_length >= 1, f"eval.max_length: must be >= 1, got {e.max_length}")
    window = e.max_length or c.max_length
    need(e.stride is None or 1 <= e.stride < window,
         f"eval.stride: must be in [1, max_length = {window}), got {e.stride}")
    need(e.batch_size >= 1, f"eval.batch_size: must be >= 1, got {e.batch_size}")
    need(0.0 <= p.sparsity < 1.0, f"prune.sparsity: must be in [0, 1), got {p.sparsity}")
    need(0.0 <= p.base_sparsity <= p.sparsity,
         f"prune.base_sparsity: must be in [0, prune.sparsity], got {p.base_sparsity}")
    if p.nm is not None:
        parse_nm(p.nm)
    for i, rule in enumerate(p.layer_sparsity):
        need(bool(rule.pattern), f"prune.layer_sparsity[{i}].pattern: must not be empty")
        need(0.0 <= rule.sparsity < 1.0, f"prune.layer_sparsity[{i}].sparsity: must be in [0, 1), got {rule.sparsity}")
    if p.layer_sparsity:
        need(p.nm is None, "prune.layer_sparsity: sets per-layer sparsities, which N:M (prune.nm) does not use")
        need(p.granularity != "global", "prune.layer_sparsity: needs prune.granularity row or layer (a global "
                                        "budget has one sparsity)")
        need(not p.block_mode, "prune.layer_sparsity: is not supported with prune.block_mode")
    if p.allocation == "owl":
        need(not p.layer_sparsity, "prune.allocation: owl sets every layer's sparsity; drop prune.layer_sparsity")
        need(p.nm is None and p.granularity != "global" and not p.block_mode,
             "prune.allocation: owl needs prune.granularity row or layer (no N:M, no block mode)")
        need(p.owl_m > 0.0, f"prune.owl_m: must be > 0, got {p.owl_m}")
        need(p.owl_lambda >= 0.0, f"prune.owl_lambda: must be >= 0, got {p.owl_lambda}")
    need(p.lambda_ >= 0.0, f"prune.lambda: must be >= 0, got {p.lambda_}")
    need(p.stages >= 1, f"prune.stages: must be >= 1, got {p.stages}")
    need(p.damp > 0.0, f"prune.damp: must be > 0, got {p.damp}")
    if p.method in ("wanda", "sparsegpt"):
        need(p.objective == "layerwise", f"prune.method: {p.method} prunes each layer on its inputs; it needs "
                                         "prune.objective=layerwise")
    if p.objective == "layerwise":
        need(p.method != "chita++", "prune.objective: layerwise prunes in one pass; chita++ needs "
                                    "prune.objective=fisher")
        need(p.nm is not None or p.granularity != "global",
             "prune.objective: layerwise prunes one layer at a time, so it needs prune.granularity row or layer "
             "(or prune.nm), got global; set prune.objective=fisher for a global budget")
        need(not p.block_mode, "prune.objective: layerwise needs no block mode (it holds one block's H at a time); "
                               "block mode is for prune.objective=fisher")
    need(p.block_size >= 1, f"prune.block_size: must be >= 1, got {p.block_size}")
    need(p.exponent > 0.0, f"prune.exponent: must be > 0, got {p.exponent}")
    need(p.include is None or len(p.include) > 0, "prune.include: must list at least one pattern (or be null)")
    need(s.max_iter >= 1, f"solver.max_iter: must be >= 1, got {s.max_iter}")
    need(s.tol >= 0.0, f"solver.tol: must be >= 0, got {s.tol}")
    need(s.escape_trials >= 0, f"solver.escape_trials: must be >= 0, got {s.escape_trials}")
    need(s.active_set_factor >= 1.0, f"solver.active_set_factor: must be >= 1, got {s.active_set_factor}")
    need(bool(cfg.output.dir), "output.dir: must not be empty")
    need(cfg.world_size is None or cfg.world_size >= 1, f"world_size: must be >= 1, got {cfg.world_size}")
    need(cfg.timeout_seconds >= 1, f"timeout_seconds: must be >= 1, got {cfg.timeout_seconds}")
    need(cfg.threads_per_rank is None or cfg.threads_per_rank >= 1,
         f"threads_per_rank: must be >= 1, got {cfg.threads_per_rank}")
    return cfg


def parse_config(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Nested dict (e.g. from YAML) + overrides -> validated RunConfig."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    return validate(from_dict(RunConfig, apply_overrides(data, list(overrides))))


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


AUTO_RIDGE_SAMPLES_PER_WEIGHT = 1e-3  # ``auto``: the Fisher diagonal below n / p = 1e-3, the identity above


def solver_ridge(ridge: str, n: int, p: int) -> str:
    """The ridge metric the solver gets: ``ridge``, with ``auto`` resolved from n calibration samples and p prunable
    weights: ``fisher_diagonal`` when n < 1e-3 p (then the back-solve fits the rank-n Fisher term exactly on almost any
    support, and with the identity ridge the best support is magnitude's), else ``identity`` (the paper's). Measured:
    MiniLM, n / p = 1.2e-5, the Fisher diagonal far better; MLPNet (n / p = 0.03) and the digits MLP (0.015), the
    identity better."""
    if ridge != "auto":
        return ridge
    return "fisher_diagonal" if n < AUTO_RIDGE_SAMPLES_PER_WEIGHT * p else "identity"


def model_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of ``dist_chita.io.models.load_model``."""
    m = cfg.model
    return {"kind": m.source, "task": m.task, "path": m.path, "factory": m.factory, "weights": m.weights,
            "dtype": m.dtype, "trust_remote_code": m.trust_remote_code}


def calibration_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of ``dist_chita.io.data.load_samples`` for the calibration samples
    (add ``tokenizer`` / ``image_processor``); samples perm[0:n] of the seeded permutation."""
    c = cfg.calibration
    return {"source": c.source, "fmt": c.format, "config_name": c.config_name, "split": c.split, "n": c.n,
            "seed": c.seed, "offset": 0, "text_column": c.text_column, "image_column": c.image_column,
            "label_column": c.label_column, "max_length": c.max_length, "padding": c.padding,
            "flatten_images": c.flatten_images}


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
    same_rows = (out["source"], out["fmt"], out["config_name"], out["split"]) == (
        c.source, c.format, c.config_name, c.split)
    out.update(n=e.n, offset=c.n if same_rows else 0)
    return out


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML: every key, in declaration order (what :func:`load_config` reads back)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(config_yaml(cfg))
