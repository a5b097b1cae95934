"""``dist_chita.prune``: prune a model that is already in memory, on one process or many.

    import dist_chita
    report = dist_chita.prune(model, calibration, target=dist_chita.Target(sparsity=0.5))

Inside a script started with ``accelerate launch`` or ``torchrun`` every rank calls it with the same arguments (the
caller creates the process group); the ranks share the work and end with the same pruned model. The YAML recipe
``launch/prune.py`` is built on this function.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from dist_chita import batchnorm, prunable, recipes, report
from dist_chita.distributed import comm
from dist_chita.distributed.partition import sample_ranges
from dist_chita.fisher import driver as fisher_driver
from dist_chita.fisher import groups, losses, ntstore, resume, tuning
from dist_chita.io import data, models, params
from dist_chita.layerwise import allocation, budgets, curvature, geometry
from dist_chita.layerwise import driver as layerwise_driver
from dist_chita.options import Fisher, Layerwise, Target, objective_name, resolve_ridge
from dist_chita.planning import memory
from dist_chita.sparsity import Sparsity, mean_sparsity
from dist_chita.validation import Validation

# the phases of the report's ``phase_seconds`` timed here (every run reports each, 0 when it did not happen)
PHASES = ("allocation", "eval_before", "magnitude_baseline", "fisher", "exchange", "solver", "backsolve",
           "writeback", "batchnorm", "eval_after")
AUTO_VALIDATION = 0.2  # the share of the calibration samples held out when a setting is auto and none is given
Evaluate = Callable[[str], Mapping[str, float]]
Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass
class _Run:
    """What every step of one prune call needs."""

    model: nn.Module
    task: str
    samples: data.Samples
    target: Target
    objective: Layerwise | Fisher
    method: str
    batch_size: int
    modules: list[tuple[str, nn.Module]]
    log: Log
    progress: Progress | None
    fisher_options: Fisher
    reestimate_batchnorm: bool = True
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    validation: Validation | None = None  # the score on the samples held out of the calibration data
    tuning: dict = field(default_factory=dict)  # what was chosen on them, for the report

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def fisher(self) -> bool:
        """Whether the Fisher driver runs (the Fisher objective, and magnitude pruning, which needs no data)."""
        return isinstance(self.objective, Fisher) or self.method == "magnitude"

    def forward(self, batch):
        return models.forward(self.model, self.task, batch)

    def forward_fn(self, model, batch):
        return models.forward(model, self.task, batch)

    def rank_microbatches(self):
        """This rank's calibration micro-batches: its share of one global sequence, longest first (the same
        micro-batches on any number of ranks, so sums over them have the same bits)."""
        return curvature.my_microbatches(
            data.iter_microbatches(self.samples, 0, self.n, self.batch_size, longest_first=True))

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def prune(
    model: nn.Module,
    calibration,
    *,
    target: Target | None = None,
    objective: Layerwise | Fisher | None = None,
    method: str | None = None,
    fisher: Fisher | None = None,
    task: str | None = None,
    batch_size: int = 16,
    evaluate: Evaluate | None = None,
    compare_magnitude: bool = False,
    probe_batches: Sequence[Mapping[str, torch.Tensor]] = (),
    check_memory: bool = True,
    log: Log | None = None,
    progress: Progress | None = None,
    validation=None,
    validation_seed: int = 0,
    reestimate_batchnorm: bool = True,
) -> report.Report:
    """Prune ``model`` in place and return the :class:`~dist_chita.report.Report`. Collective.

    Args:
        model: a Hugging Face or plain torch model in evaluation mode, on its device (every rank the same copy,
            or its DeepSpeed ZeRO-3 partition).
        calibration: the n calibration samples: a :class:`dist_chita.io.data.Samples`, a mapping of tensors with
            first dimension n (e.g. a tokenizer's output: ``input_ids``, ``attention_mask``; or ``pixel_values``,
            ``labels``), or a sequence of such per-sample mappings (:func:`dist_chita.io.data.as_samples`).
        target: which weights and to what sparsity (:class:`~dist_chita.options.Target`; None: its defaults;
            ``granularity`` None: the recipe's without an objective, else ``row``).
        objective: :class:`~dist_chita.options.Layerwise` or :class:`~dist_chita.options.Fisher`, with their
            settings; None: the model family's recipe (:func:`dist_chita.recipes.resolve`, logged with why).
        method: layerwise ``chita``, ``sparsegpt``, ``wanda``, ``magnitude``, ``obd`` (and any method registered
            in :mod:`dist_chita.methods`); Fisher ``chita``, ``chita++``, ``magnitude``; None: the recipe's.
        fisher: the Fisher options of the layerwise method ``obd`` (its ``loss`` and ``seed``) and of a recipe
            that chooses the Fisher objective (None: :class:`~dist_chita.options.Fisher`'s defaults).
        task: how the model's output is used (``causal-lm``, ``sequence-classification``, ``image-classification``,
            ``embedding``); None: inferred (:func:`dist_chita.io.models.infer_task`).
        batch_size: calibration samples per forward/backward pass.
        evaluate: ``evaluate(stage) -> {metric: value}`` called (on every rank) with ``"before"``, ``"magnitude"``
            (with ``compare_magnitude``) and ``"after"``; the values land in ``report.metric``.
        compare_magnitude: also evaluate magnitude pruning at the same targets (the weights are restored after).
        probe_batches: batches whose forward the memory estimate must also hold (e.g. the largest evaluation batch).
        check_memory: refuse with advice (MemoryError) when the estimate exceeds the memory available to the rank.
        log: receives human-readable lines (what was chosen, the memory estimate); progress: ``(phase, done,
            total)``.
        validation: samples held out to choose settings by (:mod:`dist_chita.validation`; the Fisher objective's
            ``auto`` settings): a share in (0, 1) or a count of the calibration samples, drawn with
            ``validation_seed`` and left out of the factor (:func:`dist_chita.io.data.split_validation`), or
            samples of their own (as ``calibration``); None: 0.2 of the calibration samples when a setting is
            ``auto``, else none. Never the evaluation data.
        reestimate_batchnorm: then recompute every BatchNorm layer's running statistics on the calibration samples
            (:mod:`dist_chita.batchnorm`; the metric before: ``after_stale_bn``; the magnitude baseline's too).
    """
    _check_arguments(target, objective, fisher, batch_size)
    task = task or models.infer_task(model)
    log = log or (lambda line: None)
    chosen, target, objective = _resolve(model, task, target or Target(), objective, method, fisher, log)
    method = chosen.method
    with models.eval_mode(model):  # every module's own mode restored at the end
        samples, held = _held_out(data.as_samples(calibration), validation, validation_seed, objective, log)
        sample_ranges(len(samples), comm.world_size())  # n >= number of ranks, before any work
        partitioned = params.any_partitioned(model)
        if partitioned and isinstance(objective, Fisher) and objective.group_size is not None:
            raise ValueError("group_size (layer groups) is not supported with ZeRO-3 partitioning; set it to null")
        run = _Run(model, task, samples, target, objective, method, batch_size,
                   prunable.prunable_modules(model, target.include, target.exclude, target.exclude_head),
                   log, progress, fisher or Fisher(), reestimate_batchnorm)
        _check_groups(run)
        if held is not None:
            run.validation = _validation(run, held, partitioned)
        with run.phase("allocation" if _allocates(run) else "_targets"):
            targets = _targets(run)
        run.seconds.pop("_targets", None)
        estimate = _estimate(run, targets, probe_batches, partitioned, compare_magnitude and evaluate is not None)
        if check_memory:
            _refuse_beyond_memory(run, estimate)
        with run.phase("eval_before"):
            metric = _measure(evaluate, "before")
            if run.validation is not None:
                run.tuning["dense"] = run.validation.score(model)
        if compare_magnitude and evaluate is not None and method != "magnitude":
            with run.phase("magnitude_baseline"):
                metric.update(_magnitude_metric(run, targets, evaluate))
        outcome, restored = _prune(run, targets)
        for k, v in ((k, v) for st in outcome.stages for k, v in st.seconds.items()):
            run.seconds[k] = run.seconds.get(k, 0.0) + v
        renormalised = _renormalise(run, evaluate, metric)
        with run.phase("eval_after"):
            metric.update(_measure(evaluate, "after"))
            if run.validation is not None:
                run.tuning["after"] = run.validation.score(model)
        rep = _report(run, outcome, restored, metric, estimate, partitioned)
        rep.batchnorm_reestimated, rep.recipe = renormalised, chosen.line and chosen.line.strip()
        rep.add_rank_figures(run.seconds, models.device_of(model), params.resident_bytes(model.parameters()))
        return rep


def _held_out(samples: data.Samples, validation, seed: int, objective: Layerwise | Fisher, log: Log | None):
    """(calibration samples, validation samples or None): ``validation`` of :func:`prune`."""
    tuned = objective.tuned if isinstance(objective, Fisher) else ()
    if validation is None and tuned:
        validation = AUTO_VALIDATION
        (log or (lambda line: None))(f"  validation: {AUTO_VALIDATION:.0%} of the calibration samples held out to "
                                     f"choose {', '.join(tuned)}")
    if validation is None:
        return samples, None
    if isinstance(validation, bool):
        raise ValueError(f"validation: expected a share in (0, 1), a count >= 1 or samples of their own, got "
                         f"{validation}")
    if isinstance(validation, int | float):
        calibration, held = data.split_validation(samples, validation, seed)
        if len(calibration) < comm.world_size():
            raise ValueError(f"validation: holding out {len(held)} of the n = {len(samples)} calibration samples "
                             f"leaves {len(calibration)}, fewer than the {comm.world_size()} ranks")
        return calibration, held
    return samples, data.as_samples(validation)


def _validation(run: _Run, held: data.Samples, partitioned: bool) -> Validation:
    """The score on the held-out samples: the loss on their labels (the Fisher loss ``ce`` or ``causal_lm``, a
    causal LM's next tokens, or labels present with ``sampled``), else the distance of the outputs to the dense
    model's (collective: one pass now)."""
    f = run.objective if isinstance(run.objective, Fisher) else run.fisher_options
    causal = f.loss == "causal_lm" or run.task == "causal-lm"
    if causal or f.loss == "ce" or (f.loss == "sampled" and "labels" in held.fields):
        return Validation(held, loss_function("causal_lm" if causal else "ce", run.task, f.seed), run.batch_size,
                          partitioned=partitioned)
    return Validation.output_distance(held, run.forward_fn, run.model, run.batch_size, partitioned)


def _refuse_beyond_memory(run: _Run, estimate: memory.MemoryEstimate) -> None:
    """Log the estimate; MemoryError with advice when it exceeds what a run may use of the memory available to the
    rank (:func:`dist_chita.planning.memory.usable_bytes`)."""
    available = memory.available_bytes(models.device_of(run.model), comm.local_world_size())
    run.log(_estimate_line(run, estimate, available))
    if estimate.total > memory.usable_bytes(available):
        raise MemoryError(memory.advice(estimate, available, run.n, comm.world_size(),
                                        getattr(run.objective, "storage_dtype", "float32")))


def _resolve(model: nn.Module, task: str, target: Target, objective: Layerwise | Fisher | None, method: str | None,
             fisher: Fisher | None, log: Log) -> tuple[recipes.Resolved, Target, Layerwise | Fisher]:
    """The objective, method and granularity the run uses (the model family's recipe for those not given, logged),
    checked: (what was resolved, the target with its granularity, the objective's options)."""
    chosen = recipes.resolve(model, task, objective and objective_name(objective), method, target.granularity)
    if objective is None:
        objective = (fisher or Fisher()) if chosen.objective == "fisher" else Layerwise()
    target = replace(target, granularity=chosen.granularity)
    _check(target, objective, chosen.method)
    if chosen.line is not None:
        log(chosen.line)
    return chosen, target, objective


def _renormalise(run: _Run, evaluate: Evaluate | None, metric: dict) -> int:
    """BatchNorm re-estimation after pruning (:mod:`dist_chita.batchnorm`), when asked and the model has
    BatchNorm, with the metric before it as ``after_stale_bn``: the number of layers re-estimated."""
    if not (run.reestimate_batchnorm and batchnorm.batchnorm_layers(run.model)):
        return 0
    with run.phase("eval_after"):
        metric.update(_measure(evaluate, "after_stale_bn"))
    with run.phase("batchnorm"):
        done = batchnorm.reestimate(run.model, run.forward, run.samples, run.batch_size, run.progress)
    run.log(f"  BatchNorm: running statistics of {done} layers re-estimated on the calibration data")
    return done


def _check_arguments(target, objective, fisher, batch_size) -> None:
    """A one-line ValueError for an argument of :func:`prune` of the wrong kind (before anything else)."""
    kinds = [("target", target, (Target,), "a dist_chita.Target"),
             ("objective", objective, (Layerwise, Fisher), "a dist_chita.Layerwise() or dist_chita.Fisher()"),
             ("fisher", fisher, (Fisher,), "a dist_chita.Fisher()")]
    for name, value, types, what in kinds:
        if value is not None and not isinstance(value, types):
            raise ValueError(f"{name}: expected {what} or None, got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")


def _check(target: Target, objective: Layerwise | Fisher, method: str) -> None:
    """A one-line ValueError for the first problem of the options, before any work."""
    problems = target.problems()  # first: the objective's checks compare the target's values
    problems = problems or (objective.problems(method, target) if isinstance(objective, Fisher)
                            else objective.problems(method))
    if problems:
        raise ValueError(problems[0])


def _check_groups(run: _Run) -> None:
    """N:M groups are M consecutive weights of a row: every pruned layer's rows (its inputs on the layerwise
    objective; a row of the stored weight on the Fisher objective, whose factor holds the weights as stored) must
    hold a whole number of them, else groups would straddle rows; and a weight stored transposed (Conv1D) has no
    N:M groups along its inputs on the Fisher objective."""
    if run.target.nm is None:
        return
    M = run.target.nm_pair[1]
    for name, module in run.modules:
        shape = tuple(params.shape(module.weight))
        d = geometry.input_size(module, shape)  # (the Fisher factor's rows are math.prod(shape[1:]) long)
        if run.fisher and d != math.prod(shape[1:]):
            raise ValueError(f"nm: layer {name!r} stores its weight transposed (transformers' Conv1D), so N:M groups "
                             "of the Fisher objective would run along its outputs; use the layerwise objective or "
                             "leave it out (exclude)")
        if d % M:
            raise ValueError(f"nm: the rows of layer {name!r} hold {d} weights, not a multiple of M = {M}; leave it "
                             "out (exclude) or choose another N:M")


def _targets(run: _Run) -> Sparsity:
    """``target.sparsity``, or one target per layer from ``layer_sparsity`` (patterns) or ``allocation: owl`` (a
    forward pass of the dense model over the calibration data; collective)."""
    t, names = run.target, [name for name, _ in run.modules]
    sizes = [params.numel(m.weight) for _, m in run.modules]
    if t.layer_sparsity:
        try:
            targets = prunable.layer_targets(names, t.sparsity, [(r.pattern, r.sparsity) for r in t.layer_sparsity])
        except ValueError as e:
            raise ValueError(f"layer_sparsity: {e}") from None
        run.log(f"  layer_sparsity: {sum(s != t.sparsity for s in targets)} of {len(names)} layers at their own "
                f"targets, {mean_sparsity(targets, sizes):.4f} over all prunable weights")
        return targets
    if t.allocation == "owl":  # every block's sparsity from the dense model's outliers, before any pruning
        norms = allocation.input_norms(run.modules, run.forward, run.rank_microbatches())
        targets = allocation.owl_layer_targets(run.modules, norms, t.sparsity, t.owl_m, t.owl_lambda)
        run.log(f"  OWL: block sparsities {min(targets):.4f}..{max(targets):.4f} (M {t.owl_m}, lambda "
                f"{t.owl_lambda})")
        return targets
    if _allocates(run):  # layer shares of one budget from the dense layers' reconstruction-error curves
        damp = run.objective.damp if isinstance(run.objective, Layerwise) else Layerwise().damp
        targets = budgets.global_targets(run.model, run.modules, run.forward, run.rank_microbatches, t.sparsity,
                                         damp, run.progress)
        run.log(f"  allocation by reconstruction error: layer sparsities {min(targets):.4f}..{max(targets):.4f}, "
                f"{mean_sparsity(targets, sizes):.4f} over all prunable weights")
        return targets
    return t.sparsity


def _allocates(run: _Run) -> bool:
    """Whether the layers' sparsities come from a pass over the dense model: OWL, or the reconstruction-error
    allocation (``allocation: reconstruction``, and a layerwise run with ``granularity: global``)."""
    t = run.target
    layerwise_global = not run.fisher and t.granularity == "global" and t.nm is None
    return t.allocation in ("owl", "reconstruction") or (layerwise_global and not t.layer_sparsity)


def _estimate(run: _Run, targets: Sparsity, probe_batches, partitioned: bool, compare: bool) -> memory.MemoryEstimate:
    """The memory estimate of this run per rank (:func:`dist_chita.planning.memory.estimate_run`), with the
    activations of the largest calibration and probe forwards measured on one forward each."""
    device = models.device_of(run.model)
    sizes = [params.numel(m.weight) for _, m in run.modules]
    layerwise = not run.fisher
    block_bytes = [0]  # the largest block call of the calibration probe: what a cached block input costs

    def calibration_probe(batch) -> None:
        if layerwise and not partitioned:  # no cached inputs under ZeRO-3
            block_bytes[0] = curvature.block_call_bytes(run.model, run.modules, run.forward, batch)
        else:
            run.forward(batch)
            if partitioned:  # from its second forward on, ZeRO-3 prefetches parameters ahead (its trace of the first)
                run.forward(batch)

    baseline = memory.baseline_bytes(device, params.full_bytes(run.model.parameters()))
    calibration = run.samples.largest_batch(run.batch_size) if run.method != "magnitude" else None
    activations = largest_forward_bytes(run.forward, calibration, probe_batches, device,
                                        grad=not layerwise and not partitioned, calibration_forward=calibration_probe)
    fisher = run.objective if isinstance(run.objective, Fisher) else Fisher()
    return memory.estimate_run(
        objective="magnitude" if run.method == "magnitude" else objective_name(run.objective),
        p=sum(sizes), n=run.n, world_size=comm.world_size(), sizes=sizes,
        model_params=sum(params.numel(x) for x in run.model.parameters()), micro_batch=run.batch_size,
        storage_dtype=fisher.storage_dtype, active_set_factor=fisher.active_set_factor,
        mean_sparsity=mean_sparsity(targets, sizes), group_size=fisher.group_size,
        layerwise_solver=layerwise_driver.memory_bytes(run.modules, run.method) if layerwise else 0,
        cached_block_bytes=block_bytes[0], activations=activations, dense_copy=compare, baseline=baseline)


def largest_forward_bytes(forward: Callable, calibration: Mapping | None, probe_batches: Sequence[Mapping],
                          device: torch.device, grad: bool = False, calibration_forward: Callable | None = None) -> int:
    """Bytes the largest forward pass of a run adds, measured: ``calibration_forward`` (default ``forward``) on the
    largest calibration micro-batch ``calibration`` (None: the run makes no calibration pass), with autograd's
    saved activations if ``grad`` (the Fisher objective's backward follows), and ``forward`` on every probe batch
    (e.g. the largest evaluation batch). One peak over all: memory one probe frees may be kept for the next."""
    probes = [(b, False, forward) for b in probe_batches]
    if calibration is not None:
        probes.insert(0, (calibration, grad, calibration_forward or forward))

    def forwards() -> None:
        for batch, with_grad, fn in probes:
            with torch.set_grad_enabled(with_grad):
                fn(data.to_device(batch, device))

    return memory.peak_growth(forwards, device) if probes else 0


def _estimate_line(run: _Run, est: memory.MemoryEstimate, available: int) -> str:
    p = sum(params.numel(m.weight) for _, m in run.modules)
    return (f"  {len(run.modules)} prunable layers, p = {p:,} weights, n = {run.n} calibration samples; "
            f"memory estimate per rank {est.total / 2**30:.2f} GiB (factor {est.factor / 2**30:.2f} GiB, "
            f"activations {est.activations / 2**30:.2f} GiB), available {available / 2**30:.2f} GiB")


def _measure(evaluate: Evaluate | None, stage: str) -> dict[str, float]:
    """``evaluate(stage)``, its values keyed ``stage`` (the first: the metric itself) or ``stage_<name>`` (its
    companions, e.g. ``after_nn_agreement``); at ``before`` also ``name``, the first value's own name."""
    if evaluate is None:
        return {}
    values = evaluate(stage)
    if not isinstance(values, Mapping):
        raise ValueError(f"evaluate({stage!r}) must return a mapping of metric names to values, got "
                         f"{type(values).__name__}")
    values = dict(values)
    primary = next(iter(values), None)
    out = {stage if name == primary else f"{stage}_{name}": v for name, v in values.items()}
    return {"name": primary, **out} if stage == "before" and primary is not None else out


def _magnitude_metric(run: _Run, targets: Sparsity, evaluate: Evaluate) -> dict[str, float]:
    """The metric of magnitude pruning at the same targets, on the rows the objective prunes, with the BatchNorm
    statistics re-estimated as the run's will be (``magnitude``; before that ``magnitude_stale_bn``); the dense
    weights and statistics are restored after."""
    dense = [params.read(m.weight).clone() for _, m in run.modules]
    statistics = batchnorm.buffers(run.model)
    t = run.target
    try:
        if run.fisher or (t.granularity == "global" and t.nm is None):  # a global budget: global magnitude
            fisher_driver.prune(run.model, run.modules, "magnitude", t.sparsity if not run.fisher else targets,
                                **_budget(t, fisher=True))
        else:
            layerwise_driver.prune_magnitude(run.modules, targets, t.nm_pair, per_layer=_budget(t)["per_layer"])
        values = {}
        if run.reestimate_batchnorm and statistics:
            values = _measure(evaluate, "magnitude_stale_bn")
            batchnorm.reestimate(run.model, run.forward, run.samples, run.batch_size)
        values.update(_measure(evaluate, "magnitude"))
    finally:  # (an evaluate that raises leaves the dense model, not the magnitude-pruned one)
        for (_, m), w in zip(run.modules, dense, strict=True):
            params.write(m.weight, w)
        batchnorm.restore(run.model, statistics)
    return values


def _budget(t: Target, fisher: bool = True) -> dict:
    """The drivers' budget keywords: per row, per layer (the layerwise objective's global budget is per layer once
    the layers' shares are allocated), N:M, or else global (the Fisher objective's)."""
    nm = t.nm_pair
    per_layer = t.granularity == "layer" or (not fisher and t.granularity == "global")
    return {"per_layer": nm is None and per_layer, "per_row": nm is None and t.granularity == "row", "nm": nm}


def _prune(run: _Run, targets: Sparsity) -> tuple[fisher_driver.PruneOutcome, list]:
    """The objective's driver on the model, with the stages an interrupted CHITA++ run completed (restored from
    its checkpoint) first."""
    budget = _budget(run.target, run.fisher)
    if run.fisher:
        return _prune_fisher(run, targets, budget)
    o, f = run.objective, run.fisher_options  # each layer's reconstruction, block by block
    outcome = layerwise_driver.prune_layerwise(
        run.model, run.modules, targets, forward=run.forward, make_batches=run.rank_microbatches,
        nm=budget["nm"], per_layer=budget["per_layer"], damp=o.damp, method=run.method,
        solver_options=dict(max_iter=o.max_iter, tol=o.tol, moves=o.moves), progress=run.progress,
        loss_fn=loss_function(f.loss, run.task, f.seed) if run.method == "obd" else None)
    return outcome, []


def _prune_fisher(run: _Run, targets: Sparsity, budget: dict) -> tuple[fisher_driver.PruneOutcome, list]:
    """The Fisher objective: rank r computes the rows of A for its samples [lo, hi) (whole micro-batches); with
    ``stages``, ``base_sparsity`` or ``first_order_term`` auto, once per candidate schedule
    (:mod:`dist_chita.fisher.tuning`), the one of the lowest validation score kept."""
    f = run.objective if isinstance(run.objective, Fisher) else Fisher()
    lo, hi = sample_ranges(run.n, comm.world_size(), run.batch_size)[comm.rank()]
    p = sum(params.numel(m.weight) for _, m in run.modules)
    search = run.method != "magnitude" and bool(set(f.tuned) - {"lambda"})
    checkpoint, resume_kwargs, restored = _checkpoint(run, f) if not search else (None, {}, [])
    prune_fn = fisher_driver.prune
    if f.group_size is not None:  # one group of layers at a time
        def prune_fn(*a, **kw):
            return groups.prune_in_blocks(*a, block_size=f.group_size, criterion=f.group_criterion, **kw)
    validate = validate_values = None
    if run.validation is not None and run.method != "magnitude":
        def validate():
            return run.validation.score(run.model)

        def validate_values():
            return run.validation.values(run.model).cpu() / run.validation.normaliser
    kwargs = dict(
        make_batches=lambda: data.iter_microbatches(run.samples, lo, hi, run.batch_size),
        loss_fn=loss_function(f.loss, run.task, f.seed), n=run.n, batch_size=run.batch_size,
        **_lambdas(f, run.method), first_order=f.first_order_term,
        stages=f.stages if run.method == "chita++" else 1, base_sparsity=f.base_sparsity, schedule=f.schedule,
        exponent=f.exponent, storage_dtype=models.torch_dtype(f.storage_dtype),
        solver_options=dict(max_iter=f.max_iter, tol=f.tol, active_set_factor=f.active_set_factor,
                            backsolve=f.backsolve, escape_trials=f.escape_trials, pair_swaps=f.pair_swaps,
                            ridge=resolve_ridge(f.ridge, run.n, p)),
        progress=run.progress, validate=validate, lambda_search=f.lambda_search, lambda_walk=f.lambda_walk,
        lambda_rule=f.lambda_rule, validate_values=validate_values, **budget, **resume_kwargs)
    if not search:
        outcome = prune_fn(run.model, run.modules, run.method, targets, **kwargs)
    else:
        def prune_with(c: tuning.Schedule) -> fisher_driver.PruneOutcome:
            return prune_fn(run.model, run.modules, run.method, targets, **{
                **kwargs, "stages": c.stages, "base_sparsity": c.base_sparsity, "first_order": c.first_order_term})

        sizes = [params.numel(m.weight) for _, m in run.modules]
        outcome, chosen, rows = tuning.choose_schedule(
            run.modules, tuning.schedule_candidates(f, targets, sizes), prune_with, validate, run.log,
            values=validate_values, rule=f.schedule_rule)
        run.tuning.update(schedules=rows, schedule=asdict(chosen))
    if checkpoint is not None:
        checkpoint.remove()
    return outcome, restored


def _lambdas(f: Fisher, method: str) -> dict:
    """The driver's lambda keywords: ``lam`` one lambda or (``lambda: auto``) the path to choose along, and
    ``stage_lambdas`` the per-stage list of ``lambda: [...]`` (None otherwise, and for magnitude pruning)."""
    if f.lambda_ == "auto":
        return {"lam": list(f.lambda_path), "stage_lambdas": None}
    if isinstance(f.lambda_, tuple):
        return {"lam": f.lambda_[0], "stage_lambdas": None if method == "magnitude" else f.lambda_}
    return {"lam": f.lambda_, "stage_lambdas": None}


def loss_function(kind: str, task: str, seed: int):
    """The per-sample loss l_i of the Fisher objective (:mod:`dist_chita.fisher.losses`) on the model's task
    output: ``ce``, ``causal_lm``, ``sampled`` or ``gn_probe``."""

    def forward(model, batch):
        return models.forward(model, task, batch)

    if kind == "ce":
        return losses.cross_entropy(forward)
    if kind == "causal_lm":
        return losses.causal_lm(forward)
    if kind == "sampled":
        return losses.sampled_fisher(seed, forward, causal=task == "causal-lm")
    if kind == "gn_probe":
        return losses.gauss_newton_probe(seed, forward)
    raise ValueError(f"unknown loss {kind!r} (ce, causal_lm, sampled, gn_probe)")


def _checkpoint(run: _Run, f: Fisher):
    """CHITA++'s stage checkpoint in ``f.resume_dir`` (:mod:`dist_chita.fisher.resume`): the driver's resume
    arguments and the restored stage reports; (None, {}, []) for other methods or without a directory. Without
    ``f.resume`` an old state is discarded."""
    if run.method != "chita++" or f.resume_dir is None:
        if f.resume:
            run.log(f"  note: resume applies to chita++ stages with a resume_dir; {run.method} starts from the "
                    "beginning")
        return None, {}, []
    checkpoint = resume.StageCheckpoint(f.resume_dir, _fingerprint(run, f))
    saved = checkpoint.load() if f.resume else None
    if not f.resume:
        checkpoint.remove()
    elif saved is None:
        run.log(f"  resume: no saved state in {f.resume_dir}; starting from stage 1")
    else:
        run.log(f"  resume: continuing after stage {saved.stages_done} of {f.stages} from {f.resume_dir}"
                + (f" (saved on {saved.world_size} processes)" if saved.world_size != comm.world_size() else ""))
    kwargs = {"on_stage_end": checkpoint.on_stage_end(saved.reports if saved else ())}
    if f.resume_save_factor:
        kwargs.update(on_factor=checkpoint.save_factor, load_factor=checkpoint.load_factor)
    if saved is not None:
        kwargs.update(start_stage=saved.stages_done, start_weights=saved.weights, start_support=saved.support,
                      start_lambda=saved.reports[-1].get("lam") if saved.reports else None)
    return checkpoint, kwargs, [fisher_driver.StageReport(**r) for r in (saved.reports if saved else [])]


def _fingerprint(run: _Run, f: Fisher) -> dict:
    """What determines a CHITA++ run's result: a saved state made with other settings is refused."""
    from dataclasses import asdict

    solver = {k: v for k, v in asdict(f).items() if not k.startswith("resume")}
    return {"method": run.method, "target": asdict(run.target), "fisher": solver, "n": run.n,
            "batch_size": run.batch_size, "task": run.task, "calibration": run.samples.digest(),
            "layers": [[name, list(shape)] for name, shape in prunable.named_shapes(run.modules)]}


def _report(run: _Run, outcome, restored: list, metric: dict, estimate, partitioned: bool) -> report.Report:
    outcome.stages[:0] = restored
    order = [name for name, _ in run.modules]
    layers = report.layer_table(outcome.masks, order)
    p, kept = sum(row.size for row in layers), sum(row.kept for row in layers)
    device = models.device_of(run.model)
    objective = None if run.method == "magnitude" else objective_name(run.objective)
    fisher = run.objective if isinstance(run.objective, Fisher) else None
    return report.Report(
        world_size=comm.world_size(), threads_per_rank=torch.get_num_threads(), device=device.type,
        backend="gloo" if device.type == "cpu" else "nccl",
        streaming_stores=device.type == "cpu" and ntstore.available(), method=run.method, objective=objective,
        ridge=resolve_ridge(fisher.ridge, run.n, p) if fisher is not None and run.method != "magnitude" else None,
        n=run.n, p=p, model_params=sum(params.numel(x) for x in run.model.parameters()),
        zero_stage=3 if partitioned else None, param_bytes_full=params.full_bytes(run.model.parameters()),
        storage_dtype=(fisher or Fisher()).storage_dtype, global_=report.Totals(p, kept, 1 - kept / p),
        layers=layers, stages=outcome.stages, metric=metric, validation=_validation_report(run, outcome),
        solver_iterations=sum(st.iterations for st in outcome.stages), memory_estimate_bytes=estimate.as_dict(),
        mask_sha256=report.mask_digest(outcome.masks, order))


def _validation_report(run: _Run, outcome) -> dict | None:
    """The report's ``validation``: the held-out samples' score before and after, and what was chosen on them."""
    if run.validation is None:
        return None
    f = run.objective if isinstance(run.objective, Fisher) else None
    return {"n": len(run.validation), "score": run.validation.kind, "dense": run.tuning.get("dense"),
            "after": run.tuning.get("after"), "lambda_auto": f is not None and f.lambda_ == "auto",
            "lambda": [st.lam for st in outcome.stages], "schedules": run.tuning.get("schedules", []),
            "schedule": run.tuning.get("schedule")}
