"""Exact top-k over values spread across ranks, by collective selection.

The hard-thresholding operator H_k of IHT keeps the k largest |v_j| of a vector
whose coordinates live on different ranks (column blocks). Gathering the
values would cost O(p) communication per iteration; instead the k-th largest
score is found by a radix select over the IEEE-754 bit patterns of the scores:
for non-negative floats the int32 bit pattern is monotone in the value, so a
few rounds of all-reduced histograms over successive groups of bits pin down
the exact threshold T. Communication is O(bins x rounds x segments),
independent of p, and no rank ever sees another rank's values.

Ties at T are broken by global index (lower index wins), so exactly k
coordinates survive and the result equals a stable descending sort of the
scores: ``torch.sort(scores, descending=True, stable=True).indices[:k]``.
Blocks are contiguous and in rank order, so "global index order" is rank
order, then local order.

Scores may be split into *segments* (one per layer, say), each with its own
budget k_g; a segment may straddle ranks. One all-reduce per round serves
all segments at once. When every segment lies on one rank (``local``: the rows
of a row-cut layout, :func:`dist_chita.distributed.partition.row_blocks`), k and the
segment ids are that rank's own and only the finiteness check communicates
(one integer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_chita.distributed import comm

# Bits of the (non-negative, so sign bit 0) float32 pattern resolved per round.
# One segment: 3 rounds of up to 4096 bins; many segments: 4 rounds of <= 256
# bins, to keep the histogram all-reduce small when it carries every layer.
_ROUNDS_ONE_SEGMENT = (11, 12, 8)
_ROUNDS_MANY_SEGMENTS = (7, 8, 8, 8)
# A round works on the index list of the candidates once fewer than 1 / _SPARSE_BELOW of the coordinates are left.
_SPARSE_BELOW = 16


def radix_bits(num_segments: int) -> tuple[int, ...]:
    """Bits of the float32 pattern that :func:`topk_mask` resolves per histogram round with ``num_segments``
    segments: (11, 12, 8) for one, (7, 8, 8, 8) for more. Unless the segments are local, each round all-reduces a
    (num_segments, 2^bits) int64 histogram."""
    return _ROUNDS_ONE_SEGMENT if num_segments == 1 else _ROUNDS_MANY_SEGMENTS


def check_finite(v: torch.Tensor, what: str) -> None:
    """Raise ValueError on every rank if any rank's ``v`` holds NaN or Inf.

    The check is collective so that all ranks fail together instead of the
    healthy ones waiting forever in the next collective.
    """
    bad = torch.tensor([0 if bool(torch.isfinite(v).all()) else 1], dtype=torch.int64, device=v.device)
    comm.all_reduce(bad)
    if bad.item():
        raise ValueError(f"{what} contains NaN or Inf")


def topk_mask(
    scores: torch.Tensor,
    k: torch.Tensor | int,
    segment_ids: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    local: bool = False,
) -> torch.Tensor:
    """Mask of the k_g largest ``scores`` of every segment g, over all ranks.

    Args:
        scores: (p_r,) float, non-negative (e.g. |v|); -0.0 counts as 0.0.
        k: budget per segment, an int (one segment) or an int64 tensor (G,);
            a segment with fewer allowed coordinates than k_g keeps them all.
        segment_ids: (p_r,) int64 in [0, G), the segment of each local
            coordinate; None puts every coordinate in segment 0.
        allowed: (p_r,) bool; coordinates with False are never selected.
        local: every segment lies on this rank alone (k and segment_ids are this
            rank's own); then the only collective is the NaN/Inf check's.

    Returns:
        (p_r,) bool mask; over all ranks exactly min(k_g, allowed in g)
        coordinates of segment g are True.

    Collectives (G segments, R ranks): the NaN/Inf check (1 int64), then, unless ``local``, the allowed count
    per segment (G int64), one histogram per round ((G, 2^bits) int64 for the bits of :func:`radix_bits`) and
    the ties per rank and segment ((R, G) int64): 3 + rounds all-reduces; with ``local`` the check's alone
    (the cost model counts them: :func:`dist_chita.planning.costmodel.projection_collectives`).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be a vector, got shape {tuple(scores.shape)}")
    device = scores.device
    kk = torch.as_tensor(k, dtype=torch.int64, device=device).reshape(-1)
    num_seg = kk.numel()
    check_finite(scores, "the values to threshold")
    if bool((scores < 0).any()):
        raise ValueError("scores must be non-negative")
    if bool((kk < 0).any()):
        raise ValueError("budgets must be non-negative")

    # int32 bit patterns: monotone in the value for non-negative floats (abs: -0.0 -> 0.0)
    keys = scores.detach().float().abs().view(torch.int32)
    # int32 ids while the histogram index seg * bins + digit fits in int32: no widening passes over p
    small = num_seg << max(radix_bits(num_seg)) < 2**31
    seg = None if segment_ids is None else segment_ids.to(device=device, dtype=torch.int32 if small else torch.int64)
    if seg is not None and seg.shape != keys.shape:
        raise ValueError("segment_ids must have the shape of scores")
    live = None if allowed is None else allowed.to(device=device, dtype=torch.bool)  # None: every coordinate
    sel = _start(keys, seg, kk, live, local)
    rounds = radix_bits(num_seg)
    shift = sum(rounds)
    for bits in rounds:
        shift -= bits
        _radix_round(sel, bits, shift)
    _break_ties(sel)
    return sel.selected


@dataclass
class _Selection:
    """The state of one :func:`topk_mask` between its rounds.

    keys: (p,) int32 bit patterns of the scores; seg: (p,) segment ids or None (one segment); need: (G,) int64, how
    many each segment still has to pick; selected: (p,) bool, picked so far. The candidates left are ``live`` (a
    mask over all p, None for every coordinate) while many are left, then ``cand`` (their indices): a gather costs
    several elementwise passes per element, so the index list pays off only once few are left.
    """

    keys: torch.Tensor
    seg: torch.Tensor | None
    num_seg: int
    local: bool
    need: torch.Tensor
    selected: torch.Tensor
    live: torch.Tensor | None
    cand: torch.Tensor | None = None


def _start(keys: torch.Tensor, seg: torch.Tensor | None, kk: torch.Tensor, live: torch.Tensor | None,
           local: bool) -> _Selection:
    """The allowed count per segment (all-reduced unless ``local``); a segment whose budget covers all of it is
    selected whole and takes no part in the rounds."""
    p, num_seg, device = keys.numel(), kk.numel(), keys.device
    dump = num_seg  # the histogram bin past the last: coordinates that take no part
    if seg is None:
        total = torch.tensor([p], dtype=torch.int64, device=device) if live is None else live.sum().reshape(1)
    else:
        total = torch.bincount(seg if live is None else torch.where(live, seg, dump), minlength=num_seg + 1)
        total = total[:num_seg]  # allowed coordinates per segment
    if not local:
        comm.all_reduce(total)
    # Budgets larger than a segment's allowed count keep the whole segment.
    need = torch.minimum(kk, total)
    whole = need == total
    selected = torch.zeros(p, dtype=torch.bool, device=device)
    if bool(whole.any()):
        in_whole = (whole if seg is None else whole[seg]).expand(p)
        selected = in_whole.clone() if live is None else in_whole & live
        live = ~in_whole if live is None else live & ~in_whole
        need = torch.where(whole, torch.zeros_like(need), need)
    return _Selection(keys, seg, num_seg, local, need, selected, live)


def _radix_round(sel: _Selection, bits: int, shift: int) -> None:
    """One histogram round over the digit (keys >> shift) & (2^bits - 1) of the candidates: per segment, those above
    the bin holding the need_g-th largest are selected, those in it stay candidates."""
    bins, num_seg, seg = 1 << bits, sel.num_seg, sel.seg
    active = sel.need > 0
    if sel.cand is None:
        key_c, seg_c = sel.keys, seg
        if num_seg > 1 and not bool(active.all()):
            sel.live = active[seg] if sel.live is None else sel.live & active[seg]
    else:
        if num_seg > 1:
            sel.cand = sel.cand[active[seg[sel.cand]]]
        key_c, seg_c = sel.keys[sel.cand], None if seg is None else seg[sel.cand]
    digit = (key_c >> shift) & (bins - 1)
    flat = digit if seg_c is None else seg_c * bins + digit
    if sel.cand is None and sel.live is not None:
        flat = torch.where(sel.live, flat, num_seg * bins)
    hist = torch.bincount(flat, minlength=num_seg * bins + 1)[: num_seg * bins].reshape(num_seg, bins)
    if not sel.local:
        comm.all_reduce(hist)
    # at_or_above[g, b] = number of candidates of segment g whose digit >= b.
    at_or_above = hist.flip(1).cumsum(1).flip(1)
    # The bin holding the need_g-th largest: the largest b with at_or_above >= need.
    b = (at_or_above >= sel.need[:, None]).sum(1) - 1
    b = b.clamp(min=0)
    above = at_or_above.gather(1, b[:, None]).squeeze(1) - hist.gather(1, b[:, None]).squeeze(1)
    b = b.to(digit.dtype)
    bs = b if seg_c is None else b[seg_c]
    win, tie = digit > bs, digit == bs
    if sel.cand is None:
        if sel.live is not None:
            win, tie = win & sel.live, tie & sel.live
        sel.selected |= win
        sel.live = tie
        if _SPARSE_BELOW * int(tie.sum()) < sel.keys.numel():
            sel.cand = torch.nonzero(tie, as_tuple=True)[0]
    else:
        sel.selected[sel.cand[win]] = True
        sel.cand = sel.cand[tie]
    sel.need = torch.where(active, sel.need - above, sel.need)


def _break_ties(sel: _Selection) -> None:
    """The candidates left all equal their segment's threshold: keep the first need_g of them in global index order
    (rank order, then local order; unless ``local``, one all-reduce of the ties per rank and segment)."""
    cand = torch.nonzero(sel.live, as_tuple=True)[0] if sel.cand is None else sel.cand
    s = torch.zeros_like(cand) if sel.seg is None else sel.seg[cand]
    ties = torch.bincount(s, minlength=sel.num_seg)[: sel.num_seg]
    if sel.local:
        before = torch.zeros_like(ties)
    else:
        world, me = comm.world_size(), comm.rank()
        table = torch.zeros(world, sel.num_seg, dtype=torch.int64, device=cand.device)
        table[me] = ties
        comm.all_reduce(table)
        before = table[:me].sum(0)
    quota = (sel.need - before).clamp(min=0)
    # Position of each tied candidate among this rank's ties of its segment.
    order = torch.argsort(s.long() * sel.keys.numel() + cand)
    s_sorted = s[order]
    starts = torch.cumsum(ties, 0) - ties
    pos = torch.arange(cand.numel(), device=cand.device) - starts[s_sorted]
    keep = pos < quota[s_sorted]
    sel.selected[cand[order[keep]]] = True
