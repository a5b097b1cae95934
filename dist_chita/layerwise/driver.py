"""Layer-wise CHITA over a whole model: blocks pruned in order, each on the inputs of the already pruned model.

The orchestration of ``objective: layerwise`` (:mod:`dist_chita.layerwise.row_solver` is the math), on every rank:

1. the prunable layers are grouped into blocks, in model order: the layers whose names share the prefix up to
   their first numeric component (``encoder.layer.3``; a layer without one is a block of its own);
2. for each block, every rank runs its share of the calibration samples through the model (earlier blocks
   already pruned, as SparseGPT does; or only through the block, from cached inputs:
   :func:`block_curvatures`) and accumulates each layer's H = X^T X over its input rows (tokens, padding
   excluded; Conv2d: unfolded patches; a grouped Conv2d has one H per group of output rows, over that group's
   inputs); one all-reduce of every H (d x d per layer, independent of n and of the layer's output count) gives
   the curvature of all N rows of all ranks;
3. each layer's output rows are shared among the ranks in whole chunks of ``layerwise.ROW_CHUNK`` rows (each
   chunk is solved alone, so its bits do not depend on the number of ranks; a chunk never mixes groups of a
   grouped Conv2d); every rank solves its rows
   (:func:`~dist_chita.layerwise.row_solver.solve_rows`; with a layer budget each row with its share of it, computed by
   every rank from the whole layer: :func:`~dist_chita.layerwise.row_solver.row_budgets`) and one all-reduce of the (r,
   d) weights (zeros elsewhere, so the sum is exact) gives every rank the pruned layer, which is written back (under
   ZeRO-3 into the partition).

Rows are independent problems, so the result does not depend on the number of ranks. No per-sample gradients and
no Fisher factor: peak memory is the model plus one block's H matrices. Nothing here parses a config or prints.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_chita.distributed import comm
from dist_chita.distributed.layout import ColumnLayout
from dist_chita.fisher.driver import PruneOutcome, StageReport
from dist_chita.io import params
from dist_chita.io.data import to_device
from dist_chita.layerwise.row_solver import (
    ROW_CHUNK,
    keep_mask,
    objectives,
    obs_denominator,
    ridged,
    row_budgets,
    solve_rows,
)
from dist_chita.methods.sparsegpt import sparsegpt_rows
from dist_chita.methods.wanda import wanda_scores
from dist_chita.prunable import conv1d_types, named_shapes
from dist_chita.sparsity import Sparsity, kept_count, layer_sparsities, mean_sparsity

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


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, conv1d_types())


def weight_rows(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The layer's weights as (outputs, inputs): Linear as is, transformers' Conv1D transposed, Conv2d flattened
    over (in_channels, kh, kw) in unfold's order."""
    if _is_conv1d(module):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def input_size(module: nn.Module, shape: tuple[int, ...]) -> int:
    """d, the length of a row of :func:`weight_rows` for a weight of ``shape``."""
    return shape[0] if _is_conv1d(module) else math.prod(shape[1:])


def _from_rows(module: nn.Module, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return rows.T.contiguous() if _is_conv1d(module) else rows.reshape(shape)


def _check_conv(module: nn.Module, name: str = "a Conv2d layer") -> None:
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise ValueError(f"{name}: objective layerwise supports Conv2d with zero padding only "
                         f"(padding_mode={module.padding_mode!r}); "
                         "leave it out of the prunable layers or use the Fisher objective")


def groups(module: nn.Module) -> int:
    """g: a grouped Conv2d's output rows form g groups, group j seeing only its own inputs (its own H); else 1."""
    return module.groups if isinstance(module, nn.Conv2d) else 1


def input_rows(module: nn.Module, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of X that ``module`` sees in this forward: (N_batch, inputs) float32. Sequences: one row per
    token where ``token_mask`` (b, T) is set; Conv2d: one row per output position (unfolded patch, all channels:
    with g groups, columns [j d, (j + 1) d) are group j's inputs, d = :func:`input_size`)."""
    if isinstance(module, nn.Conv2d):
        _check_conv(module)
        padding = module.padding
        if padding == "valid":
            padding = 0
        elif padding == "same":  # stride 1; torch puts the odd pixel of an even total at the end
            total = [dil * (k - 1) for dil, k in zip(module.dilation, module.kernel_size, strict=True)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = 0
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)  # (b, Cin*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).float()
    if x.dim() == 3 and token_mask is not None and token_mask.shape == x.shape[:2]:
        return x[token_mask.bool()].float()
    return x.reshape(-1, x.shape[-1]).float()


def my_microbatches(batches: Iterable) -> Iterator:
    """This rank's share of the global micro-batches ``batches`` (the same sequence on every rank): every R-th,
    from the rank's index. Each micro-batch then has the same samples (and padding) on any number of ranks, so the
    layer inputs X are computed bit for bit alike (and :func:`layer_curvature` sums them exactly)."""
    world, rank = comm.world_size(), comm.rank()
    return (b for j, b in enumerate(batches) if j % world == rank)


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


def layer_curvature(
    modules: Sequence[tuple[str, nn.Module]],
    forward: Callable[[object], object],
    batches: Iterable[tuple[object, object]],
    later: Sequence[nn.Module] = (),
    share_inputs: bool = True,
) -> list[torch.Tensor]:
    """H = X^T X / N (float64, inputs x inputs) of every module over all ranks' calibration rows. Each
    micro-batch's X_b^T X_b is computed in float32 and summed in float64, which is exact, so H has the same bits
    on any number of ranks. A grouped Conv2d (g > 1 :func:`groups`) gets (g, d, d): each group's own H.

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
    # "after": one of ``later`` has started in this forward; "in_order": no layer of the block ran after that;
    # "inputs": (input, layer) of this forward's layers that formed their product; "first": the first forward
    state: dict = {"mask": None, "record": True, "after": False, "in_order": True, "cut": False, "inputs": [],
                   "first": True, "broken": False}
    shared: dict[int, int] = {}  # layer -> the earlier layer whose H it takes
    mine = [batch for batch, _ in batches]  # on the host; each moves to the device for its forward
    partitioned = any(params.is_partitioned(m.weight) for _, m in modules)
    if partitioned:
        later = ()

    def at_later(module, args):
        state["after"] = True
        if state["cut"]:
            raise _BlockSeen

    def hook(i: int):
        def fn(module, args, out):
            state["in_order"] &= not state["after"]
            if not state["record"]:
                return
            x = args[0]
            same = next((j for y, j in state["inputs"] if y is x and H[j].shape == H[i].shape), None)
            if state["first"] and same is not None and share_inputs:
                shared[i] = same
            if i in shared:
                if same == shared[i]:
                    return
                state["broken"] = True  # no longer the same input: all H are formed again, unshared
            rows = input_rows(module, x.detach(), state["mask"])
            _add_products(H[i], rows)
            count[i] += rows.shape[0]
            if not isinstance(module, nn.Conv2d):  # its rows depend on the conv's shape too
                state["inputs"].append((x, i))
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(modules)]
    handles += [m.register_forward_pre_hook(at_later) for m in later]
    try:
        with torch.no_grad():
            for batch, state["record"] in collective_batches(mine, device, partitioned):
                state["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
                state["after"] = False
                try:
                    forward(batch)
                except _BlockSeen:
                    pass
                state["inputs"] = []
                state["first"] = state["first"] and not state["record"]
                state["cut"] = bool(later) and state["in_order"]  # from the second forward on
    finally:
        for h in handles:
            h.remove()
    if share_inputs:  # every rank that ran a forward must have found the same sharing
        code = [shared.get(i, -1) + 1.0 for i in range(len(modules))] if mine else [0.0] * len(modules)
        agreed = comm.all_reduce_floats(code + [-c if mine else -1e9 for c in code] + [state["broken"]], op="max")
        most, least = agreed[:len(modules)], [-v for v in agreed[len(modules):-1]]
        if agreed[-1] or most != least:
            return layer_curvature(modules, forward, [(b, None) for b in mine], later, share_inputs=False)
        shared = {i: int(v) - 1 for i, v in enumerate(most) if v > 0}
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


LAYERWISE_METHODS = ("chita", "wanda", "sparsegpt")


def sparsegpt_owners(modules: Sequence[tuple[str, nn.Module]], group: Sequence[int], world: int
                     ) -> dict[tuple[int, int], int]:
    """The rank that runs SparseGPT on part j (a grouped Conv2d's group of rows, else all rows) of layer i, for
    every (i, j) of a block (``group``: indices into ``modules``): largest first, by the cost d (r + d) of a part
    of r rows of d inputs (a column loop of d steps over the rows, and the factorisation; measured on one core:
    66 ms for 384 x 384, 168 ms for 1536 x 384, 622 ms for 384 x 1536), each to the least loaded rank (ties: the
    earlier layer and part, the lower rank), so every rank derives the same owners."""
    items = []
    for i in group:
        m = modules[i][1]
        shape = tuple(params.shape(m.weight))
        d, g = input_size(m, shape), groups(m)
        r = math.prod(shape) // d // g
        items += [(d * (r + d), i, j) for j in range(g)]
    load, owners = [0] * world, {}
    for cost, i, j in sorted(items, key=lambda t: (-t[0], t[1], t[2])):
        rank = min(range(world), key=lambda q: (load[q], q))
        owners[(i, j)] = rank
        load[rank] += cost
    return owners


def _baseline_runs(parts: Sequence[tuple[int, int]], world: int, rank: int, chunk: int, method: str,
                   layer: int, owners: dict[tuple[int, int], int]) -> list[tuple[int, int, int]]:
    """This rank's (part, lo, hi) of layer number ``layer`` for a baseline: Wanda's rows are independent (shared as
    :func:`_my_runs` shares CHITA's); SparseGPT chooses masks over all rows of a part, so part j goes whole to
    ``owners[(layer, j)]`` (:func:`sparsegpt_owners`)."""
    if method == "wanda":
        return _my_runs(parts, world, rank, chunk)
    return [(j, lo, hi) for j, (lo, hi) in enumerate(parts) if owners[(layer, j)] == rank]


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
    what caching one micro-batch's inputs of a block costs (:func:`prune_layerwise` keeps them for every
    micro-batch of the rank, and the next block's beside them)."""
    blocks = _submodules(model, block_names(modules))
    if blocks is None:
        return 0
    return max((_tensor_bytes(call[1:]) for call in _block_calls(blocks, forward, batch)), default=0)


def _cached_range(model: nn.Module, names: Sequence[str], forward: Callable[[object], object],
                  make_batches: Callable[[], Iterable], enabled: bool) -> tuple[list[nn.Module], int, int]:
    """The blocks (submodules named ``names``) and the run [start, stop) of them that :func:`prune_layerwise`
    computes on cached inputs (:func:`chained_blocks` on this rank's first micro-batch, the same on every rank,
    else none); none under ZeRO-3."""
    blocks = _submodules(model, names)
    if blocks is None:
        return [], 0, 0
    if not enabled or len(blocks) < 2 or any(params.is_partitioned(p) for p in model.parameters()):
        return blocks, 0, 0
    first = next(iter(make_batches()), None)
    if first is None:  # no micro-batch here: the others decide
        votes = [-1e9] * 4
    else:
        start, stop = chained_blocks(blocks, forward, to_device(first[0], next(model.parameters()).device))
        votes = [start, -start, stop, -stop]
    most = comm.all_reduce_floats(votes, op="max")
    if most[0] != -most[1] or most[2] != -most[3] or most[2] <= -1e9:
        return blocks, 0, 0
    return blocks, int(most[0]), int(most[2])


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


def memory_bytes(modules: Sequence[tuple[str, nn.Module]], method: str = "chita") -> int:
    """Peak bytes per rank of :func:`prune_layerwise` besides the model: the largest block's H matrices (float64,
    twice: accumulated and the all-reduced copy) plus the largest layer's solve (Q in float32 and, at most at once,
    its float64 copy and Cholesky factor; about 40 float32 (c, d) matrices for a chunk of c rows: iterates,
    candidates, CG; the layer's weights and their pruned copy). ``method="sparsegpt"``: four float64 (d, d)
    matrices (H, its factor, the inverse, U) and three float64 copies of the weights instead, plus every layer of
    the largest block read and solved at once (its weights and their pruned copy, float32)."""
    shapes = [(m, tuple(params.shape(m.weight))) for _, m in modules]
    dims = [(math.prod(shape) // input_size(m, shape), input_size(m, shape)) for m, shape in shapes]
    curvature = max(sum(2 * 8 * groups(shapes[i][0]) * dims[i][1] ** 2 for i in group)
                    for group in blocks_in_order(modules))
    if method == "sparsegpt":
        solve = max(32 * d * d + 24 * r * d for r, d in dims) + max(
            sum(8 * dims[i][0] * dims[i][1] for i in group) for group in blocks_in_order(modules))
    else:
        solve = max(20 * d * d + 40 * 4 * min(r, ROW_CHUNK) * d + 16 * r * d for r, d in dims)
    return curvature + solve


def prune_magnitude(modules: Sequence[tuple[str, nn.Module]], sparsity: Sparsity,
                    nm: tuple[int, int] | None = None, per_layer: bool = False) -> None:
    """Magnitude pruning on the rows :func:`prune_layerwise` uses (one output's weights; or N:M along them; or,
    with ``per_layer``, the layer's largest), in place, one layer at a time (the baseline of a layerwise run);
    ``sparsity``: one target, or one per module. Every rank computes the same (collective under ZeRO-3)."""
    targets = layer_sparsities(sparsity, len(modules)) if nm is None else [0.0] * len(modules)
    for (_, m), s in zip(modules, targets, strict=True):
        weight = params.read(m.weight)
        W = weight_rows(m, weight).float()
        r, d = W.shape
        k = None if nm else (row_budgets(W.abs(), kept_count(r * d, s), W != 0) if per_layer
                             else kept_count(d, s))
        mask = keep_mask(W.abs(), k, nm, W != 0)
        params.write(m.weight, _from_rows(m, W * mask, weight.shape))


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
    row_chunk: int = ROW_CHUNK,
    cache_inputs: bool = True,
    method: str = "chita",
) -> PruneOutcome:
    """Prune ``modules`` of ``model`` in place with layer-wise CHITA (module docstring), every output row to
    ``sparsity`` (or N:M with ``nm``); with ``per_layer`` every layer to ``sparsity``, its budget shared among its
    rows by the layer-wide OBS saliency (:func:`~dist_chita.layerwise.row_solver.row_budgets`), each row then solved
    with its share. ``sparsity`` may also give every module its own target (a sequence as long as ``modules``). The
    ridge of layer l is ``damp * mean(diag H_l)`` (of each group's H for a grouped Conv2d).

    ``forward(batch)`` runs the model on one micro-batch; ``make_batches()`` returns a fresh iterable of this
    rank's ``(batch, indices)``; ``solver_options``: keywords of :func:`~dist_chita.layerwise.row_solver.solve_rows`;
    ``row_chunk``: rows solved together (and the unit in which rows are shared among ranks).
    ``cache_inputs``: run the blocks that allow it on cached inputs (:func:`block_curvatures`).
    ``method``: ``"chita"``, or a baseline on the same inputs and blocks: ``"wanda"`` (:mod:`dist_chita.methods.wanda`:
    rows shared among ranks as CHITA's) or ``"sparsegpt"`` (:mod:`dist_chita.methods.sparsegpt`: with ``per_layer`` its
    masks are chosen over all rows of 128-column blocks, as in the paper, else per row; each layer whole on one
    rank, :func:`sparsegpt_owners`, a block's layers solved at once on all ranks).
    Returns one :class:`StageReport` for the whole model (objective: the sum over layers of the reconstruction
    objective, with, for CHITA, the magnitude-support + re-fit objective beside it).
    """
    if method not in LAYERWISE_METHODS:
        raise ValueError(f"unknown layerwise method {method!r} (one of {', '.join(LAYERWISE_METHODS)})")
    targets = layer_sparsities(sparsity, len(modules)) if nm is None else [0.0] * len(modules)
    if damp <= 0:
        raise ValueError(f"damp must be > 0, got {damp}")
    for name, m in modules:  # before any work
        _check_conv(m, name)
    world, rank = comm.world_size(), comm.rank()
    sizes = [params.numel(m.weight) for _, m in modules]
    target = float(sparsity) if isinstance(sparsity, int | float) else mean_sparsity(targets, sizes)
    report = StageReport(sparsity=target if nm is None else 1.0 - nm[0] / nm[1], kept=0, objective=0.0,
                         magnitude_objective=0.0)
    seconds = {"curvature": 0.0, "solver": 0.0, "writeback": 0.0}
    bytes_before = comm.bytes_by_phase()
    warm = 0.0
    done = 0

    def solve_layer(i: int, H: torch.Tensor, owners: dict) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's rows of this rank solved on its H: (i, its weight, W (r, d) with this rank's rows, zero
        elsewhere, this rank's [objective, magnitude objective, warm objective]); ``owners``: SparseGPT's."""
        m, sparsity_i = modules[i][1], targets[i]
        t = time.perf_counter()
        weight = params.read(m.weight)
        W_bar = weight_rows(m, weight).float()
        r, d = W_bar.shape
        H_parts = H.reshape(-1, d, d)  # one H per group of rows (grouped Conv2d), else one for all rows
        per_part = r // H_parts.shape[0]
        parts = [(j * per_part, (j + 1) * per_part) for j in range(H_parts.shape[0])]
        W = torch.zeros_like(W_bar)
        allowed = W_bar != 0
        layer_scale = float(H_parts.diagonal(dim1=1, dim2=2).mean())
        # the ridge scales with the group's mean diag H; a dead group (inputs all zero, f the ridge alone:
        # magnitude is optimal) takes the layer's, or 1 when the whole layer is dead
        lams = [damp * (float(h.diagonal().mean()) or layer_scale or 1.0 / damp) for h in H_parts]
        q_inv_diags = [None] * len(parts)  # each part's [Q^-1]_jj, when the budgets need it (else solve_rows)
        if method == "wanda":  # the scores of every row: the per-layer budgets and every run's masks
            scores = torch.cat([wanda_scores(W_bar[lo:hi], h.diagonal().float())
                                for (lo, hi), h in zip(parts, H_parts, strict=True)])
        if nm is not None or method == "sparsegpt":
            k = None
        elif per_layer and method == "wanda":  # the layer's largest scores, counted per row
            k = row_budgets(scores, kept_count(r * d, sparsity_i), allowed)
        elif per_layer:  # the same budgets on every rank: computed from the whole layer
            q_inv_diags = [obs_denominator(ridged(h, lam)) for h, lam in zip(H_parts, lams, strict=True)]
            saliency = torch.cat([W_bar[lo:hi].pow(2) / q for (lo, hi), q in zip(parts, q_inv_diags, strict=True)])
            k = row_budgets(saliency, kept_count(r * d, sparsity_i), allowed)
        else:
            k = kept_count(d, sparsity_i)
        objective = torch.zeros(3, dtype=torch.float64, device=W.device)
        if method == "chita":
            for j, lo, hi in _my_runs(parts, world, rank, row_chunk):
                res = solve_rows(W_bar[lo:hi], H_parts[j], lams[j],
                                 k=k[lo:hi] if isinstance(k, torch.Tensor) else k, nm=nm, allowed=allowed[lo:hi],
                                 row_chunk=row_chunk, q_inv_diag=q_inv_diags[j], **(solver_options or {}))
                W[lo:hi] = res.W
                objective += torch.tensor([res.objective, res.magnitude_objective, res.warm_objective],
                                          dtype=torch.float64, device=W.device)
                report.iterations = max(report.iterations, res.iterations)
        else:  # a baseline: its result and the reconstruction objective of it
            Qs: dict[int, torch.Tensor] = {}  # part -> Q in float64 (the same sum on any split of the rows)
            for j, lo, hi in _baseline_runs(parts, world, rank, row_chunk, method, i, owners):
                if method == "wanda":
                    k_j = k[lo:hi] if isinstance(k, torch.Tensor) else k
                    W[lo:hi] = W_bar[lo:hi] * keep_mask(scores[lo:hi], k_j, nm, allowed[lo:hi])
                else:
                    W[lo:hi] = sparsegpt_rows(W_bar[lo:hi], H_parts[j], sparsity_i, damp=damp, nm=nm,
                                              allowed=allowed[lo:hi], per_row=not per_layer)
                if j not in Qs:  # once per part, not per chunk of rows
                    Qs[j] = ridged(H_parts[j], lams[j]).double()
                f = float(objectives((W[lo:hi] - W_bar[lo:hi]).double(), Qs[j]).sum())
                objective += torch.tensor([f, 0.0, f], dtype=torch.float64, device=W.device)
        seconds["solver"] += time.perf_counter() - t
        return i, weight, W, objective

    curvatures = block_curvatures(model, modules, forward, make_batches, cache_inputs)
    while True:
        t = time.perf_counter()
        with comm.phase("curvature"):  # the forwards for the next block (through the pruned earlier ones) and H
            item = next(curvatures, None)
        seconds["curvature"] += time.perf_counter() - t
        if item is None:
            break
        group, Hs = item
        owners = sparsegpt_owners(modules, group, world) if method == "sparsegpt" else {}
        solved = (solve_layer(i, H, owners) for i, H in zip(group, Hs, strict=True))
        if method == "sparsegpt":  # layers go whole to one rank each: all of the block's are solved before writing
            solved = list(solved)
        for i, weight, W, objective in solved:
            m = modules[i][1]
            t = time.perf_counter()
            with comm.phase("writeback"):
                W = comm.all_reduce(W)
                objective = comm.all_reduce(objective)
                params.write(m.weight, _from_rows(m, W, weight.shape))
            seconds["writeback"] += time.perf_counter() - t
            report.objective += float(objective[0])
            report.magnitude_objective += float(objective[1])
            warm += float(objective[2])
            report.kept += int((W != 0).sum())
            done += 1
            if progress is not None:
                progress("layers", done, len(modules))
    (report.iterations,) = [int(v) for v in comm.all_reduce_floats([report.iterations], op="max")]
    report.objective_trace = [warm, report.objective] if method == "chita" else [report.objective]
    if method != "chita":
        report.magnitude_objective = None
    report.seconds = seconds
    report.bytes_sent = {k: v - bytes_before.get(k, 0) for k, v in comm.bytes_by_phase().items()}
    masks = {name: params.read(m.weight) != 0 for name, m in modules}
    layout = ColumnLayout.build(named_shapes(modules), world, rows=True)
    return PruneOutcome(layout, [report], masks)
