"""The accelerate configs in launch/accelerate/ parse, and cpu_2.yaml really starts 2 gloo ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "launch" / "accelerate"
EXPECTED = {
    "cpu_1.yaml": ("NO", 1, True),
    "cpu_2.yaml": ("MULTI_GPU", 2, True),
    "cpu_4.yaml": ("MULTI_GPU", 4, True),
    "multi_gpu.yaml": ("MULTI_GPU", 8, False),
    "multi_node_gpu.yaml": ("MULTI_GPU", 16, False),
    "deepspeed_zero3_cpu.yaml": ("DEEPSPEED", 2, True),
    "deepspeed_zero3_gpu.yaml": ("DEEPSPEED", 8, False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_is_read_by_accelerate(name):
    cfg = ClusterConfig.from_yaml_file(str(CONFIG_DIR / name))
    dist_type, nproc, use_cpu = EXPECTED[name]
    assert str(cfg.distributed_type).split(".")[-1] == dist_type
    assert cfg.num_processes == nproc
    assert cfg.use_cpu is use_cpu
    if dist_type == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 3
    # MULTI_CPU silently starts a single process with `accelerate launch`; none of ours may use it.
    assert yaml.safe_load((CONFIG_DIR / name).read_text())["distributed_type"] != "MULTI_CPU"


def test_single_node_configs_take_a_free_port():
    """A fixed port collides with another job on the machine ("Port 29502 is already in use"); 0 lets accelerate
    pick a free one. Only the multi-node config names a port, which every node must agree on."""
    for name in EXPECTED:
        port = yaml.safe_load((CONFIG_DIR / name).read_text())["main_process_port"]
        assert port == 0 or name == "multi_node_gpu.yaml", (name, port)


def test_every_config_is_listed():
    assert {p.name for p in CONFIG_DIR.glob("*.yaml")} == set(EXPECTED)


def test_multi_node_config_splits_its_ranks_over_the_nodes():
    cfg = ClusterConfig.from_yaml_file(str(CONFIG_DIR / "multi_node_gpu.yaml"))
    assert cfg.num_machines == 2 and cfg.num_processes % cfg.num_machines == 0 and cfg.machine_rank == 0


def _launch(config: str, probe: str = "worldsize_probe.py", timeout: float = 60.0, **env_extra) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_extra)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / config),
         str(Path(__file__).with_name(probe))],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Lines of different ranks may interleave; pick out every JSON object.
    return [json.loads(m) for m in re.findall(r"\{[^{}]*\"rank\"[^{}]*\}", proc.stdout)]


def test_cpu_2_starts_two_gloo_processes():
    reports = _launch("cpu_2.yaml")
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {r["world_size"] for r in reports} == {2}
    assert {r["backend"] for r in reports} == {"gloo"}
    assert {r["num_processes"] for r in reports} == {2}
    assert len({r["pid"] for r in reports}) == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIST_CHITA_SLOW"), reason="about 50 s; set DIST_CHITA_SLOW=1 to run")
def test_deepspeed_zero3_cpu_starts_two_ranks():
    reports = _launch("deepspeed_zero3_cpu.yaml", "deepspeed_probe.py", timeout=240, DS_ACCELERATOR="cpu")
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {(r["world_size"], r["backend"], r["type"], r["zero_stage"], r["engine"]) for r in reports} == {
        (2, "gloo", "DEEPSPEED", 3, "DeepSpeedEngine")}
