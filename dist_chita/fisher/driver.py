"""One-shot pruning of a model's prunable layers: magnitude, CHITA, CHITA++.

The orchestration of one run, on every rank, with plain arguments:

1. the prunable weights are flattened into w_bar (p,) and laid out in column
   blocks (:class:`~dist_chita.distributed.layout.ColumnLayout`); rank r holds
   w_bar[start_r:stop_r];
2. for each stage t (one for CHITA, T for CHITA++ along
   :func:`~dist_chita.sparsity.stage_sparsities`):
   a. the rank's column block of the Fisher factor, A_r^T (p_r, n), is built
      from per-sample gradients at the current weights
      (:func:`~dist_chita.fisher.factor.fisher_block`);
   b. the budget for the stage's sparsity is set up (global, per layer or
      N:M), with the weights pruned by earlier stages fixed at zero;
   c. :func:`~dist_chita.fisher.solver.solve` finds the new w_r;
   d. the pruned weights are gathered and written back into every rank's copy
      of the model (O(p) once per stage; the solver itself never gathers w);
      under DeepSpeed ZeRO-3 into the partitioned parameters, one layer at a
      time (:mod:`dist_chita.io.params`);
3. a report of what happened is returned.

Magnitude pruning needs no Fisher factor: it keeps the largest |w_bar|.
Nothing here parses a config, prints, or writes files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.distributed.layout import ColumnLayout
from dist_chita.distributed.partition import sample_ranges
from dist_chita.fisher.backsolve import GramCache
from dist_chita.fisher.backsolve import backsolve as ridge_backsolve
from dist_chita.fisher.budget import Budget
from dist_chita.fisher.factor import fisher_block
from dist_chita.fisher.solver import MAX_ITER, solve, target
from dist_chita.io import params
from dist_chita.prunable import named_shapes
from dist_chita.sparsity import (
    Sparsity,
    kept_count,
    layer_sparsities,
    mean_sparsity,
    stage_sparsities,
    stage_targets,
)
from dist_chita.validation import RULES as LAMBDA_RULES
from dist_chita.validation import within_one_se

METHODS = ("magnitude", "chita", "chita++")
LAMBDA_SEARCHES = ("warm_start", "solve")


@dataclass
class StageReport:
    """What one stage did (objective values are of the stage's quadratic model)."""

    sparsity: float
    kept: int
    objective_trace: list[float] = field(default_factory=list)
    iterations: int = 0
    backsolves: int = 0
    backsolve_work: dict[str, int] = field(default_factory=dict)  # what the backsolves ran (GramCache.work)
    objective: float | None = None
    magnitude_objective: float | None = None
    plain_magnitude_objective: float | None = None  # f of the magnitude support without its back-solve
    ridge_floor: float | None = None  # lambda/2 ||w_bar - H(w_bar)||^2: no solution of the stage has a lower f
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    lam: float | None = None  # the ridge lambda of the stage's solve
    validation: float | None = None  # the validation score after the stage (with validation samples)
    lambda_path: list[float] = field(default_factory=list)  # lambda auto: the lambdas tried, in order,
    validation_path: list[float] = field(default_factory=list)  # and the validation score of each


@dataclass
class PruneOutcome:
    layout: ColumnLayout
    stages: list[StageReport]
    masks: dict[str, torch.Tensor]  # layer name -> bool mask of kept weights, full shape


def local_weights(
    modules: Sequence[tuple[str, nn.Module]], layout: ColumnLayout, rank: int, check_finite: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """This rank's slice w[start_r:stop_r] of the flattened prunable weights, float32 (p_r,), on ``device``.

    Partitioned (ZeRO-3) weights are gathered one layer at a time, every layer on every rank (collective).
    ``check_finite``: raise ValueError naming the first layer whose weights contain NaN or Inf."""
    lo, hi = layout.block(rank)
    out = torch.empty(hi - lo, dtype=torch.float32, device=device)
    pieces = {piece.segment: piece for piece in layout.pieces(rank)}
    for g, (name, m) in enumerate(modules):
        if g not in pieces and not check_finite and not params.is_partitioned(m.weight):
            continue
        full = params.read(m.weight)
        if check_finite and not bool(torch.isfinite(full).all()):
            raise ValueError(f"the weights of layer {name!r} contain NaN or Inf")
        piece = pieces.get(g)
        if piece is not None:
            out[piece.local_start : piece.local_stop] = full.reshape(-1)[piece.offset : piece.offset + piece.size]
    return out


def gather_weights(w_local: torch.Tensor, layout: ColumnLayout) -> torch.Tensor:
    """All ranks' slices concatenated into the full w (p,), on every rank."""
    sizes = [hi - lo for lo, hi in layout.blocks]
    if len(sizes) == 1:
        return w_local
    padded = torch.zeros(max(sizes), dtype=w_local.dtype, device=w_local.device)
    padded[: w_local.numel()] = w_local
    parts = comm.all_gather(padded)
    return torch.cat([part[:s] for part, s in zip(parts, sizes, strict=True)])


def write_weights(modules: Sequence[tuple[str, nn.Module]], layout: ColumnLayout, w: torch.Tensor) -> None:
    """Copy the full flattened w (p,) into the modules' weights (the same w on every rank; one layer at a time,
    collective for partitioned weights)."""
    for (_, m), seg in zip(modules, layout.segments, strict=True):
        params.write(m.weight, w[seg.start : seg.stop].reshape(seg.shape))


def _solver_progress(progress: Callable, name: str, options: dict | None) -> Callable[[dict], None]:
    cap = (options or {}).get("max_iter", MAX_ITER)
    return lambda info: progress(name, min(info["iteration"], cap), cap)


def make_budget(
    layout: ColumnLayout,
    rank: int,
    sparsity: Sparsity,
    allowed: torch.Tensor,
    per_layer: bool = False,
    nm: tuple[int, int] | None = None,
    per_row: bool = False,
) -> Budget:
    """The stage's constraint on this rank: N:M, one budget per layer, one per row (``per_row``: every row of a
    layer keeps (1 - s) of its weights; ``layout`` must be cut at rows), or one global budget k = (1 - s) p.
    With one budget per layer or per row, ``sparsity`` may give every layer (segment of ``layout``) its own s."""
    lo, hi = layout.block(rank)
    if nm is not None:
        return Budget.n_m(hi - lo, nm[0], nm[1], allowed=allowed)
    if not isinstance(sparsity, int | float) and not (per_row or per_layer):
        raise ValueError("per-layer sparsities need per_layer or per_row budgets (a global budget has one)")
    targets = layer_sparsities(sparsity, len(layout.segments))
    if per_row:
        runs = []
        for piece in layout.pieces(rank):
            length = layout.segments[piece.segment].row_length
            if piece.offset % length or piece.size % length:
                raise ValueError("per-row budgets need column blocks cut at rows (ColumnLayout.build(rows=True))")
            runs.append((piece.size // length, length, kept_count(length, targets[piece.segment])))
        return Budget.per_row(runs, allowed=allowed)
    if per_layer:
        seg = torch.empty(hi - lo, dtype=torch.int64, device=allowed.device)
        for piece in layout.pieces(rank):
            seg[piece.local_start : piece.local_stop] = piece.segment
        k = torch.tensor([kept_count(sg.size, s) for sg, s in zip(layout.segments, targets, strict=True)],
                         dtype=torch.int64, device=seg.device)
        return Budget.per_segment(seg, k, allowed=allowed)
    return Budget.global_topk(hi - lo, kept_count(layout.p, sparsity), allowed=allowed)


def prune(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    method: str,
    sparsity: Sparsity,
    *,
    make_batches: Callable[[], Iterable] | None = None,
    loss_fn: Callable | None = None,
    n: int = 0,
    batch_size: int = 1,
    per_layer: bool = False,
    nm: tuple[int, int] | None = None,
    per_row: bool = False,
    lam: float | Sequence[float] = 1e-3,
    first_order: bool = False,
    stages: int = 1,
    base_sparsity: float = 0.0,
    schedule: str = "polynomial",
    exponent: float = 3.0,
    storage_dtype: torch.dtype = torch.float32,
    solver_options: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    start_stage: int = 0,
    start_weights: torch.Tensor | None = None,
    start_support: torch.Tensor | None = None,
    on_stage_end: Callable[[int, torch.Tensor, torch.Tensor, StageReport], None] | None = None,
    load_factor: Callable[[int], torch.Tensor | None] | None = None,
    on_factor: Callable[[int, torch.Tensor], None] | None = None,
    validate: Callable[[], float] | None = None,
    lambda_search: str = "warm_start",
    lambda_walk: bool = False,
    start_lambda: float | None = None,
    lambda_rule: str = "min",
    validate_values: Callable[[], torch.Tensor] | None = None,
    stage_lambdas: Sequence[float] | None = None,
) -> PruneOutcome:
    """Prune ``modules`` of ``model`` in place, on every rank; returns the layout, stage reports and masks.

    Args:
        model: the model; every rank holds the same copy (evaluation mode), or its ZeRO-3 partition
            (:mod:`dist_chita.io.params`).
        modules: ordered (name, module) prunable layers (:mod:`dist_chita.prunable`).
        method: "magnitude", "chita" or "chita++".
        sparsity: target fraction of zeros in [0, 1) (global, or per layer with
            ``per_layer``, or in every row of every layer with ``per_row``: the weights of one output, ``weight[i]``,
            the comparison group of Wanda and of SparseGPT's unstructured mode); ignored for N:M (``nm`` = (N, M)).
            With ``per_layer`` or ``per_row`` also one target per module (a sequence as long as ``modules``);
            CHITA++ then takes every layer along its own schedule (:func:`~dist_chita.sparsity.stage_targets`).
        make_batches: returns a fresh iterable of this rank's calibration
            micro-batches ``(batch, global_indices)``; rank r owns samples
            ``sample_ranges(n, R, batch_size)[r]``.
        loss_fn: per-sample loss ``loss_fn(model, batch, indices) -> (b,)``.
        n: number of calibration samples over all ranks.
        batch_size: the micro-batch size the samples are split over the ranks by
            (:func:`~dist_chita.distributed.partition.sample_ranges`).
        lam: ridge lambda of the quadratic model; a sequence of lambdas (a path, needs ``validate``): every stage
            is solved for each in turn, warm-started from the previous one's support, and the solution of the
            lowest validation score is kept.
        first_order: include the mean-gradient term (y = A w_bar - 1/sqrt(n)).
        stages, base_sparsity, schedule, exponent: CHITA++'s stages
            (:func:`~dist_chita.sparsity.stage_sparsities`).
        storage_dtype: dtype of the stored factor (arithmetic is float32).
        solver_options: keyword arguments for :func:`~dist_chita.fisher.solver.solve`.
        progress: ``progress(phase, done, total)`` callback.
        start_stage, start_weights, start_support: resume (:mod:`dist_chita.fisher.resume`) after ``start_stage``
            complete stages, from their full weights w (p,) and support S (p,) bool; only the later stages
            run and are reported.
        on_stage_end: ``on_stage_end(t, w_local (p_r,), support_local (p_r,) bool, report)`` after stage t
            (0-based), on every rank (collectives allowed).
        load_factor, on_factor: ``load_factor(t)`` returns stage t's saved A_r^T (p_r, n) or None (then it is
            computed); ``on_factor(t, At)`` is called after a computed one (collective calls, every rank).
        validate: ``validate() -> float``, the validation score of the model as it is (lower is better;
            collective, the same on every rank, :class:`dist_chita.validation.Validation`): chooses along a
            lambda path, and every stage reports its own.
        lambda_search: how a lambda path is judged: ``warm_start`` (each lambda at the solver's back-solved warm
            start, then the chosen one solved in full) or ``solve`` (each lambda solved in full).
        lambda_walk: along a lambda path, every stage after the first judges only the lambdas of a walk from the
            previous stage's choice (:func:`_walk`) instead of the whole path; ``start_lambda``: the choice of the
            stage before ``start_stage`` on resume (None: the first stage computed judges the whole path).
        lambda_rule, validate_values: which judged lambda is kept (:func:`pick_lambda`): ``min`` (the lowest
            score) or ``one_se`` (needs ``validate_values() -> (m,)``, the per-sample values whose mean is the
            score; collective, the same on every rank).
        stage_lambdas: one ridge lambda per stage (as many as the stages, CHITA++'s schedule included), each
            stage solved with its own and no lambda judged; ``lam`` is then unused. Re-runs the lambdas a path chose
            (a :class:`StageReport`'s ``lam``) without their search.
    """
    sparsity, uniform = _checked_sparsity(method, sparsity, per_layer, nm, per_row, len(modules))
    _check_lambda_choice(lam, validate, lambda_search, lambda_rule, validate_values)
    world, rank = comm.world_size(), comm.rank()
    layout = ColumnLayout.build(named_shapes(modules), world, align=nm[1] if nm else 1, rows=per_row)
    device = modules[0][1].weight.device  # the factor's, so w, the budget and the solve live there too
    w, allowed = _starting_weights(modules, layout, rank, device, start_weights, start_support)
    targets = _stage_targets(method, sparsity, uniform, nm, stages, base_sparsity, schedule, exponent)
    lam = lam if stage_lambdas is None else _checked_stage_lambdas(stage_lambdas, len(targets))
    if method != "magnitude":
        if make_batches is None or loss_fn is None or n < 1:
            raise ValueError(f"method {method} needs calibration batches, a loss and n >= 1")
        sample_ranges(n, world)  # fails early when n < world size
    run = _Run(model, modules, method, layout, rank, world, device, uniform, per_layer, nm, per_row, len(targets),
               make_batches, loss_fn, n, batch_size, lam, first_order, storage_dtype, solver_options, progress,
               load_factor, on_factor, validate, lambda_search, lambda_walk, lambda_rule, validate_values,
               stage_lambdas is not None)
    reports = _run_stages(run, targets, start_stage, w, allowed, on_stage_end, start_lambda)
    masks = {name: params.read(m.weight) != 0 for name, m in modules}
    return PruneOutcome(layout, reports, masks)


@dataclass
class _Run:
    """The fixed inputs of one :func:`prune` that every stage reads (its plain arguments, resolved once)."""

    model: nn.Module
    modules: Sequence[tuple[str, nn.Module]]
    method: str
    layout: ColumnLayout
    rank: int
    world: int
    device: torch.device
    uniform: bool  # one sparsity for all layers (else a per-layer list)
    per_layer: bool
    nm: tuple[int, int] | None
    per_row: bool
    stages: int
    make_batches: Callable[[], Iterable] | None
    loss_fn: Callable | None
    n: int
    batch_size: int
    lam: float | Sequence[float]  # one lambda, or the path lambda auto chooses along
    first_order: bool
    storage_dtype: torch.dtype
    solver_options: dict | None
    progress: Callable[[str, int, int], None] | None
    load_factor: Callable[[int], torch.Tensor | None] | None
    on_factor: Callable[[int, torch.Tensor], None] | None
    validate: Callable[[], float] | None
    lambda_search: str
    lambda_walk: bool
    lambda_rule: str
    validate_values: Callable[[], torch.Tensor] | None
    per_stage: bool = False  # ``lam`` holds one lambda per stage (else one lambda, or a path)


def _check_lambda_choice(lam, validate, lambda_search: str, lambda_rule: str, validate_values) -> None:
    """ValueError unless a lambda path comes with a validation score and the search and rule are known."""
    if not isinstance(lam, int | float) and (validate is None or not lam):
        raise ValueError("a lambda path needs validation samples to choose by (validate) and at least one lambda")
    if lambda_rule not in LAMBDA_RULES or (lambda_rule == "one_se" and validate_values is None):
        raise ValueError(f"lambda_rule must be min or one_se (with validate_values), got {lambda_rule!r}")
    if lambda_search not in LAMBDA_SEARCHES:
        raise ValueError(f"unknown lambda_search {lambda_search!r} (one of {', '.join(LAMBDA_SEARCHES)})")


def _checked_stage_lambdas(stage_lambdas: Sequence[float], stages: int) -> list[float]:
    """``stage_lambdas`` as floats, after checking there is one finite lambda >= 0 per stage."""
    if len(stage_lambdas) != stages or not all(x >= 0.0 and math.isfinite(x) for x in stage_lambdas):
        raise ValueError(f"stage_lambdas: expected {stages} lambdas >= 0 (one per stage), got {list(stage_lambdas)}")
    return [float(x) for x in stage_lambdas]


def _checked_sparsity(method: str, sparsity: Sparsity, per_layer: bool, nm, per_row: bool, layers: int):
    """(sparsity, uniform) after the argument checks: one float, or one per layer (``uniform`` False)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    uniform = isinstance(sparsity, int | float)
    if nm is None and uniform and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if sum((per_layer, per_row, nm is not None)) > 1:
        raise ValueError("choose at most one of per_layer, per_row and nm")
    if not uniform:  # checked again, with the budget kind, by make_budget before any stage's work
        sparsity = layer_sparsities(sparsity, layers)
    return sparsity, uniform


def _starting_weights(modules, layout: ColumnLayout, rank: int, device, start_weights, start_support):
    """(w (p_r,) float32, allowed (p_r,) bool) this rank starts from: the model's weights (checked for NaN/Inf; those
    already zero stay zero), or on resume the state after the completed stages (written into the model too)."""
    w = local_weights(modules, layout, rank, check_finite=True, device=device)
    allowed = w != 0  # weights already zero stay zero
    if start_weights is not None:  # resume: the state after stage start_stage
        write_weights(modules, layout, start_weights)
        lo, hi = layout.block(rank)
        w = start_weights[lo:hi].to(device, torch.float32, copy=True)
        allowed = start_support[lo:hi].to(device, copy=True)
    return w, allowed


def _stage_targets(method, sparsity, uniform, nm, stages, base_sparsity, schedule, exponent) -> list:
    """The sparsity of every stage: one for magnitude and CHITA, CHITA++'s schedule (per layer when not
    ``uniform``); 0 for N:M (the budget is N:M itself)."""
    targets = [sparsity]
    if method == "chita++":
        targets = (stage_sparsities(sparsity, stages, base_sparsity, schedule, exponent) if uniform
                   else stage_targets(sparsity, stages, base_sparsity, schedule, exponent))
    if nm is not None:
        targets = [0.0] * len(targets)
    return targets


def _run_stages(run: _Run, targets: list, start_stage: int, w: torch.Tensor, allowed: torch.Tensor,
                on_stage_end, start_lambda: float | None = None) -> list[StageReport]:
    """The stages from ``start_stage`` on, each from the previous one's weights, support and (``lambda_walk``)
    chosen lambda; their reports."""
    reports = []
    lam = start_lambda
    spare = None  # the previous stage's factor storage, reused by the next stage's fisher_block (a saved factor is
    # only ever loaded for the first stage a resumed run computes, when there is no spare: no two blocks coexist)
    for t, s in enumerate(targets):
        if t < start_stage:
            continue
        w, support, report, spare = _stage(run, t, s, w, allowed, spare, lam)
        allowed, lam = support.clone(), report.lam
        reports.append(report)
        if on_stage_end is not None:
            on_stage_end(t, w, support, report)
    return reports


def _stage(run: _Run, t: int, s, w: torch.Tensor, allowed: torch.Tensor, spare: torch.Tensor | None,
           previous_lam: float | None = None):
    """Stage t at sparsity ``s`` from this rank's w (p_r,) with the columns ``allowed``: the budget, magnitude
    pruning or the CHITA solve (a lambda walk starts at ``previous_lam``), and the write-back of the pruned weights
    into every rank's model. Returns (w, support, report, the factor storage the next stage may reuse)."""
    bytes_before = comm.bytes_by_phase()
    seconds: dict[str, float] = {}
    budget = make_budget(run.layout, run.rank, s, allowed, per_layer=run.per_layer, nm=run.nm, per_row=run.per_row)
    sizes = [sg.size for sg in run.layout.segments]
    report = StageReport(sparsity=(s if run.uniform else mean_sparsity(s, sizes))
                         if run.nm is None else 1.0 - run.nm[0] / run.nm[1], kept=budget.total())
    if run.method == "magnitude":
        start = time.perf_counter()
        support = budget.project(w)
        w = torch.where(support, w, torch.zeros_like(w))
        seconds["magnitude"] = time.perf_counter() - start
    else:
        w, support, spare = _solve_stage(run, t, w, budget, report, seconds, spare, previous_lam)
    start = time.perf_counter()
    with comm.phase("writeback"):
        write_weights(run.modules, run.layout, gather_weights(w, run.layout))
    seconds["writeback"] = time.perf_counter() - start
    if run.validate is not None:
        report.validation = run.validate()
    report.seconds = seconds
    report.bytes_sent = {k: v - bytes_before.get(k, 0) for k, v in comm.bytes_by_phase().items()}
    return w, support, report, spare


def _stage_factor(run: _Run, t: int, seconds: dict[str, float], spare: torch.Tensor | None):
    """(At (p_r, n), loaded): stage t's factor block, saved before a stop (``load_factor``) or computed by
    :func:`fisher_block` into ``spare`` when given; a computed one is handed to ``on_factor``."""
    stats: dict = {}
    At = None if run.load_factor is None else run.load_factor(t)  # resume: the factor saved before the stop
    loaded = At is not None
    progress = None if run.progress is None else (lambda d, tot: run.progress(f"gradients {t + 1}", d, tot))
    At = At.to(run.device) if loaded else fisher_block(
        run.model, run.modules, run.layout, run.make_batches(),
        sample_ranges(run.n, run.world, run.batch_size)[run.rank][0], run.n, run.loss_fn, dtype=run.storage_dtype,
        progress=progress, stats=stats, out=spare, batch_size=run.batch_size,
    )
    if run.on_factor is not None and stats:
        run.on_factor(t, At)
    seconds["fisher"] = stats.get("seconds", 0.0)
    seconds["exchange"] = stats.get("exchange_seconds", 0.0)
    return At, loaded


def _solve_stage(run: _Run, t: int, w: torch.Tensor, budget: Budget, report: StageReport, seconds, spare,
                 previous_lam: float | None = None):
    """CHITA on stage t: the factor, then :func:`~dist_chita.fisher.solver.solve` (which may overwrite At: it is not
    used after the solve; along a lambda path it is kept). Fills ``report`` and ``seconds``; returns (w, support,
    At's storage for the next stage)."""
    At, loaded = _stage_factor(run, t, seconds, spare)
    solver_progress = run.progress and _solver_progress(run.progress, f"solver {t + 1}", run.solver_options)
    lam = run.lam[t] if run.per_stage else run.lam
    if isinstance(lam, int | float):
        cache = GramCache()
        result = solve(At, w, float(lam), budget, first_order=run.first_order, progress=solver_progress,
                       overwrite_at=True, check_at=loaded,  # fisher_block checked every entry of a computed At
                       **{**(run.solver_options or {}), "gram_cache": cache})
        report.lam = float(lam)
        report.backsolve_work = dict(cache.work)
    else:
        start = previous_lam if run.lambda_walk else None
        result = _solve_path(run, At, w, budget, report, loaded, solver_progress, start)
    spare = At if t + 1 < run.stages and At.is_contiguous() else None  # contents spent (overwritten), pages not
    seconds["solver"] = result.timings.get("iht", 0.0)
    seconds["backsolve"] = result.timings.get("backsolve", 0.0)
    report.objective_trace = [float(f) for f in result.objective_trace]
    report.iterations = int(result.iterations)
    report.backsolves = int(result.backsolves)
    report.objective = float(result.objective)
    if result.magnitude_objective is not None:
        report.magnitude_objective = float(result.magnitude_objective)
    report.plain_magnitude_objective = float(result.plain_magnitude_objective)
    report.ridge_floor = float(result.ridge_floor)
    return result.w.float(), result.support, spare


def _walk(path: Sequence[float], start: float | None, judge: Callable[[int], float]) -> None:
    """Judge lambdas of ``path`` by index (``judge(i)`` scores path[i]; lower is better): all of them in order when
    ``start`` is None; else a walk from the lambda of the path nearest ``start`` (in log scale): towards smaller
    lambdas while the score falls, and when the first step there does not lower it, towards larger ones while it
    falls (a local minimum of the score along the path; at least two lambdas judged, at most all)."""
    if start is None:
        for i in range(len(path)):
            judge(i)
        return
    i0 = min(range(len(path)), key=lambda i: abs(math.log((path[i] + 1e-300) / (start + 1e-300))))
    best = judge(i0)
    for step in (-1, 1):
        moved, i = False, i0 + step
        while 0 <= i < len(path):
            value = judge(i)
            if not value < best:
                break
            best, moved, i = value, True, i + step
        if moved:
            return


def _solve_path(run: _Run, At: torch.Tensor, w: torch.Tensor, budget: Budget, report: StageReport, loaded: bool,
                solver_progress, start: float | None = None):
    """Lambda auto: the stage's solution for the lambdas of ``run.lam`` that :func:`_walk` judges (all of them when
    ``start`` is None, else a walk from ``start``), each written into the model and scored by ``run.validate``;
    returns the :class:`~dist_chita.fisher.solver.SolveResult` of the lambda ``run.lambda_rule`` picks
    (:func:`pick_lambda`) and records the path in ``report``. With ``run.lambda_search`` ``warm_start`` each lambda
    is scored at the solver's back-solved warm start (one back-solve each, the Gram matrix shared) and only the
    chosen lambda is solved in full; with ``solve`` each is solved (At kept intact, each solve also starting from
    the previously judged lambda's support when that is better). Iterations and seconds in the result are the whole
    path's."""
    options = run.solver_options or {}
    proxy = run.lambda_search == "warm_start"
    cache = GramCache()
    # y = A w_bar is the same for every lambda: formed once (the solver forms it in z = D^1/2 w for the Fisher-diagonal
    # ridge, so there each solve forms its own)
    y = None if options.get("ridge", "identity") != "identity" else target(
        At, w.to(At.device, torch.float32), None, run.first_order)
    judged: list[tuple[float, float, torch.Tensor | None, object]] = []  # (lambda, score, per-sample values, result)
    totals = {"iterations": 0, "backsolves": 0, "timings": {}}
    caches = [cache]  # every GramCache the path's backsolves ran through (their work is reported)
    warm = _MagnitudeStart(At, w, budget, y, cache) if proxy and y is not None and not loaded else None

    def judge(i: int) -> float:
        lam, support = float(run.lam[i]), judged[-1][3].support if judged else None
        if warm is not None:  # the warm start directly: magnitude pruning's support, back-solved
            result = warm.solve(lam)
        else:
            if not proxy:
                caches.append(GramCache())  # each lambda's own solve, as solve() would make it
            kw = ({**options, "max_iter": 0, "escape_trials": 0, "rounds": 1, "gram_cache": cache} if proxy else
                  {**options, "start_support": support, "gram_cache": caches[-1]})
            result = solve(At, w, lam, budget, y, first_order=run.first_order, progress=None if proxy else
                           solver_progress, overwrite_at=False, check_at=loaded and support is None, **kw)
        totals["iterations"] += result.iterations
        totals["backsolves"] += result.backsolves
        totals["timings"] = {k: totals["timings"].get(k, 0.0) + v for k, v in result.timings.items()}
        with comm.phase("writeback"):
            write_weights(run.modules, run.layout, gather_weights(result.w.float(), run.layout))
        values = run.validate_values() if run.lambda_rule == "one_se" else None
        score = float(values.sum()) / len(values) if values is not None else run.validate()
        report.lambda_path.append(lam)
        report.validation_path.append(score)
        judged.append((lam, score, values, result))
        return score

    _walk(run.lam, start, judge)
    chosen = pick_lambda([j[0] for j in judged], [j[1] for j in judged], [j[2] for j in judged], run.lambda_rule)
    report.lam, best = judged[chosen][0], judged[chosen][3]
    if proxy:  # the chosen lambda solved in full (At is not needed after); its warm start's back-solve is recalled
        # from the cache when At is not compacted (no column fixed at zero on this rank)
        best = solve(At, w, report.lam, budget, y, first_order=run.first_order, progress=solver_progress,
                     overwrite_at=True, check_at=False, **{**options, "gram_cache": cache})
    best.iterations, best.backsolves = totals["iterations"] + best.iterations, totals["backsolves"] + best.backsolves
    best.timings = {k: totals["timings"].get(k, 0.0) + v for k, v in best.timings.items()}
    report.backsolve_work = {k: sum(c.work[k] for c in caches) for k in cache.work}
    return best


class _MagnitudeStart:
    """The solver's back-solved warm start for any lambda, as a lambda path judges it (identity ridge): the support
    S_0 = H(w_bar) of magnitude pruning (the same for every lambda) and the exact ridge solution on it
    (:func:`~dist_chita.fisher.backsolve.backsolve`, the Gram matrix and gathered rows shared through ``cache``),
    without the solver's objective evaluations (the back-solve is the exact minimiser on S_0, so its objective is
    never above that of magnitude pruning, which the solver would otherwise keep). Collective."""

    def __init__(self, At: torch.Tensor, w: torch.Tensor, budget: Budget, y: torch.Tensor, cache: GramCache):
        self.At, self.y, self.cache = At, y, cache
        self.w_bar = w.to(At.device, torch.float32)
        with comm.phase("solver"):  # (the solver's phase of the bytes sent: the projection's)
            self.support = budget.to(At.device).magnitude_support(self.w_bar)
        self.w0 = torch.where(self.support, self.w_bar, torch.zeros_like(self.w_bar))

    def solve(self, lam: float) -> SimpleNamespace:
        """(w (p_r,), support, iterations 0, backsolves 1, timings) of the warm start for ``lam``."""
        start = time.perf_counter()
        w = ridge_backsolve(self.At, self.w_bar, lam, self.support, self.y, w0=self.w0, cache=self.cache)
        return SimpleNamespace(w=w, support=self.support, iterations=0, backsolves=1,
                               timings={"backsolve": time.perf_counter() - start})


def pick_lambda(lams: Sequence[float], scores: Sequence[float], values: Sequence[torch.Tensor | None],
                rule: str = "min") -> int:
    """The index of the lambda kept among those judged: ``min`` the lowest validation score (the first on a tie);
    ``one_se`` the largest lambda whose score is within one standard error of the lowest one's
    (:func:`dist_chita.validation.within_one_se`, the one-standard-error rule: among candidates the validation
    samples cannot tell apart, the most regularised, i.e. the nearest to the dense weights)."""
    if rule not in LAMBDA_RULES:
        raise ValueError(f"unknown lambda rule {rule!r} (one of {', '.join(LAMBDA_RULES)})")
    if rule == "min":
        return min(range(len(scores)), key=scores.__getitem__)
    return max(within_one_se(values), key=lambda i: (lams[i], -i))
