"""Backsolve against a dense float64 direct solve, lstsq, and the single-process result on gloo ranks."""

import pytest
import torch

from dist_chita import comm
from dist_chita.backsolve import GramCache, IllConditionedError, backsolve
from tests.multiproc import run


def _problem(n, p, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, p, generator=g, dtype=torch.float64)
    A = A + 0.8 * torch.roll(A, 1, dims=1)  # correlated neighbouring columns
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    support = torch.rand(p, generator=g) < 0.4
    return A.to(dtype), w_bar.float(), support


def _objective(A, w, w_bar, lam, y):
    A, w, w_bar, y = (t.to(torch.float64) for t in (A, w, w_bar, y))
    return 0.5 * float(((y - A @ w) ** 2).sum()) + 0.5 * lam * float(((w - w_bar) ** 2).sum())


def _dense_truth(A, w_bar, lam, support, y):
    A_S = A[:, support].double()
    b = A_S.T @ y.double() + lam * w_bar[support].double()
    w_S = torch.linalg.solve(A_S.T @ A_S + lam * torch.eye(A_S.shape[1], dtype=torch.float64), b)
    w = torch.zeros(A.shape[1], dtype=torch.float64)
    w[support] = w_S
    return w


@pytest.mark.parametrize("n,p", [(40, 30), (20, 60)])  # |S| < n and |S| > n
@pytest.mark.parametrize("lam", [1e-3, 1.0])
def test_lambda_positive_matches_dense_solve(n, p, lam):
    A, w_bar, support = _problem(n, p, seed=n + p)
    y = (A.double() @ w_bar.double()).float()
    w = backsolve(A.T.contiguous(), w_bar, lam, support, y)
    truth = _dense_truth(A, w_bar, lam, support, y)
    assert torch.all(w[~support] == 0)
    rel = float((w.double() - truth).norm() / truth.norm())
    assert rel < 1e-6, rel


def test_bfloat16_storage_solves_the_stored_matrix():
    A, w_bar, support = _problem(30, 40, seed=3, dtype=torch.bfloat16)
    y = A.double() @ w_bar.double() - 1.0 / 30**0.5
    w = backsolve(A.T.contiguous(), w_bar, 0.1, support, y)
    truth = _dense_truth(A, w_bar, 0.1, support, y)
    assert float((w.double() - truth).norm() / truth.norm()) < 1e-6


@pytest.mark.parametrize("n,p", [(40, 30), (20, 60)])
def test_lambda_zero_cg_matches_lstsq_objective(n, p):
    A, w_bar, support = _problem(n, p, seed=7 * n + p)
    y = (A.double() @ w_bar.double() + 0.1 * torch.randn(n, dtype=torch.float64)).float()
    w = backsolve(A.T.contiguous(), w_bar, 0.0, support, y, cg_tol=1e-12)
    ls = torch.linalg.lstsq(A[:, support].double(), y.double().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    w_ls = torch.zeros(p, dtype=torch.float64)
    w_ls[support] = ls
    f, f_ls = _objective(A, w, w_bar, 0.0, y), _objective(A, w_ls, w_bar, 0.0, y)
    assert torch.all(w[~support] == 0)
    assert f <= f_ls + 1e-6 * max(f_ls, 1e-3), (f, f_ls)
    # start point matters only within the null space; the objective must also beat the start
    f0 = _objective(A, torch.where(support, w_bar, torch.zeros_like(w_bar)), w_bar, 0.0, y)
    assert f < f0


def test_ill_conditioned_raises_with_advice():
    A, w_bar, support = _problem(40, 30, seed=1)
    y = (A.double() @ w_bar.double()).float()
    with pytest.raises(IllConditionedError, match="increase lambda"):
        backsolve(A.T.contiguous(), w_bar, 1e-14, support, y)
    with pytest.raises(ValueError, match="lambda"):
        backsolve(A.T.contiguous(), w_bar, -1.0, support, y)


def test_empty_local_support():
    A, w_bar, _ = _problem(10, 8, seed=2)
    support = torch.zeros(8, dtype=torch.bool)
    w = backsolve(A.T.contiguous(), w_bar, 0.5, support, torch.zeros(10))
    assert torch.all(w == 0)


def _distributed_backsolve(A, w_bar, support, y, lam, bounds):
    r = comm.rank()
    lo, hi = bounds[r], bounds[r + 1]
    comm.reset_stats()
    w = backsolve(A.T[lo:hi].contiguous(), w_bar[lo:hi], lam, support[lo:hi], y)
    return w, comm.bytes_by_phase().get("backsolve", 0)


@pytest.mark.slow
@pytest.mark.parametrize("lam", [0.05, 0.0])
def test_ranks_agree_with_single_process(lam):
    n, p = 24, 90
    A, w_bar, support = _problem(n, p, seed=11)
    y = (A.double() @ w_bar.double()).float()
    single = backsolve(A.T.contiguous(), w_bar, lam, support, y)
    for R, bounds in [(2, [0, 61, 90]), (3, [0, 10, 50, 90]), (4, [0, 30, 31, 60, 90])]:
        out = run(_distributed_backsolve, R, A, w_bar, support, y, lam, bounds)
        w = torch.cat([o[0] for o in out])
        rel = float((w - single).norm() / single.norm())
        assert rel < 1e-6, (R, rel)
        assert all(o[1] > 0 for o in out)  # bytes were counted under the "backsolve" phase


def test_gram_cache_updates_match_fresh_solves():
    A, w_bar, support = _problem(30, 80, seed=4)
    y = (A.double() @ w_bar.double()).float()
    At = A.T.contiguous()
    cache = GramCache()
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        if step:  # move a few coordinates: the cache updates G instead of recomputing it
            flip = torch.randperm(80, generator=g)[:3]
            support = support.clone()
            support[flip] = ~support[flip]
        cached = backsolve(At, w_bar, 0.01, support, y, cache=cache)
        fresh = backsolve(At, w_bar, 0.01, support, y)
        assert float((cached - fresh).norm() / fresh.norm()) < 1e-6
        G_fresh = A[:, support].double() @ A[:, support].double().T
        assert torch.allclose(cache.G, G_fresh, rtol=0, atol=1e-9 * float(G_fresh.abs().max()))
