"""launch/prune.py with fisher.group_size (layer groups): the layers are pruned one group at a time, the budget is
met exactly, and the memory estimate is that of the largest group's factor."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_model

from tests.fixtures.tiny_models import train_digits_mlp

ROOT = Path(__file__).resolve().parents[2]


def test_block_mode_run(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_model(train_digits_mlp(), str(weights))
    cfg = {"model": {"source": "torch", "factory": "tests.fixtures.tiny_models:digits_mlp", "weights": str(weights),
                     "task": "image-classification"},
           "calibration": {"source": "builtin:digits", "image_column": "image", "text_column": None,
                           "label_column": "label", "n": 40, "batch_size": 16},
           "eval": {"metric": "accuracy", "n": 300, "compare_magnitude": False},
           "prune": {"objective": "fisher", "sparsity": 0.7, "exclude_head": False,
                     "granularity": "global"},  # one global budget
           "fisher": {"loss": "ce", "group_size": 700, "group_criterion": "obs", "ridge": "identity", "max_iter": 10},
           "output": {"dir": str(tmp_path / "out")}, "world_size": None,
           "threads_per_rank": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "launch/prune.py", "--config", str(tmp_path / "run.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    p = 64 * 32 + 32 * 16 + 16 * 10  # groups: [2048], [512 + 160]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    kept = sum(int((saved[f"{i}.weight"] != 0).sum()) for i in (0, 2, 4))
    assert rep["p"] == p and kept == rep["global"]["kept"] == round(0.3 * p)
    nz = {i: int((saved[f"{i}.weight"] != 0).sum()) for i in (0, 2, 4)}
    assert [st["kept"] for st in rep["stages"]] == [nz[0], nz[2] + nz[4]]
    assert rep["memory_estimate_bytes"]["factor"] == 40 * 2048 * 4  # the largest group, not all p weights
    assert rep["metric"]["after"] > 0.5 and torch.isfinite(saved["0.weight"]).all()
