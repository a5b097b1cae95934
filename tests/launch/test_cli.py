"""The ``dist-chita`` console command as pip installs it (an editable install of this checkout into a throw-away
virtual environment that sees the installed dependencies), run in subprocesses: help, errors, a prune on a 2-rank
process group under torchrun and under its own --launch-config, decompress."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.launch import test_prune_output
from tests.multiproc import free_port

ROOT = Path(__file__).resolve().parents[2]
llama_checkpoint = test_prune_output.llama_checkpoint  # a tiny Llama (module-scoped fixture)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A virtual environment with this checkout installed (editable, no dependencies: they come from the system
    site-packages); returns its bin directory."""
    where = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(where)], check=True)
    py = where / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "-e", str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return where / "bin"


def cli(venv, *args, timeout=300, cwd=ROOT):
    return subprocess.run([str(venv / "dist-chita"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_commands_and_configs(venv, tmp_path):
    res = cli(venv, "--help", cwd=tmp_path)  # found from the installed package, wherever it is run
    assert res.returncode == 0, res.stderr
    for name in ("prune", "plan", "decompress"):
        assert f"\n  {name} " in res.stdout
    for path in [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "launch" / "accelerate").glob("*.yaml")]:
        assert f"\n  {path.name if path.parent.name == 'configs' else path.stem} " in res.stdout, path
    res = cli(venv, "prune", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "--print-config" in res.stdout and "--launch-config" in res.stdout
    assert "default.yaml" in res.stdout and "cpu_2" in res.stdout
    res = cli(venv, "plan", "--help")
    assert res.returncode == 0 and "--hardware" in res.stdout and res.stdout.startswith("usage: dist-chita plan ")


def test_errors_are_one_line(venv, tmp_path):
    res = cli(venv, "prnue")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: unknown command 'prnue' (one of prune, plan, decompress); dist-chita --help lists them"]
    res = cli(venv, "plan")  # named as the user called it, not plan.py
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "dist-chita plan: error: the following arguments are required: --hardware"]
    res = cli(venv, "prune", "prune.sparsty=0.7")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: unknown key 'prune.sparsty' (did you mean 'prune.sparsity'?)"]
    res = cli(venv, "prune", "--launch-config", "cpu_3")
    assert res.returncode == 2 and res.stderr.startswith("error: no launch config 'cpu_3' (one of cpu_1, cpu_2")
    res = cli(venv, "decompress", str(tmp_path), str(tmp_path / "x"))
    assert res.returncode == 1 and res.stderr.strip() == f"error: {tmp_path} is not a sparse compressed-tensors " \
                                                         "checkpoint"


def tiny_run(tmp_path, name):
    return ["prune", "--config", "configs/tiny_mlp.yaml", f"output.dir={tmp_path / name}", "threads_per_rank=1"]


def test_prune_under_torchrun_and_under_its_own_launch_config(venv, tmp_path):
    """The installed command as the script runs (torchrun starts it on 2 processes), and started by itself under
    accelerate launch with launch/accelerate/cpu_2.yaml: two 2-process runs with the same mask."""
    torchrun = subprocess.run([str(venv / "python"), "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), str(venv / "dist-chita"), *tiny_run(tmp_path, "tr")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    own = cli(venv, "prune", "--launch-config", "cpu_2", *tiny_run(tmp_path, "acc")[1:])
    assert own.returncode == 0, own.stderr
    reports = [json.loads((tmp_path / k / "prune_report.json").read_text()) for k in ("tr", "acc")]
    assert [r["world_size"] for r in reports] == [2, 2] and reports[0]["mask_sha256"] == reports[1]["mask_sha256"]
    for res in (torchrun, own):  # the main process prints
        assert res.stdout.count("dist-chita: tiny_mlp") == 1 and "saved to" in res.stdout


def test_launch_config_refuses_bad_input_before_starting_and_reports_failures_in_one_line(venv, tmp_path):
    """--launch-config: bad arguments and config errors are refused as a one-process run refuses them, before any
    process starts; a rank that fails once started says why in one line and the command exits with its status,
    without the launcher's traceback."""
    res = cli(venv, *tiny_run(tmp_path, "out"), "--launch-config", "cpu_2", "prune.sparsity=1.5")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: prune.sparsity: must be in [0, 1), got 1.5"], res.stderr
    res = cli(venv, "prune", "--launch-config", "cpu_2", "--bogus")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].endswith(
        "error: unrecognized arguments: --bogus") and res.stderr.count("error:") == 1, res.stderr
    (tmp_path / "out").mkdir()
    res = cli(venv, *tiny_run(tmp_path, "out"), "output.overwrite=false", "--launch-config", "cpu_2")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: output directory {tmp_path / 'out'} already exists (set output.overwrite=true to replace it)"], \
        res.stderr


def test_a_failed_launch_exits_with_the_status_of_the_rank_that_said_why(tmp_path, capsys):
    """The launcher's exit status: that of the lowest rank that wrote its error (its error file exists), else that
    of the lowest failed rank, which is then named (a signal counts as 128 + its number)."""
    from launch import cli as command

    told = tmp_path / "error.json"
    told.write_text("{}")
    assert command._failed({0: (-15, 11, str(tmp_path / "none.json")), 1: (1, 12, str(told))}) == 1
    assert capsys.readouterr().err == ""
    assert command._failed({1: (-9, 12, None), 0: (-15, 11, str(tmp_path / "none.json"))}) == 143
    assert capsys.readouterr().err == ("error: rank 0 (process 11) was killed by SIGTERM without saying why; no "
                                       "output was written\n")
    assert command._failed({0: (3, None, None)}) == 3
    assert capsys.readouterr().err == "error: rank 0 exited with status 3 without saying why; no output was written\n"


def test_decompress_writes_a_dense_checkpoint(venv, tmp_path):
    import transformers as tf

    from dist_chita.io import compressed

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    w = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w[w.abs() < w.abs().median()] = 0
    model.save_pretrained(tmp_path / "dense")
    model.save_pretrained(tmp_path / "sparse")
    compressed.compress_checkpoint(tmp_path / "sparse", model, ["model.layers.0.mlp.up_proj"], None, 0.5)
    res = cli(venv, "decompress", str(tmp_path / "sparse"), str(tmp_path / "back"))
    assert res.returncode == 0, res.stderr
    a = tf.LlamaForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    b = tf.LlamaForCausalLM.from_pretrained(tmp_path / "dense").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.listdir(tmp_path / "back") and not compressed.sparsity_config(tmp_path / "back")
    sparse, files = tmp_path / "sparse", sorted(os.listdir(tmp_path / "sparse"))
    for target in (sparse / "sub", sparse, tmp_path):  # inside the source, the source, around it
        res = cli(venv, "decompress", "--overwrite", str(sparse), str(target))
        assert res.returncode == 1 and res.stderr.strip().splitlines() == [
            f"error: output directory {target} overlaps the input {sparse}; choose another output directory"]
    assert sorted(os.listdir(sparse)) == files
    res = cli(venv, "decompress", str(sparse), str(tmp_path / "back"))
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: output directory {tmp_path / 'back'} already exists (pass --overwrite to replace it)"]
    res = cli(venv, "decompress", str(sparse), str(tmp_path / "back"), "--overwrite")
    assert res.returncode == 0 and not compressed.sparsity_config(tmp_path / "back"), res.stderr
    res = cli(venv, "decompress", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'} does not exist"]


def test_decompress_describes_the_dense_weights_in_the_report_and_card(venv, tmp_path, llama_checkpoint):
    """A prune's sparse output decompressed: its report and model card describe the dense weights written, as a
    prune with output.format: dense describes them; the rest of the report is the run's."""
    res = test_prune_output.prune(tmp_path, llama_checkpoint, "output.format=compressed-tensors")
    assert res.returncode == 0, res.stderr
    sparse, dense = tmp_path / "out", tmp_path / "dense"
    before = json.loads((sparse / "prune_report.json").read_text())
    assert before["output_format"] == "sparse-bitmask"
    res = cli(venv, "decompress", str(sparse), str(dense))
    assert res.returncode == 0, res.stderr
    rep = json.loads((dense / "prune_report.json").read_text())
    size = (dense / "model.safetensors").stat().st_size
    assert (rep["output_format"], rep["weights_bytes"], rep["dense_weights_bytes"]) == ("dense", size, size)
    same = [k for k in before if k not in ("output_format", "weights_bytes", "dense_weights_bytes")]
    assert [rep[k] for k in same] == [before[k] for k in same]
    card = (dense / "README.md").read_text()
    meta, body = card[4:].split("\n---\n", 1)
    assert "compressed-tensors" not in yaml.safe_load(meta)["tags"]
    assert f"| weights | dense (zeros stored), {size / 1e6:.1f} MB |" in body
    assert "from the run's compressed-tensors output (sparse-bitmask)" in body
    # a report or config this version cannot read (another version's, or edited): the weights are still written,
    # the description copied as it is, with a note
    (sparse / "dist_chita_config.yaml").write_text((sparse / "dist_chita_config.yaml").read_text()
                                                   + "solver:\n  max_iter: 3\n")
    res = cli(venv, "decompress", str(sparse), str(tmp_path / "dense2"))
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("note: README.md copied as it is, describing the sparse weights: "
                                 "dist_chita_config.yaml cannot be read (")
    assert (tmp_path / "dense2" / "README.md").read_text() == (sparse / "README.md").read_text()
    assert json.loads((tmp_path / "dense2" / "prune_report.json").read_text())["output_format"] == "dense"
    stages = json.loads((sparse / "prune_report.json").read_text())
    stages["stages"][0]["a_key_of_another_version"] = 1
    (sparse / "prune_report.json").write_text(json.dumps(stages))
    res = cli(venv, "decompress", str(sparse), str(tmp_path / "dense3"))
    assert res.returncode == 0 and res.stderr.startswith("note: prune_report.json and README.md copied as they are"), \
        res.stderr
    assert (tmp_path / "dense3" / "model.safetensors").stat().st_size == size


def test_a_launcher_stopped_by_a_signal_exits_128_plus_its_number(monkeypatch):
    """An accelerate that lets torch's SignalException out of launch_command (instead of exiting on it): the launch
    still ends with the shell's status for the signal, not a traceback."""
    import signal

    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from launch import cli as console

    def stopped(args):
        raise SignalException("stopped", signal.SIGINT)
    monkeypatch.setattr(accelerate_launch, "launch_command", stopped)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # relaunch sets it for the ranks
    assert console.relaunch("cpu_2", ["--config", "configs/tiny_mlp.yaml"]) == 130
