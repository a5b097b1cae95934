"""CHITA on one layer's reconstruction curvature: the sparse ridge problem of every output row, solved together.

The per-sample Fisher of the whole model (:mod:`dist_chita.fisher.solver`) has rank n, the number of calibration
samples; with n << p it cannot tell most supports apart. A layer's own reconstruction error has far more information:
with the layer's calibration inputs X (N x d, every token of every sample, N >> n) and dense weights W_bar (r x d, row i
= output i), the change of its outputs is

    1/(2N) ||X (W - W_bar)^T||_F^2 = sum_i 1/2 (w_i - w_bar_i)^T H (w_i - w_bar_i),    H = X^T X / N  (d x d),

the curvature of OBS and SparseGPT (the layer's Gauss-Newton matrix). With the ridge it is CHITA's problem (paper
eq. (4)) for each row separately, A = X / sqrt(N), y = A w_bar_i, one shared Gram matrix:

    min_{w_i}  f_i(w_i) = 1/2 (w_i - w_bar_i)^T Q (w_i - w_bar_i),   Q = H + lambda I,
    subject to ||w_i||_0 <= k_i (per row), or N:M in every group of M consecutive inputs.

Solved for a chunk of rows at once (:func:`chunk_rows`, (c, d) x (d, d) products), CHITA's scheme per row: a warm
start (the better per row of the OBS saliency w_j^2 / [Q^-1]_jj and the magnitude support, each re-fitted), then
steps of: ``moves`` local-search moves, each the best per row of its swap candidates, every swap scored exactly from
the gradient g = Q (w - w_bar), f(w + delta) = f(w) + delta . g + 1/2 delta^T Q delta with delta sparse, and the
gradient carried to the new point exactly, g += Q delta (a product over the inputs that changed only). Per-row
budgets: the best single pair, and the s cheapest kept weights for the s most promising outside ones
(s = 2, 4, 8, 16), drawn from a pool of the cheapest and most promising per row chosen once per step and re-ranked
at every move; N:M: the best swap inside each of a pool of groups, 1, 4 or 16 groups at once. Optionally
(``trials``) CHITA's support-changing steps H_k(w - tau g) from just past tau_c, the first support change, and from
1/L, each scored by a product. Then the re-fit of the kept weights on their support (the paper's back-solve, here
conjugate gradients on Q_SS, started from the point reached, preconditioned by the diagonal plus Q's leading
directions restricted to each row's support: :class:`Preconditioner`); its first step is CHITA's support-keeping
line step (the exact minimiser along the preconditioned -g_S), so the step has no line step of its own. The
back-solve runs on the rows that moved and on those whose last back-solve was still gaining (its last iteration
lowered f_i by more than ``SETTLE`` tol f_i); a row that neither moved nor was still gaining is at its minimiser
and stops. Every candidate is taken only if it lowers f (so f never increases). A row stops when its own
relative decrease per step is below ``tol``; only the rows still improving are computed. Cost per step: the
back-solve's ``refit_iters`` products, the new gradient's, and the moves' partial products; with ``trials``, one more
product per trial.

Pure math on tensors, local to one process (rows are independent; the caller shares rows among ranks).
Shapes: r rows, d inputs; all matrices float32 unless said (f sums in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ROW_CHUNK = 64  # rows solved together: a multiple of it (chunk_rows)
CHUNK_ENTRIES = 1 << 16  # a chunk of rows holds at least this many weights (chunk_rows)
_SWAPS = (2, 4, 8, 16)  # swap sizes tried per move (per-row budgets; the best single pair is searched apart)
_PAIR_POOL = 32  # the moves' candidates: this many cheapest kept and most promising outside weights per row
_GROUP_SWAPS = (1, 4, 16)  # N:M: how many groups' best swaps are tried together
_GROUP_POOL = 32  # N:M: the groups a call's moves choose from (_group_pool)
_MARGIN = 1e-6  # relative decrease of f_i a candidate must bring: below it, float32 rounding (of f computed
# directly or from the gradient) rather than the problem would decide between nearly equal candidates
SETTLE = 0.25  # a back-solve whose last iteration gained at most SETTLE tol f_i is taken as finished
CG_RTOL = 1e-5  # the back-solve stops a row once its residual is below this fraction of its first
DEFLATE = 32  # directions of the back-solve's preconditioner (Preconditioner), at most sqrt(d / 2)
_SUBSPACE_ITERS = 8  # products of the subspace iteration that finds them


@dataclass
class RowsResult:
    """W: (r, d) float32 pruned and re-fitted weights; support: (r, d) bool. Objectives are sum_i f_i."""

    W: torch.Tensor
    support: torch.Tensor
    objective: float
    warm_objective: float
    magnitude_objective: float
    iterations: int
    trace: list[float] = field(default_factory=list)


def chunk_rows(d: int) -> int:
    """Rows solved together for a layer of d inputs: the smallest multiple of ``ROW_CHUNK`` holding at least
    ``CHUNK_ENTRIES`` weights. A step costs about a hundred tensor operations per chunk whatever its size, which
    dominate narrow layers' (r, d) arithmetic unless the chunk is large; a multiple of ``ROW_CHUNK`` rows keeps
    layers of ``ROW_CHUNK``-multiple rows in whole chunks for sharing among ranks."""
    return ROW_CHUNK * max(1, -(-CHUNK_ENTRIES // (ROW_CHUNK * max(d, 1))))


def keep_mask(score: torch.Tensor, k: int | torch.Tensor | None, nm: tuple[int, int] | None,
              allowed: torch.Tensor | None) -> torch.Tensor:
    """The support of the projection: the k largest ``score`` of every row (k an int, or (r,) integers: one budget
    per row), or the N largest of every group of M consecutive entries, among ``allowed`` entries only; ties to the
    lower index. score: (r, d); returns (r, d) bool."""
    if allowed is not None:
        score = torch.where(allowed, score, torch.full_like(score, -math.inf))
    if nm is not None:
        N, M = nm
        r, d = score.shape
        if d % M:
            raise ValueError(f"N:M needs the input size ({d}) to be a multiple of M = {M}")
        return keep_mask(score.reshape(r * d // M, M), N, None, None).reshape(r, d) & (
            True if allowed is None else allowed)
    d = score.shape[1]
    if isinstance(k, torch.Tensor):  # one budget per row: a stable sort (descending, ties keep the lower index)
        order = score.sort(dim=1, descending=True, stable=True).indices
        ranks = torch.arange(d, device=score.device).expand_as(order)
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, ranks < k.to(score.device)[:, None])
        return mask if allowed is None else mask & allowed
    k = min(int(k), d)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    # the k-th largest per row by selection (O(d), not a sort); of the entries equal to it, the lowest-index ones
    thr = score.kthvalue(d - k + 1, dim=1, keepdim=True).values
    above, tied = score > thr, score == thr
    mask = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
    return mask if allowed is None else mask & allowed


def objectives(D: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """f_i = 1/2 d_i^T Q d_i for every row of D = W - W_bar (r, d); returns (r,) float64."""
    return 0.5 * (D @ Q).mul_(D).double().sum(1)


@dataclass(frozen=True)
class Preconditioner:
    """The back-solve's preconditioner, one per Q: Q ~ D^1/2 (c I + V (E - c I) V^T) D^1/2 with D = diag(Q), V (d, m)
    the leading eigenvectors of the Jacobi-scaled J = D^-1/2 Q D^-1/2, E (m,) their eigenvalues and c the mean of
    J's other eigenvalues (trace J = d). Q's spectrum is spread wide (condition numbers of 10^3 to 10^5 on MiniLM's
    layers, a few directions holding a fifth of the trace), which diagonal scaling alone leaves. Restricted to a
    row's support S the approximation is inverted exactly (Woodbury): M_S^-1 = D_S^-1/2 (I - V_S C^-1 V_S^T)
    D_S^-1/2 / c, C = c (E - c I)^-1 + V_S^T V_S, one m x m Cholesky per row and back-solve.

    scale: (d,) D^-1/2; V: (d, m); ridge: (m,) c / (E - c); c: the mean; outer: (d, m (m + 1) / 2) the upper
    triangle of v_j v_j^T for every input j (v_j = row j of V), so that every row's V_S^T V_S is one product."""

    scale: torch.Tensor
    V: torch.Tensor
    ridge: torch.Tensor
    c: float
    outer: torch.Tensor

    @property
    def rank(self) -> int:
        return self.V.shape[1]

    def on_support(self, S: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """M_S^-1 for every row's support S (r, d) bool: a function of R (r, d), zero off S, returning
        M_{S_i}^-1 r_i in every row (zero off S). Forms every row's C (one (r, d) x (d, m (m + 1) / 2) product) and
        its Cholesky factor; each application then costs two (r, d) x (d, m) products. A row whose C is not
        numerically definite (a direction far above the rest, c / (E - c) below the rounding of V_S^T V_S) is
        preconditioned by the diagonal alone instead of failing the run."""
        Sf = S.to(self.V.dtype)
        post = (self.scale / self.c)[None, :] * Sf
        m = self.rank
        if m == 0:
            return lambda R: R * self.scale[None, :] * post
        iu = torch.triu_indices(m, m, device=S.device)
        C = torch.zeros(S.shape[0], m, m, dtype=Sf.dtype, device=S.device)
        C[:, iu[0], iu[1]] = Sf @ self.outer  # V_S^T V_S, upper triangle
        C = C + C.triu(1).transpose(1, 2)
        C.diagonal(dim1=1, dim2=2).add_(self.ridge)
        L_C, info = torch.linalg.cholesky_ex(C)
        jacobi = (info != 0)[:, None]

        def apply(R):
            y = R * self.scale[None, :]
            t = torch.cholesky_solve((y @ self.V)[:, :, None], L_C)[:, :, 0].masked_fill_(jacobi, 0.0)
            return y.sub_(t @ self.V.T).mul_(post)
        return apply


def preconditioner(Q: torch.Tensor, rank: int, power_iters: int = _SUBSPACE_ITERS) -> Preconditioner:
    """:class:`Preconditioner` of Q (d, d) with at most ``rank`` directions, found by subspace iteration on J in
    Q's dtype (block of rank + rank // 2 vectors from a fixed seed, ``power_iters`` products, then Rayleigh-Ritz;
    a preconditioner needs no more precision); only eigenvalues above c are kept. Deterministic: the same Q gives
    the same bits on every rank."""
    d = Q.shape[0]
    scale = Q.diagonal().double().clamp_min(1e-30).rsqrt().to(Q.dtype)
    rank = min(rank, math.isqrt(d // 2))  # forming every row's C (m^2 / 2 per input) costs <= 1/4 of a product
    if rank <= 0:
        V, E = Q.new_zeros(d, 0), Q.new_zeros(0)
    else:
        J = scale[:, None] * Q * scale[None, :]
        block = min(d, rank + rank // 2)
        X = torch.randn(d, block, generator=torch.Generator().manual_seed(0), dtype=Q.dtype, device="cpu").to(Q.device)
        for _ in range(power_iters):
            X = torch.linalg.qr(J @ X).Q
        E, U = torch.linalg.eigh(X.T @ J @ X)
        E, V = E.flip(0)[:rank], (X @ U).flip(1)[:, :rank]
    c = (d - float(E.sum())) / (d - E.numel())
    keep = E > 1.01 * c
    E, V = E[keep], V[:, keep]
    iu = torch.triu_indices(V.shape[1], V.shape[1], device=Q.device)
    return Preconditioner(scale=scale, V=V.contiguous(), ridge=c / (E - c), c=c,
                          outer=(V[:, iu[0]] * V[:, iu[1]]).contiguous())


def refit(W: torch.Tensor, W_bar: torch.Tensor, Q: torch.Tensor, S: torch.Tensor, iters: int,
          rtol: float = CG_RTOL, pre: Preconditioner | None = None, G: torch.Tensor | None = None) -> torch.Tensor:
    """The back-solve: min f_i over w_i with support S_i, for every row, by conjugate gradients on Q_SS
    preconditioned with ``pre`` restricted to S_i (:class:`Preconditioner`; None: the diagonal, Jacobi), started
    from W (zero off S). Each iteration is one (r, d) x (d, d) product; one more forms the gradient
    (W - W_bar) Q at the start unless it is given as ``G`` (r, d) (with W zero off S). Returns the new W (zero
    off S)."""
    return _conjugate_gradients(W, W_bar, Q, S, iters, rtol, pre, G)[0]


def _conjugate_gradients(W, W_bar, Q, S, iters, rtol, pre, G):
    """:func:`refit`, also returning the decrease of every f_i in the last iteration (r,) (1/2 alpha r^T z; 0 for a
    row that had converged)."""
    Sf = S.to(W.dtype)
    if pre is None:
        M_inv = (1.0 / Q.diagonal().clamp_min(1e-30))[None, :]

        def precondition(R):
            return R * M_inv
    else:
        precondition = pre.on_support(S)
    X = W * Sf
    # minus the gradient on S: the CG residual of Q_SS x = Q_SS w_bar_S - Q_SP w_bar_P
    R = ((W_bar - X) @ Q).mul_(Sf) if G is None else G * Sf.neg()
    Z = precondition(R)
    P = Z.clone()
    rz = torch.linalg.vecdot(R, Z)
    stop = (rtol**2) * torch.linalg.vecdot(R, R).clamp_min(1e-30)
    zero = torch.zeros_like(rz)
    last = zero
    for _ in range(iters):
        live = torch.linalg.vecdot(R, R) > stop  # a converged row stops moving: its result does not depend on the rest
        if not bool(live.any()):
            break
        QP = (P @ Q).mul_(Sf)
        pq = torch.linalg.vecdot(P, QP)
        alpha = torch.where(live & (pq > 0), rz / pq.clamp_min(1e-30), zero)[:, None]
        X.addcmul_(alpha, P)
        last = 0.5 * alpha[:, 0] * rz
        R.addcmul_(alpha, QP, value=-1.0)
        Z = precondition(R)
        rz_new = torch.linalg.vecdot(R, Z)
        beta = torch.where(live & (rz > 0), rz_new / rz.clamp_min(1e-30), zero)[:, None]
        P.mul_(beta).add_(Z)
        rz = rz_new
    return X, last


def row_budgets(saliency: torch.Tensor, kept: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's budget shared among its rows: the number of weights of every row (r,) among the ``kept`` largest
    ``saliency`` (r, d) of the whole layer, ``allowed`` entries only; ties to the lower (row-major) index. With the
    OBS saliency w_j^2 / [Q^-1]_jj (the increase of f_i when w_j alone is removed and the row re-fitted), in the
    same units in every row, as SparseGPT's layer-wide masks."""
    r, d = saliency.shape
    flat = keep_mask(saliency.reshape(1, r * d), kept, None, None if allowed is None else allowed.reshape(1, r * d))
    return flat.reshape(r, d).sum(1)


def ridged(H: torch.Tensor, lam: float) -> torch.Tensor:
    """Q = H + lambda I (d, d) in float32, as :func:`solve_rows` forms it."""
    return H.float() + lam * torch.eye(H.shape[0], dtype=torch.float32, device=H.device)


def obs_denominator(Q: torch.Tensor) -> torch.Tensor:
    """[Q^-1]_jj (d,) float32, floored at 1e-30: the OBS saliency of w_j is w_j^2 / [Q^-1]_jj."""
    return inverse_diagonal(Q).float().clamp_min(1e-30)


def inverse_diagonal(Q: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """diag(Q^-1) (d,) in float64: squared column norms of L^-1, Q = L L^T (a third of an inverse's work), for
    ``block`` columns at a time (column j of L^-1 is zero above j), so that the float64 work space is L and one
    (d, block) panel; through the LU inverse when Q is not numerically definite."""
    L, info = torch.linalg.cholesky_ex(Q.double())
    if int(info) != 0:
        return torch.linalg.inv(Q.double()).diagonal()
    d = Q.shape[0]
    out = torch.empty(d, dtype=L.dtype, device=L.device)
    for a in range(0, d, block):
        b = min(a + block, d)
        eye = torch.eye(d - a, b - a, dtype=L.dtype, device=L.device)
        out[a:b] = torch.linalg.solve_triangular(L[a:, a:], eye, upper=False).pow(2).sum(0)
    return out


def lipschitz(Q: torch.Tensor, iters: int = 50) -> float:
    """The largest eigenvalue of Q by power iteration (times 1.01), in float64 (no underflow for tiny Q)."""
    Q = Q.double()
    v = torch.ones(Q.shape[0], dtype=Q.dtype, device=Q.device)
    est = 0.0
    for _ in range(iters):
        v = v / v.norm().clamp_min(1e-30)
        Qv = Q @ v
        est = float(v @ Qv)
        v = Qv
    return 1.01 * est


def solve_rows(
    W_bar: torch.Tensor,
    H: torch.Tensor,
    lam: float,
    *,
    k: int | torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    allowed: torch.Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-3,
    trials: int = 0,
    moves: int = 4,
    refit_iters: int = 10,
    deflate: int = DEFLATE,
    row_chunk: int | None = None,
    q_inv_diag: torch.Tensor | None = None,
) -> RowsResult:
    """Prune every row of one layer (module docstring).

    Args:
        W_bar: (r, d) dense weights w_bar_i.
        H: (d, d) symmetric PSD curvature X^T X / N (any float dtype).
        lam: ridge lambda (> 0 keeps Q_SS definite; callers use a fraction of mean(diag H)).
        k: weights kept per row, an int or (r,) integers (:func:`row_budgets`) (with ``allowed``: at most that
            many of the allowed ones); or ``nm`` = (N, M).
        allowed: (r, d) bool, False for weights fixed at zero; None = all.
        max_iter: IHT steps at most; a row stops when its relative decrease of f_i is below ``tol``.
        trials: support-changing step sizes tried per step from tau_c and from 1/L, doubling (each costs a
            product; on the default job's layers they lowered f in well under 1% of the row-steps where they ran,
            the swaps doing the rest).
        moves: swap moves per step, each from the point the previous one reached, before the back-solve.
        refit_iters: conjugate-gradient iterations of each back-solve.
        deflate: directions of the back-solve's preconditioner at most (:func:`preconditioner`; 0: Jacobi).
        row_chunk: rows solved together (None: :func:`chunk_rows` of d). Chunk j is rows
            [j * row_chunk, (j + 1) * row_chunk) of W_bar, computed alone, so a caller that splits a layer's rows at
            multiples of ``row_chunk`` gets the same bits for every chunk (float products are not the same bits for
            different numbers of rows).
        q_inv_diag: :func:`obs_denominator` of ``ridged(H, lam)`` when the caller has it already (else computed).
    """
    if (k is None) == (nm is None):
        raise ValueError("give exactly one of k (per row) and nm")
    if not (bool(torch.isfinite(W_bar).all()) and bool(torch.isfinite(H).all())):
        raise ValueError("non-finite weights or curvature")
    W_bar = W_bar.float()
    Q = ridged(H, lam)
    q_inv_diag = obs_denominator(Q) if q_inv_diag is None else q_inv_diag
    L = lipschitz(Q) if trials else math.inf  # only the support-changing steps from 1/L need it
    pre = preconditioner(Q, deflate)
    row_chunk = chunk_rows(W_bar.shape[1]) if row_chunk is None else row_chunk
    parts = []
    for a in range(0, W_bar.shape[0], row_chunk):
        b = min(a + row_chunk, W_bar.shape[0])
        k_ab = k[a:b] if isinstance(k, torch.Tensor) else k
        parts.append(_solve_chunk(W_bar[a:b], None if allowed is None else allowed[a:b], Q, q_inv_diag, L, pre, k_ab,
                                  nm, max_iter, tol, trials, moves, refit_iters))
    if not parts:
        empty = torch.zeros_like(W_bar)
        return RowsResult(W=empty, support=empty.bool(), objective=0.0, warm_objective=0.0, magnitude_objective=0.0,
                          iterations=0, trace=[0.0])
    steps = max(len(p[5]) for p in parts)
    trace = [sum(p[5][min(j, len(p[5]) - 1)] for p in parts) for j in range(steps)]
    return RowsResult(W=torch.cat([p[0] for p in parts]), support=torch.cat([p[1] for p in parts]),
                      objective=sum(p[2] for p in parts), warm_objective=trace[0],
                      magnitude_objective=sum(p[3] for p in parts), iterations=max(p[4] for p in parts), trace=trace)


def _solve_chunk(W_bar, allowed, Q, q_inv_diag, L, pre, k, nm, max_iter, tol, trials, moves, refit_iters):
    """:func:`solve_rows` on one chunk of rows. Returns (W, S, f, f of magnitude + back-solve, steps, trace)."""

    # warm start: OBS saliency or magnitude, whichever re-fits better (per row)
    S_obs = keep_mask(W_bar.pow(2) / q_inv_diag, k, nm, allowed)
    W_obs, last_obs = _conjugate_gradients(W_bar * S_obs, W_bar, Q, S_obs, refit_iters, CG_RTOL, pre, None)
    f_obs, G_obs = _objective_and_gradient(W_obs, W_bar, Q)
    S_mag = keep_mask(W_bar.abs(), k, nm, allowed)
    W_mag, last_mag = _conjugate_gradients(W_bar * S_mag, W_bar, Q, S_mag, refit_iters, CG_RTOL, pre, None)
    f_mag, G_mag = _objective_and_gradient(W_mag, W_bar, Q)
    take = (f_obs < f_mag)[:, None]
    W, S = torch.where(take, W_obs, W_mag), torch.where(take, S_obs, S_mag)
    fi = torch.minimum(f_obs, f_mag)
    G = torch.where(take, G_obs, G_mag)  # the gradient, kept up to date for every row
    settled = _settled(torch.where(take[:, 0], last_obs, last_mag), fi, tol)
    trace = [float(fi.sum())]

    active = torch.full((W.shape[0],), bool(moves or trials), dtype=torch.bool, device=W.device)  # else no step
    its = 0
    while its < max_iter and bool(active.any()):
        its += 1
        rows = torch.nonzero(active, as_tuple=True)[0]  # only the rows still improving are computed
        f_a = fi[rows]
        W_a, S_a, f_new, G_a, settled_a = _iht_step(W[rows], S[rows], f_a, G[rows], settled[rows], W_bar[rows],
                                                    None if allowed is None else allowed[rows], Q, L, pre,
                                                    k[rows] if isinstance(k, torch.Tensor) else k, nm, trials,
                                                    refit_iters, moves, tol)
        # a row moves only if it improves (CG from a better point cannot end worse, but guard float noise) and
        # stops for good once its own relative decrease is below tol
        step = f_new < f_a - _MARGIN * f_a.abs()
        W[rows] = torch.where(step[:, None], W_a, W[rows])
        S[rows] = torch.where(step[:, None], S_a, S[rows])
        G[rows] = torch.where(step[:, None], G_a, G[rows])
        settled[rows] = torch.where(step, settled_a, settled[rows])
        f_next = torch.where(step, f_new, f_a)
        fi[rows] = f_next
        active[rows] = (f_a - f_next) > tol * f_a.clamp_min(0.0)
        trace.append(float(fi.sum()))
    return W * S, S, float(fi.sum()), float(f_mag.sum()), its, trace


def _settled(last: torch.Tensor, fi: torch.Tensor, tol: float) -> torch.Tensor:
    """Which rows' back-solve is finished (r,) bool: its last iteration lowered f_i by at most ``SETTLE`` tol f_i.
    A row still gaining more is re-fitted at the next step even if no move takes: the rest of its back-solve is
    worth a step."""
    return last <= SETTLE * tol * fi.float()


def _objective_and_gradient(W: torch.Tensor, W_bar: torch.Tensor, Q: torch.Tensor):
    """f_i (float64) and the gradient G = (W - W_bar) Q of every row, from one product."""
    D = W - W_bar
    G = D @ Q
    return 0.5 * (G * D).double().sum(1), G


def _iht_step(W, S, fi, G, settled, W_bar, allowed, Q, L, pre, k, nm, trials, refit_iters, moves, tol):
    """One IHT step of :func:`solve_rows` on a set of rows: up to ``moves`` swap moves (:func:`_swap_moves`), each
    the best per row of the swap candidates at the current point, the gradient carried exactly to the new point;
    with ``trials``, support-changing steps H(w - t g) compete with the point reached (each scored by a product);
    then the back-solve on the support, for the rows that moved and those whose last back-solve stopped short of
    convergence (``settled`` False; a settled row that did not move is at the minimiser on its support already).
    Every candidate is taken only if it lowers f (the current point included). Returns (W, S, f, G, settled) of
    the new points. (The support-keeping line step of CHITA, the exact minimiser along -g_S, is the back-solve's
    first conjugate-gradient step: a step of its own would repeat it.)"""
    f_in = fi
    W, S, fi, G = _swap_moves(W, S, fi, G, Q, allowed, nm, moves)
    if trials:  # after the moves: a support-changing step is taken where it beats the point they reached
        W, S, fi = _support_steps(W, S, fi, G, W_bar, allowed, Q, L, k, nm, trials)
    rows = torch.nonzero((fi < f_in) | ~settled, as_tuple=True)[0]
    if rows.numel():  # (the support steps move W without the gradient: the back-solve forms it)
        W_r, last = _conjugate_gradients(W[rows], W_bar[rows], Q, S[rows], refit_iters, CG_RTOL, pre,
                                         None if trials else G[rows])
        f_r, G_r = _objective_and_gradient(W_r, W_bar[rows], Q)
        W, fi, G = W.index_copy(0, rows, W_r), fi.index_copy(0, rows, f_r), G.index_copy(0, rows, G_r)
        settled = settled.index_copy(0, rows, _settled(last, f_r, tol))
    return W, S, fi, G, settled


def _support_steps(W, S, fi, G, W_bar, allowed, Q, L, k, nm, trials):
    """CHITA's support-changing steps H(w - t g), from just past tau_c (where the first outside weight would
    overtake the smallest kept one) and from 1/L, doubling ``trials`` times each, every one scored by a product
    and taken where it lowers f; a trial after one taken steps from the point taken, along the gradient g of the
    step's start (tau_c, g and 1/L are not recomputed: each trial costs its one product). Returns (W, S, f)."""
    d = W.shape[1]
    out = torch.where(S, torch.zeros_like(G), G.abs())
    if allowed is not None:
        out = out.masked_fill(~allowed, 0.0)
    kept = torch.where(S, W.abs(), torch.full_like(W, math.inf))
    if nm is not None:
        groups = (W.shape[0], d // nm[1], nm[1])
        tau_c = (kept.reshape(groups).amin(2) / out.reshape(groups).amax(2)).amin(1)
    else:
        tau_c = kept.amin(1) / out.amax(1)
    # just past tau_c: at tau_c itself the entering and the leaving weight tie, and float noise would decide
    tau_c = torch.where(torch.isfinite(tau_c), tau_c * (1.0 + 1e-3), torch.full_like(tau_c, 1.0 / L))
    for base in (tau_c[:, None], torch.full_like(tau_c[:, None], 1.0 / L)):
        t = base
        for _ in range(trials):
            V = W - t * G
            S_t = keep_mask(V.abs(), k, nm, allowed)
            W_t = V * S_t
            f_t = objectives(W_t - W_bar, Q)
            better = f_t < fi - _MARGIN * fi.abs()  # clear wins only: float noise picks no path
            b = better[:, None]
            W, S, fi = torch.where(b, W_t, W), torch.where(b, S_t, S), torch.where(better, f_t, fi)
            t = 2.0 * t
    return W, S, fi


def _swap_moves(W, S, fi, G, Q, allowed, nm, moves):
    """Up to ``moves`` local-search moves on a set of rows: at each, the swap candidates (per-row budgets: the best
    single pair among the cheapest kept and most promising outside weights, and the s cheapest for the s best,
    s in ``_SWAPS``; N:M: the best swap inside groups, ``_GROUP_SWAPS`` groups at once), each scored exactly from
    the gradient, the best per row taken if it lowers f; the gradient then follows exactly,
    G += delta Q (delta nonzero on the 2s changed weights). Per-row budgets draw every move's candidates from one
    pool per call (the ``_PAIR_POOL`` cheapest kept and most promising outside weights at the start), re-ranked
    at each move from the current point. A row that no candidate improves keeps its point, and with the pool fixed
    for the call its candidates would be the same again: it is not scored at the later moves. Stops when no row
    improves. Returns (W, S, f, G)."""
    qd = Q.diagonal()
    pool = _group_pool(W, S, G, Q, qd, allowed, nm[1]) if nm is not None else _row_pool(W, S, G, qd, allowed)
    live = torch.arange(W.shape[0], device=W.device)  # the rows the last move improved (all at the first)
    for _ in range(moves):
        W_l, S_l, f_l, G_l = W[live], S[live], fi[live], G[live]
        allowed_l = None if allowed is None else allowed[live]
        cand = (_group_swaps(W_l, S_l, f_l, G_l, Q, qd, allowed_l, nm[1], pool[live]) if nm is not None
                else _row_swaps(W_l, S_l, f_l, G_l, Q, qd, allowed_l, pool[0][live], pool[1][live]))
        best_f, pick = f_l, torch.full_like(f_l, -1, dtype=torch.long)
        for c, (_, _, f_c) in enumerate(cand):
            better = f_c < best_f - _MARGIN * best_f.abs()
            best_f, pick = torch.where(better, f_c, best_f), torch.where(better, c, pick)
        moved = pick >= 0
        if not bool(moved.any()):
            break
        change = torch.zeros_like(W_l)  # every row's chosen swap (zero where none), applied at once
        for c, (idx, delta, _) in enumerate(cand):
            mine = (pick == c)[:, None]
            change.scatter_add_(1, idx, delta.masked_fill(~mine, 0.0))
            enters = torch.arange(idx.shape[1], device=W.device) >= idx.shape[1] // 2  # [out, in] halves
            S_l.scatter_(1, idx, torch.where(mine, enters, torch.gather(S_l, 1, idx)))
        S[live] = S_l
        change = torch.zeros_like(W).index_copy_(0, live, change)
        W += change  # a leaving weight: w + (-w), exactly zero
        cols = torch.nonzero((change != 0).any(0), as_tuple=True)[0]  # the inputs any row changed
        G += change[:, cols] @ Q[cols]
        fi = fi.index_copy(0, live, best_f)
        live = live[moved]
    return W, S, fi, G


def _row_pool(W, S, G, qd, allowed):
    """The candidates of a call's moves: the ``_PAIR_POOL`` kept weights cheapest to remove (OBD cost
    w_j^2 Q_jj) and outside weights most promising to add (g_j^2 / Q_jj) of every row, (r, m) indices each."""
    m = min(_PAIR_POOL, W.shape[1])
    cost = torch.where(S, W.pow(2) * qd, torch.full_like(W, math.inf))
    gain = torch.where(S, torch.full_like(W, -1.0), G.pow(2) / qd)
    if allowed is not None:
        gain = gain.masked_fill(~allowed, -1.0)
    return (torch.topk(cost, m, dim=1, largest=False, sorted=False).indices,
            torch.topk(gain, m, dim=1, sorted=False).indices)


def _row_swaps(W, S, fi, G, Q, qd, allowed, outs, ins):
    """Per-row budgets' swap candidates at (W, S) among the pool ``outs``, ``ins`` (r, m) (:func:`_row_pool`),
    re-ranked at the current point (a weight that changed sides since is no longer a candidate):
    [(idx (r, 2s), delta (r, 2s), f (r,))], the change of W being delta at idx (the kept weights leaving, then the
    outside ones entering at their 1-D optimum); f inf where a row has no such swap."""
    cost = torch.where(torch.gather(S, 1, outs), torch.gather(W, 1, outs).pow(2) * qd[outs], math.inf)
    inside = ~torch.gather(S, 1, ins) if allowed is None else ~torch.gather(S, 1, ins) & torch.gather(allowed, 1, ins)
    gain = torch.where(inside, torch.gather(G, 1, ins).pow(2) / qd[ins], -1.0)
    cost, order = cost.sort(dim=1, stable=True)  # cheapest first
    o = torch.gather(outs, 1, order)
    gain, order = gain.sort(dim=1, descending=True, stable=True)  # most promising first
    i_ = torch.gather(ins, 1, order)
    cand = [_best_pair_swap(W, fi, G, Q, qd, torch.isfinite(cost), gain >= 0, o, i_)]
    sizes = [n for n in _SWAPS if n <= o.shape[1]]
    if not sizes:
        return cand
    top = sizes[-1]  # every swap of the s cheapest for the s best, s in sizes, scored together
    idx = torch.cat([o[:, :top], i_[:, :top]], 1)  # (r, 2 top): [out, in]
    delta = torch.cat([-torch.gather(W, 1, o[:, :top]), -torch.gather(G, 1, i_[:, :top]) / qd[i_[:, :top]]], 1)
    first = torch.arange(top, device=W.device)
    member = torch.stack([torch.cat([first < n, first < n]) for n in sizes])  # (m, 2 top): swap n's positions
    D = delta[:, None, :] * member  # (r, m, 2 top) each swap's change of W
    g = torch.gather(G, 1, idx)[:, :, None]
    change_f = (D @ g)[:, :, 0] + 0.5 * (torch.bmm(D, _gather2(Q, idx, idx)) * D).sum(2)  # exact, (r, m)
    ok = ((gain[:, :top] > 0) & torch.isfinite(cost[:, :top])).cummin(1).values[:, [n - 1 for n in sizes]]
    f_c = torch.where(ok, fi[:, None] + change_f.double(), math.inf)
    for j, n in enumerate(sizes):
        part = torch.cat([first[:n], top + first[:n]])
        cand.append((idx[:, part], delta[:, part], f_c[:, j]))
    return cand


def _gather2(Q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Q[a_i, b_i] for every row: (r, m, n) from a (r, m) and b (r, n) indices into Q (d, d), by one flat take."""
    return torch.take(Q, a[:, :, None] * Q.shape[1] + b[:, None, :])


def _best_pair_swap(W, fi, G, Q, qd, out_ok, in_ok, o, i_):
    """The best single swap among the kept weights ``o`` (r, m) and the outside ones ``i_`` (r, m) (``out_ok``,
    ``in_ok`` (r, m): which are candidates), each pair scored exactly: removing o changes f by
    -w_o g_o + w_o^2 Q_oo / 2 and the gradient at i to g_i - w_o Q_io; adding i at its 1-D optimum then lowers f by
    that squared over 2 Q_ii. Returns (idx (r, 2): [out, in], delta (r, 2): the change of W there, f (r,))."""
    r, m = o.shape
    w_o, q_i = torch.gather(W, 1, o), qd[i_]
    remove = -w_o * torch.gather(G, 1, o) + 0.5 * w_o.pow(2) * qd[o]  # (r, m)
    g_i = torch.gather(G, 1, i_)[:, None, :] - w_o[:, :, None] * _gather2(Q, o, i_)  # (r, m, m)
    delta = remove[:, :, None] - g_i.pow(2) / (2.0 * q_i[:, None, :])
    delta = delta.masked_fill_(~(out_ok[:, :, None] & in_ok[:, None, :]), math.inf).reshape(r, m * m)
    best_delta, best = delta.min(1)
    rows = torch.arange(r, device=W.device)
    a, b = best // m, best % m
    idx = torch.stack([o[rows, a], i_[rows, b]], 1)
    change = torch.stack([-w_o[rows, a], -g_i.reshape(r, m * m)[rows, best] / q_i[rows, b]], 1)
    f_c = fi + best_delta.double()
    return idx, change, torch.where(torch.isfinite(best_delta), f_c, torch.full_like(f_c, math.inf))


def _sparse_change(W, fi, G, Q, out_j, in_j, values):
    """The change of W that zeroes the weights ``out_j`` (r, s) and sets ``in_j`` (r, s) to ``values``, and its f
    exactly: f(w + delta) = f(w) + delta . g + 1/2 delta^T Q delta, delta on the 2s changed weights.
    Returns (idx (r, 2s): [out, in], delta (r, 2s), f (r,))."""
    idx = torch.cat([out_j, in_j], 1)
    delta = torch.cat([-torch.gather(W, 1, out_j), values], 1)
    quad = torch.einsum("ra,rab,rb->r", delta, _gather2(Q, idx, idx), delta)
    return idx, delta, fi + ((delta * torch.gather(G, 1, idx)).sum(1) + 0.5 * quad).double()


def _group_pool(W, S, G, Q, qd, allowed, M):
    """The groups of a call's N:M moves: the ``_GROUP_POOL`` groups of M inputs of every row whose best swap
    (:func:`_group_best`) lowers f most at the start, (r, m) group indices."""
    r, d = W.shape
    g = d // M
    best_delta = _group_best(W.view(r, g, M), G.view(r, g, M), S.view(r, g, M), qd.view(1, g, M),
                             None if allowed is None else allowed.view(r, g, M), _group_blocks(Q, M)[None])[0]
    return torch.topk(best_delta, min(_GROUP_POOL, g), dim=1, largest=False, sorted=False).indices


def _group_blocks(Q: torch.Tensor, M: int) -> torch.Tensor:
    """Q inside every group of M consecutive inputs: (d / M, M, M)."""
    g = Q.shape[0] // M
    return Q.view(g, M, g, M).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _group_best(Wg, Gg, Sg, qg, allowed_g, blocks):
    """The best single swap inside each group of M, of a kept weight for an outside one (scored exactly as in
    :func:`_best_pair_swap`): Wg, Gg, Sg, allowed_g (r, m, M) (allowed_g may be None), qg the diagonal of Q there
    and blocks (r or 1, m, M, M) Q inside each group. Returns (decrease of f (r, m), inf where no swap; the swap
    as o * M + i (r, m); the entering weight's value (r, m))."""
    r, m, M = Wg.shape
    remove = -Wg * Gg + 0.5 * Wg.pow(2) * qg  # (r, m, M): f change from zeroing a kept weight
    g_in = Gg[:, :, None, :] - Wg[:, :, :, None] * blocks  # (r, m, M_out, M_in): gradient after removal
    delta = remove[..., None] - g_in.pow(2) / (2.0 * qg[:, :, None, :])
    inside = ~Sg if allowed_g is None else (~Sg & allowed_g)
    delta = delta.masked_fill_(~(Sg[..., :, None] & inside[..., None, :]), math.inf).reshape(r, m, M * M)
    best_delta, best = delta.min(2)
    value = -torch.gather(g_in.reshape(r, m, M * M), 2, best[..., None])[..., 0] / torch.gather(
        qg.expand(r, m, M), 2, (best % M)[..., None])[..., 0]
    return best_delta, best, value


def _group_swaps(W, S, fi, G, Q, qd, allowed, M, groups):
    """N:M candidates among the pooled ``groups`` (r, m) (:func:`_group_pool`): the best swap inside each
    (:func:`_group_best`, at the current point), then the s groups with the largest decreases swapped together
    (s in ``_GROUP_SWAPS``), each combination scored exactly. Returns [(idx, delta, f)] as :func:`_sparse_change`."""
    r, m = groups.shape
    pos = groups[:, :, None] * M + torch.arange(M, device=W.device)  # (r, m, M) inputs of every pooled group
    flat = pos.reshape(r, m * M)

    def take(x):
        return torch.gather(x, 1, flat).view(r, m, M)
    allowed_g = None if allowed is None else take(allowed)
    best_delta, best, value = _group_best(take(W), take(G), take(S), qd[pos], allowed_g, _group_blocks(Q, M)[groups])
    out_j = torch.gather(pos, 2, torch.div(best, M, rounding_mode="floor")[..., None])[..., 0]  # (r, m) inputs
    in_j = torch.gather(pos, 2, (best % M)[..., None])[..., 0]
    order = torch.argsort(best_delta, dim=1, stable=True)
    cand = []
    for n_groups in _GROUP_SWAPS:
        if n_groups > m:
            break
        chosen = order[:, :n_groups]
        ok = (torch.gather(best_delta, 1, chosen) < 0).all(1)  # inf (no valid swap) is not < 0
        o, i_ = torch.gather(out_j, 1, chosen), torch.gather(in_j, 1, chosen)
        idx, change, f_c = _sparse_change(W, fi, G, Q, o, i_, torch.gather(value, 1, chosen))
        cand.append((idx, change, torch.where(ok, f_c, torch.full_like(f_c, math.inf))))
    return cand
