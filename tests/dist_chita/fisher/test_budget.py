"""The constraint set C: projections and the support-change step, against brute force."""

import itertools
import math

import pytest
import torch

from dist_chita.distributed import comm
from dist_chita.distributed.partition import column_blocks, row_blocks
from dist_chita.fisher.budget import Budget
from tests import multiproc


def brute_force_nm(v, n, m, allowed):
    """Best N-of-M choice per group by enumeration (ties -> lexicographically first)."""
    out = torch.zeros(len(v), dtype=torch.bool)
    for g in range(len(v) // m):
        idx = list(range(g * m, (g + 1) * m))
        ok = [i for i in idx if allowed[i]]
        choices = itertools.combinations(ok, min(n, len(ok)))
        best = max(choices, key=lambda c: (sum(abs(v[i]) for i in c), [-i for i in c]))
        out[list(best)] = True
    return out


def test_n_m_projection_matches_enumeration():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, generator=g)
    v[::9] = 0.0
    allowed = torch.rand(64, generator=g) > 0.2
    for n, m in [(1, 4), (2, 4), (3, 8)]:
        mask = Budget.n_m(64, n, m, allowed).project(v)
        assert torch.equal(mask, brute_force_nm(v.tolist(), n, m, allowed.tolist())), (n, m)


def test_per_row_projection_matches_a_stable_sort_of_every_row():
    g = torch.Generator().manual_seed(1)
    runs = [(6, 8, 3), (4, 13, 5), (3, 1, 1), (2, 20, 19)]
    p = sum(c * n for c, n, _ in runs)
    v = torch.randn(p, generator=g)
    v[::7] = 0.0
    v[5::11] = -0.0
    v[40:60] = v[40]  # ties within rows
    allowed = torch.rand(p, generator=g) > 0.2
    mask = Budget.per_row(runs, allowed).project(v)
    expect, start = torch.zeros(p, dtype=torch.bool), 0
    for count, length, keep in runs:
        for _ in range(count):
            row = [i for i in range(start, start + length) if allowed[i]]
            order = sorted(row, key=lambda i: (-abs(float(v[i])), i))  # largest first, lower index on ties
            expect[order[:keep]] = True
            start += length
    assert torch.equal(mask, expect)


def test_budget_errors_name_the_problem():
    with pytest.raises(ValueError, match="budget k is 0"):
        Budget.global_topk(10, 0)
    with pytest.raises(ValueError, match="exceeds the 8 prunable weights"):
        Budget.global_topk(10, 9, allowed=torch.arange(10) < 8)
    with pytest.raises(ValueError, match="segment 1"):
        Budget.per_segment(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="0 < N < M"):
        Budget.n_m(8, 4, 4)


def test_widened_budget_is_capped():
    b = Budget.per_segment(torch.tensor([0] * 10 + [1] * 4), torch.tensor([4, 3])).widened(1.5)
    assert b.k.tolist() == [6, 4]


def support_at(budget, w, g, tau):
    return budget.project(w - tau * g)


@pytest.mark.parametrize("kind", ["global", "segments", "nm", "rows"])
def test_tau_change_is_the_first_support_change(kind):
    """Scan tau finely: the support is unchanged just below tau_change and changes just above it."""
    p = 48
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        w0 = torch.randn(p, generator=gen, dtype=torch.float64).float()
        grad = torch.randn(p, generator=gen)
        if kind == "global":
            budget = Budget.global_topk(p, 12)
        elif kind == "segments":
            budget = Budget.per_segment(torch.arange(p) // 16, torch.tensor([3, 5, 4]))
        elif kind == "rows":
            budget = Budget.per_row([(2, 8, 3), (4, 5, 2), (1, 12, 7)])
        else:
            budget = Budget.n_m(p, 2, 4)
        support = budget.project(w0)
        w = torch.where(support, w0, torch.zeros_like(w0))
        tau = budget.tau_change(w, grad, support)
        assert math.isfinite(tau) and tau > 0
        assert torch.equal(support_at(budget, w, grad, tau * (1 - 1e-4)), support)
        assert not torch.equal(support_at(budget, w, grad, tau * (1 + 1e-4)), support)
        for frac in torch.linspace(0.01, 0.99, 25).tolist():
            assert torch.equal(support_at(budget, w, grad, tau * frac), support)


ROWS = [(25, 8, 3), (40, 15, 6), (10, 20, 11)]  # (count, length, keep): 1000 weights


def _sharded(v, kind):
    p = v.numel()
    lo, hi = column_blocks(p, comm.world_size(), align=4)[comm.rank()]
    if kind == "rows":  # whole rows per rank, as in a row-cut layout
        lo, hi = row_blocks([(c, n) for c, n, _ in ROWS], comm.world_size())[comm.rank()]
        runs, start = [], 0
        for count, length, keep in ROWS:
            a, b = max(lo, start), min(hi, start + count * length)
            if a < b:
                runs.append(((b - a) // length, length, keep))
            start += count * length
        budget = Budget.per_row(runs)
    elif kind == "segments":
        seg = (torch.arange(p) * 5 // p)[lo:hi]
        budget = Budget.per_segment(seg, torch.tensor([10, 0, 40, 7, 90]))
    elif kind == "nm":
        budget = Budget.n_m(hi - lo, 2, 4)
    else:
        budget = Budget.global_topk(hi - lo, 123)
    mask = budget.project(v[lo:hi])
    grad = torch.sin(torch.arange(lo, hi, dtype=torch.float32))
    w = torch.where(mask, v[lo:hi], torch.zeros_like(mask, dtype=torch.float32))
    return mask, budget.tau_change(w, grad, mask), budget.total()


@pytest.mark.parametrize("kind", ["global", "segments", "nm", "rows"])
def test_budget_same_on_every_world_size(kind):
    v = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    ref_mask, ref_tau, ref_total = _sharded(v, kind)
    assert int(ref_mask.sum()) == ref_total
    for world_size in (2, 3, 4):
        results = multiproc.run(_sharded, world_size, v, kind)
        assert torch.equal(torch.cat([m for m, _, _ in results]), ref_mask)
        assert all(t == ref_tau and tot == ref_total for _, t, tot in results)
