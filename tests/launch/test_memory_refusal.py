"""launch/prune.py prints its memory estimate per rank before it starts and refuses, with advice, a run whose
estimate exceeds the available memory (``DIST_CHITA_AVAILABLE_BYTES`` fakes a small machine)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_model

from dist_chita.planning import memory
from tests.fixtures.tiny_models import digits_mlp

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path):
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_model(digits_mlp(), str(weights))
    cfg = {"model": {"source": "torch", "factory": "tests.fixtures.tiny_models:digits_mlp", "weights": str(weights),
                     "task": "image-classification"},
           "calibration": {"source": "builtin:digits", "image_column": "image", "text_column": None,
                           "label_column": "label", "n": 40, "batch_size": 16},
           "eval": {"metric": "none"},
           "prune": {"sparsity": 0.7, "exclude_head": False, "objective": "fisher"},
           "fisher": {"loss": "ce", "max_iter": 5}, "output": {"dir": str(tmp_path / "out")}, "world_size": None,
           "threads_per_rank": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "run.yaml"


def _run(cfg, available):
    env = {**os.environ, "DIST_CHITA_AVAILABLE_BYTES": str(available)}
    return subprocess.run([sys.executable, "launch/prune.py", "--config", str(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_refuses_with_advice_when_the_estimate_exceeds_available_memory(tmp_path):
    res = _run(_config(tmp_path), 1000)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "memory estimate per rank" in res.stdout  # printed before refusing
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: estimated "), res.stderr
    for remedy in ("fewer calibration samples (n = 40)", "bfloat16", "more ranks", "one group of layers at a time"):
        assert remedy in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("available", ["abc", "-1"])
def test_a_bad_override_is_one_line_naming_it_before_loading(tmp_path, available):
    res = _run(_config(tmp_path), available)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: DIST_CHITA_AVAILABLE_BYTES={available!r} in the environment is not a number of bytes (1 or more, "
        "e.g. 8e9); unset it to use the available memory"], res.stderr
    assert "memory estimate per rank" not in res.stdout and not (tmp_path / "out").exists()


def test_runs_when_the_estimate_fits(tmp_path):
    res = _run(_config(tmp_path), 64 * 2**30)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "prune_report.json").exists()


def test_a_tenth_of_the_available_memory_stays_free(tmp_path):
    """A run whose estimate fits the available memory but not nine tenths of it is refused (a run's peak varies by a
    few percent from one run to the next); one whose estimate fits nine tenths runs."""
    import json

    cfg = _config(tmp_path)
    first = _run(cfg, 64 * 2**30)
    assert first.returncode == 0, first.stderr
    est = json.loads((tmp_path / "out" / "prune_report.json").read_text())["memory_estimate_bytes"]["total"]
    shutil.rmtree(tmp_path / "out")
    tight = _run(cfg, int(1.05 * est))  # the estimate fits, nine tenths of it does not
    assert tight.returncode == 1 and "10% kept free" in tight.stderr, (tight.stdout, tight.stderr)
    assert not (tmp_path / "out").exists()
    roomy = _run(cfg, int(1.2 * est))
    assert roomy.returncode == 0, roomy.stderr


def test_baseline_term_is_the_resident_memory_without_the_model():
    cpu = torch.device("cpu")
    base = memory.baseline_bytes(cpu)
    # the resident set now, as /proc/self/status reports it, and at most the peak; the readings may differ by the
    # counters' lag: up to 64 page faults cached per thread, or max(32, 2 x CPUs) pages per CPU on newer kernels
    cpus = os.cpu_count() or 1
    lag = os.sysconf("SC_PAGE_SIZE") * (max(64 * (torch.get_num_threads() + 1), max(32, 2 * cpus) * cpus) + 1)
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert 0 < base and abs(base - rss) <= lag and base <= memory.peak_bytes(cpu) + lag
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    grown = memory.baseline_bytes(cpu)
    assert grown - base > 200 * 2**20 and float(x[0]) == 1.0
    assert abs(memory.baseline_bytes(cpu, model_bytes=100 * 2**20) - (grown - 100 * 2**20)) < 8 * 2**20
    e = memory.estimate(1000, 8, 1, "float32", 10, 10, 1, baseline=base)
    assert e.baseline == base and e.total == e.factor + e.model + e.gradient_buffer + e.solver + e.backsolve + base


def test_available_memory_override(monkeypatch):
    monkeypatch.setenv("DIST_CHITA_AVAILABLE_BYTES", "12345")
    assert memory.available_bytes(torch.device("cpu"), 2) == 12345



_PROBE = """
import json, sys, torch
from dist_chita.api import largest_forward_bytes
from dist_chita.io.data import Samples
torch.manual_seed(0)
wide = torch.nn.Sequential(torch.nn.Linear(8, 2**17), torch.nn.ReLU(), torch.nn.Linear(2**17, 2))
samples = Samples({"pixel_values": torch.randn(64, 8)}, torch.arange(64))
out = []
for calibration_batch, eval_batch in json.loads(sys.argv[1]):
    calibration = samples.largest_batch(calibration_batch) if calibration_batch else None
    probes = [samples.largest_batch(eval_batch)] if eval_batch else []
    forward = lambda batch: wide(batch["pixel_values"])
    out.append(largest_forward_bytes(forward, calibration, probes, torch.device("cpu")) / 2**20)
print(json.dumps(out))
"""


def test_forward_activations_measures_the_largest_forward():
    """A forward of 1 MiB of activations per sample (two 2^17-wide float32 tensors alive at once): the probe sees
    the largest batch, calibration or evaluation, and nothing for a run that makes no forward. A process of its
    own, with a fixed mmap threshold (freed batches go back to the system, so each measurement starts afresh)."""
    import json

    runs = [(1, 1),  # one-time costs (kernels) out of the way
            (48, 8),  # (calibration micro-batch, evaluation batch)
            (8, 48),
            (8, 8),
            (None, None)]  # no calibration pass (magnitude pruning) and no metric
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(runs)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    _, calibration, evaluation, small, none = json.loads(res.stdout)
    assert 40 < calibration < 80 and 40 < evaluation < 80, (calibration, evaluation)  # MiB: 2 x 48 x 0.5
    assert small < 20 and none == 0, (small, none)
