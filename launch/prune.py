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
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    from launch import watchdog

    watchdog.stop_quietly_while_starting()

import torch  # noqa: E402

from launch.config import (  # noqa: E402
    ConfigError,
    RunConfig,
    calibration_kwargs,
    config_yaml,
    eval_kwargs,
    load_config,
    model_kwargs,
    resolve_auto,
    save_config,
)


def make_parser(prog: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """The command line of a prune (``launch/prune.py``, ``dist-chita prune``)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0], epilog=epilog,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="run config (YAML); default: the embedded default run")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (every key of the sections this run reads: the defaults, the "
                         "file, the overrides) as YAML and exit without running")
    ap.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. prune.sparsity=0.9")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def say(*lines: str) -> None:
    """The one gate for output: only the main process prints."""
    from dist_chita.distributed import comm

    if comm.is_main():
        for line in lines:
            print(line, flush=True)


def start_processes(cfg: RunConfig):
    """Create the Accelerator (and with it the process group): gloo on CPU, NCCL on GPUs; checks that the
    process group has as many ranks as the launcher started; then sets ``threads_per_rank`` (after the
    Accelerator, which sets its own count on CPU when OMP_NUM_THREADS is not set)."""
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if not torch.cuda.is_available():  # before anything imports deepspeed (accelerate; transformers when saving),
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # which otherwise warns that it found no GPU
    if deepspeed and use_cpu:
        skip_deepspeed_shm_build()
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
    if cfg.threads_per_rank:
        torch.set_num_threads(cfg.threads_per_rank)
    if not comm.is_main():  # the libraries' own progress bars and notices: from the main process only
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
        datasets.utils.logging.disable_progress_bar()
    return accelerator


def skip_deepspeed_shm_build() -> None:
    """On CPU, DeepSpeed compiles an optional shared-memory all-reduce the first time a process group starts under
    it: about a minute, and a process killed during it leaves the build's lock file behind, on which every later
    run waits for ever. The prune's collectives go through torch.distributed (gloo) either way, so the build is
    skipped (DeepSpeed then uses torch.distributed for its own collectives too)."""
    import importlib

    backend = importlib.import_module("deepspeed.comm.torch")  # (the attribute deepspeed.comm.torch is torch itself)
    if hasattr(backend, "build_shm_op"):
        backend.build_shm_op = lambda: None


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


def load_data(cfg: RunConfig, loaded) -> tuple[object, dict]:
    """The calibration samples (rows of the source, or windows of its tokens with ``calibration.windows``) and the
    held-out data for the metric: ``{"samples": ...}`` (accuracy, embedding fidelity), ``{"tokens": ...}``
    (perplexity) or nothing."""
    from dist_chita.io import data, models

    def samples(kw: dict):  # preprocessed for the model: its tokenizer, image processor, input channels
        return data.load_samples(**kw, tokenizer=loaded.tokenizer, image_processor=loaded.image_processor,
                                 channels=models.input_channels(loaded.model))

    kw = calibration_kwargs(cfg)
    if cfg.calibration.windows:
        keep = ("source", "fmt", "config_name", "split", "text_column", "n", "seed", "max_length")
        calib = data.load_windows(**{k: kw[k] for k in keep}, tokenizer=loaded.tokenizer)
    else:
        calib = samples(kw)
    metric, kw = cfg.eval.metric, eval_kwargs(cfg)
    if metric == "none":
        return calib, {}
    if metric == "perplexity":
        keep = ("source", "fmt", "config_name", "split", "text_column", "n", "seed", "offset")
        return calib, {"tokens": data.token_stream(data.load_texts(**{k: kw[k] for k in keep}), loaded.tokenizer)}
    return calib, {"samples": samples(kw)}


def load(cfg: RunConfig, device: torch.device, partition=None):
    """The model (partitioned under ZeRO-3: ``partition``), its calibration and held-out data: (loaded model,
    DeepSpeed engine or None, calibration samples, evaluator or None)."""
    from dist_chita.distributed import comm
    from dist_chita.evaluate import Evaluator
    from dist_chita.io import models, params

    loaded = models.load_model(**model_kwargs(cfg))  # HF models load already partitioned under ZeRO-3
    engine = partition(loaded.model) if partition is not None else None  # it owns the partitioned parameters
    if engine is None:
        loaded.model.to(device)
    else:
        say(f"  ZeRO-3: parameters partitioned over {comm.world_size()} ranks, "
            f"{params.resident_bytes(loaded.model.parameters()) / 2**20:.2f} MiB on this rank of "
            f"{params.full_bytes(loaded.model.parameters()) / 2**20:.2f} MiB")
    positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    for key, length in (("calibration.max_length", cfg.calibration.max_length),
                        ("eval.max_length", cfg.eval.max_length)):  # (before a torch error in the first forward)
        if loaded.tokenizer is not None and isinstance(positions, int) and length is not None and length > positions:
            raise ValueError(f"{key}: {length} tokens exceed the model's {positions} positions "
                             "(max_position_embeddings)")
    calib, held_out = load_data(cfg, loaded)
    evaluator = None
    if held_out:
        e = cfg.eval
        evaluator = Evaluator(loaded.model, loaded.task, e.metric, batch_size=e.batch_size,
                              max_length=e.max_length or cfg.calibration.max_length, stride=e.stride, **held_out)
    return loaded, engine, calib, evaluator


def objective_options(cfg: RunConfig, out_dir: Path):
    """The library's options of the run's objective; CHITA++ keeps its stage states beside the output directory
    unless ``fisher.resume_dir`` says where."""
    from dist_chita.fisher import resume

    if cfg.prune.objective != "fisher":
        return cfg.layerwise
    where = cfg.fisher.resume_dir or str(resume.state_dir_for(out_dir))
    return dataclasses.replace(cfg.fisher, resume_dir=str(Path(where).resolve()))


def chance_accuracy(labels) -> float:
    """The accuracy of always answering the most frequent class of ``labels`` (n,): what a model that learnt nothing
    from its input gets."""
    return float(labels.bincount().max()) / len(labels)


def warn_near_chance(evaluator, log):
    """``evaluator`` that also says, after evaluating the dense model (``"before"``), when its accuracy is near
    chance: below chance + (1 - chance) / 4 (0.325 for 10 balanced classes). A model that was trained for its task
    scoring so low on held-out data usually means the data are not prepared as in its training (image size,
    mean and std, channels, or the label column)."""
    labels = getattr(getattr(evaluator, "samples", None), "fields", {}).get("labels")

    def evaluate(stage: str):
        values = evaluator(stage)
        if stage == "before" and evaluator.metric == "accuracy" and labels is not None and len(labels):
            acc, chance = values["accuracy"], chance_accuracy(labels)
            if acc < chance + (1 - chance) / 4:
                log(f"warning: the dense model's accuracy on the evaluation data is {acc:.4f}, near chance "
                    f"({chance:.4f}: always the most frequent class); the data are likely not prepared as in its "
                    "training (calibration.image_size, mean, std, the image processor, or the label column)")
        return values

    return evaluate


def prepare_output(cfg: RunConfig) -> Path:
    """The output directory, checked before any work: refused when it exists (without ``output.overwrite``) or
    holds an input; temporaries of killed runs beside it are removed."""
    from dist_chita.distributed import comm
    from dist_chita.io.models import BUILTIN_MODELS, resolve_weights
    from dist_chita.io.output import check_target
    from launch import watchdog

    weights = cfg.model.weights and str(resolve_weights(cfg.model.weights))
    model = BUILTIN_MODELS[cfg.model.path]() if cfg.model.path in BUILTIN_MODELS else cfg.model.path
    inputs = (model, weights, cfg.calibration.source, cfg.eval.source)
    protected = [p for p in inputs if p and os.path.exists(os.path.expanduser(p))]
    out_dir = check_target(cfg.output.dir, cfg.output.overwrite, protected, probe_replace=comm.is_main())
    if comm.is_main():
        for stale in watchdog.remove_dead_temporaries(out_dir):
            say(f"  removed {stale}, left by a run that was killed")
    return out_dir


def run(cfg: RunConfig, device: torch.device, partition=None) -> int:
    """One prune run on this rank. ``partition``: :func:`zero3_partitioner`'s function under ZeRO-3, else None."""
    import dist_chita
    from dist_chita.distributed import comm
    from dist_chita.distributed.partition import sample_ranges
    from dist_chita.planning import memory
    from launch import faults

    t_run = time.perf_counter()
    world = comm.world_size()
    say(f"dist-chita: {cfg.name}: {cfg.prune.method or 'auto'} to sparsity {cfg.prune.nm or cfg.prune.sparsity} "
        f"on {world} process(es), {torch.get_num_threads()} thread(s) each")
    if cfg.world_size is not None and cfg.world_size != world:
        say(f"note: the config asks for world_size {cfg.world_size} but {world} process(es) started "
            f"(results do not depend on it; use --config_file launch/accelerate/cpu_{cfg.world_size}.yaml "
            "or --num_processes to match)")
    out_dir = prepare_output(cfg)
    sample_ranges(cfg.calibration.n, world)  # n >= number of ranks, before loading anything
    memory.available_override()  # and a valid DIST_CHITA_AVAILABLE_BYTES
    if partition is not None and cfg.prune.objective == "fisher" and cfg.fisher.group_size is not None:
        raise ValueError("fisher.group_size (layer groups) is not supported with ZeRO-3 partitioning; set it to null")
    t = time.perf_counter()
    loaded, engine, calib, evaluator = load(cfg, device, partition)
    seconds = {"load": time.perf_counter() - t}
    cfg, recipe = resolve_auto(cfg, loaded.model, loaded.task)  # objective auto: the model family's recipe
    if recipe is not None:
        say(recipe)
    if partition is not None and cfg.prune.objective == "fisher" and cfg.fisher.group_size is not None:
        raise ValueError("fisher.group_size (layer groups) is not supported with ZeRO-3 partitioning; set it to null")
    progress = Progress(comm.is_main())
    try:
        rep = dist_chita.prune(
            loaded.model, calib, target=cfg.prune, objective=objective_options(cfg, out_dir),
            method=cfg.prune.method, fisher=cfg.fisher, task=loaded.task, batch_size=cfg.calibration.batch_size,
            evaluate=evaluator and warn_near_chance(evaluator, say), compare_magnitude=cfg.eval.compare_magnitude,
            probe_batches=evaluator.probe_batches() if evaluator else (), log=say, progress=faults.watch(progress),
            validation=cfg.calibration.validation, validation_seed=cfg.calibration.seed,
            reestimate_batchnorm=cfg.prune.reestimate_batchnorm)
    finally:
        progress.close()
    if engine is not None:  # modules the backward pass does not reach (embeddings) keep their gathered weights
        engine.empty_partition_cache()
    rep.name, rep.config, rep.metric = cfg.name, cfg.to_dict(), {**rep.metric, "name": cfg.eval.metric}
    rep.recipe = recipe and recipe.strip()
    return save(cfg, loaded, rep, out_dir, seconds, t_run, device, partitioned=engine is not None)


def save(cfg: RunConfig, loaded, rep, out_dir: Path, seconds: dict, t_run: float, device: torch.device,
         partitioned: bool) -> int:
    """Write the output directory atomically on the main process (model, resolved config, report) and finish the
    report's per-rank figures on every rank (collective)."""
    from dist_chita.distributed import comm
    from dist_chita.io import models, params
    from dist_chita.io.output import atomic_directory
    from launch import faults

    faults.point("save", stall=False)  # a stop from here on is reported as during save
    t = time.perf_counter()
    state = None  # under ZeRO-3 the full weights, gathered one parameter at a time (collective), on the main rank
    if partitioned and cfg.output.save_model:
        state = params.full_state_dict(loaded.model)
    param_bytes = params.resident_bytes(loaded.model.parameters())  # still partitioned under ZeRO-3

    def finish() -> None:
        seconds["save"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t_run
        rep.add_rank_figures(seconds, device, param_bytes)

    if not comm.is_main():
        finish()
        return 0 if comm.broadcast_object(True) else 1
    loaded_in = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), None)
    saved_dtype = (loaded.checkpoint_dtype or loaded_in) if cfg.output.dtype == "auto" else \
        models.torch_dtype(cfg.output.dtype)
    try:
        with atomic_directory(out_dir, cfg.output.overwrite) as tmp:
            if cfg.output.save_model:
                models.save_model(loaded, tmp, state_dict=state, dtype=saved_dtype)
                rep.weights_dtype = models.dtype_name(saved_dtype or loaded_in)
                write_format(cfg, loaded, rep, tmp)
            save_config(cfg, tmp / "dist_chita_config.yaml")
            finish()
            faults.point("save")
            (tmp / "prune_report.json").write_text(rep.to_json())
            (tmp / "README.md").write_text(card(cfg, rep))
    except BaseException:
        comm.broadcast_object(False)
        raise
    comm.broadcast_object(True)
    dtype_note = []
    if cfg.output.save_model and saved_dtype not in (None, loaded_in):
        dtype_note = [f"  weights saved in {models.dtype_name(saved_dtype)} (output.dtype {cfg.output.dtype}); "
                      f"pruned and measured in {models.dtype_name(loaded_in)}"]
    say(*rep.summary_lines(), *dtype_note, f"  saved to {out_dir}")
    return 0


def write_format(cfg: RunConfig, loaded, rep, out: Path) -> None:
    """Rewrite the saved checkpoint in ``output.format`` and record the format and the weight files' sizes in the
    report (``output_format``, ``weights_bytes``, ``dense_weights_bytes``)."""
    from dist_chita.io import compressed

    if cfg.output.format == "compressed-tensors":
        done = compressed.compress_checkpoint(out, loaded.model, [row.name for row in rep.layers],
                                              cfg.prune.nm_pair, rep.global_.sparsity)
        rep.output_format, rep.weights_bytes, rep.dense_weights_bytes = done.format, done.bytes, done.dense_bytes
    else:
        record_dense(rep, out)


def record_dense(rep, out: Path) -> None:
    """Record in the report that the weight files in ``out`` are dense, and their size."""
    from dist_chita.io import compressed

    rep.output_format = "dense"
    rep.weights_bytes = rep.dense_weights_bytes = compressed.weights_bytes(out)


def card(cfg: RunConfig, rep, notes: list[str] = ()) -> str:
    """The model card (README.md) of the output directory; ``notes``: more Markdown lines."""
    from dist_chita.io.card import CardInfo, model_card

    m, c, p = cfg.model, cfg.calibration, cfg.prune
    target = p.nm or (f"{p.sparsity} per {p.granularity}" if p.granularity != "global" else f"{p.sparsity} overall")
    again = "dist-chita prune --config dist_chita_config.yaml output.dir=<new directory>"
    commands = [again]
    if rep.world_size > 1:
        commands.append(f"torchrun --nproc-per-node {rep.world_size} $(command -v dist-chita) prune "
                        "--config dist_chita_config.yaml output.dir=<new directory>   # as it ran")
    data = f"`{c.source}`" + (f" ({c.config_name})" if c.config_name else "") + f", split {c.split}"
    base = m.path if m.init == "pretrained" else f"{m.path} (random weights, seed {m.seed})"
    info = CardInfo(base_model=base if m.source == "hf" else f"{m.factory} ({m.weights})", task=m.task,
                    hf=m.source == "hf", target=target,
                    calibration=data + (f", windows of {c.max_length} tokens" if c.windows else ""),
                    commands=commands, notes=list(notes))
    return model_card(rep, info)


def say_error(line: str, first: bool = True) -> None:
    """Print the one error line (``first``: this process reports; otherwise it gives the reporting rank time to
    print before this one ends, since the launcher stops every rank when the first one exits) and hand it to the
    launcher's failure summary."""
    from launch import watchdog

    if first:
        print(line, file=sys.stderr, flush=True)
        watchdog.record_for_launcher(line)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(_REPORT_GRACE_SECONDS)  # the launcher ends this process as soon as rank 0 has failed


_REPORT_GRACE_SECONDS = 10.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # every rank parsed the same arguments: rank 0 says so
        say_error(f"error: {e}", first=os.environ.get("RANK", "0") == "0")
        return 2
    if args.print_config:
        if os.environ.get("RANK", "0") == "0":
            print(config_yaml(cfg, applicable=True), end="")
        return 0
    from dist_chita.distributed import comm
    from launch import watchdog

    accelerator = None
    try:
        watchdog.handle_signals()
        accelerator = start_processes(cfg)
        watchdog.install(cfg.timeout_seconds, cfg.output.dir)
        return run(cfg, accelerator.device, zero3_partitioner(accelerator, cfg))
    except (ValueError, OSError, MemoryError, RuntimeError, ImportError, watchdog.Terminated) as e:
        if watchdog.should_print(comm.rank(), e):
            say_error(f"error: {watchdog.describe(e)}")
        elif not isinstance(e, watchdog.Terminated) and not watchdog.wait_for_rank0():
            # rank 0 did not fail in turn: the cause may be this rank's alone, so this rank says it
            say_error(f"error (rank {comm.rank()}): {watchdog.describe(e)}")
        return watchdog.exit_status(e)
    finally:
        comm.shutdown()
        watchdog.restore_signals()


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
