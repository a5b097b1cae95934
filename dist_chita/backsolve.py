"""Backsolve: the exact ridge solution on a fixed support S (CHITA, Sec. 3, "backsolve").

With the support S fixed, minimise over w_S (w is zero off S)

    f(w) = 1/2 ||y - A_S w_S||^2 + lambda/2 ||w_S - w_bar_S||^2,

whose normal equations are (A_S^T A_S + lambda I) w_S = b with b = A_S^T y + lambda w_bar_S.

* lambda > 0: Woodbury identity, an n x n system instead of a |S| x |S| one,

      w_S = (b - A_S^T (lambda I + G)^-1 A_S b) / lambda,    G = A_S A_S^T = sum_r A_{r,S} A_{r,S}^T,

  solved in float64 with a Cholesky factorisation, followed by one step of iterative refinement (the division by
  lambda cancels digits when lambda << ||G||).
* lambda = 0: conjugate gradient on the normal equations restricted to S (CGLS), started from a given point.

Storage convention (see CONTRIBUTING.md): rank r holds ``At`` = A_r^T of shape (p_r, n); ``support`` is a
(p_r,) bool mask of this rank's columns. Only n-vectors, the n x n Gram matrix G and scalars cross ranks, through
:mod:`dist_chita.comm`; all of them are bytes of phase "backsolve".
"""

from __future__ import annotations

import math

import torch

from dist_chita import comm

PHASE = "backsolve"
CHUNK_BYTES = 1 << 26  # float64 working set per chunk of gathered rows of At


class IllConditionedError(ValueError):
    """lambda I + G is not (numerically) positive definite: lambda is too small for this support."""


def _chunk_rows(n: int) -> int:
    return max(1, CHUNK_BYTES // (8 * max(n, 1)))


def _chunks(At: torch.Tensor, idx: torch.Tensor):
    """Yield (start, stop, rows) with rows = At[idx[start:stop]] in float64, shape (stop - start, n)."""
    step = _chunk_rows(At.shape[1])
    for s in range(0, idx.numel(), step):
        e = min(s + step, idx.numel())
        yield s, e, At.index_select(0, idx[s:e]).to(torch.float64)


def rows_matvec(At: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Local A_{r,S} x = sum_j At[idx_j] x_j, shape (n,) float64 (x: (|idx|,)); not reduced."""
    out = torch.zeros(At.shape[1], dtype=torch.float64)
    x = x.to(torch.float64)
    for s, e, rows in _chunks(At, idx):
        out += rows.T @ x[s:e]
    return out


def rows_rmatvec(At: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A_{r,S}^T v = At[idx] @ v, shape (|idx|,) float64 (v: (n,))."""
    out = torch.empty(idx.numel(), dtype=torch.float64)
    v = v.to(torch.float64)
    for s, e, rows in _chunks(At, idx):
        out[s:e] = rows @ v
    return out


def gram(At: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """G = sum_r A_{r,S} A_{r,S}^T, shape (n, n) float64, all-reduced over ranks."""
    n = At.shape[1]
    G = torch.zeros(n, n, dtype=torch.float64)
    for _, _, rows in _chunks(At, idx):
        G.addmm_(rows.T, rows)
    return comm.all_reduce(G)


class GramCache:
    """The last Gram matrix G = A_S A_S^T and its support, so that a nearby support S' gets
    G' = G - A_D A_D^T + A_E A_E^T (D = S minus S', E = S' minus S) in (|D| + |E|) n^2 flops instead of |S'| n^2.

    Pass the same instance to successive :func:`backsolve` / :func:`swap_curvatures` calls on the same At (every rank
    keeps its own; the decision to update is taken from all-reduced counts, so all ranks agree).
    """

    def __init__(self) -> None:
        self.support: torch.Tensor | None = None
        self.G: torch.Tensor | None = None

    def gram(self, At: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """G for ``support`` (a fresh tensor, (n, n) float64, all-reduced)."""
        if self.support is not None and self.support.shape == support.shape:
            drop, add = self.support & ~support, support & ~self.support
            changed, size = (int(v) for v in comm.all_reduce(torch.tensor(
                [int(drop.sum() + add.sum()), int(support.sum())], dtype=torch.int64)))
            if changed < size // 2:
                delta = torch.zeros_like(self.G)
                for _, _, rows in _chunks(At, torch.nonzero(add, as_tuple=True)[0]):
                    delta.addmm_(rows.T, rows)
                for _, _, rows in _chunks(At, torch.nonzero(drop, as_tuple=True)[0]):
                    delta.addmm_(rows.T, rows, alpha=-1.0)
                G = self.G + comm.all_reduce(delta) if changed else self.G.clone()
                self.support, self.G = support.clone(), G.clone()
                return G
        G = gram(At, torch.nonzero(support, as_tuple=True)[0])
        self.support, self.G = support.clone(), G.clone()
        return G


def _woodbury(At, idx, L, lam, rhs):
    """(A_S^T A_S + lambda I)^-1 rhs = (rhs - A_S^T (lambda I + G)^-1 A_S rhs) / lambda, rhs: (|S|,) float64."""
    c = comm.all_reduce(rows_matvec(At, idx, rhs))
    z = torch.cholesky_solve(c.unsqueeze(1), L).squeeze(1)
    return (rhs - rows_rmatvec(At, idx, z)) / lam


def _normal_matvec(At, idx, lam, x):
    """(A_S^T A_S + lambda I) x for x: (|S|,) float64."""
    Ax = comm.all_reduce(rows_matvec(At, idx, x))
    return rows_rmatvec(At, idx, Ax) + lam * x


def _sumsq(x: torch.Tensor) -> float:
    """Global sum of squares of a rank-local float64 vector (one scalar all-reduce)."""
    return float(comm.all_reduce(torch.dot(x, x).reshape(1))[0])


def backsolve(
    At: torch.Tensor,
    w_bar: torch.Tensor,
    lam: float,
    support: torch.Tensor,
    y: torch.Tensor,
    *,
    w0: torch.Tensor | None = None,
    max_cond: float = 1e12,
    refine_steps: int = 1,
    cg_tol: float = 1e-10,
    cg_max_iter: int = 1000,
    cache: GramCache | None = None,
) -> torch.Tensor:
    """Exact minimiser of f on the support S; collective (every rank calls it with its own block).

    Args:
        At: (p_r, n) this rank's A_r^T (any float dtype; arithmetic in float64 here).
        w_bar: (p_r,) the dense weights w_bar.
        lam: ridge weight lambda >= 0.
        support: (p_r,) bool, the support S on this rank.
        y: (n,) the target y (identical on all ranks), e.g. A w_bar.
        w0: (p_r,) starting point of CG when lambda = 0 (default: w_bar on S).
        max_cond: raise :class:`IllConditionedError` when the condition estimate of lambda I + G exceeds this.
        refine_steps: iterative-refinement steps after the Woodbury solve (lambda > 0).
        cg_tol, cg_max_iter: CG stops when ||A_S^T r|| <= cg_tol * ||A_S^T y|| or after cg_max_iter steps.
        cache: a :class:`GramCache` to update G from the previous support instead of recomputing it.

    Returns:
        w: (p_r,) float32, zero off S.
    """
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lambda must be finite and >= 0, got {lam}")
    p_r, n = At.shape
    if w_bar.shape != (p_r,) or support.shape != (p_r,) or y.shape != (n,):
        raise ValueError(f"shape mismatch: At {tuple(At.shape)}, w_bar {tuple(w_bar.shape)}, "
                         f"support {tuple(support.shape)}, y {tuple(y.shape)}")
    idx = torch.nonzero(support, as_tuple=True)[0]
    y64 = y.to(torch.float64)
    wb = w_bar[idx].to(torch.float64)
    with comm.phase(PHASE):
        b = rows_rmatvec(At, idx, y64) + lam * wb
        if lam > 0:
            L = _factor(At, support, lam, max_cond, cache)
            w = _woodbury(At, idx, L, lam, b)
            for _ in range(refine_steps):
                w += _woodbury(At, idx, L, lam, b - _normal_matvec(At, idx, lam, w))
        else:
            w = (wb if w0 is None else w0[idx].to(torch.float64)).clone()
            w = _cg(At, idx, lam, b, w, cg_tol, cg_max_iter)
    out = torch.zeros(p_r, dtype=torch.float32)
    out[idx] = w.to(torch.float32)
    return out


def _factor(At: torch.Tensor, support: torch.Tensor, lam: float, max_cond: float, cache: GramCache | None
            ) -> torch.Tensor:
    """Cholesky factor L (n x n, float64) of lambda I + G, G = A_S A_S^T; raises IllConditionedError."""
    G = cache.gram(At, support) if cache is not None else gram(At, torch.nonzero(support, as_tuple=True)[0])
    G.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(G)
    d = L.diagonal()
    cond = float((d.max() / d.min()) ** 2) if int(info) == 0 and bool((d > 0).all()) else math.inf
    if not cond <= max_cond:
        raise IllConditionedError(
            f"backsolve: lambda I + A_S A_S^T is ill-conditioned (condition estimate {cond:.3g} > "
            f"{max_cond:.3g}) with lambda = {lam:g}; increase lambda")
    return L


def swap_curvatures(
    At: torch.Tensor,
    support: torch.Tensor,
    lam: float,
    candidates: torch.Tensor,
    max_cond: float = 1e12,
    cache: GramCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact curvatures of single-coordinate moves at the ridge optimum on S (lambda > 0). Collective.

    Returns (d_inv, s_add), both (p_r,) float64:

    * d_inv_i = [(A_S^T A_S + lambda I)^-1]_ii = (1 - a_i^T (lambda I + G)^-1 a_i) / lambda on S (0 off S), so that
      removing i from S and re-optimising the rest increases f by w_i^2 / (2 d_inv_i) (the OBS saliency);
    * s_add_j = lambda (1 + a_j^T (lambda I + G)^-1 a_j) for j in ``candidates`` (a (p_r,) bool mask outside S; inf
      elsewhere), the Schur complement of j: adding j to S (others re-optimised) decreases f by g_j^2 / (2 s_add_j).

    a_i = At[i] and G = A_S A_S^T; the cost is (|S| + |candidates|) n^2 flops plus one Cholesky factorisation.
    """
    if not lam > 0:
        raise ValueError(f"swap_curvatures needs lambda > 0, got {lam}")
    with comm.phase(PHASE):
        L = _factor(At, support, lam, max_cond, cache)

    def quad(mask: torch.Tensor, fill: float) -> torch.Tensor:
        idx = torch.nonzero(mask, as_tuple=True)[0]
        out = torch.full((At.shape[0],), fill, dtype=torch.float64)
        for s, e, rows in _chunks(At, idx):
            z = torch.linalg.solve_triangular(L, rows.T, upper=False)  # (n, c): L^-1 a_i
            out[idx[s:e]] = (z * z).sum(0)
        return out

    d_inv = ((1.0 - quad(support, 1.0)) / lam).clamp_(min=0.0)
    s_add = lam * (1.0 + quad(candidates & ~support, math.inf))
    return d_inv, s_add


def _cg(At, idx, lam, b, w, tol, max_iter):
    """CG on (A_S^T A_S + lambda I) w = b (CGLS form): per step one n-vector all-reduce and two scalars."""
    s = b - _normal_matvec(At, idx, lam, w)  # residual of the normal equations, (|S|,)
    gamma = _sumsq(s)
    stop = (tol**2) * max(_sumsq(b), 1e-300)
    d = s.clone()
    for _ in range(max_iter):
        if gamma <= stop:
            break
        q = comm.all_reduce(rows_matvec(At, idx, d))  # A_S d, (n,)
        curv = float(torch.dot(q, q)) + (lam * _sumsq(d) if lam > 0 else 0.0)
        if curv <= 0:
            break
        alpha = gamma / curv
        w += alpha * d
        s -= alpha * (rows_rmatvec(At, idx, q) + lam * d)
        gamma_new = _sumsq(s)
        d = s + (gamma_new / gamma) * d
        gamma = gamma_new
    return w
