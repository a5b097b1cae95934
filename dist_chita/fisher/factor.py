"""This rank's column block of the Fisher factor A, built by streaming per-sample gradients.

A is n x p with row i = grad l_i(w_bar) / sqrt(n) over the prunable weights w (global flat order
of :mod:`dist_chita.distributed.layout`). Samples (rows) are split across ranks (rank r computes the gradients
of its samples ``sample_ranges(n, R, b)[r]``, whole micro-batches of b) while A is stored by columns: rank r keeps
``At`` = A[:, block_r]^T, shape (p_r, n), row j = the n scaled per-sample gradients of weight
block_start_r + j.

The transpose from rows to columns happens layer by layer: when a layer's (b, numel) per-sample
gradients of a micro-batch are ready (in the backward hook, :mod:`dist_chita.fisher.persample`), they
are scaled by 1/sqrt(n) and checked for NaN/Inf by the rank that computed them; the rows over this
rank's own columns are copied straight into At (transposed and cast in that one copy), the others
are cast to the storage dtype and sent with one ``comm.all_to_all`` to the ranks owning those
columns (uneven splits). No rank ever holds all n rows of all p
columns: peak memory is about p_r * n * bytes (the block) + the model + one micro-batch of
activations + the per-sample gradients of one layer (a few layers when the backward pass reaches
them out of the exchange order, see below).

Fast paths: a layer whose columns this rank owns entirely and whose per-sample gradients are computed
sample-minor (outer products: no token / spatial dimension, see :mod:`dist_chita.fisher.persample`) is computed
straight into At's columns of the micro-batch
(the ``target`` of :class:`PerSampleGrads`; cast to the storage dtype on store): no result buffer,
no send, no copy; its finiteness is checked once, over whole rows, when this rank's batches are
exhausted. At's pages are all faulted in, in order, when it is allocated (:func:`empty_block`; huge pages from
1 GiB): left to the column-wise writes, its first-touch page faults cost more than the gradients.

Collective schedule (identical on every rank, even when sample counts differ): per step, one
``all_gather`` of (micro-batch size, first index, error flags), then one ``all_to_all`` per layer
in the fixed order L-1, ..., 0 (reverse layer order, which is close to the order the backward
pass reaches them; layers reached earlier wait in a buffer). A rank whose batches are exhausted
takes part with empty sends until every rank is done. When the model's parameters are partitioned
(DeepSpeed ZeRO-3, :mod:`dist_chita.io.params`) forward and backward passes are collective too, so such a
rank also runs a padding step (forward + backward of its first micro-batch, gradients dropped).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.distributed.layout import ColumnLayout
from dist_chita.distributed.partition import sample_ranges
from dist_chita.fisher import ntstore
from dist_chita.fisher.losses import LossFn
from dist_chita.fisher.persample import PerSampleGrads, Scratch
from dist_chita.io import models, params
from dist_chita.io.data import to_device

PHASE = "fisher"

_OK, _BAD_INDICES, _FAILED = 0, 1, 2


class _Exchange:
    """Column exchange of one step: receives each layer's local (b_r, numel) gradients, sends them
    in the fixed layer order and writes what this rank receives into ``At``."""

    def __init__(self, at: torch.Tensor, layout: ColumnLayout):
        self.at, self.layout = at, layout
        self.rank, self.R = comm.rank(), comm.world_size()
        self.owners = [layout.owners(g) for g in range(len(layout.segments))]
        self.mine: dict[int, tuple[int, int, int]] = {}  # segment -> (offset, local_start, count)
        for piece in layout.pieces(self.rank):
            self.mine[piece.segment] = (piece.offset, piece.local_start, piece.size)
        self.bad_layer = -1
        self.seconds = 0.0
        self.written: dict[int, list[list[int]]] = {}  # layer -> column ranges computed straight into At
        # reused "send" / "recv" buffers in the storage dtype: a fresh receive buffer per all_to_all cost about a
        # third of MLPNet's exchange at R = 2 in first-touch page faults
        self._scratch = Scratch()

    def start(self, sizes: list[int], firsts: list[int], b: int, discard: bool = False) -> None:
        """A new step; ``discard``: this rank runs a padding step (ZeRO-3) whose gradients are dropped, it
        sends no rows (b = 0)."""
        self.sizes, self.firsts, self.b, self.discard = sizes, firsts, b, discard
        self.pending: dict[int, torch.Tensor] = {}
        self.direct: dict[int, torch.Tensor] = {}
        self.next = len(self.layout.segments) - 1

    def target(self, g: int, b: int) -> torch.Tensor | None:
        """Where layer g's local (b, numel_g) gradients can be computed in place (the ``target`` of
        :class:`PerSampleGrads`): At's columns of this rank's samples of the step, a (b, numel_g) view with
        strides (1, n), when this rank owns all of layer g's columns; else None. Those rows then skip the
        send buffer, the all_to_all and the copy into At."""
        seg = self.layout.segments[g]
        _, local_start, cnt = self.mine.get(g, (0, 0, 0))
        if self.discard or not b or b != self.b or cnt != seg.size:
            return None
        first = self.firsts[self.rank]
        view = self.direct[g] = self.at[local_start : local_start + cnt, first : first + b].t()
        return view

    def add(self, g: int, grads: torch.Tensor) -> None:
        """Layer g's per-sample gradients (b, numel_g), float32, already divided by sqrt(n); exchanges
        every layer that is next in order.
        ``grads`` may be a reused buffer, so a layer that arrives out of order is copied."""
        if self.discard:
            grads = grads[:0]
        view = self.direct.get(g)
        if view is not None and not (grads.data_ptr() == view.data_ptr() and grads.stride() == view.stride()):
            del self.direct[g]  # computed elsewhere: sent the ordinary way
        self.pending[g] = grads if g == self.next or g in self.direct else grads.clone()
        while self.next >= 0 and self.next in self.pending:
            self._send(self.next, self.pending.pop(self.next), direct=self.direct.pop(self.next, None) is not None)
            self.next -= 1

    def finish_zeros(self) -> None:
        """Zero rows for every layer not yet sent, in the same order: empty sends when this rank has no
        samples in the step, zeros after a failed loss (the error is raised collectively next step)."""
        for g in range(self.next, -1, -1):
            self._send(g, torch.zeros((self.b, self.layout.segments[g].size), device=self.at.device))
        self.next = -1

    def check_direct(self) -> None:
        """Finiteness check of what this rank computed straight into At (its own samples' columns of the
        layers it owns whole): one summing pass per run of consecutive columns (usually all of
        [lo, hi): long contiguous rows), done once when its batches are exhausted, so a hit is flagged
        (and raised on every rank) at the next all_gather."""
        t0 = time.perf_counter()
        for g, ranges in sorted(self.written.items()):
            _, local_start, cnt = self.mine[g]
            for a, z in ranges:
                block = self.at[local_start : local_start + cnt, a:z]
                if not torch.isfinite(block.sum()) and not torch.isfinite(block).all():
                    self.bad_layer = g if self.bad_layer < 0 else min(self.bad_layer, g)
        self.written.clear()
        self.seconds += time.perf_counter() - t0

    def _send(self, g: int, grads: torch.Tensor, direct: bool = False) -> None:
        """Write this rank's own columns of layer g's local rows into At, send the other columns' rows to their
        owners and write the rows received into At; ``direct``: ``grads`` is already At's block of this rank's
        rows (only this rank owns layer g), so this rank sends nothing and receives the other ranks' rows.

        Each rank checks the rows it computed (one summing pass over ``grads``; NaN/Inf propagate), so received
        rows are not checked again. Its own columns never go through the all_to_all: they are copied straight
        from ``grads`` into At (transposing and casting in that one copy)."""
        t0 = time.perf_counter()
        seg = self.layout.segments[g]
        if grads.shape != (self.b, seg.size):
            raise ValueError(
                f"layer {seg.name!r}: expected gradients of shape {(self.b, seg.size)}, got {tuple(grads.shape)}"
            )
        offset, local_start, my_cnt = self.mine.get(g, (0, 0, 0))
        first = self.firsts[self.rank]
        columns = grads.t()  # (numel, b): owners hold consecutive row ranges, in rank order
        if direct:  # checked once at the end, over whole rows (a strided check here would cost 3x more)
            self._record_direct(g, first)
            send, send_counts = columns.new_empty(0), [0] * self.R
        else:
            if self.b and not torch.isfinite(grads.sum()) and not torch.isfinite(grads).all():
                self.bad_layer = g if self.bad_layer < 0 else min(self.bad_layer, g)
            if my_cnt and self.b:
                _write(
                    self.at[local_start : local_start + my_cnt, first : first + self.b],
                    columns[offset : offset + my_cnt],
                )
            send, send_counts = self._pack(g, columns)
        del grads, columns
        self._receive(send, send_counts, local_start, my_cnt)
        self.seconds += time.perf_counter() - t0

    def _record_direct(self, g: int, first: int) -> None:
        """Note that this rank's samples [first, first + b) of layer g were computed straight into At (checked for
        NaN/Inf by :meth:`check_direct`); consecutive steps extend one range."""
        ranges = self.written.setdefault(g, [])
        if ranges and ranges[-1][1] == first:
            ranges[-1][1] = first + self.b
        else:
            ranges.append([first, first + self.b])

    def _pack(self, g: int, columns: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(send buffer, per-rank element counts) of the other owners' columns of layer g, (numel_g, b) ``columns``
        in rank order, in the storage dtype: a view when they are one contiguous range already in that dtype."""
        send_counts = [0] * self.R
        others = [(q, off, cnt) for q, off, cnt in self.owners[g] if q != self.rank]
        for q, _, cnt in others:
            send_counts[q] = cnt * self.b
        lo = others[0][1] if others else 0
        hi = others[-1][1] + others[-1][2] if others else 0
        if not others or not self.b:
            return columns.new_empty(0, dtype=self.at.dtype), send_counts
        if hi - lo == sum(cnt for _, _, cnt in others) and columns.is_contiguous() and columns.dtype == self.at.dtype:
            return columns[lo:hi].reshape(-1), send_counts  # the other ranks' rows are one range, in send order
        send = self._scratch.get("send", (sum(send_counts),), self.at)  # transpose and cast in one pass
        pos = 0
        for _, off, cnt in others:
            _write(send[pos : pos + cnt * self.b].view(cnt, self.b), columns[off : off + cnt])
            pos += cnt * self.b
        return send, send_counts

    def _receive(self, send: torch.Tensor, send_counts: list[int], local_start: int, my_cnt: int) -> None:
        """The all_to_all of one layer; writes the rows received from every other rank (its samples of the step)
        into this rank's ``my_cnt`` rows of At from ``local_start``."""
        froms = [0 if q == self.rank else s for q, s in enumerate(self.sizes)]
        recv_counts = [my_cnt * s for s in froms]
        recv = comm.all_to_all(
            send, send_counts, recv_counts, out=self._scratch.get("recv", (sum(recv_counts),), self.at)
        )
        pos = 0
        for s, first in zip(froms, self.firsts, strict=True):
            if s and my_cnt:
                _write(
                    self.at[local_start : local_start + my_cnt, first : first + s],
                    recv[pos : pos + my_cnt * s].view(my_cnt, s),
                )
                pos += my_cnt * s


def _write(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, cast to dst's dtype; float32 on x86 CPUs with streaming stores
    (:mod:`dist_chita.fisher.ntstore`: a transposed (b, numel) block into At's columns at 10-18 GB/s against 2-2.5
    GB/s, b = 16-32)."""
    if not ntstore.copy_into(dst, src):
        dst.copy_(src)


_POPULATE_MIN_BYTES = 64 << 20  # smaller blocks: torch.empty (their page faults are cheap enough)
_HUGE_PAGE_MIN_BYTES = 1 << 30  # blocks from this size on are also given transparent huge pages
_HUGE_PAGE = 2 << 20  # bytes of a transparent huge page (x86-64, arm64 with 4 KiB base pages)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # the constant is missing from Python < 3.14's mmap


def empty_block(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised (p_r, n) storage for At; ``torch.empty`` except for large CPU blocks on Linux, which are
    an anonymous mapping whose pages are all faulted in at once (MADV_POPULATE_WRITE, Linux >= 5.14), in order;
    blocks of at least 1 GiB are also aligned to 2 MiB and advised MADV_HUGEPAGE (transparent huge pages).

    Why populate: the block is written once, column by column, and every page is touched first by that write. Left
    to the exchange's column-wise writes, the first-touch page faults cost more than computing the per-sample
    gradients (MiniLM-size encoder at R = 2, 1.36 GB per rank: 4.5 s against 2.6 s populated in order).

    Why huge pages only from 1 GiB (measured on this project's 2-core VM, whose fresh memory is served slowly by the
    hypervisor): below, huge pages made the population 2.6-3x slower and nothing faster (129 MB: 0.24 s against
    0.085 s, the MLPNet prune's stage 1 at R = 1 took 0.26 s against 0.11 s; 680 MB: 0.95-1.36 s against 0.37-0.42
    s). For the default job's 2.75 GB per rank (2 ranks), huge pages gave the faster gradient phase in 5 of 5
    alternated pairs (24.5-26.4 s against 27.0-28.3 s; populating took 5.7 s against 6.2 s in the job). Where between
    0.7 and 2.75 GB the balance turns was not measured; 1 GiB is a round figure in that range.

    The result is an ordinary contiguous tensor (the mapping is released with its last reference); if the kernel
    refuses the advice, the writes fault the pages in as usual.
    """
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < _POPULATE_MIN_BYTES or not hasattr(mmap.mmap, "madvise"):
        return torch.empty(shape, dtype=dtype, device=device)
    huge = nbytes >= _HUGE_PAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE")
    try:
        region = mmap.mmap(-1, nbytes + (_HUGE_PAGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return torch.empty(shape, dtype=dtype, device=device)
    if huge:
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # kernel without transparent huge pages: the mapping still works with small pages
            pass
    try:
        region.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # kernel before 5.14: the writes fault the pages in
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE_PAGE if huge else 0
    return raw[start : start + nbytes].view(dtype).view(shape)


def _check_layout(modules: Sequence[tuple[str, nn.Module]], layout: ColumnLayout) -> None:
    if layout.world_size != comm.world_size():
        raise ValueError(f"layout is for {layout.world_size} ranks, the process group has {comm.world_size()}")
    if len(layout.segments) != len(modules):
        raise ValueError(f"layout has {len(layout.segments)} layers, {len(modules)} prunable modules were given")
    for seg, (name, m) in zip(layout.segments, modules, strict=True):
        if seg.name != name or seg.shape != tuple(params.shape(m.weight)):
            raise ValueError(
                f"layout layer {seg.name!r} {seg.shape} does not match module {name!r} {tuple(params.shape(m.weight))}"
            )


def fisher_block(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    layout: ColumnLayout,
    batches: Iterable[tuple[Any, Any]],
    sample_start: int,
    n: int,
    loss_fn: LossFn,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
    out: torch.Tensor | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """This rank's block At = A[:, block_start_r:block_stop_r]^T, shape (p_r, n), dtype ``dtype``.

    model: the dense network (weights w_bar); set to eval mode for the call (restored after), its
        parameters get ``requires_grad=False`` meanwhile (restored), nothing is written to ``.grad``.
    modules: the prunable (name, module) list of :func:`dist_chita.prunable.prunable_modules`.
    layout: ``ColumnLayout.build(named_shapes(modules), R, align)``; names and shapes must match.
    batches: this rank's micro-batches as ``(batch, indices)``, indices the GLOBAL sample indices of
        the batch rows, contiguous and ascending (a range, list or int tensor), together covering
        exactly this rank's samples ``sample_ranges(n, R, batch_size)[r]``; micro-batch counts may differ
        between ranks.
    sample_start: first global sample index of this rank (= ``sample_ranges(n, R, batch_size)[r][0]``), checked.
    n: total number of calibration samples (columns of At); row i of A is divided by sqrt(n).
    loss_fn: ``loss_fn(model, batch, indices) -> (b,)`` per-sample losses l_i (:mod:`dist_chita.fisher.losses`).
    dtype: storage dtype of At (float32, bfloat16, float16); gradients are computed in float32.
    progress: called on every rank after each step as ``progress(samples_done, n)`` (global count).
    stats: if given, filled with ``seconds`` (wall time of the call), ``exchange_seconds`` (packing,
        all_to_all and unpacking), ``bytes`` and ``calls`` (this rank's payload in phase "fisher").
    out: optional storage for At, overwritten and returned: a contiguous (p_r, n) tensor of ``dtype`` on the
        model's device, typically the previous CHITA++ stage's block (its fresh pages' first touch costs as much
        as the exchange: measured on MLPNet at R = 2, unpacking into a fresh block took 50-65 ms a stage, into a
        reused one 18 ms).
    batch_size: the micro-batch size b the samples are split over the ranks by (:func:`sample_ranges`: rank
        boundaries at multiples of b, so that every micro-batch, and with it the factor, is the same on any
        number of ranks).

    All collectives run under ``comm.phase("fisher")``. Errors are raised on every rank at the same
    step, so no rank is left waiting in a collective: ValueError for non-finite gradients (naming the
    first such layer), bad or duplicate or missing sample indices; if ``batches`` or ``loss_fn`` raise
    on one rank (a loss of the wrong shape is a ValueError), that rank re-raises it and the others raise
    RuntimeError. Not supported: activation checkpointing (the recomputed forward would re-fire the
    hooks)."""
    t_start = time.perf_counter()
    R, r = comm.world_size(), comm.rank()
    _check_layout(modules, layout)
    lo, hi = sample_ranges(n, R, batch_size)[r]
    if sample_start != lo:
        raise ValueError(f"rank {r} owns samples [{lo}, {hi}) of n = {n}, got sample_start = {sample_start}")
    device = modules[0][1].weight.device
    block_lo, block_hi = layout.block(r)
    exchange = _Exchange(_block_storage((block_hi - block_lo, n), dtype, device, out), layout)
    feed = _Feed(model, loss_fn, exchange, lo, hi, n, device)
    bytes0, calls0 = comm.bytes_by_phase().get(PHASE, 0), comm.calls_by_phase().get(PHASE, 0)
    with gradients_only(model), comm.phase(PHASE):
        with PerSampleGrads(modules, exchange.add, scale=1.0 / math.sqrt(n), target=exchange.target) as psg:
            feed.run(iter(batches), psg, progress)
    if stats is not None:
        stats.update(
            seconds=time.perf_counter() - t_start,
            exchange_seconds=exchange.seconds,
            bytes=comm.bytes_by_phase().get(PHASE, 0) - bytes0,
            calls=comm.calls_by_phase().get(PHASE, 0) - calls0,
        )
    return exchange.at


def _block_storage(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, out: torch.Tensor | None):
    """``out`` after checking it is a contiguous ``shape`` tensor of ``dtype`` on ``device``, else fresh storage."""
    if out is None:
        return empty_block(shape, dtype, device)
    if out.shape != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {device}")
    return out


@contextlib.contextmanager
def gradients_only(model: nn.Module):
    """The model in eval mode with ``requires_grad=False`` on its parameters (per-sample gradients come from hooks,
    nothing is written to ``.grad``); both restored on exit."""
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)
    try:
        with models.eval_mode(model):
            yield
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)


class _Feed:
    """This rank's side of fisher_block's step protocol: per step it takes its next micro-batch (or none), gathers
    every rank's (micro-batch size, first index, error flags), raises collectively, then runs the forward and
    backward pass whose hooks feed the exchange (a padding step under ZeRO-3, zeros after a failure)."""

    def __init__(self, model, loss_fn, exchange: _Exchange, lo: int, hi: int, n: int, device: torch.device):
        self.model, self.loss_fn, self.exchange = model, loss_fn, exchange
        self.lo, self.hi, self.n, self.device = lo, hi, n, device
        self.collective_forward = params.any_partitioned(model)  # ZeRO-3: every rank runs every step's forward
        self.pad_item = None  # the micro-batch a rank without samples in a step runs (discarded) under ZeRO-3
        self.covered = torch.zeros(n, dtype=torch.bool, device="cpu")  # host-side bookkeeping
        self.error, self.local_exc = _OK, None

    def run(self, it, psg: PerSampleGrads, progress: Callable[[int, int], None] | None) -> None:
        """Steps until no rank has samples left; then every sample must have been given once."""
        done = 0
        while True:
            batch, idx = self._next(it)
            sizes, firsts = self._announce(idx)
            if sum(sizes) == 0:
                break
            self._step(psg, batch, idx, sizes, firsts)
            done += sum(sizes)
            if progress is not None:
                progress(done, self.n)
        if not self.covered.all():
            missing = (~self.covered).nonzero().squeeze(-1)
            raise ValueError(f"{len(missing)} of n = {self.n} samples were never given (first: {int(missing[0])})")

    def _next(self, it) -> tuple[Any, torch.Tensor]:
        """(batch, indices (b,) int64 on the host); (None, empty) once exhausted or if the iterator raised."""
        try:
            item = next(it, None)
        except Exception as exc:  # raised on every rank together at the next all_gather
            item, self.local_exc, self.error = None, exc, _FAILED
        if item is None:
            self.exchange.check_direct()  # this rank's own columns are final now
            return None, torch.empty(0, dtype=torch.long, device="cpu")
        batch, idx = item
        return batch, torch.as_tensor(idx, dtype=torch.long, device="cpu").reshape(-1)

    def _announce(self, idx: torch.Tensor) -> tuple[list[int], list[int]]:
        """All ranks' micro-batch sizes and first indices of this step, after raising (on every rank) any rank's
        error and marking the samples covered."""
        b, first = len(idx), int(idx[0]) if len(idx) else 0
        if b and (first < self.lo or first + b > self.hi
                  or not torch.equal(idx, torch.arange(first, first + b, device="cpu"))):
            self.error = self.error or _BAD_INDICES
        info = torch.tensor([b, first, self.exchange.bad_layer, self.error], dtype=torch.long, device=self.device)
        rows = torch.stack(comm.all_gather(info)).cpu().tolist()
        _raise_collective_errors(rows, self.exchange.layout, self.local_exc)
        sizes, firsts = [row[0] for row in rows], [row[1] for row in rows]
        for s, f in zip(sizes, firsts, strict=True):
            if self.covered[f : f + s].any():
                raise ValueError(f"sample indices [{f}, {f + s}) were given twice")
            self.covered[f : f + s] = True
        return sizes, firsts

    def _step(self, psg: PerSampleGrads, batch, idx: torch.Tensor, sizes: list[int], firsts: list[int]) -> None:
        """This rank's forward and backward pass of the step (the hooks send every layer), or its empty sends."""
        b = len(idx)
        pad = self.collective_forward and not b and self.pad_item is not None and self.local_exc is None
        self.exchange.start(sizes, firsts, b, discard=pad)
        losses = None
        if b and self.pad_item is None:
            self.pad_item = (batch, idx)
        if pad:
            pad_batch, pad_idx = self.pad_item
            losses = self.loss_fn(self.model, to_device(pad_batch, self.device), pad_idx.to(self.device))
        elif b:
            try:
                losses = self.loss_fn(self.model, to_device(batch, self.device), idx.to(self.device))
                if not torch.is_tensor(losses) or losses.shape != (b,):
                    raise ValueError(f"loss_fn must return a ({b},) tensor of per-sample losses")
            except Exception as exc:  # keep the collective schedule; raised at the next all_gather
                losses, self.local_exc, self.error = None, exc, _FAILED
        if losses is not None:
            psg.backward(losses)
        else:
            self.exchange.finish_zeros()


def _raise_collective_errors(rows: list[list[int]], layout: ColumnLayout, local_exc: BaseException | None) -> None:
    """Every rank sees the same gathered flags and raises at the same point: a rank whose batches or
    loss_fn raised re-raises that exception, the others raise RuntimeError naming it."""
    bad_layers = [row[2] for row in rows if row[2] >= 0]
    if bad_layers:
        name = layout.segments[min(bad_layers)].name
        raise ValueError(f"non-finite per-sample gradient (NaN/Inf) in layer {name!r} (first such layer)")
    for q, row in enumerate(rows):
        if row[3] == _BAD_INDICES:
            raise ValueError(
                f"rank {q}: micro-batch indices must be contiguous, ascending global sample indices "
                "inside that rank's sample range"
            )
        if row[3] == _FAILED:
            if local_exc is not None:
                raise local_exc
            raise RuntimeError(f"rank {q}: its batches or loss_fn raised during fisher_block")
