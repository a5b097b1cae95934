"""Backsolve against a dense float64 direct solve, lstsq, and the single-process result on gloo ranks."""

import pytest
import torch

from dist_chita.distributed import comm
from dist_chita.fisher import backsolve as backsolve_module
from dist_chita.fisher.backsolve import GramCache, IllConditionedError, backsolve
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
    A, w_bar, support = _problem(20, 60, seed=1)  # |S| > n: the n x n dual lambda I + G, G of rank <= 20
    A[:, 1::2] = A[:, ::2]  # rank(A_S) < n: G singular
    y = (A.double() @ w_bar.double()).float()
    with pytest.raises(IllConditionedError, match="increase lambda"):
        backsolve(A.T.contiguous(), w_bar, 1e-14, support, y)
    A, w_bar, _ = _problem(40, 30, seed=1)  # |S| < n: the primal A_S^T A_S + lambda I with two equal columns
    A[:, 1] = A[:, 0]
    support = torch.zeros(30, dtype=torch.bool)
    support[:10] = True
    with pytest.raises(IllConditionedError, match="increase lambda"):
        backsolve(A.T.contiguous(), w_bar, 1e-14, support, y[:40] if y.numel() >= 40 else torch.zeros(40))
    with pytest.raises(ValueError, match="lambda"):
        backsolve(A.T.contiguous(), w_bar, -1.0, support, torch.zeros(40))


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


@pytest.mark.parametrize("fast", [True, False])
def test_gram_cache_updates_match_fresh_solves(fast):
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
        cached = backsolve(At, w_bar, 0.01, support, y, cache=cache, fast=fast)
        fresh = backsolve(At, w_bar, 0.01, support, y, fast=False)
        truth = _dense_truth(A, w_bar, 0.01, support, y)
        assert float((cached.double() - truth).norm() / truth.norm()) < 1e-6
        assert float((fresh.double() - truth).norm() / truth.norm()) < 1e-6
        G_fresh = A[:, support].double() @ A[:, support].double().T
        # float32-formed G (a preconditioner) is accurate to float32 rounding; float64-formed G to float64 rounding
        atol = (1e-5 if fast else 1e-9) * float(G_fresh.abs().max())
        assert cache.exact is not fast
        assert torch.allclose(cache.G, G_fresh, rtol=0, atol=atol)


def _ill_problem(n, p, seed, spread):
    """A with column scales spread over ``spread`` decades and nearly collinear neighbours: G = A_S A_S^T
    ill-conditioned (the float32-formed G is then a poor approximation in its small eigen-directions)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, p, generator=g, dtype=torch.float64)
    A = A + 0.999 * torch.roll(A, 1, dims=1)
    A = A * torch.logspace(0, -spread, p, dtype=torch.float64)[torch.randperm(p, generator=g)]
    A = A / A.norm() * 10.0
    w_bar = torch.randn(p, generator=g, dtype=torch.float64).float()
    support = torch.rand(p, generator=g) < 0.5
    return A.float(), w_bar, support


class _Spy:
    """Counts the Gram matrices formed in float32 and float64 (to check which path a solve took)."""

    def __init__(self, monkeypatch):
        self.calls = {True: 0, False: 0}
        real_local, real_syrk = backsolve_module._local_gram, backsolve_module._syrk

        def local(At, idx, exact, *a, **k):
            self.calls[bool(exact)] += 1
            return real_local(At, idx, exact, *a, **k)

        def syrk(R):
            self.calls[R.dtype == torch.float64] += 1
            return real_syrk(R)

        monkeypatch.setattr(backsolve_module, "_local_gram", local)
        monkeypatch.setattr(backsolve_module, "_syrk", syrk)


@pytest.mark.parametrize("n,p", [(60, 300), (120, 80)])  # dual (|S| > n) and primal (|S| < n)
@pytest.mark.parametrize("lam", [1e-5, 1e-3, 0.0])
@pytest.mark.parametrize("spread", [0.0, 4.0])
def test_fast_path_matches_dense_float64_solve(n, p, lam, spread, monkeypatch):
    """The float32-formed preconditioner + PCG against torch.linalg.solve / lstsq of the full normal equations in
    float64, on well and ill-conditioned G (column scales over 3 decades, collinear neighbours)."""
    A, w_bar, support = _ill_problem(n, p, seed=n + p, spread=spread)
    y = (A.double() @ w_bar.double() + 0.01 * torch.randn(n, dtype=torch.float64, generator=torch.Generator()
                                                              .manual_seed(1))).float()
    A_S = A[:, support].double()
    G = A_S @ A_S.T
    ev = torch.linalg.eigvalsh(G)
    if spread:
        assert float(ev[-1] / ev[ev > 1e-9 * ev[-1]][0]) > 1e4  # really ill-conditioned on its range
    spy = _Spy(monkeypatch)
    At = A.T.contiguous()
    if lam == 0 and int(support.sum()) >= n:  # not unique: compare the objective with lstsq
        w = backsolve(At, w_bar, 0.0, support, y, cg_tol=1e-14, cg_max_iter=5000)
        ls = torch.linalg.lstsq(A_S, y.double().unsqueeze(1), driver="gelsd").solution.squeeze(1)
        w_ls = torch.zeros(p, dtype=torch.float64)
        w_ls[support] = ls
        f, f_ls = _objective(A, w, w_bar, 0.0, y), _objective(A, w_ls, w_bar, 0.0, y)
        assert f <= f_ls * (1 + 1e-6) + 1e-12, (f, f_ls)
        return
    w = backsolve(At, w_bar, lam, support, y)
    assert spy.calls[False] >= 1  # the float32 preconditioner was formed
    truth = _dense_truth(A, w_bar, lam, support, y) if lam > 0 else None
    if truth is None:
        truth = torch.zeros(p, dtype=torch.float64)
        truth[support] = torch.linalg.solve(A_S.T @ A_S, A_S.T @ y.double())
    assert torch.all(w[~support] == 0)
    rel = float((w.double() - truth).norm() / truth.norm())
    assert rel < 1e-6, rel


def test_fast_path_falls_back_to_float64_gram(monkeypatch):
    """lambda = 1e-7 against ||G|| = 14: the float32 rounding of G (~1e-6) swamps lambda, PCG with the float32 factor
    does not converge within pcg_max_iter = 2 steps, G is formed again in float64 and the answer is still the
    float64 solution."""
    A, w_bar, support = _ill_problem(30, 120, seed=5, spread=4.0)
    y = A.double() @ w_bar.double()
    truth = _dense_truth(A, w_bar, 1e-7, support, y)
    spy = _Spy(monkeypatch)
    w = backsolve(A.T.contiguous(), w_bar, 1e-7, support, y, pcg_max_iter=2)
    assert spy.calls[False] >= 1 and spy.calls[True] >= 1  # tried float32, then formed G in float64
    assert float((w.double() - truth).norm() / truth.norm()) < 1e-6
    spy.calls.update({True: 0, False: 0})
    w = backsolve(A.T.contiguous(), w_bar, 1e-7, support, y)  # default: more PCG steps, float32 suffices
    assert spy.calls == {True: 0, False: 1}
    assert float((w.double() - truth).norm() / truth.norm()) < 1e-6


def test_cache_reuses_factor_and_solution(monkeypatch):
    A, w_bar, support = _problem(20, 60, seed=8)
    y = (A.double() @ w_bar.double()).float()
    At = A.T.contiguous()
    cache = GramCache()
    first = backsolve(At, w_bar, 0.1, support, y, cache=cache)
    spy = _Spy(monkeypatch)
    calls = {"n": 0}
    real = backsolve_module._solve_dual

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(backsolve_module, "_solve_dual", counting)
    again = backsolve(At, w_bar, 0.1, support, y, cache=cache)
    assert torch.equal(first, again) and calls["n"] == 0  # answered from memory
    other_y = y + 0.5
    w = backsolve(At, w_bar, 0.1, support, other_y, cache=cache)  # same support: factor reused, no new Gram
    assert calls["n"] == 1 and spy.calls == {True: 0, False: 0}
    truth = _dense_truth(A, w_bar, 0.1, support, other_y)
    assert float((w.double() - truth).norm() / truth.norm()) < 1e-6


def _fast_ranks(A, w_bar, support, y, lam, bounds):
    r = comm.rank()
    lo, hi = bounds[r], bounds[r + 1]
    cache = GramCache()
    At = A.T[lo:hi].contiguous()
    w1 = backsolve(At, w_bar[lo:hi], lam, support[lo:hi], y, cache=cache)
    s2 = support.clone()
    s2[[0, 1, -1]] = ~s2[[0, 1, -1]]  # a nearby support (on both ranks): the cached G is updated
    w2 = backsolve(At, w_bar[lo:hi], lam, s2[lo:hi], y, cache=cache)
    return w1, w2


@pytest.mark.slow
@pytest.mark.parametrize("n,p", [(24, 90), (60, 50)])  # dual and primal (kept columns gathered across ranks)
@pytest.mark.parametrize("lam", [1e-5, 0.0])
def test_fast_path_one_and_two_processes_agree(n, p, lam):
    A, w_bar, support = _ill_problem(n, p, seed=3, spread=2.0)
    y = (A.double() @ w_bar.double()).float()
    bounds = [0, p // 2 + 3, p]
    (one,) = run(_fast_ranks, 1, A, w_bar, support, y, lam, [0, p])
    two = run(_fast_ranks, 2, A, w_bar, support, y, lam, bounds)
    for k in range(2):
        w = torch.cat([o[k] for o in two])
        rel = float((w - one[k]).norm() / one[k].norm())
        assert rel < 1e-6, (k, rel)
    if lam > 0 or int(support.sum()) < n:
        truth = _dense_truth(A, w_bar, lam, support, y) if lam > 0 else None
        if truth is not None:
            assert float((one[0].double() - truth).norm() / truth.norm()) < 1e-6


@pytest.mark.parametrize("n", [40, 300, 513, 1000])
def test_syrk_is_the_full_gram(n):
    """The lower-block-triangle product equals R^T R (and is symmetric), for 1, 2 and 4 column blocks."""
    R = torch.randn(70, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    G = backsolve_module._syrk(R)
    assert torch.allclose(G, R.T @ R, rtol=0, atol=1e-10) and torch.allclose(G, G.T, rtol=0, atol=1e-10)


def test_chunks_are_cache_sized_on_the_cpu_and_large_on_an_accelerator():
    """On a GPU thousands of cache-sized chunks would each cost kernel launches: chunks there are at least
    DEVICE_CHUNK_BYTES (no CUDA needed to ask: only the device type matters)."""
    from dist_chita.fisher.backsolve import DEVICE_CHUNK_BYTES, chunk_bytes

    assert chunk_bytes(torch.device("cpu"), 4096) == 4096
    assert chunk_bytes(torch.device("cuda", 3), 4096) == DEVICE_CHUNK_BYTES
    assert chunk_bytes("cuda", 2 * DEVICE_CHUNK_BYTES) == 2 * DEVICE_CHUNK_BYTES


@pytest.mark.parametrize("n,p", [(24, 90), (60, 50)])  # dual (|S| >= n) and primal (|S| < n)
def test_a_lambda_path_on_one_support_gathers_its_rows_once_and_matches_fresh_solves(monkeypatch, n, p):
    A, w_bar, support = _problem(n, p, seed=5)
    y = (A.double() @ w_bar.double()).float()
    At = A.T.contiguous()
    counts = {"rows": 0, "columns": 0}
    rows, columns = backsolve_module._Rows, backsolve_module._gather_columns

    class CountingRows(rows):
        def __init__(self, *a):
            counts["rows"] += 1
            super().__init__(*a)

    def counting_columns(*a):
        counts["columns"] += 1
        return columns(*a)

    monkeypatch.setattr(backsolve_module, "_Rows", CountingRows)
    monkeypatch.setattr(backsolve_module, "_gather_columns", counting_columns)
    cache = GramCache()
    for lam in (1e-3, 1e-1, 10.0):
        w = backsolve(At, w_bar, lam, support, y, cache=cache)
        truth = _dense_truth(A, w_bar, lam, support, y)
        assert float((w.double() - truth).norm() / truth.norm()) < 1e-6
        assert torch.equal(w, backsolve(At, w_bar, lam, support, y))  # a fresh cache: the same bits
    kind = "rows" if int(support.sum()) >= n else "columns"
    assert counts == {kind: 1 + 3, ("columns" if kind == "rows" else "rows"): 0}  # once cached, 3 fresh solves
    other = support.clone()
    other[0] = ~other[0]
    backsolve(At, w_bar, 1e-3, other, y, cache=cache)  # another support: gathered again
    assert counts[kind] == 5


def _dense_curvatures(A, support, lam):
    """d_inv_i = [inv(A_S^T A_S + lambda I)]_ii on S, and s_add_j = 1 / [inv(A_T^T A_T + lambda I)]_jj for the
    support T = S + {j} off S (the Schur complement of j), by dense float64 inverses, one per j."""
    A = A.double()
    p = A.shape[1]
    d_inv = torch.zeros(p, dtype=torch.float64)
    s_add = torch.full((p,), float("inf"), dtype=torch.float64)
    idx = torch.nonzero(support, as_tuple=True)[0]
    A_S = A[:, idx]
    d_inv[idx] = torch.linalg.inv(A_S.T @ A_S + lam * torch.eye(idx.numel(), dtype=torch.float64)).diagonal()
    for j in torch.nonzero(~support, as_tuple=True)[0].tolist():
        A_T = torch.cat([A_S, A[:, j : j + 1]], 1)
        s_add[j] = 1.0 / torch.linalg.inv(A_T.T @ A_T + lam * torch.eye(A_T.shape[1], dtype=torch.float64))[-1, -1]
    return d_inv, s_add


@pytest.mark.parametrize("n,p", [(12, 20), (6, 24)])  # |S| < n and |S| > n
def test_swap_curvatures_match_dense_inverses_across_lambdas_on_one_cache(n, p):
    """swap_curvatures against dense inv(A_S^T A_S + lambda I) (and the Schur complement of each added j, from the
    inverse on S + {j}), for two lambdas and back on the same support through one GramCache: the cached Cholesky
    factor of one lambda is never used for another, and each answer matches a call without a cache."""
    A, _, support = _problem(n, p, seed=3)
    At = A.T.contiguous()
    cache = GramCache()
    for lam in (0.05, 3.0, 0.05):
        d_inv, s_add = backsolve_module.swap_curvatures(At, support, lam, ~support, cache=cache)
        want_d, want_s = _dense_curvatures(A, support, lam)
        assert torch.allclose(d_inv, want_d, rtol=1e-6, atol=0)
        assert torch.equal(s_add[support], want_s[support])  # inf on S: not candidates
        assert torch.allclose(s_add[~support], want_s[~support], rtol=1e-6, atol=0)
        fresh = backsolve_module.swap_curvatures(At, support, lam, ~support)
        assert torch.allclose(d_inv, fresh[0], rtol=1e-12) and torch.allclose(s_add, fresh[1], rtol=1e-12)
