"""launch/plan.py: printed plan (memory, times, fit, smallest count), JSON output, one-line errors with exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dist_chita.planning import costmodel as cm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import plan  # noqa: E402

H100 = str(ROOT / "configs" / "hardware" / "h100.yaml")


@pytest.mark.parametrize("name", ["h100.yaml", "a100.yaml", "cpu_this_machine.yaml"])
def test_hardware_files_load(name):
    hw = plan.load_hardware(str(ROOT / "configs" / "hardware" / name))
    assert hw.memory_bytes > 1e9 and hw.flops > 1e9 and hw.memory_bandwidth > 1e9


def test_plan_7b_on_64_h100(capsys):
    args = ["--params", "7e9", "--n", "128", "--gpus", "64", "--hardware", H100, "--largest-layer", "45088768"]
    assert plan.main(args) == 0
    out = capsys.readouterr().out
    # factor per rank by hand: 128 * ceil(7e9 / 64) * 2 bytes (bfloat16 default)
    factor = 128 * -(-7_000_000_000 // 64) * 2
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("factor"))
    assert line.split()[1] == f"{factor / 1e9:.2f}"
    assert "fits" in out and "DOES NOT FIT" not in out
    for ph in ("fisher", "solver", "backsolve", "writeback", "save", "total"):
        assert f"  {ph}" in out
    # the backsolve line shows its four terms, the kept-row passes (gather, rho + q passes) among them
    line = next(ln for ln in out.splitlines() if "backsolve(s)" in ln)
    assert all(k in line for k in ("Gram", "all-reduce", "Cholesky", "kept-row passes"))
    w = cm.Workload(p=7_000_000_000, n=128, model_params=7_000_000_000, storage_dtype="bfloat16",
                    largest_layer=45088768)
    hw = plan.load_hardware(H100)
    smallest = cm.smallest_fitting_ranks(w, hw)
    usable = 0.9 * hw.memory_bytes  # a tenth of the device kept free
    assert 1 < smallest <= 64 and cm.memory_per_rank(w, smallest - 1).total > usable
    assert cm.memory_per_rank(w, smallest).total <= usable
    assert f"smallest GPU count that fits: {smallest} (power of two: 64)" in out


def test_plan_does_not_fit_and_json(capsys):
    args = ["--params", "7e9", "--n", "128", "--gpus", "8", "--hardware", H100, "--dtype", "float32", "--json"]
    assert plan.main(args) == 0
    pl = json.loads(capsys.readouterr().out)
    assert pl["fits"] is False
    assert pl["memory_per_rank"]["factor"] == 128 * 875_000_000 * 4
    assert pl["seconds"]["total"] == pytest.approx(sum(v for k, v in pl["seconds"].items() if k != "total"))
    assert pl["smallest_fitting"] > 8
    assert pl["workload"]["backsolves"] == 1
    assert plan.main(args[:-1] + ["--js"]) == 0  # argparse's abbreviation of --json: JSON too
    assert json.loads(capsys.readouterr().out) == pl


def test_backsolves_and_rates_file(tmp_path, capsys):
    base = ["--params", "1e6", "--n", "100", "--gpus", "2", "--hardware", H100, "--json"]
    assert plan.main(base) == 0
    one = json.loads(capsys.readouterr().out)
    assert plan.main(base + ["--backsolves", "10"]) == 0
    ten = json.loads(capsys.readouterr().out)
    assert ten["terms"]["backsolve_gram"] == pytest.approx(10 * one["terms"]["backsolve_gram"])
    rates = tmp_path / "summary.json"
    rates.write_text(json.dumps({"rates": {"memory_efficiency": 0.5, "read_efficiency": 0.5,
                                           "fixed": {"solver": 2.0}}}))
    assert plan.main(base + ["--rates", str(rates)]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["terms"]["solver_reads"] == pytest.approx(2 * one["terms"]["solver_reads"])
    # the memory-bound terms halve in speed at e_m = e_r = 0.5: block reads, vector passes and the per-solve set-up
    # but for its two all-reduces' latency (2 x 2 log2(2) hops of the node link)
    lat = plan.load_hardware(H100).link(2)[1]
    t = one["terms"]
    memory_bound = t["solver_reads"] + t["solver_vectors"] + t["solver_setup"] - 2 * 2 * lat
    assert fitted["seconds"]["solver"] == pytest.approx(one["seconds"]["solver"] + memory_bound + 2.0)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--params", "x", "--n", "1", "--gpus", "1", "--hardware", H100], "--params"),
        (["--params", "1e6", "--n", "1", "--gpus", "0", "--hardware", H100], "--gpus must be >= 1"),
        (["--params", "1e6", "--n", "1", "--gpus", "2", "--hardware", "nope.yaml"], "hardware file not found"),
        (["--params", "1e6", "--n", "1", "--gpus", "2", "--hardware", H100, "--dtype", "int8"], "--dtype"),
        (["--params", "1e6", "--n", "0", "--gpus", "2", "--hardware", H100], "n must be >= 1"),
        (["--params", "1e6", "--p", "2e6", "--n", "4", "--gpus", "2", "--hardware", H100], "exceeds --params"),
        (["--n", "4", "--gpus", "2", "--hardware", H100], "--params"),
        (["--params", "1e6", "--n", "4", "--gpus", "2", "--hardware", H100, "--backsolves", "0"], "--backsolves"),
    ],
)
def test_bad_arguments_one_line_exit_2(capsys, args, fragment):
    assert plan.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("plan.py: error:") and fragment in err


def test_bad_hardware_file(tmp_path, capsys):
    bad = tmp_path / "hw.yaml"
    bad.write_text("name: x\nmemory_bytes: 1e9\nwarp_drive: 3\n")
    assert plan.main(["--params", "1e6", "--n", "4", "--gpus", "2", "--hardware", str(bad)]) == 2
    assert "unknown hardware key 'warp_drive'" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    (b"name: [x\n", "not YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
    (b"name: x\nmemory_bytes: a: b\n", "not YAML (mapping values are not allowed here at line 2"),
    (b"\xff\xfe\x00", "not YAML (not UTF-8 text)"),
    (b"", "must be a mapping"),
    (b"name: x\nflops: 1e12\nflops: 2e12\n", "not YAML (duplicate key 'flops' on lines 2 and 3)"),
    ((plan.ROOT / "configs" / "hardware" / "h100.yaml").read_bytes().replace(b"memory_bytes:", b"memory_bytes: ~ #"),
     "hardware memory_bytes: expected a number, got None"),
])
def test_bad_hardware_file_named_on_one_line(tmp_path, capsys, text, message):
    bad = tmp_path / "hw.yaml"
    bad.write_bytes(text)
    assert plan.main(["--params", "1e6", "--n", "4", "--gpus", "2", "--hardware", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"plan.py: error: bad hardware file {bad}: ") and message in err


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "x"}, "hidden_size must be a whole number, got 'x'"),
    ({"hidden_size": 8192.5}, "hidden_size must be a whole number, got 8192.5"),
    ({"num_key_value_heads": True}, "num_key_value_heads must be a whole number, got True"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"num_attention_heads": 0}, "heads must be >= 1"),
    ({"vocab_size": None}, "lacks 'vocab_size'"),
])
def test_bad_model_config_names_file_and_key(tmp_path, capsys, change, message):
    cfg = {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
           "num_key_value_heads": 8, "vocab_size": 32000}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in (cfg | change).items() if v is not None}))
    assert plan.main(["--objective", "layerwise", "--model", str(path), "--hardware", H100]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"plan.py: error: --model {path}: ") and message in err


def test_command_line_exit_code():
    ok = subprocess.run([sys.executable, str(ROOT / "launch" / "plan.py"), "--params", "25.6e6", "--n", "100",
                         "--gpus", "8", "--hardware", str(ROOT / "configs" / "hardware" / "a100.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "smallest GPU count that fits: 1" in ok.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "plan.py"), "--gpus", "8"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_null_rate_in_a_rates_file_is_unbounded(tmp_path, capsys):
    """A study's summary.json writes a rate the fit left unbounded as null (strict JSON): read back as infinite."""
    base = ["--params", "1e6", "--n", "100", "--gpus", "2", "--hardware", H100, "--json"]
    rates = tmp_path / "summary.json"
    rates.write_text(json.dumps({"rates": {"exchange_efficiency": None}}))
    assert plan.load_rates(str(rates)).exchange_efficiency == math.inf
    assert plan.main(base + ["--rates", str(rates)]) == 0
    assert json.loads(capsys.readouterr().out)["terms"]["fisher_exchange"] >= 0


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must be a mapping"),
    ('"fast"', "must be a mapping"),
    ("name: tiny\n", "not JSON"),
    (b"\xff\xfe\x00", "not JSON (not UTF-8 text)"),
    ('{"memory_efficiency": "fast"}', "memory_efficiency must be a number > 0, got 'fast'"),
    ('{"memory_efficiency": 0}', "memory_efficiency must be a number > 0"),
    ('{"iteration_overhead": -1}', "iteration_overhead must be a number >= 0"),
    ('{"fixed": 3}', "fixed must map phases"),
    ('{"fixed": {"save": "x"}}', "fixed.save must be a number"),
    ('{"backsolve_rounds": 2.5}', "backsolve_rounds must be a whole number >= 1"),
])
def test_bad_rates_file_one_line_naming_it(tmp_path, capsys, text, message):
    """A rates file that is not JSON, not a mapping of rates, or holds a rate that is not a number in range: one
    line naming the file, exit 2."""
    rates = tmp_path / "rates.json"
    rates.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert plan.main(["--params", "1e6", "--n", "100", "--gpus", "2", "--hardware", H100, "--rates", str(rates)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err
    assert err.startswith(f"plan.py: error: bad rates file {rates}: ") and message in err


def test_granularity_sets_the_selection_collectives(tmp_path, capsys):
    """--granularity (default row, as prune.granularity): a per-row plan's selections make T + 1 small all-reduces
    per iteration, a global one's T (3 + 3) + 2; a rates file that still holds the retired selection_rounds loads."""
    base = ["--params", "1e8", "--n", "128", "--gpus", "16", "--hardware", H100, "--json"]
    plans = {}
    for g in (None, "row", "global", "layer", "nm"):
        assert plan.main(base + ([] if g is None else ["--granularity", g])) == 0
        plans[g] = json.loads(capsys.readouterr().out)
    assert plans[None] == plans["row"] and plans["row"]["workload"]["granularity"] == "row"
    T = cm.Rates().selections_per_iteration
    row, glob = plans["row"]["terms"]["solver_selection"], plans["global"]["terms"]["solver_selection"]
    assert row == pytest.approx(glob * (T + 1) / (T * 6 + 2))
    assert plans["layer"]["terms"]["solver_selection"] == pytest.approx(glob * (T * 7 + 2) / (T * 6 + 2))
    assert plans["nm"]["terms"]["solver_selection"] == pytest.approx(row)
    for key in ("solver_reads", "solver_vectors", "solver_allreduce"):
        assert plans["row"]["terms"][key] == plans["global"]["terms"][key]
    rates = tmp_path / "summary.json"
    rates.write_text(json.dumps({"rates": {"selection_rounds": 3, "memory_efficiency": 0.5}}))
    assert plan.load_rates(str(rates)) == cm.Rates(memory_efficiency=0.5)
    rates.write_text(json.dumps({"rates": {"warp_drive": 3}}))
    assert plan.main(base + ["--rates", str(rates)]) == 2
    assert "unknown rate 'warp_drive'" in capsys.readouterr().err
    assert plan.main(base + ["--granularity", "per_row"]) == 2
    assert "--granularity" in capsys.readouterr().err


def test_layerwise_plans_rows_per_count_and_zero3(capsys):
    from dist_chita.planning import layerwise as lw

    assert plan.main(["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--gpus", "1,8",
                      "--json"]) == 0
    pl = json.loads(capsys.readouterr().out)
    assert [(r["gpus"], r["zero3"]) for r in pl["plans"]] == [(1, False), (8, False), (1, True), (8, True)]
    z8 = pl["plans"][3]
    # the weights' ZeRO-3 shard by hand: P bfloat16 bytes over 8 ranks, P of the Llama-2-7B shape
    assert z8["memory_per_rank"]["model"] == 6_738_415_616 * 2 // 8
    job = lw.Job(n=128, tokens=2048, ranks=8, zero3=True)
    assert z8["seconds"] == lw.phase_seconds(lw.PRESETS["llama-7b"], job, plan.load_hardware(H100))
    assert pl["plans"][0]["seconds"]["solver"] == pytest.approx(8 * pl["plans"][1]["seconds"]["solver"], rel=0.01)


def test_a_repeated_gpu_count_is_planned_once(capsys):
    """--gpus 8,1,8: one row per count, in the order given (was a row per entry); the fisher plan takes 8,8 as 8."""
    assert plan.main(["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--gpus", "8,1,8",
                      "--json"]) == 0
    pl = json.loads(capsys.readouterr().out)
    assert [(r["gpus"], r["zero3"]) for r in pl["plans"]] == [(8, False), (1, False), (8, True), (1, True)]
    assert plan.main(["--params", "7e9", "--n", "128", "--gpus", "8,8", "--hardware", H100, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == 8


def test_layerwise_plan_from_a_config_file(tmp_path, capsys):
    cfg = {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
           "num_key_value_heads": 8, "vocab_size": 32000}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert plan.main(["--objective", "layerwise", "--model", str(path), "--hardware", H100, "--no-zero3"]) == 0
    from_file = capsys.readouterr().out
    assert plan.main(["--objective", "layerwise", "--model", "llama-70b", "--hardware", H100, "--no-zero3"]) == 0
    assert from_file == capsys.readouterr().out
    assert "NO" in from_file and "none" in from_file  # 138 GB of weights per rank fit no count without ZeRO-3


def test_layerwise_steps_from_a_study_summary(tmp_path, capsys):
    """--steps-from takes the mean IHT steps per row a layerwise study fitted (rates.solver_steps): the same plan as
    --steps with that number, its header naming the file, and a solve phase below the max_iter bound's."""
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"rates": {"solver_steps": 3.5, "curvature_compute_scale": 0.4}}))
    base = ["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--gpus", "1,8", "--json"]
    plans = []
    for extra in (["--steps-from", str(summary)], ["--steps", "3.5"], []):
        assert plan.main(base + extra) == 0
        plans.append(json.loads(capsys.readouterr().out))
    fitted, given, bound = plans
    assert fitted["steps"] == 3.5 and fitted["steps_from"] == str(summary)
    assert [r["seconds"] for r in fitted["plans"]] == [r["seconds"] for r in given["plans"]]
    assert all(f["seconds"]["solver"] < b["seconds"]["solver"]
               for f, b in zip(fitted["plans"], bound["plans"], strict=True))
    assert plan.main(base[:-1] + ["--steps-from", str(summary)]) == 0
    assert f"3.5 IHT steps per row, as fitted in {summary}" in capsys.readouterr().out
    summary.write_text(json.dumps({"rates": {"factor_rate": 1.0}}))  # a Fisher study's summary: no steps
    assert plan.main(base + ["--steps-from", str(summary)]) == 2
    assert "not a layerwise study summary" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--steps-from", "/nonexistent.json"],
     "file not found"),
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--steps", "4", "--steps-from", "x"],
     "not allowed with"),
    (["--params", "7e9", "--n", "128", "--gpus", "8", "--hardware", H100, "--steps", "4"], "--objective layerwise"),
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--method", "sparsegpt", "--steps", "4"],
     "sparsegpt takes none"),
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--steps", "-1"], "steps >= 0"),
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--steps", "nan"], "steps >= 0"),
    (["--objective", "layerwise", "--hardware", H100], "needs --model"),
    (["--objective", "layerwise", "--model", "gpt-9", "--hardware", H100], "neither"),
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--gpus", "1,x"], "whole numbers"),
    (["--params", "7e9", "--n", "128", "--gpus", "1,8", "--hardware", H100], "one --gpus count"),
    (["--n", "128", "--gpus", "8", "--hardware", H100], "needs --params"),
])
def test_layerwise_bad_arguments(argv, message, capsys):
    assert plan.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    # zero is refused, not read as "not given" (the layerwise defaults n = 128, tokens = 2048; the fisher P / 32)
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--n", "0"], "--n must be >= 1, got 0"),
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--tokens", "0"],
     "--tokens must be >= 1, got 0"),
    (["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--micro-batch", "0"],
     "--micro-batch must be >= 1, got 0"),
    (["--params", "7e9", "--n", "128", "--gpus", "8", "--hardware", H100, "--largest-layer", "0"],
     "--largest-layer must be >= 1, got 0"),
    # a layer larger than the model (or its prunable part) is refused as --p is, not cut down to it
    (["--params", "7e9", "--n", "128", "--gpus", "8", "--hardware", H100, "--largest-layer", "8e9"],
     "--largest-layer (8000000000) exceeds --params (7000000000)"),
    (["--params", "7e9", "--p", "5e9", "--n", "128", "--gpus", "8", "--hardware", H100, "--largest-layer", "6e9"],
     "--largest-layer (6000000000) exceeds --p (5000000000)"),
])
def test_zero_and_oversized_counts_refused(argv, message, capsys):
    assert plan.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1


LAYERWISE = ["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--gpus", "8"]
FISHER = ["--params", "7e9", "--n", "128", "--gpus", "8", "--hardware", H100]


@pytest.mark.parametrize("base, extra, message", [
    *[(LAYERWISE, opt, f"{opt[0]} plans the fisher objective: --objective layerwise does not use it")
      for opt in (["--params", "7e9"], ["--kept-fraction", "0.5"], ["--granularity", "row"], ["--iterations", "100"],
                  ["--backsolves", "2"], ["--dtype", "bfloat16"], ["--p", "1e9"], ["--largest-layer", "1e6"],
                  ["--layers", "3"], ["--rates", "summary.json"], ["--zero3"], ["--flops-per-sample", "1e9"])],
    (LAYERWISE, ["--params", "7e9", "--dtype", "float32", "--zero3"],
     "--params, --dtype and --zero3 plan the fisher objective: --objective layerwise does not use them"),
    *[(FISHER, opt, f"{opt[0]} plans the layerwise objective (--objective layerwise): the fisher objective does not "
      "use it")
      for opt in (["--model", "llama-7b"], ["--method", "chita"], ["--no-zero3"], ["--model-dtype", "bfloat16"])],
    (FISHER, ["--model", "llama-7b", "--method", "sparsegpt"],
     "--model and --method plan the layerwise objective (--objective layerwise): the fisher objective does not use "
     "them"),
])
def test_an_option_of_the_other_objective_is_refused(base, extra, message, capsys):
    """An option the chosen objective does not use is refused, naming it, even when given its default value."""
    assert plan.main(base + extra) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == f"plan.py: error: {message}"


def test_a_sparsegpt_plan_counts_no_iht_steps(capsys):
    """SparseGPT takes no IHT steps: its plan's header names none, and its solve phase does not change with them."""
    base = ["--objective", "layerwise", "--model", "llama-7b", "--hardware", H100, "--gpus", "1"]
    assert plan.main(base + ["--method", "sparsegpt"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("layerwise plan (sparsegpt): ") and "IHT" not in header
    assert plan.main(base) == 0
    assert capsys.readouterr().out.startswith("layerwise plan (chita, 200 IHT steps per row): ")
