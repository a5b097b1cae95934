"""Backsolve: the exact ridge solution on a fixed support S (CHITA, Sec. 3, "backsolve").

With the support S fixed, minimise over w_S (w is zero off S)

    f(w) = 1/2 ||y - A_S w_S||^2 + lambda/2 ||w_S - w_bar_S||^2,

whose normal equations are M w_S = b with M = A_S^T A_S + lambda I and b = A_S^T y + lambda w_bar_S.

* lambda > 0, |S| >= n: Woodbury identity, an n x n system instead of a |S| x |S| one,

      w_S = (b - A_S^T z) / lambda,   (lambda I + G) z = A_S b,   G = A_S A_S^T = sum_r A_{r,S} A_{r,S}^T.

* |S| < n (lambda > 0, or lambda = 0 with A_S of full column rank): the primal |S| x |S| system M w_S = b itself;
  the |S| kept columns are gathered on every rank (|S| n < n^2 numbers, fewer than the all-reduce of G).
* lambda = 0 otherwise: conjugate gradient on the normal equations restricted to S (CGLS), started from a given
  point (the minimiser is not unique; CG moves only within the row space).

Speed with exactness (measured on the MLPNet Fisher factor, n = 1000, |S| = 16,180, 2 threads): forming G is the
dominating cost, |S| n^2 flops. It is formed in float32 (sgemm, lower tile triangle only; about 3x less time than
the float64 dgemm of the full product) and factored in float64 (Cholesky of lambda I + G~). G~ is only a
preconditioner: the system is then solved by preconditioned conjugate gradient (PCG) with exact matrix-vector
products (float64 copies of the float32/bfloat16 rows of A_S, float64 accumulation) until PCG's bound on the error
of w_S is below ``tol`` relative (default 1e-14) or stalls at the float64 rounding floor. float64 level, not just
float32 level, matters: the solver's IHT is sensitive to the last bit of w (ties in |w - tau g|), and only solutions
accurate far below float32 rounding give the same support on any number of ranks. On the MLPNet factor the
preconditioned spectrum lies within 1 +- 5e-5 (lambda = 1e-5), so each PCG step gains four digits or more and a few
steps suffice. If the float32 preconditioner fails (Cholesky breakdown, condition estimate above ``max_cond``, or no
convergence in ``pcg_max_iter`` steps: lambda far below the float32 rounding of G), G is formed again in float64 and
the solve repeated, so the answer never depends on the float32 shortcut.

:class:`GramCache` keeps G, its factor and the last solutions across calls: a nearby support gets G updated from the
symmetric difference, a repeated (support, lambda) reuses the factor, and a repeated backsolve is answered from memory.

Storage convention (see CONTRIBUTING.md): rank r holds ``At`` = A_r^T of shape (p_r, n); ``support`` is a
(p_r,) bool mask of this rank's columns. Only n-vectors, the n x n Gram matrix G, the gathered kept columns when
|S| < n, and scalars cross ranks, through :mod:`dist_chita.distributed.comm`; all of them are bytes of phase
"backsolve".
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dist_chita.distributed import comm

PHASE = "backsolve"
CHUNK_BYTES = 1 << 22  # float64 rows of At converted per chunk in rows_matvec / rows_rmatvec: cache-sized (4 MiB ran
# 4x faster than 64 MiB on a 32k x 1000 factor: the converted chunk is multiplied before it leaves the cache)
DEVICE_CHUNK_BYTES = 1 << 28  # chunks on an accelerator: each costs kernel launches and a host sync, not cache misses
GATHER_BYTES = 1 << 28  # float64 copy of the rows A_{r,S}^T kept during one backsolve (else re-read per product)
MEMO_SIZE = 4  # solutions remembered by a GramCache (each: |S_r| indices and values, 12 |S_r| bytes)
WORK_KEYS = ("grams", "gram_updates", "gram_update_rows", "factorizations", "pcg_runs", "pcg_steps")
MEMO_BYTES = 1 << 26  # a rank does not remember solutions larger than this (then no rank recalls them)
STALL_TOL = 1e-7  # PCG stalled at rounding level counts as converged when its error bound is below this (relative)


class IllConditionedError(ValueError):
    """lambda I + G is not (numerically) positive definite: lambda is too small for this support."""


def chunk_bytes(device: torch.device, cpu_bytes: int) -> int:
    """Bytes of rows of At per chunk of a chunked product: ``cpu_bytes`` (cache-sized) on the CPU, at least
    :data:`DEVICE_CHUNK_BYTES` on an accelerator (where thousands of small chunks would be launch-bound)."""
    return cpu_bytes if torch.device(device).type == "cpu" else max(cpu_bytes, DEVICE_CHUNK_BYTES)


def _chunk_rows(n: int, nbytes: int = CHUNK_BYTES) -> int:
    return max(1, nbytes // (8 * max(n, 1)))


def _chunks(At: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype = torch.float64, nbytes: int = CHUNK_BYTES):
    """Yield (start, stop, rows) with rows = At[idx[start:stop]] converted to ``dtype``, shape (stop - start, n);
    ``idx`` increasing without repeats (as ``torch.nonzero`` gives).

    The rows are written into one reused buffer (and a reused staging buffer for the gather): fresh large tensors
    per chunk cost page faults that took longer than the arithmetic. A range of rows is sliced, not gathered.
    ``rows`` is only valid until the next chunk and must not be written to.
    """
    m, n = idx.numel(), At.shape[1]
    step = min(_chunk_rows(n, chunk_bytes(At.device, nbytes)), max(m, 1))
    if m == 0:
        return
    first = int(idx[0])
    if int(idx[-1]) - first == m - 1:  # a range of rows (e.g. all of them): idx is increasing and without repeats
        if At.dtype == dtype:
            for s in range(0, m, step):
                yield s, min(s + step, m), At[first + s : first + min(s + step, m)]
            return
        buf = torch.empty(step, n, dtype=dtype, device=At.device)
        for s in range(0, m, step):
            e = min(s + step, m)
            buf[: e - s].copy_(At[first + s : first + e])
            yield s, e, buf[: e - s]
        return
    same = At.dtype == dtype
    buf = torch.empty(step, n, dtype=dtype, device=At.device)
    stage = buf if same else torch.empty(step, n, dtype=At.dtype, device=At.device)
    for s in range(0, m, step):
        e = min(s + step, m)
        torch.index_select(At, 0, idx[s:e], out=stage[: e - s])
        if not same:
            buf[: e - s].copy_(stage[: e - s])
        yield s, e, buf[: e - s]


def rows_matvec(At: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Local A_{r,S} x = sum_j At[idx_j] x_j, shape (n,) float64 (x: (|idx|,)); not reduced."""
    out = torch.zeros(At.shape[1], dtype=torch.float64, device=At.device)
    x = x.to(torch.float64)
    for s, e, rows in _chunks(At, idx):
        out.addmv_(rows.T, x[s:e])
    return out


def rows_rmatvec(At: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A_{r,S}^T v = At[idx] @ v, shape (|idx|,) float64 (v: (n,))."""
    out = torch.empty(idx.numel(), dtype=torch.float64, device=At.device)
    v = v.to(torch.float64)
    for s, e, rows in _chunks(At, idx):
        torch.mv(rows, v, out=out[s:e])
    return out


def gathers(m: int, n: int) -> bool:
    """Whether a backsolve gathers its m kept rows (n entries each) once (:class:`_Rows`): while their float64 size
    fits in GATHER_BYTES; else each product re-reads them from At."""
    return m * n * 8 <= GATHER_BYTES


def syrk_tiles(n: int) -> int:
    """Column tiles nb of :func:`_syrk` for n columns, the tiling of the Gram product (below 2: the plain product
    R.T @ R)."""
    return min(4, n // 128)


def _syrk(R: torch.Tensor) -> torch.Tensor:
    """R^T R for R (m, n), computing only the lower tile triangle (torch has no syrk): with 4 column tiles 10 of
    the 16 tile products, measured 1.5-1.7x faster than R.T @ R on the MLPNet factor. Returns (n, n), R's dtype."""
    n = R.shape[1]
    nb = syrk_tiles(n)
    if nb < 2:
        return R.T @ R
    G = torch.empty(n, n, dtype=R.dtype, device=R.device)
    e = [round(i * n / nb) for i in range(nb + 1)]
    for i in range(nb):
        G[e[i] : e[i + 1], : e[i + 1]] = R[:, e[i] : e[i + 1]].T @ R[:, : e[i + 1]]
    for i in range(1, nb):
        G[: e[i], e[i] : e[i + 1]] = G[e[i] : e[i + 1], : e[i]].T
    return G


def _local_gram(At: torch.Tensor, idx: torch.Tensor, exact: bool, sign: float = 1.0, out=None) -> torch.Tensor:
    """Local sign * A_{r,S} A_{r,S}^T over rows ``idx``, (n, n) float64; formed in float32 unless ``exact``."""
    n = At.shape[1]
    G = torch.zeros(n, n, dtype=torch.float64, device=At.device) if out is None else out
    dtype = torch.float64 if exact else torch.float32
    for _, _, rows in _chunks(At, idx, dtype, nbytes=GATHER_BYTES):
        G.add_(_syrk(rows), alpha=sign)
    return G


def gram(At: torch.Tensor, idx: torch.Tensor, exact: bool = True, rows=None) -> torch.Tensor:
    """G = sum_r A_{r,S} A_{r,S}^T, shape (n, n) float64, all-reduced over ranks.

    ``exact=False`` forms the products in float32 (sgemm; entries accurate to about 1e-7 relative): a
    preconditioner, not a solution. ``rows``: a :class:`_Rows` of ``idx`` whose gathered float32 rows are reused.
    """
    local = rows.gram32() if rows is not None and not exact else _local_gram(At, idx, exact)
    return comm.all_reduce(local)


def _key(support: torch.Tensor) -> int:
    return hash(support.cpu().numpy().tobytes())  # (a host copy on an accelerator)


def _same_on_all_ranks(value: int) -> bool:
    """True when ``value`` is the same integer on every rank (one all-reduce of two int64 at world size > 1)."""
    both = torch.tensor([value, -value], dtype=torch.int64, device=comm.device())
    mx, neg_mn = (int(v) for v in comm.all_reduce(both, op="max"))
    return mx == -neg_mn


def _all_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (one scalar all-reduce at world size > 1)."""
    return bool(int(comm.all_reduce(torch.tensor([int(flag)], dtype=torch.int64, device=comm.device()), op="min")[0]))


class GramCache:
    """State kept across backsolves on the same At, w_bar and y (every rank keeps its own instance; every decision is
    taken from all-reduced values, so all ranks agree).

    * G = A_S A_S^T of the last support (``G``, (n, n) float64; ``exact`` says whether it was formed in float64 or
      is a float32-formed preconditioner). A nearby support S' gets G' = G - A_D A_D^T + A_E A_E^T (D = S minus S',
      E = S' minus S) in (|D| + |E|) n^2 flops instead of |S'| n^2.
    * The Cholesky factor of lambda I + G for the last (support, lambda).
    * The last :data:`MEMO_SIZE` solutions, so a backsolve repeated on the same support and lambda costs nothing.
    * The gathered rows of the last support (the dual's :class:`_Rows`; the primal's kept columns of all ranks and
      their Gram matrix), so another lambda on the same support (a lambda path) gathers and multiplies them once.

    ``work`` counts what the backsolves through this cache ran (the same on every rank; keys :data:`WORK_KEYS`):
    ``grams`` the Gram matrices formed from all kept rows (each one all-reduce of n x n float64; the dual's rows
    gathered anew for each), ``gram_updates`` those updated from a nearby support and ``gram_update_rows`` the rows
    |D| + |E| over all ranks those updates multiplied, ``factorizations`` the n x n Cholesky factorisations (of
    lambda I + G, or the primal's), ``pcg_runs`` the PCG solves and ``pcg_steps`` their steps (a remembered
    solution or a recalled factor costs none of these).
    """

    def __init__(self) -> None:
        self.support: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.exact = True
        self.factor: tuple[float, bool, torch.Tensor] | None = None  # (lambda, exact, L) for self.support
        self.solutions: OrderedDict = OrderedDict()  # (support digest, lambda) -> (id, idx, w_S)
        self.stored = 0  # solutions remembered so far: the id of the next one (the same on every rank)
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # (y, w_bar) the solutions are for
        self.gathered: tuple[tuple, torch.Tensor, object] | None = None  # (At's key, support, rows or columns)
        self.work = dict.fromkeys(WORK_KEYS, 0)

    def _held(self, At: torch.Tensor, support: torch.Tensor, kind: str, collective: bool):
        """The rows or columns kept for this At and support (``kind`` ``rows`` or ``columns``), else None; with
        ``collective`` every rank must hold them (the columns were gathered across ranks)."""
        key = (kind, At.data_ptr(), tuple(At.shape), At.dtype)
        g = self.gathered
        mine = g is not None and g[0] == key and g[1].shape == support.shape and torch.equal(g[1], support)
        if collective:
            mine = _all_true(mine)
        return g[2] if mine else None

    def _keep(self, At: torch.Tensor, support: torch.Tensor, kind: str, value) -> None:
        self.gathered = ((kind, At.data_ptr(), tuple(At.shape), At.dtype), support.clone(), value)

    def rows(self, At: torch.Tensor, idx: torch.Tensor, support: torch.Tensor) -> _Rows:
        """:class:`_Rows` of this rank's rows ``idx`` of ``support``, reused while At and the support stay."""
        rows = self._held(At, support, "rows", collective=False)
        if rows is None:
            self.gathered = None  # the old rows freed first: never two sets held at once
            rows = _Rows(At, idx)
            self._keep(At, support, "rows", rows)
        return rows

    def columns(self, At: torch.Tensor, idx: torch.Tensor, support: torch.Tensor, wb: torch.Tensor) -> dict:
        """The primal's kept columns of all ranks (:func:`_gather_columns`: ``R`` (|S|, n) float64, ``wb`` w_bar
        on them, ``offset`` of this rank's) and a dict ``P`` for their Gram matrices; reused while At, the support
        and w_bar stay (collective)."""
        held = self._held(At, support, "columns", collective=True)
        if held is not None and _all_true(torch.equal(held["local_wb"], wb)):
            return held
        self.gathered = None
        R, wb_all, off = _gather_columns(At.index_select(0, idx).to(torch.float64), wb)
        held = {"R": R, "wb": wb_all, "offset": off, "local_wb": wb.clone(), "P": {}}
        self._keep(At, support, "columns", held)
        return held

    def gram(self, At: torch.Tensor, support: torch.Tensor, exact: bool = True, rows=None) -> torch.Tensor:
        """G for ``support`` (a fresh tensor, (n, n) float64, all-reduced); float32-formed unless ``exact``
        (``rows``: gathered rows of the support to reuse, see :func:`gram`)."""
        if self.support is not None and self.support.shape == support.shape and (self.exact or not exact):
            drop, add = self.support & ~support, support & ~self.support
            changed, size = (int(v) for v in comm.all_reduce(torch.tensor(
                [int(drop.sum() + add.sum()), int(support.sum())], dtype=torch.int64, device=comm.device())))
            if changed == 0:
                return self.G.clone()
            if changed < size // 2:
                self.work["gram_updates"] += 1
                self.work["gram_update_rows"] += changed
                self.exact = self.exact and exact
                delta = _local_gram(At, torch.nonzero(add, as_tuple=True)[0], self.exact)
                _local_gram(At, torch.nonzero(drop, as_tuple=True)[0], self.exact, -1.0, out=delta)
                self.G = self.G + comm.all_reduce(delta)
                self.support, self.factor = support.clone(), None
                return self.G.clone()
        self.G = gram(At, torch.nonzero(support, as_tuple=True)[0], exact, rows)
        self.work["grams"] += 1
        self.support, self.exact, self.factor = support.clone(), exact, None
        return self.G.clone()

    def same_support(self, support: torch.Tensor) -> bool:
        """Whether the cached G is for ``support`` on every rank (collective)."""
        mine = self.support is not None and self.support.shape == support.shape and torch.equal(self.support, support)
        return _all_true(mine)

    def _same_inputs(self, y: torch.Tensor, w_bar: torch.Tensor) -> bool:
        """Whether the remembered solutions are for this y and w_bar; if not, forget them."""
        if self.inputs is not None and all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                                           for a, b in zip(self.inputs, (y, w_bar), strict=True)):
            return True
        self.solutions.clear()
        self.inputs = (y.clone(), w_bar.clone())
        return False

    def recall(self, support: torch.Tensor, lam: float, y: torch.Tensor, w_bar: torch.Tensor):
        """A remembered solution (p_r,) for this (support, lambda, y, w_bar), else None (collective). Every rank must
        find the same remembered solve: equal local supports alone could belong to different global supports."""
        hit = self.solutions.get((_key(support), lam)) if self._same_inputs(y, w_bar) else None
        idx = torch.nonzero(support, as_tuple=True)[0]
        mine = hit is not None and torch.equal(hit[1], idx)
        if not _same_on_all_ranks(hit[0] if mine else -1) or not mine:
            return None
        w = torch.zeros(support.shape[0], dtype=torch.float32, device=support.device)
        w[idx] = hit[2]
        return w

    def remember(self, support, lam, y, w_bar, w) -> None:
        """Keep the solution w (p_r,) of (support, lambda) for the current y and w_bar."""
        self._same_inputs(y, w_bar)
        idx = torch.nonzero(support, as_tuple=True)[0]
        if 12 * idx.numel() <= MEMO_BYTES:
            self.solutions[(_key(support), lam)] = (self.stored, idx, w[idx].clone())
        self.stored += 1
        while len(self.solutions) > MEMO_SIZE:
            self.solutions.popitem(last=False)


class _Rows:
    """The rows A_{r,S}^T = At[idx] (m = |idx|, n) for the products of one solve. When their float64 size fits in
    GATHER_BYTES they are gathered once in float32 (``R32``: the Gram matrix, :meth:`gram32`, and the products),
    otherwise re-read from At per product. Products convert one cache-sized chunk of rows at a time to float64
    (exact for float32 / bfloat16 storage) and accumulate in float64; a whole float64 copy would be read twice as
    many bytes per product."""

    def __init__(self, At: torch.Tensor, idx: torch.Tensor) -> None:
        self.At, self.idx = At, idx
        fits = gathers(idx.numel(), At.shape[1])
        self.R32 = At.index_select(0, idx).float() if fits else None
        self._src = (self.R32, torch.arange(idx.numel(), device=idx.device)) if fits else (At, idx)

    def gram32(self) -> torch.Tensor:
        """Local A_{r,S} A_{r,S}^T formed in float32, (n, n) float64."""
        if self.R32 is None:
            return _local_gram(self.At, self.idx, exact=False)
        return _syrk(self.R32).double()

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        """Local A_{r,S} x, (n,) float64 (x: (m,) float64); not reduced."""
        return rows_matvec(*self._src, x)

    def rmv(self, v: torch.Tensor) -> torch.Tensor:
        """A_{r,S}^T v, (m,) float64 (v: (n,) float64)."""
        return rows_rmatvec(*self._src, v)

    def normal_mv(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local A_{r,S} A_{r,S}^T v (n,), A_{r,S}^T v (m,)), float64, in one pass: each chunk of rows is used
        for both products while it is in cache."""
        u = torch.zeros(self.At.shape[1], dtype=torch.float64, device=self.At.device)
        t = torch.empty(self.idx.numel(), dtype=torch.float64, device=self.At.device)
        v = v.to(torch.float64)
        for s, e, rows in _chunks(*self._src):
            u.addmv_(rows.T, torch.mv(rows, v, out=t[s:e]))
        return u, t


def _cholesky(P: torch.Tensor, max_cond: float) -> tuple[torch.Tensor | None, float]:
    """(L, condition estimate) of the SPD matrix P (float64); L is None when the factorisation breaks down."""
    L, info = torch.linalg.cholesky_ex(P)
    d = L.diagonal()
    if int(info) != 0 or not bool((d > 0).all()):
        return None, math.inf
    return L, float((d.max() / d.min()) ** 2)


def _ill_conditioned(cond: float, lam: float, max_cond: float) -> IllConditionedError:
    return IllConditionedError(
        f"backsolve: lambda I + A_S A_S^T is ill-conditioned (condition estimate {cond:.3g} > "
        f"{max_cond:.3g}) with lambda = {lam:g}; increase lambda")


def _factor(At, support, lam, max_cond, cache, exact, rows=None):
    """Cholesky factor L (n x n, float64) of lambda I + G, G = A_S A_S^T formed in float64 (``exact``) or float32.

    Returns None when the float32-formed matrix does not factor well (the caller then asks for ``exact``); raises
    :class:`IllConditionedError` when the float64-formed one does not.
    """
    f = None if cache is None else cache.factor
    if f is not None and f[0] == lam and (f[1] or not exact) and cache.same_support(support):
        return f[2]
    if cache is not None:
        G = cache.gram(At, support, exact, rows)
        exact = cache.exact
    else:
        G = gram(At, torch.nonzero(support, as_tuple=True)[0], exact, rows)
    G.diagonal().add_(lam)
    L, cond = _cholesky(G, max_cond)
    _count(cache, factorizations=1)
    if not cond <= max_cond:
        if not exact:
            return None
        raise _ill_conditioned(cond, lam, max_cond)
    if cache is not None:
        cache.factor = (lam, exact, L)
    return L


def _pcg(apply_M, precond, rhs, scale_sq, tol, max_iter):
    """Preconditioned CG on M x = rhs from x0 = P^-1 rhs, with vectors identical on every rank (only apply_M
    communicates). ``apply_M(v)`` returns (M v, B v) for some linear map B (a by-product, e.g. A_S^T v), so that
    B x is kept along x without extra products.

    gamma = r^T P^-1 r is the squared error bound (the caller's units): converged when gamma <= tol^2 s with
    s = scale_sq(x0, B x0), or when gamma stops decreasing (the float64 rounding floor) below STALL_TOL^2 s.
    Returns (x, B x, converged, steps)."""
    x = precond(rhs)
    Mx, Bx = apply_M(x)
    r = rhs - Mx
    s = precond(r)
    gamma = float(torch.dot(r, s))
    scale = scale_sq(x, Bx)
    stop, floor = tol**2 * scale, STALL_TOL**2 * scale
    d = s
    for it in range(max_iter):
        if gamma <= stop:
            return x, Bx, True, it
        q, Bd = apply_M(d)
        curv = float(torch.dot(d, q))
        if not curv > 0:
            return x, Bx, gamma <= floor, it
        alpha = gamma / curv
        x = x + alpha * d
        Bx = Bx + alpha * Bd
        r = r - alpha * q
        s = precond(r)
        gamma_new = float(torch.dot(r, s))
        if gamma_new > 0.25 * gamma and gamma_new <= floor:  # stalled at rounding level
            return x, Bx, True, it + 1
        d = s + (gamma_new / gamma) * d
        gamma = gamma_new
    return x, Bx, gamma <= stop, max_iter


def _solve_dual(At, idx, support, lam, y64, wb, max_cond, cache, tol, max_iter, fast):
    """w_S = (b - A_S^T z) / lambda with (lambda I + G) z = A_S b by PCG (lambda > 0). The error of w_S is at most
    ||A_S^T dz|| / lambda <= ||dz||_{lambda I + G} / lambda ~ sqrt(gamma) / lambda (gamma = r^T P^-1 r of PCG).
    Products per PCG step: one A_S^T v and one A_S u (one n-vector all-reduce); A_S^T z is carried along."""
    rows = _Rows(At, idx) if cache is None else cache.rows(At, idx, support)
    L = _factor(At, support, lam, max_cond, cache, exact=not fast, rows=rows)  # uses the float32 rows first
    b = rows.rmv(y64) + lam * wb
    c = comm.all_reduce(rows.mv(b))  # A_S b, (n,)

    def apply_K(v):
        local, Atv = rows.normal_mv(v)
        return lam * v + comm.all_reduce(local), Atv

    def scale_sq(z0, Atz0):
        r = b - Atz0
        return float(comm.all_reduce(torch.dot(r, r).reshape(1))[0])  # (lambda ||w_0||)^2

    for exact in ((False, True) if fast else (True,)):
        if exact and fast:
            L = _factor(At, support, lam, max_cond, cache, exact=True)
        if L is None:
            continue
        _, Atz, ok, steps = _pcg(apply_K, lambda v, L=L: torch.cholesky_solve(v.unsqueeze(1), L).squeeze(1), c,
                                 scale_sq, tol, max_iter)
        _count(cache, pcg_runs=1, pcg_steps=steps)
        if ok:
            break
    return (b - Atz) / lam


def _count(cache: GramCache | None, **counts: int) -> None:
    """Add ``counts`` (keys of :data:`WORK_KEYS`) to ``cache.work`` (nothing without a cache)."""
    if cache is not None:
        for key, value in counts.items():
            cache.work[key] += value


def _gather_columns(R: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' kept rows R (m_r, n) and a per-row value ``extra`` (m_r,), concatenated in rank order on every
    rank; returns (R_all, extra_all, offset of this rank's rows)."""
    counts = [int(c) for c in comm.all_gather(torch.tensor([R.shape[0]], dtype=torch.int64, device=R.device))]
    top = max(counts)
    pad = torch.zeros(top, R.shape[1] + 1, dtype=torch.float64, device=R.device)
    pad[: R.shape[0], :-1] = R
    pad[: R.shape[0], -1] = extra
    parts = [t[:c] for t, c in zip(comm.all_gather(pad), counts, strict=True)]
    full = torch.cat(parts)
    return full[:, :-1].contiguous(), full[:, -1].contiguous(), sum(counts[: comm.rank()])


def _solve_primal(At, idx, lam, y64, wb, max_cond, tol, max_iter, fast, cache=None, support=None):
    """M w_S = b with M = A_S^T A_S + lambda I (|S| x |S|, |S| < n) on the gathered kept columns by PCG, the
    preconditioner the Cholesky factor of M formed in float32. Returns this rank's w_S, or None when M is singular
    to working precision (lambda = 0 and A_S rank deficient: the caller uses CG). With ``cache`` (and ``support``)
    the gathered columns and their Gram matrices are kept for the next lambda on the same support."""
    if cache is None:
        R, wb_all, off = _gather_columns(At.index_select(0, idx).to(torch.float64), wb)  # (|S|, n): row j = column j
        grams: dict = {}
    else:
        held = cache.columns(At, idx, support, wb)
        R, wb_all, off, grams = held["R"], held["wb"], held["offset"], held["P"]
    b = R @ y64 + lam * wb_all

    def apply_M(v):
        return R @ (R.T @ v) + lam * v, v

    for exact in ((False, True) if fast else (True,)):
        if exact not in grams:
            grams[exact] = _syrk(R.T) if exact else _syrk(R.T.float()).double()
        P = grams[exact].clone()
        P.diagonal().add_(lam)
        L, cond = _cholesky(P, max_cond)
        _count(cache, factorizations=1)
        if not cond <= max_cond:
            if exact and lam > 0:
                raise _ill_conditioned(cond, lam, max_cond)
            continue
        # ||dw|| <= ||dw||_M / sqrt(mu_min(M)) = sqrt(gamma / mu_min); mu_min(M) >= lambda, and for lambda = 0
        # about mu_min(P) (half the Rayleigh quotient after a few power steps on P^-1)
        mu = lam
        if lam == 0:
            v = torch.randn(P.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                            device="cpu").to(P.device)  # the same draw on every device
            for _ in range(8):
                v = torch.cholesky_solve(v.unsqueeze(1), L).squeeze(1)
                v = v / v.norm().clamp(min=1e-300)
            mu = 0.5 / float(v @ torch.cholesky_solve(v.unsqueeze(1), L).squeeze(1))
        w, _, ok, steps = _pcg(apply_M, lambda r, L=L: torch.cholesky_solve(r.unsqueeze(1), L).squeeze(1), b,
                               lambda x, _, mu=mu: mu * float(x @ x), tol, max_iter)
        _count(cache, pcg_runs=1, pcg_steps=steps)
        if ok or exact:
            return w[off : off + idx.numel()]
    return None


@dataclass(frozen=True)
class _Accuracy:
    """The numerical settings of one :func:`backsolve` (its keyword arguments of the same names)."""

    max_cond: float
    tol: float
    pcg_max_iter: int
    fast: bool
    cg_tol: float
    cg_max_iter: int


def _solve_on_support(At, idx, support, lam, y64, wb, w0, acc: _Accuracy, cache) -> torch.Tensor:
    """w_S (|idx|,) float64 on this rank's rows ``idx`` of S: w_bar_S when S is empty everywhere; the primal system
    when |S| < n (unless singular); the dual (Woodbury) system when lambda > 0; else CG from w0 (default w_bar)."""
    n = At.shape[1]
    size = int(comm.all_reduce(torch.tensor([idx.numel()], dtype=torch.int64, device=idx.device))[0])
    w = None if size else wb
    if w is None and size < n:
        w = _solve_primal(At, idx, lam, y64, wb, acc.max_cond, acc.tol, acc.pcg_max_iter, acc.fast, cache, support)
    if w is None and lam > 0:
        w = _solve_dual(At, idx, support, lam, y64, wb, acc.max_cond, cache, acc.tol, acc.pcg_max_iter, acc.fast)
    elif w is None:
        rows = _Rows(At, idx)
        w = (wb if w0 is None else w0[idx].to(torch.float64)).clone()
        w = _cg(rows, lam, rows.rmv(y64), w, acc.cg_tol, acc.cg_max_iter)
    return w


def backsolve(
    At: torch.Tensor,
    w_bar: torch.Tensor,
    lam: float,
    support: torch.Tensor,
    y: torch.Tensor,
    *,
    w0: torch.Tensor | None = None,
    max_cond: float = 1e12,
    tol: float = 1e-14,
    pcg_max_iter: int = 10,
    fast: bool = True,
    cg_tol: float = 1e-10,
    cg_max_iter: int = 1000,
    cache: GramCache | None = None,
) -> torch.Tensor:
    """Exact minimiser of f on the support S; collective (every rank calls it with its own block).

    Args:
        At: (p_r, n) this rank's A_r^T (any float dtype; products exact in float64).
        w_bar: (p_r,) the dense weights w_bar.
        lam: ridge weight lambda >= 0.
        support: (p_r,) bool, the support S on this rank.
        y: (n,) the target y (identical on all ranks), e.g. A w_bar.
        w0: (p_r,) starting point of CG when lambda = 0 and |S| >= n (default: w_bar on S).
        max_cond: raise :class:`IllConditionedError` when the condition estimate of lambda I + G exceeds this.
        tol: PCG stops when its bound on the error of w_S is below tol * ||w_S|| (lambda > 0, or |S| < n).
        pcg_max_iter: PCG steps before the float32-formed preconditioner is given up for a float64-formed one.
        fast: form the Gram matrix in float32 first (False: float64 only, the reference path).
        cg_tol, cg_max_iter: CG (lambda = 0, |S| >= n) stops when ||A_S^T r|| <= cg_tol * ||A_S^T y|| or after
            cg_max_iter steps.
        cache: a :class:`GramCache` (G updates across nearby supports, factor and solution reuse).

    Returns:
        w: (p_r,) float32 on At's device, zero off S.
    """
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lambda must be finite and >= 0, got {lam}")
    p_r, n = At.shape
    if w_bar.shape != (p_r,) or support.shape != (p_r,) or y.shape != (n,):
        raise ValueError(f"shape mismatch: At {tuple(At.shape)}, w_bar {tuple(w_bar.shape)}, "
                         f"support {tuple(support.shape)}, y {tuple(y.shape)}")
    w_bar, support, y = w_bar.to(At.device), support.to(At.device), y.to(At.device)  # computed where At lives
    w0 = None if w0 is None else w0.to(At.device)
    accuracy = _Accuracy(max_cond, tol, pcg_max_iter, fast, cg_tol, cg_max_iter)
    with comm.phase(PHASE):
        if cache is not None and lam > 0:
            w = cache.recall(support, lam, y, w_bar)
            if w is not None:
                return w
        idx = torch.nonzero(support, as_tuple=True)[0]
        w = _solve_on_support(At, idx, support, lam, y.to(torch.float64), w_bar[idx].to(torch.float64), w0, accuracy,
                              cache)
    out = torch.zeros(p_r, dtype=torch.float32, device=At.device)
    out[idx] = w.to(torch.float32)
    if cache is not None and lam > 0:
        cache.remember(support, lam, y, w_bar, out)
    return out


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

    a_i = At[i] and G = A_S A_S^T formed in float64 (the difference 1 - a_i^T (...)^-1 a_i cancels digits, so the
    float32-formed G of :func:`backsolve` is not used here); the cost is (|S| + |candidates|) n^2 flops plus one
    Cholesky factorisation.
    """
    if not lam > 0:
        raise ValueError(f"swap_curvatures needs lambda > 0, got {lam}")
    with comm.phase(PHASE):
        L = _factor(At, support, lam, max_cond, cache, exact=True)

    def quad(mask: torch.Tensor, fill: float) -> torch.Tensor:
        idx = torch.nonzero(mask, as_tuple=True)[0]
        out = torch.full((At.shape[0],), fill, dtype=torch.float64, device=At.device)
        for s, e, rows in _chunks(At, idx):
            z = torch.linalg.solve_triangular(L, rows.T, upper=False)  # (n, c): L^-1 a_i
            out[idx[s:e]] = (z * z).sum(0)
        return out

    d_inv = ((1.0 - quad(support, 1.0)) / lam).clamp_(min=0.0)
    s_add = lam * (1.0 + quad(candidates & ~support, math.inf))
    return d_inv, s_add


def _sumsq(x: torch.Tensor) -> float:
    """Global sum of squares of a rank-local float64 vector (one scalar all-reduce)."""
    return float(comm.all_reduce(torch.dot(x, x).reshape(1))[0])


def _cg(rows, lam, b, w, tol, max_iter):
    """CG on (A_S^T A_S + lambda I) w = b (CGLS form): per step one n-vector all-reduce and two scalars."""

    def normal(x):
        return rows.rmv(comm.all_reduce(rows.mv(x))) + lam * x

    s = b - normal(w)  # residual of the normal equations, (|S|,)
    gamma = _sumsq(s)
    stop = (tol**2) * max(_sumsq(b), 1e-300)
    d = s.clone()
    for _ in range(max_iter):
        if gamma <= stop:
            break
        q = comm.all_reduce(rows.mv(d))  # A_S d, (n,)
        curv = float(torch.dot(q, q)) + (lam * _sumsq(d) if lam > 0 else 0.0)
        if curv <= 0:
            break
        alpha = gamma / curv
        w += alpha * d
        s -= alpha * (rows.rmv(q) + lam * d)
        gamma_new = _sumsq(s)
        d = s + (gamma_new / gamma) * d
        gamma = gamma_new
    return w
