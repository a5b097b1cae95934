"""Layerwise CHITA on one layer: the rows of its runs, each part on its own H, with per-row or shared budgets."""

import pytest
import torch

from dist_chita.layerwise.row_solver import objectives, solve_rows
from dist_chita.methods.base import LayerProblem
from dist_chita.methods.chita import Chita
from dist_chita.sparsity import kept_count


def _two_parts(seed):
    """W_bar (8, 10) float32 whose rows [0, 4) see H_0 and [4, 8) see H_1, and the ridge of each."""
    g = torch.Generator().manual_seed(seed)
    X = [torch.randn(60, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
         for _ in range(2)]
    H = torch.stack([x.T @ x / 60 for x in X])
    return torch.randn(8, 10, generator=g), H, tuple(0.01 * float(h.diagonal().mean()) for h in H)


@pytest.mark.parametrize("per_layer", [False, True])
def test_rows_of_each_part_are_solved_on_that_parts_curvature(per_layer):
    """Only the runs given are pruned (zeros elsewhere), each row on its part's Q = H_j + lambda_j I: the result is
    solve_rows of those rows alone; with per_layer the budgets are the layer's kept_count(r d, s) largest OBS
    saliencies w^2 / [Q_j^-1]_jj (an explicit inverse and torch.topk here). The objective is sum f_i over the runs'
    rows, computed here from Q; the warm start's and magnitude + back-solve's are not lower."""
    W_bar, H, lams = _two_parts(4)
    runs = ((0, 1, 4), (1, 4, 7))  # this rank: rows 1-3 of part 0, rows 4-6 of part 1
    parts = ((0, 4), (4, 8))
    exact = {"refit_iters": 60}
    res = Chita().prune(LayerProblem(W_bar=W_bar, sparsity=0.6, per_layer=per_layer, parts=parts, runs=runs, H=H,
                                     lams=lams, row_chunk=2, options=exact))
    Qs = [h + lam * torch.eye(10, dtype=h.dtype) for h, lam in zip(H, lams, strict=True)]
    if per_layer:
        saliency = torch.cat([W_bar[lo:hi].double().pow(2) / torch.linalg.inv(Q).diagonal()
                              for (lo, hi), Q in zip(parts, Qs, strict=True)])
        top = saliency.flatten().topk(kept_count(80, 0.6)).indices
        k = torch.zeros(80).scatter_(0, top, 1.0).view(8, 10).sum(1).long()
        assert not torch.equal(k, torch.full_like(k, kept_count(10, 0.6)))  # the rows do share the budget
    else:
        k = torch.full((8,), kept_count(10, 0.6))
    assert torch.equal(res.W[0], torch.zeros(10)) and torch.equal(res.W[7], torch.zeros(10))
    f = 0.0
    for j, lo, hi in runs:
        alone = solve_rows(W_bar[lo:hi], H[j], lams[j], k=k[lo:hi], row_chunk=2, **exact)
        torch.testing.assert_close(res.W[lo:hi], alone.W, rtol=1e-5, atol=1e-6)
        assert torch.equal((res.W[lo:hi] != 0).sum(1), k[lo:hi])
        f += float(objectives((res.W[lo:hi] - W_bar[lo:hi]).double(), Qs[j]).sum())
    assert res.objective == pytest.approx(f, rel=1e-4)
    assert res.objective <= res.warm_objective * (1 + 1e-6) and res.objective <= res.magnitude_objective * (1 + 1e-6)
    assert res.iterations > 0


def test_n_m_and_fixed_zeros():
    W_bar, H, lams = _two_parts(5)
    allowed = torch.rand(8, 10, generator=torch.Generator().manual_seed(1)) > 0.2
    W_bar = W_bar * allowed
    res = Chita().prune(LayerProblem(W_bar=W_bar, sparsity=0.0, nm=(1, 2), parts=((0, 4), (4, 8)), H=H, lams=lams))
    assert not bool((res.W[~allowed] != 0).any())
    assert bool(((res.W.view(8, 5, 2) != 0).sum(2) <= 1).all())
