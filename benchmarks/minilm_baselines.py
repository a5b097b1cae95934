"""The embedded default job against the one-shot baselines a pruning researcher would try first.

all-MiniLM-L6-v2 (real weights), the default job's data (128 calibration paragraphs of ``pydoc_data.topics``, the
other ~450 held out), 50% sparsity of the 37 Linear layers, one process. Held-out fidelity to the dense embeddings
(mean cosine similarity, top-1 nearest-neighbour agreement) of the tool's own methods, nothing re-implemented here:

* magnitude pruning, global (:func:`dist_chita.fisher.driver.prune`, method ``magnitude``: the only global budget),
  per layer and per row (every output row keeps 50%) (the layerwise method ``magnitude``,
  :mod:`dist_chita.methods.magnitude`, through :func:`dist_chita.layerwise.driver.prune_layerwise`: no data);
* Wanda (Sun et al., 2023): per row, score |W_ij| ||X_j||_2 over the calibration tokens (padding excluded); the
  tool's sequential Wanda (:mod:`dist_chita.methods.wanda`, ``prune.method: wanda``): the norms taken block by
  block on the inputs of the already pruned model, as Wanda's own code does, not from one pass of the dense model;
* OBD (LeCun et al., 1990) per row: score F_jj W_ij^2 / 2 with F the diagonal of the empirical Fisher of the default
  job's loss (the Gauss-Newton probe) on the dense model, without any weight update (:mod:`dist_chita.methods.obd`);
* SparseGPT (Frantar & Alistarh, 2023): sequential, blocks of 128 columns whose masks are chosen over all rows of a
  layer, 1% damping (Algorithm 1, :mod:`dist_chita.methods.sparsegpt`, the tool's ``prune.method: sparsegpt`` with
  ``granularity: layer``);
* dist-chita's ``objective: layerwise``: CHITA per row on each layer's H = X^T X, blocks in order
  (:mod:`dist_chita.methods.chita`); and with ``granularity: layer`` (each layer's budget shared among its rows by
  the OBS saliency);
* dist-chita with the Fisher objective (:func:`dist_chita.fisher.driver.prune`): per-row budgets and the
  ``fisher_diagonal`` ridge (its warm start is the OBD saliency, then IHT and the ridge back-solve), and CHITA as in
  the paper (global budget, identity ridge).

    python benchmarks/minilm_baselines.py [--threads 2] [--nm 2:4] [key=value ...]   # e.g. prune.sparsity=0.7

Overrides apply to the default config (sparsity, calibration.n, solver.storage_dtype, ...). Prints a table and
writes its run into benchmarks/results/minilm_baselines.json, keyed by the overrides (about 6 minutes on 2 cores;
2 with --nm 2:4).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dist_chita import evaluate, prunable  # noqa: E402
from dist_chita.fisher import driver as fisher_driver  # noqa: E402
from dist_chita.io import data, models  # noqa: E402
from dist_chita.layerwise import driver as layerwise_driver  # noqa: E402
from launch.config import calibration_kwargs, eval_kwargs, load_config, model_kwargs, parse_nm  # noqa: E402
from launch.prune import build_loss  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_baselines.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nm", default=None, help="N:M (e.g. 2:4): run the N:M variants of magnitude, Wanda, SparseGPT "
                                               "and layerwise CHITA instead")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the default config")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides)
    s = cfg.prune.sparsity
    loaded = models.load_model(**model_kwargs(cfg))
    model, task = loaded.model, loaded.task
    calib = data.load_samples(**calibration_kwargs(cfg), tokenizer=loaded.tokenizer, image_processor=None)
    held = data.load_samples(**eval_kwargs(cfg), tokenizer=loaded.tokenizer, image_processor=None)
    modules = prunable.prunable_modules(model, cfg.prune.include, cfg.prune.exclude, cfg.prune.exclude_head)
    dense = [m.weight.detach().clone() for _, m in modules]
    reference = evaluate.collect_outputs(model, task, held, cfg.eval.batch_size)
    loss_fn = build_loss(cfg, task)
    n, bs = cfg.calibration.n, cfg.calibration.batch_size

    def batches():  # consecutive, as the Fisher factor's exchange needs
        return data.iter_microbatches(calib, 0, n, bs)

    def by_length():  # the curvature passes: longest first, as launch/prune.py runs them
        return data.iter_microbatches(calib, 0, n, bs, longest_first=True)

    def fidelity() -> dict[str, float]:
        return evaluate.embedding_fidelity(reference, evaluate.collect_outputs(model, task, held, cfg.eval.batch_size))

    def restore() -> None:
        with torch.no_grad():
            for (_, m), w in zip(modules, dense, strict=True):
                m.weight.copy_(w)

    results: dict[str, dict] = {}

    def record(name: str, seconds: float) -> None:
        results[name] = {**fidelity(), "seconds": seconds}
        restore()
        r = results[name]
        print(f"{name:48s} cosine {r['cosine']:.4f}  nn agreement {r['nn_agreement']:.4f}  ({seconds:.1f} s)",
              flush=True)

    def layerwise(name: str, method: str, nm: tuple[int, int] | None = None, per_layer: bool = False) -> None:
        """One run of the tool's layerwise driver with ``method`` (:mod:`dist_chita.methods`)."""
        t = time.perf_counter()
        out = layerwise_driver.prune_layerwise(model, modules, s,
                                               forward=lambda batch: models.forward(model, task, batch),
                                               make_batches=by_length, nm=nm, per_layer=per_layer, damp=cfg.prune.damp,
                                               method=method, loss_fn=loss_fn)
        record(name, time.perf_counter() - t)
        stage = out.stages[0]
        figures = dict(objective=stage.objective, magnitude_objective=stage.magnitude_objective,
                       iterations=stage.iterations or None)
        results[name].update({k: v for k, v in figures.items() if v is not None})

    if args.nm:
        nm = parse_nm(args.nm)
        layerwise(f"magnitude, {args.nm}", "magnitude", nm)
        layerwise(f"Wanda (|W| ||X||), {args.nm}", "wanda", nm)
        layerwise(f"SparseGPT (sequential, blocks of 128), {args.nm}", "sparsegpt", nm)
        layerwise(f"dist-chita layerwise: CHITA {args.nm} on H = X^T X", "chita", nm)
        save(args, cfg, s, n, held, results, f"nm={args.nm}")
        return

    t = time.perf_counter()
    fisher_driver.prune(model, modules, "magnitude", s)
    record("magnitude, global", time.perf_counter() - t)
    layerwise("magnitude, per layer", "magnitude", per_layer=True)
    layerwise("magnitude, per row", "magnitude")
    layerwise("Wanda (|W| ||X||), per row", "wanda")
    layerwise("OBD (W^2 diag F), per row, no update", "obd")
    layerwise("SparseGPT (sequential, blocks of 128)", "sparsegpt", per_layer=True)
    layerwise("dist-chita layerwise: CHITA per row on H = X^T X", "chita")
    layerwise("dist-chita layerwise: CHITA per layer (OBS-saliency row budgets)", "chita", per_layer=True)

    common = dict(make_batches=batches, loss_fn=loss_fn, n=n, lam=cfg.prune.lambda_,
                  storage_dtype=models.torch_dtype(cfg.solver.storage_dtype))
    options = dict(max_iter=cfg.solver.max_iter, tol=cfg.solver.tol, escape_trials=cfg.solver.escape_trials)
    t = time.perf_counter()
    out = fisher_driver.prune(model, modules, "chita", s, per_row=True,
                         solver_options={**options, "ridge": "fisher_diagonal"}, **common)
    name = "dist-chita Fisher objective: CHITA, per row, fisher_diagonal"
    record(name, time.perf_counter() - t)
    results[name].update(objective=out.stages[-1].objective, iterations=out.stages[-1].iterations)
    t = time.perf_counter()
    fisher_driver.prune(model, modules, "chita", s, solver_options={**options, "ridge": "identity"}, **common)
    record("CHITA as in the paper: global, identity ridge", time.perf_counter() - t)

    save(args, cfg, s, n, held, results)


def save(args, cfg, s, n, held, results, *key) -> None:
    """Add this run to the results file, keyed by its overrides (and ``key``)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(RESULTS.read_text()).get("runs", {}) if RESULTS.exists() else {}
    runs[" ".join([*key, *args.overrides]) or "default"] = {
        "sparsity": s, "n": n, "storage_dtype": cfg.solver.storage_dtype, "held_out": len(held),
        "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    RESULTS.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "runs": runs}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
