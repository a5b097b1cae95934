"""dist_chita/io/images.py: every form an image column holds, channel conversion against PIL's, preprocessing
against a plain computation, image processors of 1 and 3 channels, and the one-line errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dist_chita.io import images


def png(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture()
def grey():
    return np.random.default_rng(0).integers(0, 256, size=(6, 7), dtype=np.uint8)


@pytest.fixture()
def rgb():
    return np.random.default_rng(1).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)


def test_every_form_decodes_to_the_same_pixels(tmp_path, grey):
    (tmp_path / "a.png").write_bytes(png(grey))
    forms = [Image.fromarray(grey), {"bytes": png(grey), "path": None}, {"bytes": None, "path": "a.png"}, png(grey),
             str(tmp_path / "a.png"), grey, grey.tolist(), grey[None]]
    for value in forms:
        out = images.decode(value, "image", "src", 0, base=tmp_path)
        assert out.shape == (6, 7, 1) and np.array_equal(out[..., 0], grey), type(value)
    rgb = np.stack([grey, grey // 2, 255 - grey])
    assert np.array_equal(images.decode(rgb, "image", "src"), np.moveaxis(rgb, 0, -1))  # (C, H, W), C <= 4 < W


def test_channels_convert_as_pil_does(grey, rgb):
    as_grey = images.convert_channels(rgb, 1, "image", "src")[..., 0]
    assert np.abs(as_grey.astype(int) - np.asarray(Image.fromarray(rgb).convert("L")).astype(int)).max() <= 1
    assert np.array_equal(images.convert_channels(grey[..., None], 3, "image", "src"), np.stack([grey] * 3, -1))
    rgba = np.concatenate([rgb, np.full_like(rgb[..., :1], 7)], -1)
    assert np.array_equal(images.convert_channels(rgba, 3, "image", "src"), rgb)
    assert images.convert_channels(grey[..., None], 4, "image", "src")[..., 3].min() == 255
    with pytest.raises(ValueError, match=r"^images in column 'image' of src have 3 channels; the model takes 2$"):
        images.convert_channels(rgb, 2, "image", "src")


def test_normalise_against_a_plain_computation(rgb):
    a, b = rgb, rgb[::-1].copy()
    x = images.pixel_values([a, b], column="image", mean=[0.5, 0.4, 0.3], std=[0.2], flatten=False)
    want = (torch.tensor(np.stack([a, b]), dtype=torch.float32).permute(0, 3, 1, 2) / 255
            - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    torch.testing.assert_close(x, want)
    flat = images.pixel_values([a, b], column="image", flatten=True)
    torch.testing.assert_close(flat, (want * 0.2 + torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)).reshape(2, -1))
    sized = images.pixel_values([a, np.zeros((9, 4, 3), np.uint8)], column="image", size=5, flatten=False)
    want = torch.nn.functional.interpolate(torch.tensor(a, dtype=torch.float32).permute(2, 0, 1)[None] / 255,
                                           size=(5, 5), mode="bilinear", antialias=True)
    assert sized.shape == (2, 3, 5, 5) and float(sized[1].abs().max()) == 0.0
    torch.testing.assert_close(sized[:1], want)
    floats = images.pixel_values([np.full((2, 2), 0.25, np.float32)], column="image", flatten=True)
    assert floats.tolist() == [[0.25] * 4]  # float pixels are taken as they are


def test_mixed_grey_and_colour_become_colour(grey, rgb):
    x = images.pixel_values([grey, rgb], column="image", flatten=False)
    assert x.shape == (2, 3, 6, 7) and torch.equal(x[0, 0], x[0, 2])
    x = images.pixel_values([grey, rgb], column="image", channels=1, flatten=False)
    assert x.shape == (2, 1, 6, 7)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_processor_of_the_model_channels(channels, grey, rgb):
    from transformers import ConvNextImageProcessor

    proc = ConvNextImageProcessor(size={"shortest_edge": 8}, crop_pct=1.0, image_mean=[0.5] * channels,
                                  image_std=[0.25] * channels, do_rescale=True)
    x = images.pixel_values([Image.fromarray(grey), {"bytes": png(rgb), "path": None}], column="img",
                            channels=channels, processor=proc)
    assert x.shape == (2, channels, 8, 8)
    direct = proc(images=[Image.fromarray(grey).convert(images.PIL_MODES[channels])], return_tensors="pt")
    torch.testing.assert_close(x[:1], direct["pixel_values"])
    # the model's channels unknown (a plain torch module): the images take the processor's channels
    z = images.pixel_values([Image.fromarray(grey), {"bytes": png(rgb), "path": None}], column="img", processor=proc)
    torch.testing.assert_close(z, x)
    other = 4 - channels  # 1 <-> 3: the processor's mean does not fit the model
    with pytest.raises(ValueError, match=rf"^the image processor normalises {channels} channels but the model takes "
                                         rf"{other}: set calibration.mean"):
        images.pixel_values([grey], column="img", channels=other, processor=proc)
    # given mean / std / size replace the processor
    y = images.pixel_values([grey], column="img", channels=channels, processor=proc, mean=[0.0], std=[1.0],
                            flatten=False)
    assert y.shape == (1, channels, 6, 7) and float(y.max()) <= 1.0


def test_errors_are_one_line_naming_the_column(grey):
    cases = [({"bytes": b"not an image", "path": None}, r"column 'image' of src, row 4: cannot decode an image"),
             ("no/such/file.png", r"column 'image' of src, row 4: cannot decode an image \(FileNotFoundError"),
             ({"a": 1}, r"column 'image' of src, row 4: expected a datasets Image, \{bytes, path\}"),
             (np.zeros((2, 2, 2, 2)), r"expected a datasets Image.*got ndarray of shape \(2, 2, 2, 2\)"),
             (["x", "y"], r"expected a datasets Image.*got list$")]
    for value, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            images.pixel_values([value], column="image", source="src", rows=[4])
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"differ in size \(\(6, 7\), \(7, 6\)\): set calibration.image_size"):
        images.pixel_values([grey, grey.T.copy()], column="image", source="src")
    with pytest.raises(ValueError, match=r"^calibration\.mean: expected 1 value or 3 \(one per channel\) for images "
                                         r"of 3 channels, got 2$"):
        images.pixel_values([np.zeros((2, 2, 3), np.uint8)], column="image", mean=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"^calibration\.std: expected 1 value for images of 1 channel, got 2$"):
        images.pixel_values([grey], column="image", std=[0.1, 0.2])
