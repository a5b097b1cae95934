"""`launch/prune.py` on image data as users have it: tiny ResNets of 1 and 3 channels saved with image-processor
configs, datasets written with the datasets Image feature (Dataset.to_parquet, save_to_disk), no column given in
the config; the near-chance warning."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def resnet_checkpoint(path: Path, channels: int) -> Path:
    import transformers as tf

    torch.manual_seed(channels)
    cfg = tf.ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          num_labels=3)
    tf.ResNetForImageClassification(cfg).save_pretrained(path)
    tf.ConvNextImageProcessor(size={"shortest_edge": 16}, crop_pct=1.0, image_mean=[0.5] * channels,
                              image_std=[0.25] * channels).save_pretrained(path)
    return path


def image_data(path: Path, kind: str, mode: str) -> Path:
    """40 images of 20 x 20 (PIL mode ``mode``) with ClassLabel labels and a string column, as the Image feature."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).convert(mode) for _ in range(40)]
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"image": imgs, "text": ["a photo"] * 40, "label": [i % 3 for i in range(40)]},
                                    features=feats)
    if kind == "parquet":
        ds.to_parquet(str(path.with_suffix(".parquet")))
        return path.with_suffix(".parquet")
    ds.save_to_disk(str(path))
    return path


def run(tmp_path, model, source, *overrides):
    cfg = {"name": "images", "model": {"path": str(model), "task": "image-classification"},
           "calibration": {"source": str(source), "n": 16, "batch_size": 8},  # no column given
           "eval": {"metric": "accuracy", "batch_size": 24, "compare_magnitude": False},
           "prune": {"sparsity": 0.5}, "layerwise": {"max_iter": 10}, "output": {"dir": str(tmp_path / "out")},
           "world_size": None, "threads_per_rank": 1}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "launch/prune.py", "--config", str(path), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("channels, mode, kind", [(1, "L", "parquet"), (3, "RGB", "disk"), (1, "RGB", "disk")])
def test_resnet_on_image_feature_data(tmp_path, channels, mode, kind):
    """Grey images for a grey model from parquet, colour for colour from save_to_disk, and colour images for a grey
    model (converted): the run prunes, and warns that the untrained model's accuracy is near chance."""
    model = resnet_checkpoint(tmp_path / "ckpt", channels)
    res = run(tmp_path, model, image_data(tmp_path / "data", kind, mode))
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert rep["n"] == 16 and 0.45 < rep["global"]["sparsity"] < 0.55
    warning = [line for line in res.stdout.splitlines() if line.startswith("warning: the dense model's accuracy")]
    assert len(warning) == 1 and f"{rep['metric']['before']:.4f}, near chance" in warning[0]


def test_config_keys_replace_the_image_processor_and_errors_name_the_problem(tmp_path):
    model = resnet_checkpoint(tmp_path / "ckpt", 3)
    source = image_data(tmp_path / "data", "parquet", "RGB")
    res = run(tmp_path, model, source, "calibration.mean=[0.4]", "calibration.std=[0.2, 0.2]", "output.overwrite=true")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "error: calibration.std: expected 1 value or 3 (one per channel) for images of 3 channels, got 2")
    res = run(tmp_path, model, source, "calibration.image_size=12", "calibration.mean=[0.5, 0.5, 0.5]",
              "calibration.std=[0.2]")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load((tmp_path / "out" / "dist_chita_config.yaml").read_text())["calibration"]
    assert (cfg["image_size"], cfg["mean"], cfg["std"]) == (12, [0.5, 0.5, 0.5], [0.2])
    res = run(tmp_path, model, source, "calibration.label_column=text", "output.overwrite=true")
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1] == (
        f"error: label column 'text' of {source} must hold integer class ids, got str 'a photo'")


def test_no_warning_for_a_model_that_learnt_its_task(tmp_path):
    """The digits MLP (about 97% on its training digits) prepared as in its training: no warning."""
    from safetensors.torch import save_model

    from tests.fixtures.tiny_models import train_digits_mlp

    save_model(train_digits_mlp(), str(tmp_path / "w.safetensors"))
    cfg = {"name": "digits", "model": {"source": "torch", "factory": "tests.fixtures.tiny_models:digits_mlp",
                                       "weights": str(tmp_path / "w.safetensors"), "task": "image-classification"},
           "calibration": {"source": "builtin:digits", "n": 40}, "eval": {"metric": "accuracy", "n": 300},
           "prune": {"sparsity": 0.5, "method": "magnitude"}, "output": {"dir": str(tmp_path / "out")},
           "world_size": None}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "launch/prune.py", "--config", str(tmp_path / "run.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert rep["metric"]["before"] > 0.9 and "near chance" not in res.stdout + res.stderr
