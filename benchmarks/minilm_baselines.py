"""The embedded default job against the one-shot baselines a pruning researcher would try first.

all-MiniLM-L6-v2 (real weights), the default job's data (128 calibration paragraphs of ``pydoc_data.topics``, the
other ~450 held out), 50% sparsity of the 37 Linear layers, one process. Held-out fidelity to the dense embeddings
(mean cosine similarity, top-1 nearest-neighbour agreement) of the tool's own methods, each run through
:func:`dist_chita.prune` with the default config's settings (nothing re-implemented here):

* magnitude pruning, global (Fisher objective: the only global budget), per layer and per row (layerwise method
  ``magnitude``: no data);
* Wanda (Sun et al., 2024): per row, score |W_ij| ||X_j||_2 over the calibration tokens (padding excluded), the
  norms taken block by block on the inputs of the already pruned model, as Wanda's own code does
  (:mod:`dist_chita.methods.wanda`);
* OBD (LeCun et al., 1990) per row: score F_jj W_ij^2 / 2 with F the diagonal of the empirical Fisher of the default
  job's loss (the Gauss-Newton probe) on the dense model, without any weight update (:mod:`dist_chita.methods.obd`);
* SparseGPT (Frantar & Alistarh, 2023): sequential, blocks of 128 columns whose masks are chosen over all rows of a
  layer, 1% damping (Algorithm 1, :mod:`dist_chita.methods.sparsegpt`, ``granularity: layer``);
* dist-chita's layerwise objective: CHITA per row on each layer's H = X^T X, blocks in order (the default job); and
  with ``granularity: layer`` (each layer's budget shared among its rows by the OBS saliency);
* dist-chita with the Fisher objective: per-row budgets and the ``fisher_diagonal`` ridge (its warm start is the OBD
  saliency, then IHT and the ridge back-solve), and CHITA as in the paper (global budget, identity ridge).

    python benchmarks/minilm_baselines.py [--threads 2] [--nm 2:4] [key=value ...]   # e.g. prune.sparsity=0.7

Overrides apply to the default config (sparsity, calibration.n, layerwise.max_iter, fisher.storage_dtype, ...).
Prints a table and writes its run into benchmarks/results/minilm_baselines.json, keyed by the overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dist_chita  # noqa: E402
from dist_chita import evaluate  # noqa: E402
from dist_chita.io import data, models  # noqa: E402
from launch.config import calibration_kwargs, eval_kwargs, load_config, model_kwargs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_baselines.json"


def default_job_inputs(cfg):
    """The config's model and data as the default job loads them: (model, task, calibration samples, held-out
    samples, the dense state dict to restore after each prune, the dense outputs on the held-out samples)."""
    loaded = models.load_model(**model_kwargs(cfg))
    model, task = loaded.model, loaded.task
    calib = data.load_samples(**calibration_kwargs(cfg), tokenizer=loaded.tokenizer, image_processor=None)
    held = data.load_samples(**eval_kwargs(cfg), tokenizer=loaded.tokenizer, image_processor=None)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference = evaluate.collect_outputs(model, task, held, cfg.eval.batch_size)
    return model, task, calib, held, dense, reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nm", default=None, help="N:M (e.g. 2:4): run the N:M variants of magnitude, Wanda, SparseGPT "
                                               "and layerwise CHITA instead")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the default config")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides)
    model, task, calib, held, dense, reference = default_job_inputs(cfg)
    results: dict[str, dict] = {}

    def run(name: str, method: str, objective, **target) -> None:
        """One prune of the dense model by ``method`` on ``objective``, held-out fidelity, weights restored."""
        t = time.perf_counter()
        rep = dist_chita.prune(model, calib, target=dataclasses.replace(cfg.prune, **target), objective=objective,
                               method=method, fisher=cfg.fisher, task=task, batch_size=cfg.calibration.batch_size,
                               check_memory=False)
        seconds = time.perf_counter() - t
        out = evaluate.embedding_fidelity(reference, evaluate.collect_outputs(model, task, held,
                                                                             cfg.eval.batch_size))
        stage = rep.stages[-1]
        figures = dict(objective=stage.objective, magnitude_objective=stage.magnitude_objective,
                       iterations=stage.iterations or None)
        results[name] = {**out, "seconds": seconds, **{k: v for k, v in figures.items() if v is not None}}
        model.load_state_dict(dense)
        print(f"{name:68s} cosine {out['cosine']:.4f}  nn agreement {out['nn_agreement']:.4f}  ({seconds:.1f} s)",
              flush=True)

    lw = cfg.layerwise
    if args.nm:
        for name, method in (("magnitude", "magnitude"), ("Wanda (|W| ||X||)", "wanda"),
                             ("SparseGPT (sequential, blocks of 128)", "sparsegpt"),
                             ("dist-chita layerwise: CHITA on H = X^T X", "chita")):
            run(f"{name}, {args.nm}", method, lw, nm=args.nm)
        save(args, cfg, len(held), results, f"nm={args.nm}")
        return
    run("magnitude, global", "magnitude", cfg.fisher, granularity="global")
    run("magnitude, per layer", "magnitude", lw, granularity="layer")
    run("magnitude, per row", "magnitude", lw, granularity="row")
    run("Wanda (|W| ||X||), per row", "wanda", lw, granularity="row")
    run("OBD (W^2 diag F), per row, no update", "obd", lw, granularity="row")
    run("SparseGPT (sequential, blocks of 128)", "sparsegpt", lw, granularity="layer")
    run("dist-chita layerwise: CHITA per row on H = X^T X (the default job)", "chita", lw, granularity="row")
    run("dist-chita layerwise: CHITA per layer (OBS-saliency row budgets)", "chita", lw, granularity="layer")
    run("dist-chita Fisher objective: CHITA, per row, fisher_diagonal", "chita",
        dataclasses.replace(cfg.fisher, ridge="fisher_diagonal"), granularity="row")
    run("CHITA as in the paper: Fisher objective, global, identity ridge", "chita",
        dataclasses.replace(cfg.fisher, ridge="identity"), granularity="global")
    save(args, cfg, len(held), results)


def save(args, cfg, held_out: int, results, *key) -> None:
    """Add this run to the results file, keyed by its overrides (and ``key``)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(RESULTS.read_text()).get("runs", {}) if RESULTS.exists() else {}
    runs[" ".join([*key, *args.overrides]) or "default"] = {
        "sparsity": cfg.prune.sparsity, "n": cfg.calibration.n, "held_out": held_out,
        "storage_dtype": cfg.fisher.storage_dtype, "layerwise_max_iter": cfg.layerwise.max_iter,
        "threads": args.threads, "results": results}
    RESULTS.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "runs": runs}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
