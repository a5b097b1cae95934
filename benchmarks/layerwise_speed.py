"""Layerwise CHITA against SparseGPT and Wanda on the default job: prune time, each layer's objective, fidelity.

all-MiniLM-L6-v2 (real weights), the default config's data, objective (layerwise, per row) and damping, at
unstructured 50% and 70% and 2:4, one process. Every method is run through :func:`dist_chita.prune` as the
default job runs it (nothing re-implemented here); per setting:

* SparseGPT (per row, the default job's granularity: the same constraint set as CHITA's), Wanda and CHITA each
  alone: the prune time as the driver measures it (curvature passes + solve + write-back, seconds on this
  process) and its ratio to SparseGPT's, the sum of the layers' objectives, and the held-out fidelity of the
  pruned sentence embeddings to the dense ones (mean cosine, top-1 nearest-neighbour agreement);
* every layer's final objective f = sum_i 1/2 (w_i - w_bar_i)^T (H + lambda I) (w_i - w_bar_i) of CHITA and of
  SparseGPT on the SAME problem (the same H, from the inputs of the model pruned by CHITA so far): a method
  registered here, ``chita_vs_sparsegpt``, runs both on every layer the driver shows it, records both objectives
  and solve times, and hands on CHITA's result (so the run follows CHITA's path); on the same problems also CHITA
  with one swap move per step, the support-changing trials on and tol 1e-4 (``SINGLE_MOVE``), for the objective
  and solve time the further moves buy;
* CHITA's warm start alone (``layerwise.moves=0``: every row's OBS-saliency or magnitude support, whichever its
  back-solve fits better), also through :func:`dist_chita.prune`: the fast end of CHITA's time against objective,
  its prune time against SparseGPT's, and (from the paired run's warm-start objectives) the layers where it is at
  most SparseGPT's.

    python benchmarks/layerwise_speed.py [--threads 1] [--settings 0.5 0.7 2:4]

Writes benchmarks/results/layerwise_speed.json (with the load average before and after each setting: the
machine is shared, so times are compared only as ratios within one run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dist_chita  # noqa: E402
from benchmarks.minilm_baselines import default_job_inputs  # noqa: E402
from dist_chita import evaluate  # noqa: E402
from dist_chita.methods.base import LayerMethod, LayerProblem, LayerResult, register  # noqa: E402
from dist_chita.methods.chita import Chita  # noqa: E402
from dist_chita.methods.sparsegpt import SparseGPT  # noqa: E402
from launch.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "layerwise_speed.json"
PHASES = ("curvature", "solver", "writeback")
PAIRED: list[dict] = []  # the layers seen by ChitaVsSparseGPT in the current run
SINGLE_MOVE = {"moves": 1, "trials": 1, "tol": 1e-4}


@register
class ChitaVsSparseGPT(LayerMethod):
    """SparseGPT and CHITA on the same layer problem: both objectives and solve times recorded in ``PAIRED``,
    CHITA's result returned (one process: every row of the layer)."""

    name = "chita_vs_sparsegpt"

    def prune(self, layer: LayerProblem) -> LayerResult:
        t0 = time.perf_counter()
        sgpt = SparseGPT().prune(layer)
        t1 = time.perf_counter()
        chita = Chita().prune(layer)
        t2 = time.perf_counter()
        single = Chita().prune(dataclasses.replace(layer, options={**layer.options, **SINGLE_MOVE}))
        t3 = time.perf_counter()
        PAIRED.append({"rows": layer.W_bar.shape[0], "inputs": layer.W_bar.shape[1],
                       "sparsegpt": sgpt.objective, "chita": chita.objective, "chita_warm": chita.warm_objective,
                       "chita_single_move": single.objective, "sparsegpt_seconds": t1 - t0,
                       "chita_seconds": t2 - t1, "chita_single_move_seconds": t3 - t2})
        return chita


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", nargs="+", default=["0.5", "0.7", "2:4"],
                    help="sparsities (unstructured, per row) or N:M patterns")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [])
    model, task, calib, held, dense, reference = default_job_inputs(cfg)

    def run(method: str, setting: str, name: str | None = None, **layerwise) -> dict:
        """One prune of the dense model (``layerwise``: settings of the default job's objective replaced): phase
        seconds, objective, held-out fidelity; weights restored."""
        target = (dataclasses.replace(cfg.prune, nm=setting) if ":" in setting
                  else dataclasses.replace(cfg.prune, sparsity=float(setting)))
        rep = dist_chita.prune(model, calib, target=target, objective=dataclasses.replace(cfg.layerwise, **layerwise),
                               method=method,
                               fisher=cfg.fisher, task=task, batch_size=cfg.calibration.batch_size,
                               check_memory=False)
        out = evaluate.embedding_fidelity(reference, evaluate.collect_outputs(model, task, held,
                                                                             cfg.eval.batch_size))
        model.load_state_dict(dense)
        seconds = {ph: float(rep.phase_seconds.get(ph, [0.0])[0]) for ph in PHASES}
        stage = rep.stages[-1]
        row = {"cosine": out["cosine"], "nn_agreement": out["nn_agreement"], "objective": stage.objective,
               "seconds": seconds, "prune_seconds": sum(seconds.values())}
        print(f"  {setting:4s} {name or method:20s} prune {row['prune_seconds']:6.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in seconds.items())})  objective {stage.objective:.5g}  "
              f"cosine {out['cosine']:.4f}  agreement {out['nn_agreement']:.4f}", flush=True)
        return row

    settings = {}
    for setting in args.settings:
        load_before = os.getloadavg()[0]
        methods = {m: run(m, setting) for m in ("sparsegpt", "chita", "wanda")}
        methods["chita_warm_start"] = run("chita", setting, "chita moves=0", moves=0)
        PAIRED.clear()
        paired_run = run("chita_vs_sparsegpt", setting)
        layers = list(PAIRED)
        for m in methods.values():
            m["prune_ratio_to_sparsegpt"] = m["prune_seconds"] / methods["sparsegpt"]["prune_seconds"]
        worse = [i for i, lay in enumerate(layers) if lay["chita"] > lay["sparsegpt"]]
        above_single = [i for i, lay in enumerate(layers) if lay["chita"] > lay["chita_single_move"]]
        warm_worse = [i for i, lay in enumerate(layers) if lay["chita_warm"] > lay["sparsegpt"]]
        settings[setting] = {
            "methods": methods, "layers": layers, "layers_chita_above_sparsegpt": worse,
            "paired_objective_chita": sum(lay["chita"] for lay in layers),
            "paired_objective_sparsegpt": sum(lay["sparsegpt"] for lay in layers),
            "paired_solve_seconds_chita": sum(lay["chita_seconds"] for lay in layers),
            "paired_solve_seconds_sparsegpt": sum(lay["sparsegpt_seconds"] for lay in layers),
            "layers_chita_above_single_move": above_single,
            "paired_objective_single_move": sum(lay["chita_single_move"] for lay in layers),
            "paired_solve_seconds_single_move": sum(lay["chita_single_move_seconds"] for lay in layers),
            "layers_warm_start_above_sparsegpt": warm_worse,
            "paired_objective_warm_start": sum(lay["chita_warm"] for lay in layers),
            "paired_run_same_objective_as_chita": paired_run["objective"] == methods["chita"]["objective"],
            "load_before": load_before, "load_after": os.getloadavg()[0]}
        s = settings[setting]
        print(f"{setting}: CHITA prune time {methods['chita']['prune_ratio_to_sparsegpt']:.2f}x SparseGPT's; "
              f"CHITA's objective below SparseGPT's on {len(layers) - len(worse)} of {len(layers)} layers "
              f"(sum {s['paired_objective_chita']:.5g} against {s['paired_objective_sparsegpt']:.5g}); warm start "
              f"alone {methods['chita_warm_start']['prune_ratio_to_sparsegpt']:.2f}x, below SparseGPT's on "
              f"{len(layers) - len(warm_worse)} layers; load {load_before:.1f} -> {s['load_after']:.1f}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": "all-MiniLM-L6-v2", "threads": args.threads, "processes": 1, "n": cfg.calibration.n,
        "held_out": len(held), "granularity": cfg.prune.granularity, "damp": cfg.layerwise.damp,
        "max_iter": cfg.layerwise.max_iter, "tol": cfg.layerwise.tol, "moves": cfg.layerwise.moves,
        "single_move": SINGLE_MOVE, "torch": torch.__version__,
        "machine": platform.machine(), "settings": settings}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
