"""Plan a prune on a cluster before renting it: memory per rank, time per phase, the smallest GPU count that fits.

The layerwise objective (what ``configs/llm_wikitext.yaml`` runs), for a Llama-architecture model by name or by its
Hugging Face config.json, on each of several GPU counts with and without ZeRO-3::

    python launch/plan.py --objective layerwise --model llama-7b|llama-70b|config.json \\
        --hardware configs/hardware/h100.yaml [--n 128] [--tokens 2048] [--gpus 1,8,64] [--method chita|sparsegpt] \\
        [--steps S | --steps-from summary.json] [--micro-batch B] [--model-dtype bfloat16] [--no-zero3] [--json]

(formulas and assumptions: ``dist_chita/planning/layerwise.py``; ``--steps``: mean IHT steps per row, default the
solver's ``max_iter`` bound of 200; ``--steps-from``: the mean a layerwise scaling study fitted to its runs, its
summary.json's ``rates.solver_steps``). The Fisher objective (the default)::

    python launch/plan.py --params 7e9 --n 128 --gpus 64 --hardware configs/hardware/h100.yaml \\
        [--dtype bfloat16] [--iterations 100] [--p P] [--largest-layer N] [--micro-batch B] [--layers L] \\
        [--tokens T | --flops-per-sample F] [--kept-fraction 0.5] [--granularity row|layer|global|nm] [--zero3] \\
        [--rates summary.json] [--json]

The formulas are in ``dist_chita/planning/costmodel.py``. ``--rates`` takes measured rates (a JSON file holding a
``Rates`` dict, or a scaling study's summary.json with a "rates" entry); without it the hardware file's
numbers are used at face value (efficiency 1, per-sample gradients at twice the cost of 6 FLOPs per
parameter). ``--granularity`` is the run's ``prune.granularity`` (``nm`` when ``prune.nm`` is set; default ``row``,
the config's default); it sets what the solver's selections communicate (global and per-layer budgets all-reduce
histograms, per-row and N:M budgets select locally). An option of the other objective is refused, not ignored. Bad
arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from dist_chita.planning import costmodel as cm  # noqa: E402
from dist_chita.planning import layerwise as lw  # noqa: E402
from dist_chita.planning.memory import HEADROOM, usable_bytes  # noqa: E402
from launch.config import yaml_load  # noqa: E402

GB = 1e9
# the keys of a Llama config.json that give the model's shape (lw.TransformerShape.from_hf_config)
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size")
# the options one objective takes and the other refuses, with their defaults (argparse's are None: not given)
FISHER_ONLY = {"params": None, "p": None, "largest_layer": None, "layers": None, "flops_per_sample": None,
               "dtype": "bfloat16", "iterations": 100, "kept_fraction": 0.5, "granularity": "row", "zero3": False,
               "backsolves": None, "rates": None}
LAYERWISE_ONLY = {"model": None, "method": "chita", "steps": None, "steps_from": None, "model_dtype": "bfloat16",
                  "no_zero3": False}
BUDGETS = {"global": "one global budget", "layer": "a budget per layer", "row": "a budget per row", "nm": "N:M"}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; one line is enough
        raise _ArgError(message)


class _ArgError(ValueError):
    pass


def parse_args(argv: list[str] | None, prog: str = "plan.py") -> argparse.Namespace:
    """The options of ``argv``: one the chosen objective does not use is refused, the objective's defaults are set;
    ``prog``: the command's name in usage and errors."""
    ap = _OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--objective", default="fisher", choices=("fisher", "layerwise"), help="what the prune minimises")
    ap.add_argument("--params", type=float, default=None, help="model parameters P (e.g. 7e9; fisher: required)")
    ap.add_argument("--n", type=int, default=None, help="calibration samples (fisher: required; layerwise: 128)")
    ap.add_argument("--gpus", default=None,
                    help="ranks R (one GPU each; fisher: one count, required; layerwise: a list, default 1,8,64)")
    ap.add_argument("--model", default=None, help="layerwise: llama-7b, llama-70b or a Llama config.json")
    ap.add_argument("--method", default=None, choices=("chita", "sparsegpt"),
                    help="layerwise: the method (default chita)")
    steps = ap.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=float, default=None,
                       help="layerwise: mean IHT steps per row (default 200; 0: the warm start alone, moves 0)")
    steps.add_argument("--steps-from", default=None,
                       help="layerwise: the mean IHT steps per row a layerwise scaling study fitted (its summary.json)")
    ap.add_argument("--model-dtype", default=None, choices=sorted(cm.DTYPE_BYTES),
                    help="layerwise: the model's weights and activations (default bfloat16)")
    ap.add_argument("--no-zero3", action="store_true", default=None, help="layerwise: plans without ZeRO-3 only")
    ap.add_argument("--hardware", required=True, help="hardware YAML (configs/hardware/*.yaml)")
    ap.add_argument("--dtype", default=None, choices=sorted(cm.DTYPE_BYTES),
                    help="fisher: factor storage dtype (default bfloat16)")
    ap.add_argument("--iterations", type=int, default=None, help="fisher: solver iterations (default 100)")
    ap.add_argument("--p", type=float, default=None, help="fisher: prunable weights (default: all parameters)")
    ap.add_argument("--largest-layer", type=float, default=None,
                    help="fisher: weights of the largest prunable layer (default: P / 32, conservative)")
    ap.add_argument("--micro-batch", type=int, default=1, help="samples per backward pass")
    ap.add_argument("--layers", type=int, default=None, help="fisher: prunable layers (default: p / largest layer)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens per sample (fisher: per-sample FLOPs 6 P T, default 1; layerwise: 2048)")
    ap.add_argument("--flops-per-sample", type=float, default=None,
                    help="fisher: forward + backward FLOPs per sample (overrides 6 P T; e.g. 3x forward for a CNN)")
    ap.add_argument("--kept-fraction", type=float, default=None, help="fisher: k / p (1 - sparsity; default 0.5)")
    ap.add_argument("--granularity", default=None, choices=cm.GRANULARITIES,
                    help="fisher: the sparsity budget, as prune.granularity (default row, as there; nm: prune.nm set): "
                         "global and layer budgets select by histogram all-reduces, row and nm budgets locally")
    ap.add_argument("--zero3", action="store_true", default=None,
                    help="fisher: model parameters sharded across ranks (ZeRO-3; the layerwise plans show both)")
    ap.add_argument("--backsolves", type=int, default=None,
                    help="fisher: backsolves per prune (default: from --rates, else 1; every escape trial of the "
                         "solver runs one, so a solve with escapes can run hundreds)")
    ap.add_argument("--rates", default=None, help="fisher: JSON file of measured rates (or a study summary.json)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    # an option of the other objective is refused, not ignored; the defaults are set here, after the check
    mine, theirs = (LAYERWISE_ONLY, FISHER_ONLY) if args.objective == "layerwise" else (FISHER_ONLY, LAYERWISE_ONLY)
    given = [f"--{k.replace('_', '-')}" for k in theirs if getattr(args, k) is not None]
    if given:
        names = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
        verb = "plans" if len(given) == 1 else "plan"
        if args.objective == "layerwise":
            ap.error(f"{names} {verb} the fisher objective: --objective layerwise does not use "
                     f"{'it' if len(given) == 1 else 'them'}")
        ap.error(f"{names} {verb} the layerwise objective (--objective layerwise): the fisher objective does not use "
                 f"{'it' if len(given) == 1 else 'them'}")
    for k, default in mine.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    return args


def load_hardware(path: str) -> cm.Hardware:
    """``--hardware``: a YAML file of :class:`~dist_chita.planning.costmodel.Hardware`'s keys; a file that is not one
    raises ValueError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"hardware file not found: {path}")
    try:
        data = yaml_load(p.read_text())  # (as the run config: a key given twice is refused)
    except UnicodeDecodeError:
        raise ValueError(f"bad hardware file {path}: not YAML (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"bad hardware file {path}: not YAML ({getattr(e, 'problem', None) or e}{where})") from None
    try:
        return cm.Hardware.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad hardware file {path}: {e}") from None


def load_rates(path: str | None) -> cm.Rates:
    """``--rates``: a JSON ``Rates`` dict or a study summary holding one under "rates" (null: a rate the fit left
    unbounded, read as infinite); a file that is not one raises ValueError naming it."""
    if path is None:
        return cm.Rates()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"rates file not found: {path}")
    data = _read_json(p, f"bad rates file {path}")
    if isinstance(data, dict):
        data = data.get("rates", data)
    if not isinstance(data, dict):
        raise ValueError(f"bad rates file {path}: must be a mapping (or a summary with one under \"rates\"), "
                         f"got {type(data).__name__}")
    # null: a rate the fit left unbounded (written so that the file is strict JSON)
    data = {k: math.inf if v is None else v for k, v in data.items()}
    try:
        return cm.Rates.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad rates file {path}: {e}") from None


def _read_json(p: Path, what: str) -> object:
    """The JSON value in file ``p``; a file that is not UTF-8 JSON raises ValueError starting with ``what``."""
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what}: not JSON (not UTF-8 text)") from None


def build(args: argparse.Namespace) -> tuple[cm.Workload, cm.Hardware, cm.Rates]:
    def whole(x: float, what: str) -> int:
        if not (x >= 1 and math.isfinite(x)):
            raise ValueError(f"--{what} must be >= 1, got {x:g}")
        return int(round(x))

    if args.params is None or args.n is None or args.gpus is None:
        raise ValueError("the fisher objective needs --params, --n and --gpus")
    args.tokens = 1 if args.tokens is None else args.tokens
    counts = _counts(args.gpus)
    if len(counts) != 1:
        raise ValueError(f"the fisher objective plans one --gpus count, got {args.gpus!r}")
    args.gpus = counts[0]
    params = whole(args.params, "params")
    p = whole(args.p, "p") if args.p is not None else params
    if p > params:
        raise ValueError(f"--p ({p}) exceeds --params ({params})")
    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    if args.tokens < 1 or (args.flops_per_sample is not None and not args.flops_per_sample > 0):
        raise ValueError("--tokens must be >= 1 and --flops-per-sample > 0")
    if not 0 < args.kept_fraction <= 1:
        raise ValueError(f"--kept-fraction must be in (0, 1], got {args.kept_fraction}")
    if args.largest_layer is None:
        largest = min(max(1, math.ceil(params / 32)), p)
    else:
        largest = whole(args.largest_layer, "largest-layer")
        if largest > p:
            bound = f"--p ({p})" if args.p is not None else f"--params ({params})"
            raise ValueError(f"--largest-layer ({largest}) exceeds {bound}")
    layers = args.layers if args.layers is not None else max(1, math.ceil(p / largest))
    w = cm.Workload(
        p=p,
        n=args.n,
        model_params=params,
        storage_dtype=args.dtype,
        iterations=args.iterations,
        kept=max(1, int(args.kept_fraction * p)),
        largest_layer=largest,
        micro_batch=args.micro_batch,
        layers=layers,
        model_sharded=args.zero3,
        flops_per_sample=args.flops_per_sample if args.flops_per_sample else 6.0 * params * args.tokens,
        granularity=args.granularity,
    )
    rates = load_rates(args.rates)
    if args.backsolves is not None:
        if args.backsolves < 1:
            raise ValueError(f"--backsolves must be >= 1, got {args.backsolves}")
        rates = dataclasses.replace(rates, backsolve_rounds=args.backsolves)
    return w, load_hardware(args.hardware), rates


def plan(w: cm.Workload, hw: cm.Hardware, rates: cm.Rates, ranks: int) -> dict:
    """The plan as a dict: memory by part, seconds by phase and term, fit, smallest fitting R."""
    pred = cm.predict(w, ranks, hw, rates)
    return {
        "hardware": hw.name,
        "ranks": ranks,
        "workload": {"params": w.model_params, "p": w.p, "n": w.n, "storage_dtype": w.storage_dtype,
                     "iterations": w.iterations, "kept": w.k, "granularity": w.granularity,
                     "largest_layer": w.largest_layer,
                     "micro_batch": w.micro_batch, "layers": w.layers, "zero3": w.model_sharded,
                     "flops_per_sample": w.sample_flops, "backsolves": rates.backsolve_rounds},
        "memory_per_rank": pred.memory.as_dict(),
        "memory_available": hw.memory_bytes,
        "fits": pred.fits,
        "seconds": {**pred.seconds, "total": pred.total},
        "terms": pred.terms,
        "smallest_fitting": cm.smallest_fitting_ranks(w, hw),
        "smallest_fitting_power_of_two": cm.smallest_fitting_ranks(w, hw, power_of_two=True),
    }


def format_plan(pl: dict) -> str:
    w, mem, sec, t = pl["workload"], pl["memory_per_rank"], pl["seconds"], pl["terms"]
    lines = [
        f"plan: {w['params']:.3g} parameters ({w['p']:.3g} prunable, largest layer {w['largest_layer']:.3g}), "
        f"n = {w['n']} ({w['flops_per_sample']:.3g} FLOPs each), factor in {w['storage_dtype']}, "
        f"{w['iterations']} solver iterations ({BUDGETS[w['granularity']]}), "
        f"{pl['ranks']} x {pl['hardware']}" + (" (ZeRO-3)" if w["zero3"] else ""),
        "memory per rank:",
    ]
    for part in ("factor", "model", "gradient_buffer", "solver", "backsolve"):
        lines.append(f"  {part:<16} {mem[part] / GB:10.2f} GB")
    verdict = "fits" if pl["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':<16} {mem['total'] / GB:10.2f} GB of {pl['memory_available'] / GB:.2f} GB "
                 f"({HEADROOM:.0%} kept free): {verdict}")
    lines.append("time per phase:")
    detail = {
        "fisher": f"per-sample gradients {t['fisher_gradients']:.3g} s, row writes {t['fisher_write']:.3g} s, "
                  f"exchange {t['fisher_exchange']:.3g} s",
        "solver": f"block reads {t['solver_reads']:.3g} s, vector passes {t['solver_vectors']:.3g} s, "
                  f"all-reduce {t['solver_allreduce']:.3g} s, selection latency {t['solver_selection']:.3g} s, "
                  f"overhead {t['solver_overhead']:.3g} s, per-solve set-up {t['solver_setup']:.3g} s",
        "backsolve": f"{pl['workload']['backsolves']} backsolve(s): Gram {t['backsolve_gram']:.3g} s, "
                     f"all-reduce {t['backsolve_allreduce']:.3g} s, "
                     f"Cholesky {t['backsolve_cholesky']:.3g} s, preconditioner {t['backsolve_precond']:.3g} s, "
                     f"kept-row passes {t['backsolve_rows']:.3g} s",
    }
    for ph in (*cm.PHASES, "total"):
        extra = f"  ({detail[ph]})" if ph in detail else ""
        lines.append(f"  {ph:<10} {sec[ph]:10.3f} s{extra}")
    sf, sp = pl["smallest_fitting"], pl["smallest_fitting_power_of_two"]
    if sf is None:
        lines.append("smallest GPU count that fits: none (the unsharded parts alone exceed one device; try --zero3)")
    else:
        lines.append(f"smallest GPU count that fits: {sf} (power of two: {sp})")
    return "\n".join(lines)


def _counts(text: str) -> list[int]:
    """GPU counts from ``--gpus`` ("8" or "1,8,64"), each >= 1, each once (in the order given)."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--gpus must be whole numbers separated by commas, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--gpus must be >= 1, got {text!r}")
    return list(dict.fromkeys(counts))


def load_shape(model: str | None) -> lw.TransformerShape:
    """``--model``: a name of :data:`~dist_chita.planning.layerwise.PRESETS` or a Llama config.json; a file that is
    not one raises ValueError naming it (and the key)."""
    if model is None:
        raise ValueError(f"the layerwise objective needs --model ({', '.join(lw.PRESETS)} or a config.json)")
    if model in lw.PRESETS:
        return lw.PRESETS[model]
    p = Path(model)
    if not p.is_file():
        raise ValueError(f"--model: neither {', '.join(lw.PRESETS)} nor a file: {model}")
    cfg = _read_json(p, f"--model {model}")
    if not isinstance(cfg, dict):
        raise ValueError(f"--model {model}: not a config mapping")
    for key in SHAPE_KEYS:  # from_hf_config would take "4096" and 4096.7, and name no key for "x"
        v = cfg.get(key)
        if not (v is None or (isinstance(v, int) and not isinstance(v, bool))):
            raise ValueError(f"--model {model}: {key} must be a whole number, got {v!r}")
    tied = cfg.get("tie_word_embeddings")
    if not isinstance(tied, bool | None):
        raise ValueError(f"--model {model}: tie_word_embeddings must be true or false, got {tied!r}")
    try:
        return lw.TransformerShape.from_hf_config(cfg)
    except ValueError as e:
        raise ValueError(f"--model {model}: {e}") from None


def fitted_steps(path: str) -> float:
    """The mean IHT steps per row a layerwise scaling study fitted to its runs (``rates.solver_steps`` of its
    summary.json)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--steps-from: file not found: {path}")
    try:
        steps = json.loads(p.read_text())["rates"]["solver_steps"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ValueError(f"--steps-from {path}: not a layerwise study summary (no rates.solver_steps)") from None
    if not isinstance(steps, int | float) or not steps > 0:
        raise ValueError(f"--steps-from {path}: rates.solver_steps must be a positive number, got {steps!r}")
    return float(steps)


def layerwise_plans(args: argparse.Namespace) -> dict:
    """Every GPU count of ``--gpus`` without and (unless ``--no-zero3``) with ZeRO-3: memory by part, seconds by
    phase, fit, and the smallest fitting count."""
    shape, hw = load_shape(args.model), load_hardware(args.hardware)
    counts = _counts(args.gpus or "1,8,64")
    b = cm.DTYPE_BYTES[args.model_dtype]
    steps = args.steps if args.steps_from is None else fitted_steps(args.steps_from)
    rates = lw.LayerwiseRates() if steps is None else lw.LayerwiseRates(steps=steps)
    n, tokens = 128 if args.n is None else args.n, 2048 if args.tokens is None else args.tokens
    rows = []
    for zero3 in (False,) if args.no_zero3 else (False, True):
        for r in counts:
            job = lw.Job(n=n, tokens=tokens, ranks=r, micro_batch=args.micro_batch, model_bytes=b, act_bytes=b,
                         zero3=zero3, method=args.method)
            mem = lw.memory_parts(shape, job)
            rows.append({"gpus": r, "zero3": zero3, "memory_per_rank": mem,
                         "fits": mem["total"] <= usable_bytes(hw.memory_bytes),
                         "seconds": lw.phase_seconds(shape, job, hw, rates),
                         "smallest_fitting": lw.smallest_fitting(shape, job, hw)})
    return {"objective": "layerwise", "hardware": hw.name, "memory_available": hw.memory_bytes,
            "model": dataclasses.asdict(shape), "params": shape.params, "method": args.method,
            "n": job.n, "tokens": job.tokens, "micro_batch": job.micro_batch, "model_dtype": args.model_dtype,
            "steps": rates.steps, "steps_from": args.steps_from, "plans": rows}


def format_layerwise(pl: dict) -> str:
    m = pl["model"]
    source = f", as fitted in {pl['steps_from']}" if pl.get("steps_from") else ""
    steps = f", {pl['steps']:.3g} IHT steps per row{source}" if pl["method"] == "chita" else ""  # SparseGPT: none
    lines = [f"layerwise plan ({pl['method']}{steps}): Llama-architecture "
             f"{pl['params'] / 1e9:.3g} B parameters ({m['layers']} blocks, d = {m['hidden']}, I = "
             f"{m['intermediate']}, {m['heads']} heads / {m['kv_heads']} kv), n = {pl['n']} x {pl['tokens']} tokens, "
             f"micro-batch {pl['micro_batch']}, weights in {pl['model_dtype']}, on {pl['hardware']} "
             f"({pl['memory_available'] / GB:.0f} GB, {HEADROOM:.0%} kept free)",
             f"{'GPUs':>5} {'ZeRO-3':>6} | {'model':>7} {'gather':>7} {'H':>7} {'solver':>7} {'cache':>7} "
             f"{'activ':>7} {'total':>7} GB {'fits':>4} | {'curvature':>10} {'solve':>10} {'write':>8} "
             f"{'total':>10} s | smallest fitting"]
    for row in pl["plans"]:
        mem, sec = row["memory_per_rank"], row["seconds"]
        gb = " ".join(f"{mem[k] / GB:7.2f}" for k in ("model", "gathered", "curvature", "solver", "cached_inputs",
                                                      "activations", "total"))
        least = row["smallest_fitting"]
        fits = "yes" if row["fits"] else "NO"
        lines.append(f"{row['gpus']:>5} {'yes' if row['zero3'] else 'no':>6} | {gb}    {fits:>4}"
                     f" | {sec['curvature']:10.1f} {sec['solver']:10.1f} {sec['writeback']:8.2f} {sec['total']:10.1f}"
                     f"   | {least if least is not None else 'none'}")
    return "\n".join(lines)


def render(argv: list[str], prog: str = "plan.py") -> tuple[dict, str]:
    """The plan of ``argv`` as a dict and as printed (``prog``: the command's name in errors)."""
    return _render(parse_args(argv, prog))


def _render(args: argparse.Namespace) -> tuple[dict, str]:
    """:func:`render` of parsed options."""
    for name in ("n", "tokens", "micro_batch"):  # counts of both objectives
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.objective == "layerwise":
        if args.method != "chita" and (args.steps is not None or args.steps_from is not None):
            raise ValueError(f"--steps and --steps-from count CHITA's IHT steps: {args.method} takes none")
        if args.steps is not None and not (math.isfinite(args.steps) and args.steps >= 0):
            raise ValueError(f"--steps must be a number of IHT steps >= 0, got {args.steps}")
        pl = layerwise_plans(args)
        return pl, format_layerwise(pl)
    w, hw, rates = build(args)
    pl = plan(w, hw, rates, args.gpus)
    return pl, format_plan(pl)


def main(argv: list[str] | None = None, prog: str = "plan.py") -> int:
    """Print the plan of ``argv`` (None: the command line); 2 on a bad option or file, with one line naming it
    under ``prog`` (``dist-chita plan`` from the console command)."""
    try:
        args = parse_args(argv, prog)
        pl, text = _render(args)
    except (ValueError, OSError, yaml.YAMLError) as e:
        msg = " ".join(str(e).split())
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(pl, indent=2) if args.json else text, flush=True)
    except BrokenPipeError:  # the reader stopped early (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
