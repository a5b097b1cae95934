"""Sparse checkpoints in the compressed-tensors format: a pruned layer stored as its non-zero values and a bitmask.

``output.format: compressed-tensors`` rewrites a Hugging Face checkpoint that ``save_pretrained`` wrote (one
``model.safetensors`` or shards with their index) in the format of the compressed-tensors library's sparse
compressors, with the ``sparsity_config`` in ``config.json`` as llm-compressor wrote it. For a pruned weight
``<m>.weight`` of shape (R, C) (values of dtype ``dtype``):

* ``sparse-bitmask`` (unstructured and N:M other than 2:4): ``<m>.shape`` int64 (2,) = [R, C];
  ``<m>.compressed`` (nnz,) ``dtype``: the non-zero values in row-major order; ``<m>.bitmask`` uint8 (R, ceil(C/8)):
  where the non-zeros are, each row packed least significant bit first (bit j of byte b is column 8 b + j);
  ``<m>.row_offsets`` int64 (R,): the position in ``compressed`` of each row's first value;
* ``sparse-24-bitmask`` (2:4 along the stored rows): ``<m>.shape`` int64 (2, 1); ``<m>.compressed`` (R, C/2): two
  values of every group of four consecutive columns, in column order; ``<m>.bitmask`` as above, with exactly two
  bits set per group (a group with fewer non-zeros stores zeros as well, its lowest-numbered zero positions).

``config.json`` gets ``quantization_config = {"quant_method": "compressed-tensors", "version": ..., "sparsity_config":
{"format", "global_sparsity", "sparsity_structure", "targets", "ignore", "registry_requires_subclass": false},
"transform_config": {}}``; ``targets`` and ``ignore`` name module classes (``Linear``) or modules, reduced as
llm-compressor does: a class is a target when at least half of its modules are compressed, and its other
modules are ignored; otherwise the compressed modules are listed by name.

Who reads it: compressed-tensors up to 0.14 (its ``ModelCompressor`` decompresses these files; with transformers
4.x, ``from_pretrained`` does so on load). The compressed-tensors releases that work with transformers 5 (0.15 and
later) dropped the sparse compressors, and vLLM dropped sparse inference: transformers 5 loads such a checkpoint
with the compressed layers' weights missing (newly initialised, with a warning table). :func:`load_pretrained`
(and :func:`dist_chita.io.models.load_hf_model`, which recognises the format) reads it back exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_chita.io import params

FORMAT_VERSION = "0.14.0.1"  # the last compressed-tensors release with the sparse compressors: its format
BITMASK, SPARSE24 = "sparse-bitmask", "sparse-24-bitmask"
SPARSE_FORMATS = (BITMASK, SPARSE24)
_PARTS = ("shape", "compressed", "bitmask", "row_offsets")
INDEX = "model.safetensors.index.json"


@dataclass
class Written:
    """What :func:`compress_checkpoint` did: the sparsity format, the layers stored compressed, and the bytes of the
    checkpoint's weight files before (dense) and after."""

    format: str
    compressed: list[str]
    dense_bytes: int
    bytes: int


# --------------------------------------------------------------------------- one tensor


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """Bool (R, C) -> uint8 (R, ceil(C/8)), each row's bits packed least significant bit first."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy().astype(np.uint8), axis=-1, bitorder="little"))


def unpack_rows(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """uint8 (R, ceil(C/8)) -> bool (R, C), the inverse of :func:`pack_rows`."""
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=columns, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def follows_24(w: torch.Tensor) -> bool:
    """Whether a 2-D ``w`` (R, C) has C % 4 == 0 and at most two non-zeros in every four consecutive columns."""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def compress_weight(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """A 2-D weight (R, C) as the tensors of ``fmt`` (``shape``, ``compressed``, ``bitmask`` [, ``row_offsets``])."""
    rows, cols = w.shape
    if fmt == BITMASK:
        mask = w != 0
        counts = mask.sum(1)
        return {"shape": torch.tensor([rows, cols], dtype=torch.int64), "compressed": w[mask].contiguous(),
                "bitmask": pack_rows(mask), "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}
    if fmt != SPARSE24:
        raise ValueError(f"unknown sparse format {fmt!r} (one of {', '.join(SPARSE_FORMATS)})")
    if not follows_24(w):
        raise ValueError(f"a weight of shape {tuple(w.shape)} is not 2:4 sparse along its rows")
    groups = w.reshape(rows, -1, 4)
    # two positions of each group: its non-zeros first, then its lowest-numbered zeros (a stable sort)
    order = torch.sort((groups == 0).to(torch.int8), dim=-1, stable=True).indices[..., :2].sort(-1).values
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)
    return {"shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
            "compressed": w[mask].reshape(rows, cols // 2).contiguous(), "bitmask": pack_rows(mask)}


def decompress_weight(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight (R, C) from the tensors of either format (:func:`compress_weight`)."""
    rows, cols = (int(x) for x in parts["shape"].reshape(-1).tolist())
    mask = unpack_rows(parts["bitmask"], cols).reshape(rows, cols)
    values = parts["compressed"].reshape(-1)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"bitmask has {int(mask.sum())} bits set but {values.numel()} values are stored")
    out = torch.zeros(rows, cols, dtype=values.dtype)
    out[mask] = values
    return out


# --------------------------------------------------------------------------- a checkpoint directory


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors weight files of a ``save_pretrained`` directory (shards listed by its index)."""
    d = Path(directory)
    if (d / INDEX).exists():
        names = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors"))


def weights_bytes(directory: str | Path) -> int:
    """Bytes of a checkpoint directory's weight files."""
    return sum(p.stat().st_size for p in weight_files(directory))


def sparse_format(nm: tuple[int, int] | None) -> tuple[str, str]:
    """(format, sparsity_structure) for unstructured pruning (``nm`` None) or N:M: ``sparse-24-bitmask`` for 2:4,
    ``sparse-bitmask`` otherwise."""
    if nm == (2, 4):
        return SPARSE24, "2:4"
    return BITMASK, "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"


def compress_checkpoint(directory: str | Path, model: nn.Module, layers: Iterable[str],
                        nm: tuple[int, int] | None, global_sparsity: float) -> Written:
    """Rewrite the dense checkpoint ``save_pretrained`` wrote into ``directory`` in the sparse format of ``nm``
    (:func:`sparse_format`): the 2-D weights ``<layer>.weight`` of ``layers`` (the pruned modules of ``model``)
    are stored compressed, except those the format cannot hold exactly (2:4 needs the pattern along the stored
    rows: transformers' Conv1D stores its weight transposed), which stay dense and are listed under ``ignore``.
    ``global_sparsity`` goes into the config. Returns the sizes before and after."""
    from safetensors.torch import load_file, save_file

    d = Path(directory)
    fmt, structure = sparse_format(nm)
    files = weight_files(d)
    if not files or not (d / "config.json").exists():
        raise ValueError(f"{d} holds no safetensors checkpoint with a config.json to compress")
    dense_bytes = weights_bytes(d)
    wanted, done, key_file = {f"{name}.weight": name for name in layers}, [], {}
    for path in files:
        tensors = load_file(str(path))
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            name = wanted.get(key)
            if name is None or t.dim() != 2 or (fmt == SPARSE24 and not follows_24(t)):
                out[key] = t
                continue
            out.update({f"{name}.{part}": v for part, v in compress_weight(t, fmt).items()})
            done.append(name)
        save_file(out, str(path), metadata={"format": "pt"})
        key_file.update(dict.fromkeys(out, path.name))
    if (d / INDEX).exists():
        index = json.loads((d / INDEX).read_text())
        index["weight_map"] = dict(sorted(key_file.items()))
        index.setdefault("metadata", {})["total_size"] = weights_bytes(d)
        (d / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    targets, ignore = targets_and_ignore(model, done)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "version": FORMAT_VERSION,
        "sparsity_config": {"format": fmt, "global_sparsity": float(global_sparsity), "ignore": ignore,
                            "registry_requires_subclass": False, "sparsity_structure": structure,
                            "targets": targets},
        "transform_config": {}}
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Written(fmt, done, dense_bytes, weights_bytes(d))


def targets_and_ignore(model: nn.Module, compressed: Iterable[str]) -> tuple[list[str], list[str]]:
    """``sparsity_config``'s ``targets`` and ``ignore`` (module docstring): per module class of the compressed
    modules, the class name when at least half of that class's modules (with a 2-D weight) are compressed, with
    the others ignored; else the compressed modules' names."""
    done = set(compressed)
    by_class: dict[str, list[tuple[str, bool]]] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and (len(params.shape(w)) == 2 or name in done):
            by_class.setdefault(type(module).__name__, []).append((name, name in done))
    targets, ignore = [], []
    for cls, members in sorted(by_class.items()):
        hit = [n for n, c in members if c]
        miss = [n for n, c in members if not c]
        if hit and len(hit) >= len(miss):
            targets.append(cls)
            ignore.extend(miss)
        elif hit:
            targets.extend(hit)
    return targets, ignore


def sparsity_config(directory: str | Path) -> dict[str, Any] | None:
    """The ``sparsity_config`` of a checkpoint directory's config.json when its format is a sparse one, else None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    q = json.loads(path.read_text()).get("quantization_config") or {}
    s = q.get("sparsity_config") or {}
    return s if q.get("quant_method") == "compressed-tensors" and s.get("format") in SPARSE_FORMATS else None


def decompressed_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sparse checkpoint, with each compressed weight restored as ``<m>.weight`` (dense)."""
    from safetensors.torch import load_file

    files = weight_files(directory)
    if not files:
        raise ValueError(f"{directory} holds no safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return decompressed_state_dict_of(tensors)


def decompressed_state_dict_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (of one file or all) with each compressed weight's parts replaced by ``<m>.weight`` (dense)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key, t in tensors.items():
        prefix, _, part = key.rpartition(".")
        if part in _PARTS and f"{prefix}.bitmask" in tensors:
            groups.setdefault(prefix, {})[part] = t
        else:
            out[key] = t
    for prefix, parts in groups.items():
        out[f"{prefix}.weight"] = decompress_weight(parts)
    return out


def load_pretrained(directory: str | Path, auto_class: str = "AutoModel", dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False) -> nn.Module:
    """A sparse checkpoint loaded with transformers' ``auto_class`` (e.g. ``AutoModelForCausalLM``), its weights
    decompressed: the same model ``from_pretrained`` gives for the dense checkpoint. Raises ValueError when the
    directory is not in a sparse format."""
    import transformers

    if sparsity_config(directory) is None:
        raise ValueError(f"{directory} is not a sparse compressed-tensors checkpoint (no sparsity_config of format "
                         f"{' or '.join(SPARSE_FORMATS)} in its config.json)")
    config = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # decompressed here: nothing for transformers' quantizers to do
    model_class = _model_class(getattr(transformers, auto_class), config)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return model_class.from_pretrained(None, config=config, state_dict=decompressed_state_dict(directory), **kwargs)


def _model_class(auto: Any, config: Any) -> type:
    """The model class ``auto.from_pretrained`` builds for ``config`` (its mapping, or the remote code's class)."""
    remote = (getattr(config, "auto_map", None) or {}).get(auto.__name__)
    if remote is not None:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(remote, config.name_or_path)
    try:
        found = auto._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"{auto.__name__} has no model class for {type(config).__name__}") from None
    return found[0] if isinstance(found, (list, tuple)) else found


def decompress_checkpoint(source: str | Path, target: str | Path, overwrite: bool = False,
                          overwrite_hint: str = "pass overwrite=True", name: str = "target",
                          finish: Callable[[Path], None] | None = None) -> None:
    """Write the sparse checkpoint ``source`` as a dense one at ``target`` (written atomically): the same files,
    each compressed weight restored in its shard, and no ``quantization_config`` in config.json. What any
    transformers version and vLLM load. ``target`` must not be, contain or lie inside ``source``; an existing
    ``target`` is replaced only with ``overwrite`` (:func:`dist_chita.io.output.check_target`, whose messages
    ``overwrite_hint`` and ``name`` complete). ``finish(directory)`` runs on the new directory once its weights and
    config are written, before it takes ``target``'s place: to rewrite other files that describe the weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dist_chita.io.output import atomic_directory, check_target

    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if sparsity_config(source) is None:
        raise ValueError(f"{source} is not a sparse compressed-tensors checkpoint")
    check_target(target, overwrite, [src], overwrite_hint, name)
    with atomic_directory(target, overwrite) as tmp:
        shards = {p.name for p in weight_files(src)}
        for p in src.iterdir():
            if p.is_file() and p.name not in shards:
                shutil.copy2(p, tmp / p.name)
        key_file = {}
        for name in sorted(shards):
            tensors = decompressed_state_dict_of(load_file(str(src / name)))
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            key_file.update(dict.fromkeys(tensors, name))
        if (tmp / INDEX).exists():
            index = json.loads((tmp / INDEX).read_text())
            index["weight_map"] = dict(sorted(key_file.items()))
            index.setdefault("metadata", {})["total_size"] = weights_bytes(tmp)
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if finish is not None:
            finish(tmp)
