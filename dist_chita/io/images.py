"""Images as datasets hold them, turned into a model's ``pixel_values``.

Values of an image column, each decoded to an array (H, W, C) by :func:`decode`:

* a PIL image (what the ``datasets`` Image feature gives: parquet written by ``Dataset.to_parquet``,
  ``save_to_disk``, imagefolder, hub datasets);
* a mapping ``{"bytes": ..., "path": ...}`` (the Image feature's storage, as a parquet file without the feature's
  metadata holds it): the bytes decoded with PIL, else the file at ``path``;
* encoded bytes, or a path to an image file;
* an array or nested list (H, W) or (H, W, C) (channels last; (C, H, W) with C <= 4 < W is read as channels first).

:func:`pixel_values` makes the batch tensor:

* with the checkpoint's image processor (and none of ``size`` / ``mean`` / ``std`` given): images converted to
  the channels the model takes (``L`` for 1, ``RGB`` for 3, ``RGBA`` for 4) and passed to it;
* otherwise: channels converted to the model's (grey replicated, colour to luminance L = 0.299 R + 0.587 G +
  0.114 B, alpha dropped), integer pixels divided by ``scale`` (None: 65535 for 16-bit pixels, else 255; float
  pixels are used as they are), resized to ``size`` (bilinear, antialiased), then ``(x - mean) / std`` per channel
  (one value, or one per channel), as float32 (N, C, H, W), or (N, C*H*W) with ``flatten``.

Every problem is a one-line ValueError naming the column and what was expected.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_LUMA = np.array([0.299, 0.587, 0.114])
_EXPECTED = "a datasets Image, {bytes, path}, image bytes, an image file path, or an array (H, W[, C])"


def _where(column: str, source: str, row: int | None) -> str:
    return f"column {column!r} of {source}" + (f", row {row}" if row is not None else "")


def _open(value: Any, base: Path | None):
    """A PIL image from bytes, a path, or a ``{bytes, path}`` mapping; None when ``value`` is none of these."""
    from PIL import Image

    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return Image.open(io.BytesIO(data))
        value = path
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, (str, Path)):
        p = Path(value)
        if not p.is_file() and base is not None and (base / p).is_file():
            p = base / p
        return Image.open(p)
    return None


def decode(value: Any, column: str, source: str, row: int | None = None, base: Path | None = None) -> np.ndarray:
    """One image value (module docstring) as an array (H, W, C), of its stored dtype (uint8 for 8-bit images)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = value if isinstance(value, Image.Image) else _open(value, base)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{_where(column, source, row)}: cannot decode an image ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if img is not None:
        if img.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I", "F"):
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        arr = np.asarray(img)
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            arr = np.asarray(None)
        if arr.dtype.kind not in "uif" or arr.ndim not in (2, 3):
            raise ValueError(f"{_where(column, source, row)}: expected {_EXPECTED}, got {type(value).__name__}"
                             + (f" of shape {arr.shape}" if arr.dtype.kind in "uif" else ""))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.shape[0] <= 4 < arr.shape[-1]:  # channels first
        arr = np.moveaxis(arr, 0, -1)
    return arr


def convert_channels(arr: np.ndarray, channels: int | None, column: str, source: str) -> np.ndarray:
    """(H, W, C) -> (H, W, ``channels``): grey replicated to colour, colour to luminance, alpha dropped."""
    c = arr.shape[-1]
    if channels is None or c == channels:
        return arr
    if c in (2, 4):  # grey or colour with alpha
        arr, c = arr[..., :-1], c - 1
    if c == channels:
        return arr
    if c == 1 and channels in (3, 4):
        out = np.repeat(arr, 3, axis=-1)
        return out if channels == 3 else np.concatenate([out, np.full_like(arr, _opaque(arr))], axis=-1)
    if c == 3 and channels == 1:
        luma = arr.astype(np.float64) @ _LUMA
        return (np.rint(luma) if arr.dtype.kind in "ui" else luma).astype(arr.dtype)[..., None]
    raise ValueError(f"images in {_where(column, source, None)} have {arr.shape[-1]} channels; the model takes "
                     f"{channels}")


def _opaque(arr: np.ndarray):
    return np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0


def default_scale(dtype: np.dtype) -> float:
    """What integer pixels are divided by: 65535 for 16-bit pixels, 255 for other integers (8-bit values however
    they are stored); 1 for float pixels."""
    if dtype.kind not in "ui":
        return 1.0
    return 65535.0 if dtype == np.uint16 else 255.0


def _per_channel(values: Sequence[float] | None, channels: int, name: str) -> torch.Tensor | None:
    """``values`` (one, or one per channel) as (1, C, 1, 1); a ValueError naming ``calibration.<name>`` (where a
    run sets it) when there are neither."""
    if values is None:
        return None
    vals = [float(v) for v in (values if isinstance(values, Sequence) else [values])]
    if len(vals) not in (1, channels):
        per_channel = "" if channels == 1 else f" or {channels} (one per channel)"
        raise ValueError(f"calibration.{name}: expected 1 value{per_channel} for images of {channels} "
                         f"channel{'s' if channels > 1 else ''}, got {len(vals)}")
    return torch.tensor(vals, dtype=torch.float32).view(1, -1, 1, 1)


def normalise(arrays: Sequence[np.ndarray], *, size: int | Sequence[int] | None, scale: float | None,
              mean: Sequence[float] | None, std: Sequence[float] | None, flatten: bool, column: str,
              source: str) -> torch.Tensor:
    """Arrays (H, W, C) of one channel count -> float32 (N, C, H', W') or flattened (N, C*H'*W') (module
    docstring). Without ``size`` every image must have the same height and width."""
    shapes = sorted({a.shape[:2] for a in arrays})
    if size is None and len(shapes) > 1:
        raise ValueError(f"images in {_where(column, source, None)} differ in size ({', '.join(map(str, shapes[:3]))}"
                         f"{', ...' if len(shapes) > 3 else ''}): set calibration.image_size, or use a model with an "
                         "image processor")
    target = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    out = []
    for a in arrays:
        x = torch.as_tensor(a.astype(np.float32) / (scale or default_scale(a.dtype))).permute(2, 0, 1)[None]
        if target is not None and tuple(x.shape[-2:]) != target:
            x = torch.nn.functional.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    x = torch.cat(out)
    m, s = _per_channel(mean, x.shape[1], "mean"), _per_channel(std, x.shape[1], "std")
    if m is not None:
        x = x - m
    if s is not None:
        x = x / s
    return x.reshape(len(x), -1) if flatten else x.contiguous()


def processor_channels(processor: Any) -> int | None:
    """The channels an image processor normalises (the length of its ``image_mean``), or None."""
    mean = getattr(processor, "image_mean", None)
    return len(mean) if isinstance(mean, (list, tuple)) else None


def process(arrays: Sequence[np.ndarray], processor: Any, channels: int | None, column: str,
            source: str) -> torch.Tensor:
    """Arrays (H, W, C) through a Hugging Face image processor: as PIL images of the mode of the channel count
    (arrays channels last otherwise); the processor's own resizing and normalisation apply."""
    from PIL import Image

    wanted = processor_channels(processor)
    if channels is not None and wanted is not None and wanted != channels:
        raise ValueError(f"the image processor normalises {wanted} channels but the model takes {channels}: set "
                         "calibration.mean and calibration.std (with calibration.image_size) to preprocess without it")
    c = arrays[0].shape[-1]
    if all(a.dtype == np.uint8 for a in arrays) and c in PIL_MODES:
        images = [Image.fromarray(a[..., 0] if c == 1 else a, PIL_MODES[c]) for a in arrays]
        kwargs = {}
    else:
        images, kwargs = list(arrays), {"input_data_format": "channels_last"}
    try:
        out = processor(images=images, return_tensors="pt", **kwargs)["pixel_values"]
    except (ValueError, TypeError) as e:
        raise ValueError(f"image processor {type(processor).__name__} on {_where(column, source, None)}: "
                         f"{str(e).splitlines()[0]}") from None
    return torch.as_tensor(out)


def pixel_values(values: Sequence[Any], *, column: str, source: str = "data", rows: Sequence[int] | None = None,
                 channels: int | None = None, processor: Any = None, size: int | Sequence[int] | None = None,
                 scale: float | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, flatten: bool = False,
                 base: Path | None = None) -> torch.Tensor:
    """The ``pixel_values`` of the images ``values`` of ``column`` (module docstring). ``channels``: what the model
    takes (None: those the image processor normalises, else as the images come, grey and colour mixed made colour);
    ``rows``: the row numbers, for error messages; ``base``: the directory relative image paths are under."""
    rows = list(range(len(values))) if rows is None else list(rows)
    use_processor = processor is not None and size is None and mean is None and std is None
    if use_processor and channels is None:
        channels = processor_channels(processor)  # the model's channels unknown: those the processor normalises
    arrays = [convert_channels(decode(v, column, source, r, base), channels, column, source)
              for v, r in zip(values, rows, strict=True)]
    if len({a.shape[-1] for a in arrays}) > 1:  # grey and colour mixed: all colour (alpha dropped)
        target = 3 if any(a.shape[-1] >= 3 for a in arrays) else 1
        arrays = [convert_channels(a, target, column, source) for a in arrays]
    if use_processor:
        return process(arrays, processor, channels, column, source)
    return normalise(arrays, size=size, scale=scale, mean=mean, std=std, flatten=flatten, column=column,
                     source=source)
