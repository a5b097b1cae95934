"""Each layer's reconstruction curvature H = X^T X / N over all ranks' calibration rows, block after block.

* Blocks (SparseGPT's sense): the prunable layers whose names share the prefix up to their first numeric component
  (``encoder.layer.3``; a layer without one is a block of its own), in model order (:func:`blocks_in_order`).
* Micro-batches: one global sequence dealt to the ranks in rounds, every other round in reverse order
  (:func:`my_microbatches`), so a micro-batch has the same samples and padding on any number of ranks and its X is
  computed bit for bit alike, and the ranks get nearly equal shares of tokens from a sequence sorted longest first.
* :func:`layer_curvature`: a block's H, from forwards of this rank's micro-batches (X_b^T X_b in float32, summed
  in float64, which is exact) and one all-reduce: the same bits on any number of ranks.
* :func:`block_curvatures`: the blocks in order, each on the inputs of the model as the caller has left it
  (earlier blocks pruned); the longest run of blocks whose calls follow one from another runs on cached inputs
  (:func:`chained_blocks`), as SparseGPT's code does.

Collective where said (every rank asks for every block). Nothing here prunes, parses a config or prints.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from dist_chita.distributed import comm
from dist_chita.io import params
from dist_chita.io.data import to_device
from dist_chita.layerwise.geometry import groups, input_rows, input_size

_PRODUCT_ELEMENTS = 1 << 22  # X_b^T X_b is formed in column chunks of at most about this many entries


def _blocks(modules: Sequence[tuple[str, nn.Module]]) -> dict[str, list[int]]:
    keys: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(modules):
        m = re.match(r"(.*?(?:^|\.)\d+)(?:\.|$)", name)
        keys.setdefault(m.group(1) if m else name, []).append(i)
    return keys


def blocks_in_order(modules: Sequence[tuple[str, nn.Module]]) -> list[list[int]]:
    """Indices of ``modules`` grouped by the name prefix up to the first numeric component, in order of first
    appearance (``a.layer.0.q``, ``a.layer.0.k`` -> one block; ``fc1`` -> a block of its own)."""
    return list(_blocks(modules).values())


def block_names(modules: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """The name of each block of :func:`blocks_in_order` (its prefix: the submodule holding its layers)."""
    return list(_blocks(modules))


def dealt_to(j: int, world: int) -> int:
    """The rank that takes micro-batch j of the global sequence: rounds of ``world`` micro-batches dealt 0, 1, ...,
    R - 1, the next round R - 1, ..., 1, 0, and so on. With the micro-batches longest first, dealing every R-th to
    a rank would give rank 0 the longest of every round; the reversed rounds even the ranks' tokens out."""
    q, r = divmod(j, world)
    return r if q % 2 == 0 else world - 1 - r


def my_microbatches(batches: Iterable) -> Iterator:
    """This rank's share of the global micro-batches ``batches`` (the same sequence on every rank), dealt as
    :func:`dealt_to` says. Each micro-batch then has the same samples (and padding) on any number of ranks, so the
    layer inputs X are computed bit for bit alike (and :func:`layer_curvature` sums them exactly)."""
    world, rank = comm.world_size(), comm.rank()
    return (b for j, b in enumerate(batches) if dealt_to(j, world) == rank)


def collective_batches(mine: Sequence, device: torch.device, partitioned: bool) -> Iterator[tuple[object, bool]]:
    """This rank's micro-batches ``mine`` moved to ``device`` one at a time, each with whether it counts. Under
    ZeRO-3 (``partitioned``) a forward is collective, so a rank with fewer micro-batches than another follows them
    with forwards of its first one, which do not count (collective: one all-reduce first)."""
    padding = 0
    if partitioned:
        (most,) = comm.all_reduce_floats([len(mine)], op="max")
        padding = int(most) - len(mine)
    for j, batch in enumerate([*mine, *mine[:1] * padding]):
        yield to_device(batch, device), j < len(mine)


class _BlockSeen(Exception):
    """Raised inside a forward pass once every layer of the block has recorded its inputs (the rest of the model
    is not needed)."""


def _add_products(H: torch.Tensor, rows: torch.Tensor) -> None:
    """H (g, d, d) float64 += the upper triangle (diagonal included) of each group's X_b^T X_b, for ``rows``
    (N_b, g d) float32: products in float32, column chunk [a, b) over rows [0, b) only (about half the flops of
    the full product; the chunks also bound the temporary to 12 bytes x g x d x chunk)."""
    g, d = H.shape[:2]
    by_group = rows.view(rows.shape[0], g, d).transpose(0, 1)  # (g, N_b, d)
    chunk = max(128, min(-(-d // 8), _PRODUCT_ELEMENTS // (g * d)))
    for a in range(0, d, chunk):
        b = min(a + chunk, d)
        H[:, :b, a:b].add_(torch.bmm(by_group[:, :, :b].transpose(1, 2), by_group[:, :, a:b]))


class _Recorder:
    """The forward pre-hooks of :func:`layer_curvature`: each layer's X_b^T X_b added to its H (upper triangle) and
    its row count, forward after forward.

    ``mask``: the token mask of the running forward; ``record``: whether it counts; ``after``: one of the later
    modules has started in it; ``in_order``: no layer of the block ran after that, in any forward so far; ``cut``:
    forwards stop at the first later module; ``inputs``: (input, layer) of this forward's layers that formed their
    product; ``first``: no counted forward has finished yet; ``shared``: layer -> the earlier layer whose H it
    takes; ``broken``: a layer of ``shared`` did not receive that layer's input in some forward. ``order``: the
    layers in the order their inputs arrived in this forward; ``last``: the layer whose input came last in the
    first counted forward, when every layer ran exactly once there (None otherwise, or when ``may_stop`` is False);
    once every layer has recorded in a forward, that forward stops at ``last``'s input (the rest of the forward
    computes nothing H needs)."""

    def __init__(self, H: list[torch.Tensor], count: torch.Tensor, share_inputs: bool, may_stop: bool):
        self.H, self.count, self.share_inputs, self.may_stop = H, count, share_inputs, may_stop
        self.mask, self.record, self.after, self.in_order, self.cut = None, True, False, True, False
        self.inputs: list = []
        self.first, self.broken = True, False
        self.shared: dict[int, int] = {}
        self.order: list[int] = []
        self.last: int | None = None

    def at_later(self, module, args) -> None:
        self.after = True
        if self.cut:
            raise _BlockSeen

    def hook(self, i: int) -> Callable:
        def fn(module, args):
            self.in_order &= not self.after
            self.order.append(i)
            if not self.record:
                return
            self._add(i, module, args[0])
            if i == self.last and len(set(self.order)) == len(self.H):
                raise _BlockSeen
        return fn

    def _add(self, i: int, module: nn.Module, x: torch.Tensor) -> None:
        same = next((j for y, j in self.inputs if y is x and self.H[j].shape == self.H[i].shape), None)
        if self.first and same is not None and self.share_inputs:
            self.shared[i] = same
        if i in self.shared:
            if same == self.shared[i]:
                return
            self.broken = True  # no longer the same input: all H are formed again, unshared
        rows = input_rows(module, x.detach(), self.mask)
        _add_products(self.H[i], rows)
        self.count[i] += rows.shape[0]
        if not isinstance(module, nn.Conv2d | nn.Conv1d):  # its rows depend on the conv's shape too
            self.inputs.append((x, i))

    def finished(self) -> None:
        """After a forward: the first counted one fixes ``last``."""
        if self.first and self.record and self.may_stop and sorted(self.order) == list(range(len(self.H))):
            self.last = self.order[-1]
        self.inputs, self.order = [], []
        self.first = self.first and not self.record

    def run(self, forward: Callable[[object], object], batches: Iterable[tuple[object, bool]],
            cut_after_first: bool) -> None:
        """One forward of every ``(batch, counts)``; from the second on, stopped at the first later module when
        ``cut_after_first`` and every layer of the block has run before the later ones so far."""
        with torch.no_grad():
            for batch, self.record in batches:
                self.mask = batch.get("attention_mask") if isinstance(batch, dict) else None
                self.after = False
                try:
                    forward(batch)
                except _BlockSeen:
                    pass
                self.finished()
                self.cut = cut_after_first and self.in_order


def layer_curvature(
    modules: Sequence[tuple[str, nn.Module]],
    forward: Callable[[object], object],
    batches: Iterable[tuple[object, object]],
    later: Sequence[nn.Module] = (),
    share_inputs: bool = True,
) -> list[torch.Tensor]:
    """H = X^T X / N (float64, inputs x inputs) of every module over all ranks' calibration rows. Each
    micro-batch's X_b^T X_b is computed in float32 and summed in float64, which is exact, so H has the same bits
    on any number of ranks. A grouped Conv2d (g > 1 :func:`~dist_chita.layerwise.geometry.groups`) gets (g, d, d):
    each group's own H.

    ``forward(batch)`` runs the model; ``batches`` yields this rank's ``(batch, indices)`` (host tensors, moved to
    the layers' device one at a time); a dict batch's ``attention_mask`` marks the tokens that count. Collective:
    one all-reduce of all H. Under ZeRO-3 (the layers' weights partitioned) the forward pass is collective too: a
    rank with fewer micro-batches than another runs padding forwards of its first one, which add nothing.

    ``later``: modules that run after the block (the later blocks' layers). The first micro-batch runs the whole
    model and checks that no layer of ``modules`` runs after one of ``later`` has started; if so, every further
    forward stops when the first of ``later`` is about to run (the inputs of the block are then all seen). Not
    under ZeRO-3, whose forward must not be cut short.

    ``share_inputs``: a Linear or Conv1D that receives the very tensor an earlier layer of ``modules`` received
    in the first forward (query, key and value; gate and up projections) takes that layer's H (the same tensor
    object) instead of forming it again, as long as every forward does so; if one does not, on any rank, H is
    formed again with every layer on its own."""
    dims = [input_size(m, tuple(params.shape(m.weight))) for _, m in modules]
    device = modules[0][1].weight.device
    H = [torch.zeros(groups(m), d, d, dtype=torch.float64, device=device)
         for (_, m), d in zip(modules, dims, strict=True)]
    count = torch.zeros(len(modules), dtype=torch.float64, device=device)
    mine = [batch for batch, _ in batches]  # on the host; each moves to the device for its forward
    partitioned = any(params.is_partitioned(m.weight) for _, m in modules)
    recorder = _Recorder(H, count, share_inputs, may_stop=not partitioned)
    if partitioned:
        later = ()
    handles = [m.register_forward_pre_hook(recorder.hook(i)) for i, (_, m) in enumerate(modules)]
    handles += [m.register_forward_pre_hook(recorder.at_later) for m in later]
    try:
        recorder.run(forward, collective_batches(mine, device, partitioned), bool(later))
    finally:
        for h in handles:
            h.remove()
    shared = recorder.shared
    if share_inputs:  # every rank that ran a forward must have found the same sharing
        shared = _agreed_sharing(len(modules), shared, recorder.broken, bool(mine))
        if shared is None:
            return layer_curvature(modules, forward, [(b, None) for b in mine], later, share_inputs=False)
    return _reduced(modules, H, count, shared)


def _agreed_sharing(n_layers: int, shared: dict[int, int], broken: bool, ran: bool) -> dict[int, int] | None:
    """The sharing every rank that ran a forward (``ran``) found, or None if two ranks differ or one saw it broken
    (collective: one all-reduce)."""
    code = [shared.get(i, -1) + 1.0 for i in range(n_layers)] if ran else [0.0] * n_layers
    agreed = comm.all_reduce_floats(code + [-c if ran else -1e9 for c in code] + [broken], op="max")
    most, least = agreed[:n_layers], [-v for v in agreed[n_layers:-1]]
    if agreed[-1] or most != least:
        return None
    return {i: int(v) - 1 for i, v in enumerate(most) if v > 0}


def _reduced(modules: Sequence[tuple[str, nn.Module]], H: list[torch.Tensor], count: torch.Tensor,
             shared: dict[int, int]) -> list[torch.Tensor]:
    """Every layer's H over all ranks (one all-reduce of the upper triangles and row counts), mirrored and
    divided by N; a shared layer takes its owner's tensor."""
    owners = [i for i in range(len(modules)) if i not in shared]
    flat = comm.all_reduce(torch.cat([H[i].reshape(-1) for i in owners] + [count]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(modules)
    at = 0
    for i in owners:
        h = H[i]
        n_rows = float(flat[-len(modules) + i])
        if n_rows == 0:
            raise ValueError(f"layer {modules[i][0]} saw no calibration inputs")
        upper = flat[at:at + h.numel()].view(h.shape).triu()
        full = (upper + upper.triu(1).transpose(1, 2)) / n_rows  # the strict lower triangle mirrors the upper
        out[i] = full if h.shape[0] > 1 else full[0]
        at += h.numel()
    for i, j in sorted(shared.items()):
        out[i] = out[j]
    return out



def _same(a, b) -> bool:
    """Equal structures of the same tensors (bit for bit) and the same other values."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) in (int, float, bool, str) and type(a) is type(b) and a == b)


def _next_inputs(out, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The call of the next block when it takes this block's output ``out`` (or its first element) as hidden
    states, everything else unchanged; None when ``out`` has no such tensor or the call has no hidden states."""
    hidden = out[0] if isinstance(out, (tuple, list)) and out else out
    if not torch.is_tensor(hidden):
        return None
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return None


def _submodules(model: nn.Module, names: Sequence[str]) -> list[nn.Module] | None:
    try:
        return [model.get_submodule(name) for name in names]
    except AttributeError:
        return None


@torch.no_grad()
def _block_calls(blocks: Sequence[nn.Module], forward: Callable[[object], object], batch,
                 stop_at: int | None = None) -> list[tuple[int, tuple, dict]]:
    """``(block index, args, kwargs)`` of every call of ``blocks`` in one forward of ``batch``; with ``stop_at``
    the forward ends when block ``stop_at`` is called (its call the last one)."""
    calls: list = []

    def hook(j: int):
        def fn(module, args, kwargs):
            calls.append((j, args, kwargs))
            if j == stop_at:
                raise _BlockSeen
        return fn

    handles = [m.register_forward_pre_hook(hook(j), with_kwargs=True) for j, m in enumerate(blocks)]
    try:
        forward(batch)
    except _BlockSeen:
        pass
    finally:
        for h in handles:
            h.remove()
    return calls


@torch.no_grad()
def chained_blocks(blocks: Sequence[nn.Module], forward: Callable[[object], object], batch) -> tuple[int, int]:
    """The longest run [start, stop) of at least two ``blocks`` whose calls follow one from another: one forward
    of ``batch`` records every block's call (each block must be called exactly once, in order), and block j + 1's
    call must be what block j's output gives (:func:`_next_inputs`, compared bit for bit); (0, 0) when there is
    none. Every block but the last runs once more here."""
    calls = _block_calls(blocks, forward, batch)
    if [j for j, _, _ in calls] != list(range(len(blocks))):
        return 0, 0
    follows = [_same(_next_inputs(blocks[j](*calls[j][1], **calls[j][2]), *calls[j][1:]), calls[j + 1][1:])
               for j in range(len(blocks) - 1)]
    best, j = (0, 0), 0
    while j < len(follows):
        if follows[j]:
            end = j
            while end < len(follows) and follows[end]:
                end += 1
            if end + 1 - j > best[1] - best[0]:
                best = (j, end + 1)
            j = end
        j += 1
    return best


def _tensor_bytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_tensor_bytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_tensor_bytes(v) for v in x.values())
    return 0


@torch.no_grad()
def block_call_bytes(model: nn.Module, modules: Sequence[tuple[str, nn.Module]], forward: Callable[[object], object],
                     batch) -> int:
    """The bytes of the tensors in the largest call of a block (:func:`block_names`) in one forward of ``batch``:
    what caching one micro-batch's inputs of a block costs (:func:`block_curvatures` keeps them for every
    micro-batch of the rank, and the next block's beside them)."""
    blocks = _submodules(model, block_names(modules))
    if blocks is None:
        return 0
    return max((_tensor_bytes(call[1:]) for call in _block_calls(blocks, forward, batch)), default=0)


def _cached_range(model: nn.Module, names: Sequence[str], forward: Callable[[object], object],
                  make_batches: Callable[[], Iterable], enabled: bool) -> tuple[list[nn.Module], int, int]:
    """The blocks (submodules named ``names``) and the run [start, stop) of them that :func:`block_curvatures`
    computes on cached inputs (:func:`chained_blocks` on the first sample of this rank's first micro-batch, the
    same on every rank, else none); none under ZeRO-3."""
    blocks = _submodules(model, names)
    if blocks is None:
        return [], 0, 0
    if not enabled or len(blocks) < 2 or any(params.is_partitioned(p) for p in model.parameters()):
        return blocks, 0, 0
    first = next(iter(make_batches()), None)
    if first is None:  # no micro-batch here: the others decide
        votes = [-1e9] * 4
    else:
        start, stop = chained_blocks(blocks, forward, to_device(_one_sample(first[0]), next(model.parameters()).device))
        votes = [start, -start, stop, -stop]
    most = comm.all_reduce_floats(votes, op="max")
    if most[0] != -most[1] or most[2] != -most[3] or most[2] <= -1e9:
        return blocks, 0, 0
    return blocks, int(most[0]), int(most[2])


def _one_sample(batch):
    """The first sample of a micro-batch (a tensor, or a dict of tensors with the samples along dim 0): how the
    blocks are called does not depend on how many samples a forward carries, and one costs a micro-batch's share."""
    if torch.is_tensor(batch) and batch.dim() > 0:
        return batch[:1]
    if isinstance(batch, dict) and all(torch.is_tensor(v) and v.dim() > 0 for v in batch.values()):
        return {k: v[:1] for k, v in batch.items()}
    return batch


def _capture(blocks: Sequence[nn.Module], j: int, forward: Callable[[object], object],
             make_batches: Callable[[], Iterable]) -> list[dict]:
    """For each of this rank's micro-batches ``{"attention_mask": ..., "call": (args, kwargs)}`` of block j, from
    a forward that stops there."""
    device = next(blocks[j].parameters()).device
    inputs = []
    for batch, _ in make_batches():
        batch = to_device(batch, device)
        calls = _block_calls(blocks, forward, batch, stop_at=j)
        if not calls or calls[-1][0] != j:
            raise RuntimeError(f"layerwise: block {j} was not called in the forward of a calibration micro-batch, "
                               "as it was in the first one, so its inputs cannot be cached")
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        inputs.append({"attention_mask": mask, "call": calls[-1][1:]})
    return inputs


def block_curvatures(
    model: nn.Module,
    modules: Sequence[tuple[str, nn.Module]],
    forward: Callable[[object], object],
    make_batches: Callable[[], Iterable],
    cache_inputs: bool = True,
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """The blocks of :func:`blocks_in_order` in order, each as (its indices into ``modules``, their H of
    :func:`layer_curvature`), on the inputs through the earlier blocks as the caller has left them (pruned) when
    it asks for the next block. Collective (every rank asks for every block).

    ``cache_inputs``: the longest run of blocks that allows it (:func:`chained_blocks`, the same on every rank;
    not under ZeRO-3) runs on cached inputs, as SparseGPT does: every micro-batch's call of the run's first block
    is kept (one forward of the model up to it), and when the next block is asked for, each cached call goes
    through the (pruned) block and its output becomes the next block's input. Each block of the run is computed
    twice (its H, its outputs) instead of the model up to it; the other blocks take the model's forward, which
    stops before the later blocks. The calls are checked to be bit for bit those of the model's own forward."""
    order = blocks_in_order(modules)
    blocks, start, stop = _cached_range(model, block_names(modules), forward, make_batches, cache_inputs)
    inputs: list[dict] = []
    for b, group in enumerate(order):
        members = [modules[i] for i in group]
        if b == start < stop:  # through the model (earlier blocks pruned) once
            inputs = _capture(blocks, b, forward, make_batches)
        if start <= b < stop:  # the block alone, on its cached inputs
            Hs = layer_curvature(members, lambda x, blk=blocks[b]: blk(*x["call"][0], **x["call"][1]),
                                 [(x, None) for x in inputs])
        else:
            Hs = layer_curvature(members, forward, make_batches(), [modules[i][1] for g in order[b + 1:] for i in g])
        yield group, Hs
        if start <= b < stop - 1:  # the caller has pruned block b: its outputs are block b + 1's inputs
            with torch.no_grad():
                for x in inputs:
                    args, kwargs = x["call"]
                    x["call"] = _next_inputs(blocks[b](*args, **kwargs), args, kwargs)
        elif b == stop - 1:
            inputs = []

