"""Prune a model with dist-chita.

    accelerate launch [--config_file launch/accelerate/cpu_2.yaml] launch/prune.py \
        [--config configs/<run>.yaml] [key=value ...]

Without ``--config`` the embedded default runs (configs/default.yaml: all-MiniLM-L6-v2 pruned to 50% on Python's
own documentation). The same script runs under plain ``python`` (one process), ``accelerate launch`` and
``torchrun``. Under Accelerate's DeepSpeed plugin with ZeRO stage 3
(``--config_file launch/accelerate/deepspeed_zero3_cpu.yaml``) the model's parameters stay partitioned across
the ranks for the whole run (:func:`zero3_partitioner`, :mod:`dist_chita.io.params`). This recipe is the only
place that reads the config and creates the process group; the library (``dist_chita``) gets plain arguments.
Only the main process prints and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from launch.config import (  # noqa: E402
    ConfigError,
    RunConfig,
    calibration_kwargs,
    config_yaml,
    eval_kwargs,
    load_config,
    model_kwargs,
    parse_nm,
    save_config,
    solver_ridge,
)

PHASES = ("load", "allocation", "eval_before", "magnitude_baseline", "fisher", "exchange", "solver", "backsolve",
          "writeback", "eval_after", "save")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="run config (YAML); default: the embedded default run")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (every key: the defaults, the file, the overrides) as YAML and "
                         "exit without running")
    ap.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. prune.sparsity=0.9")
    return ap.parse_args(argv)


def say(*lines: str) -> None:
    """The one gate for output: only the main process prints."""
    from dist_chita.distributed import comm

    if comm.is_main():
        for line in lines:
            print(line, flush=True)


def start_processes(cfg: RunConfig):
    """Create the Accelerator (and with it the process group): gloo on CPU, NCCL on GPUs; checks that the
    process group has as many ranks as the launcher started."""
    if cfg.threads_per_rank:
        torch.set_num_threads(cfg.threads_per_rank)
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if not torch.cuda.is_available():  # before anything imports deepspeed (accelerate; transformers when saving),
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # which otherwise warns that it found no GPU
    from accelerate import Accelerator, InitProcessGroupKwargs

    from dist_chita.distributed import comm

    handlers = []
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:  # launched as several processes
        backend = "gloo" if use_cpu else "nccl"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.timeout_seconds)))
    # cpu=True would turn the DeepSpeed plugin off (the DeepSpeed configs set use_cpu themselves)
    accelerator = Accelerator(cpu=use_cpu and not deepspeed, kwargs_handlers=handlers)
    if comm.world_size() != launched:
        raise RuntimeError(f"the launcher started {launched} processes but the process group has "
                           f"{comm.world_size()} rank(s)")
    if not comm.is_main():  # the libraries' own progress bars and notices: from the main process only
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
        datasets.utils.logging.disable_progress_bar()
    return accelerator


def zero3_partitioner(accelerator, cfg: RunConfig):
    """Under Accelerate's DeepSpeed plugin with ZeRO stage 3: a function ``partition(model) -> engine`` that
    partitions the model's parameters across the ranks (``accelerator.prepare`` builds a DeepSpeed engine around
    it, which also gathers each module's parameters for its forward and backward); None otherwise (no plugin, or
    ZeRO stages 0-2, which do not partition parameters: the model is used as is)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return None

    def partition(model):
        from dist_chita.distributed import comm

        ds = plugin.deepspeed_config  # prepare() needs the batch sizes; nothing here trains
        ds["train_micro_batch_size_per_gpu"] = cfg.calibration.batch_size
        ds["train_batch_size"] = cfg.calibration.batch_size * comm.world_size()
        ds["gradient_accumulation_steps"] = 1
        # DeepSpeed keeps parameters below this size whole on every rank (default 1e5 elements); 0 partitions all
        ds.setdefault("zero_optimization", {}).setdefault("stage3_param_persistence_threshold", 0)
        engine = accelerator.prepare(model)
        model.eval()
        return engine

    return partition


class Progress:
    """tqdm bars on the main process, one per phase name."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.name = enabled, None, None

    def __call__(self, name: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if name != self.name:
            self.close()
            self.bar, self.name = tqdm(total=total, desc=name, leave=False, dynamic_ncols=True), name
        self.bar.total = total
        self.bar.update(done - self.bar.n)  # through update(), so tqdm's rate is samples (iterations) per second

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.name = None, None


def build_loss(cfg: RunConfig, task: str):
    """The per-sample loss l_i of the config (:mod:`dist_chita.fisher.losses`), on the model's task output."""
    from dist_chita.fisher import losses
    from dist_chita.io import models

    def forward(model, batch):
        return models.forward(model, task, batch)

    kind = cfg.prune.loss
    if kind == "ce":
        return losses.cross_entropy(forward)
    if kind == "causal_lm":
        return losses.causal_lm(forward)
    if kind == "sampled":
        return losses.sampled_fisher(cfg.solver.seed, forward, causal=task == "causal-lm")
    return losses.gauss_newton_probe(cfg.solver.seed, forward)


def forward_activations(cfg: RunConfig, model, task: str, device, calib, held_out: dict, grad: bool,
                        calibration_forward=None) -> int:
    """Bytes the largest forward pass of the run adds: the calibration micro-batch with the most tokens (with
    autograd's saved activations if ``grad``: the Fisher objective's backward follows) and the largest evaluation
    batch, each measured on one forward (collective under ZeRO-3, like every forward). ``calibration_forward``
    (batch): runs the calibration probe instead of the model's forward (to measure something else in it too)."""
    from dist_chita.io import data, models
    from dist_chita.planning import memory

    def forward(batch) -> None:
        models.forward(model, task, batch)

    probes = []
    if cfg.prune.method != "magnitude":
        probes.append((calib.largest_batch(cfg.calibration.batch_size), grad, calibration_forward or forward))
    if "samples" in held_out:
        probes.append((held_out["samples"].largest_batch(cfg.eval.batch_size), False, forward))
    elif "tokens" in held_out:
        ids = held_out["tokens"][: cfg.eval.max_length or cfg.calibration.max_length][None]
        probes.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, False, forward))

    def forwards() -> None:  # one peak over all: memory one probe frees may be kept by the process for the next
        for batch, with_grad, run in probes:
            with torch.set_grad_enabled(with_grad):
                run(data.to_device(batch, device))

    return memory.peak_growth(forwards, device) if probes else 0


def load_calibration(cfg: RunConfig, loaded):
    """The calibration samples: rows of the source, or windows of its tokens (``calibration.windows``)."""
    from dist_chita.io import data

    kw = calibration_kwargs(cfg)
    if cfg.calibration.windows:
        keep = ("source", "fmt", "config_name", "split", "text_column", "n", "seed", "max_length")
        return data.load_windows(**{k: kw[k] for k in keep}, tokenizer=loaded.tokenizer)
    return data.load_samples(**kw, tokenizer=loaded.tokenizer, image_processor=loaded.image_processor)


def load_eval(cfg: RunConfig, loaded):
    """Held-out data for the metric: samples (accuracy, embedding fidelity) or a token stream (perplexity)."""
    from dist_chita.io import data

    metric = cfg.eval.metric
    if metric == "none":
        return {}
    kw = eval_kwargs(cfg)
    if metric == "perplexity":
        keep = ("source", "fmt", "config_name", "split", "text_column", "n", "seed", "offset")
        texts = data.load_texts(**{k: kw[k] for k in keep})
        return {"tokens": data.token_stream(texts, loaded.tokenizer)}
    return {"samples": data.load_samples(**kw, tokenizer=loaded.tokenizer, image_processor=loaded.image_processor)}


def rank_microbatches(cfg: RunConfig, calib):
    """This rank's share of the calibration micro-batches, every R-th of one global sequence (longest first): the
    same micro-batches on any number of ranks, so sums over them have the same bits (the layerwise objective, OWL)."""
    from dist_chita.io import data
    from dist_chita.layerwise import driver as layerwise_driver

    return layerwise_driver.my_microbatches(
        data.iter_microbatches(calib, 0, cfg.calibration.n, cfg.calibration.batch_size, longest_first=True))


def layer_targets(cfg: RunConfig, modules, forward, calib) -> float | list[float]:
    """The library's sparsity target: ``prune.sparsity``, or one per layer from ``prune.layer_sparsity`` (patterns)
    or ``prune.allocation: owl`` (a forward pass of the dense model over the calibration data; collective)."""
    from dist_chita import prunable, sparsity
    from dist_chita.io import params
    from dist_chita.layerwise import allocation

    sizes = [params.numel(m.weight) for _, m in modules]
    if cfg.prune.layer_sparsity:
        try:
            targets = prunable.layer_targets([name for name, _ in modules], cfg.prune.sparsity,
                                             [(r.pattern, r.sparsity) for r in cfg.prune.layer_sparsity])
        except ValueError as e:
            raise ValueError(f"prune.layer_sparsity: {e}") from None
        say(f"  prune.layer_sparsity: {sum(s != cfg.prune.sparsity for s in targets)} of {len(modules)} layers at "
            f"their own targets, {sparsity.mean_sparsity(targets, sizes):.4f} over all prunable weights")
        return targets
    if cfg.prune.allocation == "owl":  # every block's sparsity from the dense model's outliers, before any pruning
        norms = allocation.input_norms(modules, forward, rank_microbatches(cfg, calib))
        targets = allocation.owl_layer_targets(modules, norms, cfg.prune.sparsity, cfg.prune.owl_m,
                                               cfg.prune.owl_lambda)
        say(f"  OWL: block sparsities {min(targets):.4f}..{max(targets):.4f} (M {cfg.prune.owl_m}, lambda "
            f"{cfg.prune.owl_lambda})")
        return targets
    return cfg.prune.sparsity


def run(cfg: RunConfig, device: torch.device, partition=None) -> int:
    """One prune run on this rank. ``partition``: :func:`zero3_partitioner`'s function under ZeRO-3, else None."""
    from dist_chita import evaluate, prunable, report
    from dist_chita.distributed import comm
    from dist_chita.distributed.partition import sample_ranges
    from dist_chita.fisher import driver as fisher_driver
    from dist_chita.fisher import groups, ntstore
    from dist_chita.io import data, models, params
    from dist_chita.io.output import atomic_directory, check_target
    from dist_chita.layerwise import driver as layerwise_driver
    from dist_chita.planning import memory
    from dist_chita.sparsity import mean_sparsity
    from launch import faults, watchdog

    t_run = time.perf_counter()
    seconds = dict.fromkeys(PHASES, 0.0)
    world, rank = comm.world_size(), comm.rank()
    say(f"dist-chita: {cfg.name}: {cfg.prune.method} to sparsity {cfg.prune.nm or cfg.prune.sparsity} "
        f"on {world} process(es), {torch.get_num_threads()} thread(s) each")
    if cfg.world_size is not None and cfg.world_size != world:
        say(f"note: the config asks for world_size {cfg.world_size} but {world} process(es) started "
            f"(results do not depend on it; use --config_file launch/accelerate/cpu_{cfg.world_size}.yaml "
            "or --num_processes to match)")
    weights = cfg.model.weights and str(models.resolve_weights(cfg.model.weights))
    protected = [p for p in (cfg.model.path, weights, cfg.calibration.source) if p and os.path.exists(p)]
    out_dir = check_target(cfg.output.dir, cfg.output.overwrite, protected)
    if comm.is_main():
        for stale in watchdog.remove_dead_temporaries(out_dir):
            say(f"  removed {stale}, left by a run that was killed")
    sample_ranges(cfg.calibration.n, world)  # n >= number of ranks, before loading anything
    if partition is not None and cfg.prune.block_mode:
        raise ValueError("prune.block_mode is not supported with ZeRO-3 partitioning; set prune.block_mode=false")

    t = time.perf_counter()
    loaded = models.load_model(**model_kwargs(cfg))  # HF models load already partitioned under ZeRO-3
    model, task = loaded.model, loaded.task
    engine = None
    if partition is not None:
        engine = partition(model)  # the DeepSpeed engine, which owns the partitioned parameters
    else:
        model.to(device)
    full_bytes = params.full_bytes(model.parameters())
    if partition is not None:
        say(f"  ZeRO-3: parameters partitioned over {world} ranks, "
            f"{params.resident_bytes(model.parameters()) / 2**20:.2f} MiB on this rank of {full_bytes / 2**20:.2f} MiB")
    calib = load_calibration(cfg, loaded)
    held_out = load_eval(cfg, loaded)
    modules = prunable.prunable_modules(model, cfg.prune.include, cfg.prune.exclude, cfg.prune.exclude_head)
    nm = parse_nm(cfg.prune.nm) if cfg.prune.nm else None
    checkpoint, resume_kwargs, restored = stage_checkpoint(cfg, modules, out_dir)
    seconds["load"] = time.perf_counter() - t

    n = cfg.calibration.n
    sizes = [params.numel(m.weight) for _, m in modules]
    p = sum(sizes)
    t = time.perf_counter()
    sparsity = layer_targets(cfg, modules, lambda batch: models.forward(model, task, batch), calib)
    seconds["allocation"] = time.perf_counter() - t if cfg.prune.allocation == "owl" else 0.0
    mean_target = mean_sparsity(sparsity, sizes)
    est = memory.estimate(
        p=groups.largest_group(sizes, cfg.prune.block_size)
        if cfg.prune.block_mode else p, n=n, world_size=world, storage_dtype=cfg.solver.storage_dtype,
        model_params=sum(params.numel(x) for x in model.parameters()),
        largest_layer=max(sizes), micro_batch=cfg.calibration.batch_size,
        active_fraction=0.0 if cfg.prune.method == "magnitude" else min(1.0, cfg.solver.active_set_factor
                                                                        * (1 - mean_target)),
        baseline=memory.baseline_bytes(device, full_bytes),
    )
    layerwise = cfg.prune.objective == "layerwise" and cfg.prune.method != "magnitude"
    block_bytes = [0]  # the largest block call of the calibration probe: what a cached block input costs

    def calibration_probe(batch) -> None:
        block_bytes[0] = layerwise_driver.block_call_bytes(model, modules,
                                                           lambda b: models.forward(model, task, b), batch)

    est = dataclasses.replace(est, activations=forward_activations(  # the backward's saved activations: not ZeRO-3
        cfg, model, task, device, calib, held_out, grad=not layerwise and partition is None,
        calibration_forward=calibration_probe if layerwise and partition is None else None))  # no cache: ZeRO-3
    if cfg.prune.method == "magnitude":
        est = dataclasses.replace(est, factor=0, gradient_buffer=0, backsolve=0)  # no Fisher factor
    elif layerwise:  # no factor either: one block's H and one layer's solve, and the cached block inputs
        per_batch = block_bytes[0]
        batches = math.ceil(math.ceil(n / cfg.calibration.batch_size) / world)
        est = dataclasses.replace(est, factor=0, gradient_buffer=0, backsolve=0,
                                  solver=layerwise_driver.memory_bytes(modules, cfg.prune.method)
                                  + 2 * batches * per_batch)
    compare = cfg.eval.metric != "none" and cfg.prune.method != "magnitude" and cfg.eval.compare_magnitude
    if compare:  # the dense prunable weights are kept while the magnitude baseline is measured
        est = dataclasses.replace(est, model=est.model + 4 * p)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    avail = memory.available_bytes(device, local_ranks)
    say(f"  {len(modules)} prunable layers, p = {p:,} weights, n = {n} calibration samples; "
        f"memory estimate per rank {est.total / 2**30:.2f} GiB (factor {est.factor / 2**30:.2f} GiB, "
        f"activations {est.activations / 2**30:.2f} GiB), "
        f"available {avail / 2**30:.2f} GiB")
    if est.total > avail:
        raise MemoryError(memory.advice(est, avail, n, world, cfg.solver.storage_dtype))

    metric = {"name": cfg.eval.metric}
    progress = Progress(comm.is_main())

    def measure(key: str, reference=None) -> None:
        vals = evaluate.evaluate(model, task, cfg.eval.metric, reference=reference, batch_size=cfg.eval.batch_size,
                                 max_length=cfg.eval.max_length or cfg.calibration.max_length,
                                 stride=cfg.eval.stride, **held_out)
        for name, v in vals.items():
            metric[key if name in (cfg.eval.metric, "accuracy", "perplexity", "cosine") else f"{key}_{name}"] = v

    t = time.perf_counter()
    reference = None
    if cfg.eval.metric == "embedding_fidelity":
        reference = evaluate.collect_outputs(model, task, held_out["samples"], cfg.eval.batch_size)
    elif cfg.eval.metric != "none":
        measure("before")
    seconds["eval_before"] = time.perf_counter() - t

    ridge = solver_ridge(cfg.prune.ridge, n, p)  # auto resolved from n and p
    prune_kwargs = dict(per_layer=nm is None and cfg.prune.granularity == "layer",
                        per_row=nm is None and cfg.prune.granularity == "row", nm=nm)
    if compare:
        t = time.perf_counter()
        dense = [params.read(m.weight).clone() for _, m in modules]
        if layerwise:  # the same rows (outputs) as the layerwise solve, one layer at a time
            layerwise_driver.prune_magnitude(modules, sparsity, nm, per_layer=prune_kwargs["per_layer"])
        else:
            fisher_driver.prune(model, modules, "magnitude", sparsity, **prune_kwargs)
        measure("magnitude", reference)
        for (_, m), w in zip(modules, dense, strict=True):
            params.write(m.weight, w)
        del dense
        seconds["magnitude_baseline"] = time.perf_counter() - t

    lo, hi = sample_ranges(n, world)[rank]
    try:
        prune_fn = fisher_driver.prune
        if cfg.prune.block_mode:  # one group of layers at a time (dist_chita.fisher.groups)
            def prune_fn(*a, **kw):
                return groups.prune_in_blocks(*a, block_size=cfg.prune.block_size,
                                              criterion=cfg.prune.block_criterion, **kw)
        if layerwise:  # each layer's reconstruction, block by block, every rank on every R-th global micro-batch
            outcome = layerwise_driver.prune_layerwise(
                model, modules, sparsity, forward=lambda batch: models.forward(model, task, batch),
                make_batches=lambda: rank_microbatches(cfg, calib),
                nm=nm, per_layer=prune_kwargs["per_layer"], damp=cfg.prune.damp,
                solver_options=dict(max_iter=cfg.solver.max_iter, tol=cfg.solver.tol),
                progress=faults.watch(progress), method=cfg.prune.method)
        else:  # the Fisher objective: rank r computes the rows of A for samples [lo, hi)
            outcome = prune_fn(
                model, modules, cfg.prune.method, sparsity,
                make_batches=lambda: data.iter_microbatches(calib, lo, hi, cfg.calibration.batch_size),
                loss_fn=build_loss(cfg, task), n=n, lam=cfg.prune.lambda_, first_order=cfg.prune.first_order_term,
                stages=cfg.prune.stages if cfg.prune.method == "chita++" else 1, base_sparsity=cfg.prune.base_sparsity,
                schedule=cfg.prune.schedule, exponent=cfg.prune.exponent,
                storage_dtype=models.torch_dtype(cfg.solver.storage_dtype),
                solver_options=dict(max_iter=cfg.solver.max_iter, tol=cfg.solver.tol,
                                    active_set_factor=cfg.solver.active_set_factor, backsolve=cfg.solver.backsolve,
                                    escape_trials=cfg.solver.escape_trials,
                                    ridge=ridge),
                progress=faults.watch(progress), **prune_kwargs, **resume_kwargs,
            )
    finally:
        progress.close()
    for st in outcome.stages:
        for k, v in st.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
    outcome.stages[:0] = restored  # the stages an interrupted run completed

    t = time.perf_counter()
    if cfg.eval.metric != "none":
        measure("after", reference)
    seconds["eval_after"] = time.perf_counter() - t
    if engine is not None:  # modules the backward pass does not reach (embeddings) keep their gathered weights
        engine.empty_partition_cache()
    param_bytes = params.resident_bytes(model.parameters())  # after pruning: still partitioned under ZeRO-3

    order = [name for name, _ in modules]
    layers = report.layer_table(outcome.masks, order)
    kept = sum(row["kept"] for row in layers)
    rep = {
        "version": 1,
        "name": cfg.name,
        "config": cfg.to_dict(),
        "world_size": world,
        "threads_per_rank": torch.get_num_threads(),
        "device": device.type,
        "backend": "gloo" if device.type == "cpu" else "nccl",
        "streaming_stores": device.type == "cpu" and ntstore.available(),
        "method": cfg.prune.method,
        "objective": cfg.prune.objective if cfg.prune.method != "magnitude" else None,
        "ridge": ridge if cfg.prune.method != "magnitude" and not layerwise else None,
        "n": n,
        "p": p,
        "model_params": sum(params.numel(x) for x in model.parameters()),
        "zero_stage": 3 if partition is not None else None,
        "param_bytes_full": full_bytes,
        "storage_dtype": cfg.solver.storage_dtype,
        "global": {"p": p, "kept": kept, "sparsity": 1 - kept / p},
        "layers": layers,
        "stages": [vars(st) for st in outcome.stages],
        "metric": metric,
        "solver_iterations": sum(st.iterations for st in outcome.stages),
        "memory_estimate_bytes": est.as_dict(),
        "mask_sha256": report.mask_digest(outcome.masks, order),
    }

    t = time.perf_counter()
    state = None  # under ZeRO-3 the full weights, gathered one parameter at a time (collective), on the main rank
    if partition is not None and cfg.output.save_model:
        state = params.full_state_dict(model)
    ok = True
    if comm.is_main():
        try:
            with atomic_directory(out_dir, cfg.output.overwrite) as tmp:
                if cfg.output.save_model:
                    models.save_model(loaded, tmp, state_dict=state)
                save_config(cfg, tmp / "dist_chita_config.yaml")
                seconds["save"] = time.perf_counter() - t
                seconds["total"] = time.perf_counter() - t_run
                finish_report(rep, seconds, device, param_bytes)
                faults.point("save")
                (tmp / "prune_report.json").write_text(_json(rep))
        except BaseException:
            ok = False
            comm.broadcast_object(ok)
            raise
        comm.broadcast_object(ok)
        if checkpoint is not None:
            checkpoint.remove()
        say(*report.summary_lines(rep), f"  saved to {out_dir}")
    else:
        seconds["total"] = time.perf_counter() - t_run
        finish_report(rep, seconds, device, param_bytes)
        if not comm.broadcast_object(ok):
            return 1
    return 0


def stage_checkpoint(cfg: RunConfig, modules, out_dir: Path):
    """chita++: the stage checkpoint (:mod:`dist_chita.fisher.resume`), the pipeline's resume arguments and the restored
    stage reports; (None, {}, []) for other methods. Without ``resume`` an old state is discarded."""
    from dist_chita import prunable
    from dist_chita.distributed import comm
    from dist_chita.fisher import driver as fisher_driver
    from dist_chita.fisher import resume

    if cfg.prune.method != "chita++":
        if cfg.resume:
            say(f"  note: resume applies to chita++ stages; {cfg.prune.method} starts from the beginning")
        return None, {}, []
    d = cfg.to_dict()
    settings = {k: d[k] for k in ("model", "calibration", "prune", "solver")}
    settings["layers"] = [[name, list(shape)] for name, shape in prunable.named_shapes(modules)]
    state_dir = Path(cfg.resume_dir).resolve() if cfg.resume_dir else resume.state_dir_for(out_dir)
    checkpoint = resume.StageCheckpoint(state_dir, settings)
    saved = checkpoint.load() if cfg.resume else None
    if not cfg.resume:
        checkpoint.remove()
    elif saved is None:
        say(f"  resume: no saved state in {state_dir}; starting from stage 1")
    else:
        say(f"  resume: continuing after stage {saved.stages_done} of {cfg.prune.stages} from {state_dir}"
            + (f" (saved on {saved.world_size} processes)" if saved.world_size != comm.world_size() else ""))
    kwargs = {"on_stage_end": checkpoint.on_stage_end(saved.reports if saved else ())}
    if cfg.resume_save_factor:
        kwargs.update(on_factor=checkpoint.save_factor, load_factor=checkpoint.load_factor)
    if saved is not None:
        kwargs.update(start_stage=saved.stages_done, start_weights=saved.weights, start_support=saved.support)
    return checkpoint, kwargs, [fisher_driver.StageReport(**r) for r in (saved.reports if saved else [])]


def finish_report(rep: dict, seconds: dict, device: torch.device, param_bytes: int = 0) -> None:
    """Add the per-rank figures (collective: every rank must call it once); ``param_bytes``: bytes of parameters
    resident on this rank (its ZeRO-3 partition, else the whole model)."""
    from dist_chita import report
    from dist_chita.distributed import comm
    from dist_chita.planning import memory

    per_rank = report.gather_per_rank({**{f"t.{k}": v for k, v in seconds.items()},
                                       **{f"b.{k}": v for k, v in comm.bytes_by_phase().items()},
                                       "peak": memory.peak_bytes(device), "params": param_bytes})
    rep["phase_seconds"] = {k[2:]: v for k, v in per_rank.items() if k.startswith("t.")}
    rep["bytes_sent"] = {k[2:]: v for k, v in per_rank.items() if k.startswith("b.")}
    rep["peak_memory_bytes"] = per_rank["peak"]
    rep["param_bytes"] = per_rank["params"]
    solver_bytes = max(rep["bytes_sent"].get("solver", [0]))
    rep["bytes_per_solver_iteration"] = solver_bytes / max(1, rep["solver_iterations"])


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=float)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank parsed the same arguments: one of them says so
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        if os.environ.get("RANK", "0") == "0":
            print(config_yaml(cfg), end="")
        return 0
    from dist_chita.distributed import comm
    from launch import watchdog

    accelerator = None
    try:
        accelerator = start_processes(cfg)
        watchdog.install(cfg.timeout_seconds, cfg.output.dir)
        return run(cfg, accelerator.device, zero3_partitioner(accelerator, cfg))
    except (ValueError, OSError, MemoryError, RuntimeError, ImportError, watchdog.Terminated) as e:
        if watchdog.should_print(comm.rank(), e):
            print(f"error: {watchdog.describe(e)}", file=sys.stderr)
        elif not isinstance(e, watchdog.Terminated) and not watchdog.wait_for_rank0():
            # rank 0 did not fail in turn: the cause may be this rank's alone, so this rank says it
            print(f"error (rank {comm.rank()}): {watchdog.describe(e)}", file=sys.stderr)
        return 1
    finally:
        comm.shutdown()


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and the process group destroyed; skip the interpreter's teardown, where a process
        # of a multi-process run aborted now and then after completing ("terminate called without an active
        # exception", rank 0, a few runs in a hundred here, exit status -6 failing the whole launch).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
