"""The layerwise objective over a whole model: blocks pruned in order, each layer by a per-layer method.

On every rank, :func:`prune_layerwise`:

1. takes the blocks of prunable layers in model order (:func:`~dist_chita.layerwise.curvature.blocks_in_order`)
   and, when the method needs it, each block's curvature H = X^T X / N per layer on the inputs of the already
   pruned model (:func:`~dist_chita.layerwise.curvature.block_curvatures`: every rank's share of the calibration
   micro-batches, one all-reduce of every H, the same bits on any number of ranks); when the method needs the
   Fisher diagonal of the loss, that once on the dense model first;
2. hands each layer to the method (:mod:`dist_chita.methods`) as a
   :class:`~dist_chita.methods.base.LayerProblem`: its rows (:func:`~dist_chita.layerwise.geometry.weight_rows`),
   the H and ridge of each part, its budget, and this rank's rows: whole chunks of ``row_chunk`` rows of every part
   shared among the ranks in order (each chunk solved alone, so its bits do not depend on the number of ranks; a
   chunk never mixes groups of a grouped Conv2d), or whole parts when the method assigns them
   (:meth:`~dist_chita.methods.base.LayerMethod.owners`);
3. once the block's layers are solved, all-reduces every layer's (r, d) rows (zeros off this rank's rows, so the
   sum is exact) and its objective, and writes the pruned layer back (under ZeRO-3 into the partition).

No per-sample gradients and no Fisher factor: peak memory is the model plus one block's H matrices, one layer's
solve and the block's pruned layers (:func:`memory_bytes`). Nothing here parses a config or prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.distributed.layout import ColumnLayout
from dist_chita.fisher.driver import PruneOutcome, StageReport
from dist_chita.fisher.groups import diagonal_fisher
from dist_chita.io import params
from dist_chita.layerwise.curvature import block_curvatures, blocks_in_order
from dist_chita.layerwise.geometry import check_zero_padding, from_rows, groups, input_size, weight_rows
from dist_chita.layerwise.row_solver import chunk_rows
from dist_chita.methods.base import LayerMethod, LayerProblem, LayerResult, resolve_method
from dist_chita.methods.magnitude import Magnitude
from dist_chita.prunable import named_shapes
from dist_chita.sparsity import Sparsity, layer_sparsities, mean_sparsity

__all__ = ["fisher_rows", "memory_bytes", "prune_layerwise", "prune_magnitude"]


@dataclass(frozen=True)
class _Job:
    """What :func:`prune_layerwise` was asked, as every layer needs it. ``fisher``: F_jj of every layer in its rows'
    layout, when the method asks for it."""

    modules: Sequence[tuple[str, nn.Module]]
    method: LayerMethod
    targets: list[float]
    nm: tuple[int, int] | None
    per_layer: bool
    damp: float
    options: dict
    row_chunk: int | None
    fisher: list[torch.Tensor] | None


@dataclass
class _Tally:
    """The run's report, summed layer after layer; ``has``: whether any rank's method gave an objective, a
    magnitude objective, a warm objective."""

    report: StageReport
    bytes_before: dict[str, int]
    seconds: dict[str, float] = field(default_factory=lambda: {"curvature": 0.0, "solver": 0.0, "writeback": 0.0})
    warm: float = 0.0
    done: int = 0
    has: list[bool] = field(default_factory=lambda: [False, False, False])

    def add(self, W: torch.Tensor, totals: torch.Tensor) -> None:
        """A written layer: its rows W (r, d) and its all-reduced :func:`_objective_vector`."""
        self.report.objective += float(totals[0])
        self.report.magnitude_objective += float(totals[1])
        self.warm += float(totals[2])
        self.has = [h or bool(v > 0) for h, v in zip(self.has, totals[3:].tolist(), strict=True)]
        self.report.kept += int((W != 0).sum())
        self.done += 1


def prune_layerwise(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    sparsity: Sparsity,
    *,
    forward: Callable[[object], object],
    make_batches: Callable[[], Iterable],
    nm: tuple[int, int] | None = None,
    per_layer: bool = False,
    damp: float = 0.01,
    solver_options: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    row_chunk: int | None = None,
    cache_inputs: bool = True,
    method: str | LayerMethod = "chita",
    loss_fn: Callable | None = None,
) -> PruneOutcome:
    """Prune ``modules`` of ``model`` in place with a per-layer method (module docstring), every output row to
    ``sparsity`` (or N:M with ``nm``); with ``per_layer`` every layer to ``sparsity``, its budget shared among its
    rows by the method's saliency (CHITA: the OBS saliency). ``sparsity`` may also give every module its own target
    (a sequence as long as ``modules``). The ridge of layer l is ``damp * mean(diag H_l)`` (of each group's H for a
    grouped Conv2d).

    ``forward(batch)`` runs the model on one micro-batch; ``make_batches()`` returns a fresh iterable of this
    rank's ``(batch, indices)`` (global sample indices); ``solver_options``: keywords of the method's solver
    (CHITA: :func:`~dist_chita.layerwise.row_solver.solve_rows`); ``row_chunk``: rows solved together (and the unit
    in which rows are shared among ranks; None: :func:`~dist_chita.layerwise.row_solver.chunk_rows` of each layer).
    ``cache_inputs``: run the blocks that allow it on cached inputs
    (:func:`~dist_chita.layerwise.curvature.block_curvatures`).
    ``method``: a name of :func:`~dist_chita.methods.base.method_names` (``"chita"``, ``"magnitude"``, ``"wanda"``,
    ``"obd"``, ``"sparsegpt"``, ...) or a :class:`~dist_chita.methods.base.LayerMethod`. A method without H runs
    no calibration pass. ``loss_fn(model, batch, indices) -> (b,)`` per-sample losses: required by a method that
    asks for the Fisher diagonal (OBD).
    Returns one :class:`StageReport` for the whole model (objective: the sum over layers of the reconstruction
    objective, None for a method without H; with CHITA the warm start's objective first in the trace and the
    magnitude-support + re-fit objective beside it).
    """
    chosen = resolve_method(method)
    targets = layer_sparsities(sparsity, len(modules)) if nm is None else [0.0] * len(modules)
    if damp <= 0:
        raise ValueError(f"damp must be > 0, got {damp}")
    for name, m in modules:  # before any work
        check_zero_padding(m, name)
    if chosen.needs_fisher_diagonal and loss_fn is None:
        raise ValueError(f"layerwise method {chosen.name!r} needs the Fisher diagonal of the loss: give loss_fn")
    sizes = [params.numel(m.weight) for _, m in modules]
    target = float(sparsity) if isinstance(sparsity, int | float) else mean_sparsity(targets, sizes)
    tally = _Tally(StageReport(sparsity=target if nm is None else 1.0 - nm[0] / nm[1], kept=0, objective=0.0,
                               magnitude_objective=0.0), comm.bytes_by_phase())
    fisher = None
    if chosen.needs_fisher_diagonal:
        t = time.perf_counter()
        with comm.phase("fisher_diagonal"):
            fisher = fisher_rows(model, modules, make_batches, loss_fn)
        tally.seconds["fisher_diagonal"] = time.perf_counter() - t
    job = _Job(modules, chosen, targets, nm, per_layer, damp, dict(solver_options or {}), row_chunk, fisher)
    blocks: Iterator = (block_curvatures(model, modules, forward, make_batches, cache_inputs) if chosen.needs_curvature
                        else ((group, [None] * len(group)) for group in blocks_in_order(modules)))
    while True:
        t = time.perf_counter()
        with comm.phase("curvature"):  # the forwards for the next block (through the pruned earlier ones) and H
            item = next(blocks, None)
        tally.seconds["curvature"] += time.perf_counter() - t
        if item is None:
            break
        _prune_block(job, *item, tally, progress)
    return _outcome(modules, tally)


def _prune_block(job: _Job, group: list[int], Hs: list[torch.Tensor | None], tally: _Tally,
                 progress: Callable[[str, int, int], None] | None) -> None:
    """The layers ``group`` (indices into ``job.modules``) of one block, each on its H: this rank's rows of every
    layer solved by the method, then every layer all-reduced and written back, in order. (The block's layers are
    independent given their H, so the ranks meet once per block: a rank's faster and slower layers even out
    before it waits for the others.)"""
    owners = job.method.owners(_part_shapes(job.modules, group), comm.world_size())
    solved = [_solve_layer(job, i, H, owners, tally) for i, H in zip(group, Hs, strict=True)]
    for i, shape, result in solved:
        m = job.modules[i][1]
        t = time.perf_counter()
        with comm.phase("writeback"):
            W = comm.all_reduce(result.W)
            totals = comm.all_reduce(_objective_vector(result, W.device))
            params.write(m.weight, from_rows(m, W, shape))
        tally.seconds["writeback"] += time.perf_counter() - t
        tally.add(W, totals)
        if progress is not None:
            progress("layers", tally.done, len(job.modules))


def _solve_layer(job: _Job, i: int, H: torch.Tensor | None, owners: dict[tuple[int, int], int] | None,
                 tally: _Tally) -> tuple[int, torch.Size, LayerResult]:
    """Layer i's rows of this rank pruned by the method on H (None: the method needs none): (i, the layer's weight
    shape, the method's result, its W (r, d) zero off this rank's rows)."""
    m = job.modules[i][1]
    t = time.perf_counter()
    weight = params.read(m.weight)
    W_bar = weight_rows(m, weight).float()
    r, d = W_bar.shape
    per_part = r // groups(m)
    parts = tuple((j * per_part, (j + 1) * per_part) for j in range(groups(m)))
    world, rank = comm.world_size(), comm.rank()
    chunk = chunk_rows(d) if job.row_chunk is None else job.row_chunk
    runs = (_my_runs(parts, world, rank, chunk) if owners is None
            else [(j, lo, hi) for j, (lo, hi) in enumerate(parts) if owners[(i, j)] == rank])
    H_parts = None if H is None else H.reshape(-1, d, d)  # one H per group of rows (grouped Conv2d)
    if H is not None and not bool(torch.isfinite(H).all()):  # (H is all-reduced: every rank raises)
        raise ValueError(f"the inputs of layer {job.modules[i][0]!r} contain NaN or Inf on the calibration data "
                         "(check the calibration samples, or the pruned layers before it)")
    layer = LayerProblem(W_bar=W_bar, sparsity=job.targets[i], per_layer=job.per_layer, nm=job.nm,
                         allowed=W_bar != 0, parts=parts, runs=tuple(runs), H=H_parts, lams=_ridges(H_parts, job.damp),
                         damp=job.damp, fisher=None if job.fisher is None else job.fisher[i],
                         row_chunk=chunk, options=job.options)
    result = job.method.prune(layer)
    tally.report.iterations = max(tally.report.iterations, result.iterations)
    tally.seconds["solver"] += time.perf_counter() - t
    return i, weight.shape, result


def _ridges(H_parts: torch.Tensor | None, damp: float) -> tuple[float, ...]:
    """lambda of each part: ``damp`` times the part's mean diag H. A dead part (inputs all zero, f the ridge alone:
    magnitude is optimal) takes the layer's mean, or 1 when the whole layer is dead."""
    if H_parts is None:
        return ()
    layer_scale = float(H_parts.diagonal(dim1=1, dim2=2).mean())
    return tuple(damp * (float(h.diagonal().mean()) or layer_scale or 1.0 / damp) for h in H_parts)


def _part_shapes(modules: Sequence[tuple[str, nn.Module]], group: Sequence[int]
                 ) -> dict[tuple[int, int], tuple[int, int]]:
    """(layer, part) -> (rows, inputs) of every part of the layers ``group`` (no gather under ZeRO-3)."""
    shapes = {}
    for i in group:
        m = modules[i][1]
        shape = tuple(params.shape(m.weight))
        d, g = input_size(m, shape), groups(m)
        for j in range(g):
            shapes[(i, j)] = (math.prod(shape) // d // g, d)
    return shapes


def _objective_vector(result: LayerResult, device: torch.device) -> torch.Tensor:
    """[objective, magnitude objective, warm objective, and whether each was given] (6,) float64, to sum over
    ranks (a missing value counts 0)."""
    values = (result.objective, result.magnitude_objective, result.warm_objective)
    return torch.tensor([v or 0.0 for v in values] + [float(v is not None) for v in values], dtype=torch.float64,
                        device=device)


def _outcome(modules: Sequence[tuple[str, nn.Module]], tally: _Tally) -> PruneOutcome:
    """The report (iterations: the largest on any rank) and the masks of the pruned layers."""
    report = tally.report
    (report.iterations,) = [int(v) for v in comm.all_reduce_floats([report.iterations], op="max")]
    has_objective, has_magnitude, has_warm = tally.has
    report.objective_trace = [tally.warm, report.objective] if has_warm else [report.objective]
    if not has_magnitude:
        report.magnitude_objective = None
    if not has_objective:
        report.objective, report.objective_trace = None, []
    report.seconds = tally.seconds
    report.bytes_sent = {k: v - tally.bytes_before.get(k, 0) for k, v in comm.bytes_by_phase().items()}
    masks = {name: params.read(m.weight) != 0 for name, m in modules}
    layout = ColumnLayout.build(named_shapes(modules), comm.world_size(), rows=True)
    return PruneOutcome(layout, [report], masks)


def _my_runs(parts: Sequence[tuple[int, int]], world: int, rank: int, chunk: int) -> list[tuple[int, int, int]]:
    """This rank's rows of a layer whose rows form ``parts`` (consecutive [lo, hi) ranges, one per H): every part
    is cut into whole chunks of ``chunk`` rows (the last one of a part shorter), the chunks of all parts are shared
    among the ranks in order as evenly as they allow, and this rank's chunks are merged into runs
    (part, lo, hi) that start at a chunk boundary of their part, so every chunk is solved alike on any number of
    ranks."""
    chunks = [(j, a, min(a + chunk, hi)) for j, (lo, hi) in enumerate(parts) for a in range(lo, hi, chunk)]
    mine = chunks[len(chunks) * rank // world: len(chunks) * (rank + 1) // world]
    runs: list[tuple[int, int, int]] = []
    for j, a, b in mine:
        if runs and runs[-1][0] == j and runs[-1][2] == a:
            runs[-1] = (j, runs[-1][1], b)
        else:
            runs.append((j, a, b))
    return runs


def fisher_rows(model: nn.Module, modules: Sequence[tuple[str, nn.Module]], make_batches: Callable[[], Iterable],
                loss_fn: Callable) -> list[torch.Tensor]:
    """F_jj of every weight of every module in its rows' layout (r, d) float64, on the module's device: the
    diagonal of the empirical Fisher of ``loss_fn`` at the current weights, (1/n) sum_i (dl_i/dw_j)^2 over the n
    samples of all ranks' ``make_batches()`` (:func:`~dist_chita.fisher.groups.diagonal_fisher`). Collective."""
    (n,) = comm.all_reduce_floats([float(sum(len(idx) for _, idx in make_batches()))])
    diag = diagonal_fisher(model, modules, make_batches(), int(n), loss_fn)
    for (name, _), f in zip(modules, diag, strict=True):  # (all-reduced: every rank raises)
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"the loss gradients of layer {name!r} contain NaN or Inf on the calibration data "
                             "(check the calibration samples)")
    return [weight_rows(m, f.view(tuple(params.shape(m.weight)))).to(m.weight.device)
            for (_, m), f in zip(modules, diag, strict=True)]


def memory_bytes(modules: Sequence[tuple[str, nn.Module]], method: str | LayerMethod = "chita") -> int:
    """Peak bytes per rank of :func:`prune_layerwise` besides the model: the largest block's H matrices (float64,
    twice: accumulated and the all-reduced copy; none for a method without H) plus the method's own work
    (:meth:`~dist_chita.methods.base.LayerMethod.solve_bytes`)."""
    chosen = resolve_method(method)
    shapes = [(m, tuple(params.shape(m.weight))) for _, m in modules]
    dims = [(math.prod(shape) // input_size(m, shape), input_size(m, shape)) for m, shape in shapes]
    order = blocks_in_order(modules)
    curvature = max(sum(2 * 8 * groups(shapes[i][0]) * dims[i][1] ** 2 for i in group)
                    for group in order) if chosen.needs_curvature else 0
    return curvature + chosen.solve_bytes(dims, order)


def prune_magnitude(modules: Sequence[tuple[str, nn.Module]], sparsity: Sparsity,
                    nm: tuple[int, int] | None = None, per_layer: bool = False) -> None:
    """Magnitude pruning (:class:`~dist_chita.methods.magnitude.Magnitude`) on the rows :func:`prune_layerwise`
    uses (one output's weights; or N:M along them; or, with ``per_layer``, the layer's largest), in place, one layer
    at a time, without data (the baseline of a layerwise run); ``sparsity``: one target, or one per module. Every
    rank computes every layer whole, the same (no communication; collective under ZeRO-3, whose reads gather)."""
    targets = layer_sparsities(sparsity, len(modules)) if nm is None else [0.0] * len(modules)
    method = Magnitude()
    for (_, m), s in zip(modules, targets, strict=True):
        weight = params.read(m.weight)
        W_bar = weight_rows(m, weight).float()
        pruned = method.prune(LayerProblem(W_bar=W_bar, sparsity=s, per_layer=per_layer, nm=nm))
        params.write(m.weight, from_rows(m, pruned.W, weight.shape))
