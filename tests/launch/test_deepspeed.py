"""`launch/prune.py` under Accelerate's DeepSpeed plugin with ZeRO stage 3 on 2 CPU processes: the model's
parameters stay partitioned across the ranks while it is pruned, and the result is the plain run's.

A tiny GPT-2 (Conv1D layers, tied head) written with ``save_pretrained``, a word-level tokenizer and a small
calibration text file, all built here (no downloads). n = 9 samples in micro-batches of 4 give rank 0 two
batches and rank 1 one, so the padding step that keeps ZeRO-3's collective forward passes in step is used, in
the per-sample gradients and in the perplexity windows alike. The first run compiles DeepSpeed's shm_comm op
(about a minute; cached in ~/.cache/torch_extensions afterwards).
"""

import json
import math
import os
import subprocess
import sys

import deepspeed  # noqa: F401 - a declared dependency: fail (not skip) when it is missing
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_chita.sparsity import kept_count
from tests.launch.test_prune import ROOT, run

WORDS = "the cat sat on mat a dog ran far away big small red blue tree house".split()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(model directory, calibration text file)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpt2")
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                       initializer_range=0.2, bos_token_id=1, eos_token_id=1))
    model.save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>").save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(4, 12, (1,), generator=g)),),
                                                      generator=g)) for _ in range(60)]
    (root / "calib.txt").write_text("\n".join(lines) + "\n")
    return root / "model", root / "calib.txt"


def write_config(tmp_path, model_dir, calib, objective="fisher", allocation="uniform"):
    cfg = {
        "name": "gpt2_zero3",
        "model": {"source": "hf", "path": str(model_dir), "task": "causal-lm"},
        "calibration": {"source": str(calib), "format": "text", "text_column": "text", "n": 9, "batch_size": 4,
                        "max_length": 16},
        "eval": {"metric": "perplexity", "n": 30, "max_length": 16, "stride": 8, "compare_magnitude": True},
        "prune": {"objective": objective, "method": "chita", "sparsity": 0.6, "allocation": allocation},
        "fisher": {"loss": "causal_lm", "lambda": 1e-3, "max_iter": 30},
        "layerwise": {"max_iter": 30},
        "output": {"dir": str(tmp_path / "out")},
        "world_size": 2,
        "threads_per_rank": 1,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_zero3(args, timeout=900):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           "launch/accelerate/deepspeed_zero3_cpu.yaml", "launch/prune.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


RELOAD = """
import json, sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
names = json.loads(sys.argv[2])
mods = dict(model.named_modules())
print(json.dumps({"kept": sum(int((mods[n].weight != 0).sum()) for n in names),
                  "p": sum(mods[n].weight.numel() for n in names), "dist_chita": "dist_chita" in sys.modules}))
"""


_SLOW = pytest.mark.skipif(not os.environ.get("DIST_CHITA_SLOW"), reason="about 35 s; DIST_CHITA_SLOW=1 runs it")


@pytest.mark.parametrize("objective,allocation", [("fisher", "uniform"), ("layerwise", "uniform"),
                                                   pytest.param("layerwise", "owl", marks=_SLOW)])
def test_zero3_prunes_partitioned_and_matches_the_plain_run(tmp_path, gpt2, objective, allocation):
    """Also OWL's targets (allocation owl): derived from the partitioned model's forwards and weights, the same as
    the plain run's (the same mask)."""
    model_dir, calib = gpt2
    cfg = write_config(tmp_path, model_dir, calib, objective, allocation)
    plain = run(["--config", str(cfg), f"output.dir={tmp_path / 'plain'}"])
    assert plain.returncode == 0, plain.stderr
    z3 = run_zero3(["--config", str(cfg), f"output.dir={tmp_path / 'z3'}"])
    assert z3.returncode == 0, z3.stderr[-4000:]
    r1 = json.loads((tmp_path / "plain" / "prune_report.json").read_text())
    r3 = json.loads((tmp_path / "z3" / "prune_report.json").read_text())
    assert (r1["world_size"], r1["zero_stage"], r3["world_size"], r3["zero_stage"]) == (1, None, 2, 3)
    assert "ZeRO-3: parameters partitioned over 2 ranks" in z3.stdout and z3.stdout.count("saved to") == 1

    # the same mask, exactly, and the same weights
    assert r1["mask_sha256"] == r3["mask_sha256"]
    # the per-row budget: every row keeps 40%; a row of GPT-2's Conv1D weights (in, out) is one input's in the
    # Fisher objective's flat layout, one output's in the layerwise objective's (its rows are outputs)
    if objective == "fisher":
        per_row = sum(layer["shape"][0] * kept_count(math.prod(layer["shape"][1:]), 0.6) for layer in r1["layers"])
    else:
        per_row = sum(layer["shape"][1] * kept_count(layer["shape"][0], 0.6) for layer in r1["layers"])
    assert r1["global"] == r3["global"]
    if allocation == "uniform":
        assert r1["global"]["kept"] == per_row
    else:  # the blocks' own targets, 0.6 over all prunable weights
        assert len({round(layer["sparsity"], 2) for layer in r1["layers"]}) > 1
        assert r1["global"]["sparsity"] == pytest.approx(0.6, abs=0.02)
        assert "OWL: block sparsities" in z3.stdout
    w1, w3 = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "z3" / "model.safetensors")
    assert sorted(w1) == sorted(w3)
    for k in w1:
        assert torch.equal(w1[k] == 0, w3[k] == 0), k
        assert float((w1[k] - w3[k]).norm()) <= 1e-5 * float(w1[k].norm()), k
    # evaluation ran under ZeRO-3 (padding forwards included) and gives the plain run's numbers
    for key in ("before", "magnitude", "after"):
        assert r3["metric"][key] == pytest.approx(r1["metric"][key], rel=1e-5), key
    assert r3["metric"]["after_tokens"] == r1["metric"]["after_tokens"]

    # each rank held about half of the parameters (measured after pruning: they stayed partitioned)
    full = r3["param_bytes_full"]
    assert r1["param_bytes"] == [full] == [r1["param_bytes_full"]]
    assert len(r3["param_bytes"]) == 2 and all(0 < b <= 0.6 * full for b in r3["param_bytes"]), r3["param_bytes"]

    # the full checkpoint reloads in plain transformers with exactly the reported sparsity
    names = [row["name"] for row in r3["layers"]]
    res = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "z3"), json.dumps(names)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"kept": r3["global"]["kept"], "p": r3["p"], "dist_chita": False}
    assert 1 - got["kept"] / got["p"] == pytest.approx(r3["global"]["sparsity"], abs=0)


def test_zero3_runs_the_sparsegpt_baseline_as_the_plain_run(tmp_path, gpt2):
    """prune.method=sparsegpt under ZeRO-3: the block's layers go whole to the two ranks, each reading the gathered
    weights and writing its result into the partitions; the same mask and weights as one plain process."""
    model_dir, calib = gpt2
    cfg = write_config(tmp_path, model_dir, calib, "layerwise")
    args = ["--config", str(cfg), "prune.method=sparsegpt", "prune.granularity=layer"]
    plain = run([*args, f"output.dir={tmp_path / 'plain'}"])
    assert plain.returncode == 0, plain.stderr
    z3 = run_zero3([*args, f"output.dir={tmp_path / 'z3'}"])
    assert z3.returncode == 0, z3.stderr[-4000:]
    r1 = json.loads((tmp_path / "plain" / "prune_report.json").read_text())
    r3 = json.loads((tmp_path / "z3" / "prune_report.json").read_text())
    assert (r3["world_size"], r3["zero_stage"], r3["method"]) == (2, 3, "sparsegpt")
    assert r1["mask_sha256"] == r3["mask_sha256"] and r1["global"] == r3["global"]
    assert r3["stages"][0]["objective"] == pytest.approx(r1["stages"][0]["objective"], rel=1e-6)
    w1, w3 = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "z3" / "model.safetensors")
    for k in w1:
        assert float((w1[k] - w3[k]).norm()) <= 1e-5 * float(w1[k].norm()), k
