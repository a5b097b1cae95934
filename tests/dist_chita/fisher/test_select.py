"""Collective top-k against torch.topk / a stable sort, on 1-4 real gloo processes."""

import pytest
import torch

from dist_chita.distributed import comm
from dist_chita.distributed.partition import column_blocks
from dist_chita.fisher.select import topk_mask
from tests import multiproc


def reference_mask(scores, k, segment_ids=None, allowed=None):
    """Stable descending sort per segment: the deterministic top-k (ties -> lower index)."""
    p = scores.numel()
    seg = torch.zeros(p, dtype=torch.int64) if segment_ids is None else segment_ids
    ok = torch.ones(p, dtype=torch.bool) if allowed is None else allowed
    kk = torch.as_tensor(k).reshape(-1)
    out = torch.zeros(p, dtype=torch.bool)
    for g in range(kk.numel()):
        idx = torch.nonzero((seg == g) & ok).flatten()
        order = torch.sort(scores[idx], descending=True, stable=True).indices[: int(kk[g])]
        out[idx[order]] = True
    return out


def nasty_values(seed, p):
    """Ties, zeros, -0.0, duplicates, tiny and huge magnitudes."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(p, generator=g)
    v[::5] = torch.randint(-3, 4, (v[::5].numel(),), generator=g).float()
    v[1::11] = -0.0
    v[2::13] = 0.0
    v[3::17] = 1e-38
    v[4::19] = 3e38
    v[7::23] = v[0]
    return v


@pytest.mark.parametrize("seed", range(40))
def test_single_process_matches_stable_sort_and_topk(seed):
    p = 1 + seed * 37 % 500
    v = nasty_values(seed, p)
    k = seed * 13 % (p + 1)
    mask = topk_mask(v.abs(), k)
    assert torch.equal(mask, reference_mask(v.abs(), k))
    # Same values as torch.topk (which does not promise an order among ties).
    assert torch.equal(torch.sort(v.abs()[mask]).values, torch.sort(torch.topk(v.abs(), k).values).values)


@pytest.mark.parametrize("seed", range(10))
def test_segments_and_allowed(seed):
    g = torch.Generator().manual_seed(100 + seed)
    p, num_seg = 700, 6
    v = nasty_values(seed, p)
    seg = torch.randint(0, num_seg, (p,), generator=g)
    k = torch.randint(0, 150, (num_seg,), generator=g)
    allowed = torch.rand(p, generator=g) > 0.3
    mask = topk_mask(v.abs(), k, seg, allowed)
    assert torch.equal(mask, reference_mask(v.abs(), k, seg, allowed))
    assert not bool((mask & ~allowed).any())


def _sharded_select(v, k, seg, allowed):
    lo, hi = column_blocks(v.numel(), comm.world_size())[comm.rank()]
    with comm.phase("select"):
        mask = topk_mask(
            v[lo:hi].abs(), k, None if seg is None else seg[lo:hi], None if allowed is None else allowed[lo:hi]
        )
    return mask, comm.bytes_by_phase().get("select", 0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_collective_selection_equals_single_process(world_size):
    p = 1003  # uneven blocks
    v = nasty_values(world_size, p)
    for k, seg, allowed in [
        (0, None, None),
        (1, None, None),
        (417, None, None),
        (p, None, None),
        (torch.tensor([5, 0, 300]), torch.arange(p) * 3 // p, None),  # segments straddle ranks
        (torch.tensor([50, 200]), (torch.arange(p) % 2), torch.arange(p) % 7 != 0),
    ]:
        results = multiproc.run(_sharded_select, world_size, v, k, seg, allowed)
        mask = torch.cat([m for m, _ in results])
        assert torch.equal(mask, reference_mask(v.abs(), k, seg, allowed)), (world_size, k)


@pytest.mark.parametrize("world_size", [2, 3])
def test_large_inputs_on_several_ranks(world_size):
    """Inputs large enough that the rounds work on masks over all coordinates (with few distinct values, through
    every round; ranks may switch to candidate lists at different rounds): the single process's mask."""
    g = torch.Generator().manual_seed(5)
    p = 20_000
    few = torch.randint(0, 3, (p,), generator=g).float()
    wide = torch.randn(p, generator=g).exp() ** 6
    wide[: p // 2] = 1.0  # one rank's block all equal, the other's spread out
    for v, k, seg in [(few, 7_001, None), (wide, 9_000, None),
                      (few, torch.tensor([3_000, 1, 2_500]), torch.arange(p) * 3 // p)]:
        results = multiproc.run(_sharded_select, world_size, v, k, seg, None)
        assert torch.equal(torch.cat([m for m, _ in results]), reference_mask(v.abs(), k, seg)), (world_size, k)


def test_communication_does_not_grow_with_p():
    sent = []
    for p in (10_000, 1_000_000):
        v = torch.randn(p, generator=torch.Generator().manual_seed(0))
        results = multiproc.run(_sharded_select, 2, v, p // 10, None, None)
        sent.append(results[0][1])
    assert sent[0] == sent[1] > 0


def _nan_on_rank1():
    v = torch.ones(10)
    if comm.rank() == 1:
        v[3] = float("nan")
    try:
        topk_mask(v, 3)
    except ValueError as e:
        return str(e)
    return "no error"


def test_nan_on_one_rank_fails_every_rank():
    assert multiproc.run(_nan_on_rank1, 2) == ["the values to threshold contains NaN or Inf"] * 2
    with pytest.raises(ValueError, match="NaN or Inf"):
        topk_mask(torch.tensor([1.0, float("inf")]), 1)


@pytest.mark.parametrize("case", ["equal", "few_distinct", "wide", "segments_whole_and_empty", "local_rows"])
def test_large_inputs_through_every_round(case):
    """Inputs large enough that the rounds run on masks over all coordinates before switching to candidate lists
    (and, with equal or few distinct values, never switch): the same mask as the stable sort."""
    g = torch.Generator().manual_seed(7)
    p = 20_000
    seg, allowed, local = None, None, False
    if case == "equal":
        v, k = torch.full((p,), 0.5), 12_345
    elif case == "few_distinct":
        v, k = torch.randint(0, 4, (p,), generator=g).float(), 9_000
    elif case == "wide":
        v = torch.randn(p, generator=g).exp() ** 8  # magnitudes over many binades
        k, allowed = 3_000, torch.rand(p, generator=g) > 0.5
    elif case == "segments_whole_and_empty":
        num_seg = 40
        v = nasty_values(3, p)
        seg = torch.randint(0, num_seg, (p,), generator=g)
        k = torch.randint(0, 400, (num_seg,), generator=g)
        k[::5] = 0  # empty budgets
        k[1::5] = p  # larger than the segment: it is kept whole
    else:  # one segment per row of a (200, 100) weight, all on this rank
        v = nasty_values(4, p)
        seg = torch.arange(p) // 100
        k, local = torch.randint(0, 101, (200,), generator=g), True
    mask = topk_mask(v.abs(), k, seg, allowed, local=local)
    assert torch.equal(mask, reference_mask(v.abs(), k, seg, allowed))


def test_negative_scores_and_budgets_are_refused_but_minus_zero_is_zero():
    """The documented input contract: any negative score (even one just below zero) and any negative budget are
    refused; -0.0 is a valid score equal to 0.0 (the mask then matches the one of +0.0)."""
    with pytest.raises(ValueError, match="non-negative"):
        topk_mask(torch.tensor([1.0, -0.5, 2.0]), 1)
    with pytest.raises(ValueError, match="non-negative"):
        topk_mask(torch.tensor([1.0, -1e-30, 2.0]), 1)
    with pytest.raises(ValueError, match="budgets must be non-negative"):
        topk_mask(torch.tensor([1.0, 0.5, 2.0]), -1)
    with pytest.raises(ValueError, match="budgets must be non-negative"):
        topk_mask(torch.tensor([1.0, 0.5, 2.0]), torch.tensor([2, -1]), segment_ids=torch.tensor([0, 1, 1]))
    assert torch.equal(topk_mask(torch.tensor([-0.0, 3.0, 0.0]), 2), topk_mask(torch.tensor([0.0, 3.0, 0.0]), 2))
