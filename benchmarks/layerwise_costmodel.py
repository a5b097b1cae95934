"""The layerwise cost model (dist_chita/planning/layerwise.py) against real prunes of tiny Llama-architecture models.

    python benchmarks/layerwise_costmodel.py

Random-weight Llama models built from a config (transformers' LlamaForCausalLM), pruned on one process, one thread
(the hardware file's rates are per core), or on two (``accelerate launch --config_file
launch/accelerate/cpu_2.yaml``, gloo, one thread each; held out only: the rows and micro-batches are shared as the
formulas say, with the rates fitted on one process), by ``dist_chita.layerwise.driver.prune_layerwise`` with CHITA
at 50% per row; random token windows as calibration data. Per run: the seconds per phase the driver reports, the
peak resident memory, and the plan's prediction from ``configs/hardware/cpu_this_machine.yaml``.

Fitting: on the first runs (``FIT``) only, CHITA's mean IHT steps per row s and the fixed seconds per chunk step
(least squares on the solve phase, non-negative), and the curvature phase as a scale of its formula plus fixed
seconds per block forward of a micro-batch (hooks, small-batch overhead); the other runs (``HELD_OUT``) are
predicted with those and scored on phases of at least 0.5 s. Memory: the peak resident set against the plan's total
plus the process's resident set besides the model's weights once it is built
(``dist_chita.planning.memory.baseline_bytes``, as the library's estimate counts it: the interpreter and libraries,
which a plan for a GPU does not count). Each run is repeated (``REPEATS``) and each phase's fastest time counts. The
machine is shared: each run measures its float32 matmul rate just before and after the prune (:func:`matmul_rate`,
the mean; the slowest rank's) and is predicted at that rate, a ratio inside the run rather than the hardware file's
rate. Writes benchmarks/results/layerwise_costmodel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from dist_chita.distributed import comm  # noqa: E402
from dist_chita.layerwise.curvature import my_microbatches  # noqa: E402
from dist_chita.layerwise.driver import prune_layerwise  # noqa: E402
from dist_chita.planning import layerwise as lw  # noqa: E402
from dist_chita.planning.costmodel import Hardware  # noqa: E402
from dist_chita.planning.memory import baseline_bytes, peak_bytes  # noqa: E402
from dist_chita.prunable import prunable_modules  # noqa: E402

# (name, layers, hidden, intermediate, heads, n windows, tokens, processes): fitting runs first, then the held-out
# ones (on 2 processes: the rows and micro-batches shared as the formulas say, rates fitted on 1)
FIT = (("fit-a", 2, 128, 344, 4, 64, 256, 1), ("fit-b", 2, 256, 688, 4, 32, 256, 1))
HELD_OUT = (("held-a", 3, 192, 512, 4, 48, 256, 1), ("held-b", 2, 320, 864, 5, 32, 256, 1),
            ("held-c", 4, 128, 344, 4, 64, 192, 1), ("held-a-2p", 3, 192, 512, 4, 48, 256, 2),
            ("held-b-2p", 2, 320, 864, 5, 32, 256, 2))
MIN_SECONDS = 0.5
REPEATS = 3  # each run repeated; each phase's fastest counts (the machine is shared: slower repeats wait for a core)


def matmul_rate(size: int = 256, seconds: float = 0.3) -> float:
    """float32 FLOP/s of (size, size) products measured now in this process, over about ``seconds`` (the core's
    share this process gets at the moment: the machine is shared)."""
    a = torch.randn(size, size)
    count, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ a
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - t)


def _hw(r: dict, hw: Hardware) -> Hardware:
    """``hw`` at the run's measured matmul rate (float32; float64 at half), when recorded."""
    f = r.get("matmul_flops")
    return hw if f is None else replace(hw, flops=f, flops_float32=f, flops_float64=f / 2)


def _start(processes: int) -> None:
    """The gloo process group when launched as several processes (as launch/prune.py creates it)."""
    if processes > 1:
        from accelerate import Accelerator, InitProcessGroupKwargs

        Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


def run(name: str, layers: int, hidden: int, inter: int, heads: int, n: int, tokens: int, processes: int) -> dict:
    """One prune: the driver's seconds per phase (of the rank with the most solve time, the one the plan predicts)
    and the peak resident bytes (the largest)."""
    import transformers

    _start(processes)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, vocab_size=1000)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    before = baseline_bytes(torch.device("cpu"), 4 * sum(p.numel() for p in model.parameters()))
    modules = prunable_modules(model)
    g = torch.Generator().manual_seed(1)
    batches = [({"input_ids": torch.randint(0, 1000, (1, tokens), generator=g)}, [i]) for i in range(n)]
    rate_before = matmul_rate()
    t = time.perf_counter()
    with torch.no_grad():
        out = prune_layerwise(model, modules, 0.5, forward=lambda b: model(**b),
                              make_batches=lambda: my_microbatches(batches))
    wall = time.perf_counter() - t
    rates = comm.all_gather_object((rate_before + matmul_rate()) / 2)
    # the busiest rank's phases (the most solve time): the others wait for it in their writeback's all-reduce
    ranks = comm.all_gather_object({"seconds": out.stages[0].seconds, "peak": peak_bytes(torch.device("cpu")),
                                    "before": before})
    busiest = max(ranks, key=lambda x: x["seconds"]["solver"])
    shape = lw.TransformerShape.from_hf_config(cfg.to_dict())
    return {"name": name, "shape": {"layers": layers, "hidden": hidden, "intermediate": inter, "heads": heads},
            "n": n, "tokens": tokens, "processes": processes, "wall": wall,
            "measured": busiest["seconds"], "per_rank": [x["seconds"] for x in ranks],
            "peak_bytes": max(x["peak"] for x in ranks), "baseline_bytes": max(x["before"] for x in ranks),
            "matmul_flops": min(rates), "iterations_max": out.stages[0].iterations, "params": shape.params}


def _job(r: dict) -> tuple[lw.TransformerShape, lw.Job]:
    s = r["shape"]
    shape = lw.TransformerShape(layers=s["layers"], hidden=s["hidden"], intermediate=s["intermediate"],
                                heads=s["heads"], kv_heads=s["heads"], vocab=1000)
    return shape, lw.Job(n=r["n"], tokens=r["tokens"], ranks=r["processes"], model_bytes=4, act_bytes=4)


def _forward_calls(r: dict) -> int:
    """Block forwards of micro-batches in the curvature phase on the busiest rank: (2 L - 1) ceil(n / R) (one window
    per micro-batch)."""
    return (2 * r["shape"]["layers"] - 1) * -(-r["n"] // r["processes"])


def _lstsq(rows: list[list[float]], target: list[float]) -> list[float]:
    A, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(A, y).solution[:, 0].clamp_min(0).tolist()


def fit(runs: list[dict], hw: Hardware) -> tuple[lw.LayerwiseRates, list[float]]:
    """(rates with s and the chunk-step seconds, the curvature's (scale of the formula, seconds per block forward
    of a micro-batch)) from ``runs``: the solve phase is zero + s per_step + chunks (s + 2) o, linear in s and
    u = (s + 2) o; the curvature a formula + c calls; least squares, clipped at 0."""
    rows, target = [], []
    for r in runs:
        shape, job = _job(r)
        hw_r = _hw(r, hw)
        zero = lw.solver_seconds(shape, job, hw_r, lw.LayerwiseRates(steps=0))
        per_step = lw.solver_seconds(shape, job, hw_r, lw.LayerwiseRates(steps=1)) - zero
        chunks = lw.solver_seconds(shape, job, hw_r, lw.LayerwiseRates(steps=0, chunk_step_seconds=1.0)) - zero
        rows.append([per_step, chunks / 2])  # chunk count: the chunk term at s = 0 is 2 chunks o
        target.append(r["measured"]["solver"] - zero)
    steps, per_chunk = _lstsq(rows, target)
    # the chunk term is chunks (s + 2) o: fitted as chunks u, u = (s + 2) o
    rates = lw.LayerwiseRates(steps=steps, chunk_step_seconds=per_chunk / (steps + 2))
    curv = _lstsq([[lw.phase_seconds(*_job(r), _hw(r, hw), rates)["curvature"], _forward_calls(r)] for r in runs],
                  [r["measured"]["curvature"] for r in runs])
    return rates, curv


def compare(r: dict, hw: Hardware, rates: lw.LayerwiseRates, curv: list[float]) -> dict:
    shape, job = _job(r)
    hw = _hw(r, hw)
    pred = lw.phase_seconds(shape, job, hw, rates)
    pred["curvature"] = curv[0] * pred["curvature"] + curv[1] * _forward_calls(r)
    mem = lw.memory_parts(shape, job)["total"] + r["baseline_bytes"]
    phases = {}
    for ph in lw.PHASES:
        m, p = r["measured"][ph], pred[ph]
        phases[ph] = {"measured": m, "predicted": p, "error": p / m - 1 if m > 0 else None,
                      "scored": m >= MIN_SECONDS}
    return {"name": r["name"], "phases": phases, "memory_predicted": mem, "memory_peak": r["peak_bytes"],
            "memory_ratio": mem / r["peak_bytes"]}


def _one(argv: list[str], attempts: int = 2) -> dict:
    """One run in fresh processes, its JSON; a failed launch (e.g. a rendezvous port taken by other work on the
    machine) is tried again once, then the benchmark stops with the run's error."""
    for _ in range(attempts):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
    sys.exit(f"layerwise_costmodel.py: {' '.join(argv[-2:])} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layerwise_costmodel.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # one run in this process, its JSON printed
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = {spec[0]: spec for spec in (*FIT, *HELD_OUT)}
    if args.one:
        result = run(*specs[args.one])
        if comm.is_main():
            print(json.dumps(result), flush=True)
        comm.shutdown()  # the process group ends before the interpreter does (gloo aborts otherwise, at times)
        return
    hw = Hardware.from_dict(yaml.safe_load((ROOT / "configs" / "hardware" / "cpu_this_machine.yaml").read_text()))
    hw = replace(hw, shared_cores=0)
    runs, load = [], [os.getloadavg()[0]]
    for spec in (*FIT, *HELD_OUT):  # each in a fresh process: its own peak resident set
        tries, load_before = [], os.getloadavg()[0]
        for _ in range(REPEATS):
            launcher = [sys.executable] if spec[-1] == 1 else [
                "accelerate", "launch", "--config_file", str(ROOT / "launch" / "accelerate" / f"cpu_{spec[-1]}.yaml")]
            tries.append(_one([*launcher, __file__, "--one", spec[0]]))
        best = dict(tries[0], measured={ph: min(t["measured"][ph] for t in tries) for ph in tries[0]["measured"]},
                    repeats=[t["measured"] for t in tries], peak_bytes=max(t["peak_bytes"] for t in tries),
                    load_before=load_before, matmul_flops=max(t["matmul_flops"] for t in tries))
        runs.append(best)
        print(f"{spec[0]}: " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[-1]["measured"].items()), flush=True)
    load.append(os.getloadavg()[0])
    rates, curv = fit(runs[:len(FIT)], hw)
    rows = [compare(r, hw, rates, curv) for r in runs]
    held = rows[len(FIT):]
    worst = max((abs(p["error"]) for row in held for p in row["phases"].values() if p["scored"]), default=None)
    for row in rows:
        print(row["name"], " ".join(f"{ph} {p['measured']:.2f}/{p['predicted']:.2f} s" for ph, p in
                                    row["phases"].items()), f"memory {row['memory_ratio']:.2f}x of peak")
    print(f"fitted: {rates.steps:.1f} steps per row, {rates.chunk_step_seconds * 1e3:.2f} ms per chunk step, "
          f"curvature {curv[0]:.2f} x formula + {curv[1] * 1e3:.2f} ms per block forward of a micro-batch; "
          f"worst held-out error {worst:.0%} (phases >= {MIN_SECONDS} s)")
    Path(args.out).write_text(json.dumps({
        "hardware": "configs/hardware/cpu_this_machine.yaml (1 thread, one process)", "fit": [r["name"] for r in
                                                                                               runs[:len(FIT)]],
        "held_out": [r["name"] for r in runs[len(FIT):]], "fitted": {"steps": rates.steps,
                                                                     "chunk_step_seconds": rates.chunk_step_seconds,
                                                                     "curvature_scale": curv[0],
                                                                     "curvature_call_seconds": curv[1]},
        "load_average": load, "torch": torch.__version__, "repeats": REPEATS, "min_seconds": MIN_SECONDS,
        "worst_held_out_error": worst, "runs": runs, "comparison": rows}, indent=2))


if __name__ == "__main__":
    main()
