"""CHITA: l0-constrained ridge regression on a column-sharded Fisher factor (Benbaki et al., ICML 2023).

Problem (paper eq. (4)/(6)), with A (n x p) the scaled per-sample gradients, w_bar the dense weights, lambda >= 0::

    min_w  f(w) = 1/2 ||y - A w||^2 + lambda/2 ||w - w_bar||^2   subject to  w in C  (the Budget: ||w||_0 <= k, ...)

with y = A w_bar (the Fisher/OBS quadratic) or y = A w_bar - 1/sqrt(n) 1 (adds the first-order term). Optionally
the ridge term is lambda/2 (w - w_bar)^T D (w - w_bar) with D = diag(A^T A) + floor * mean(diag(A^T A)) instead of
lambda/2 ||w - w_bar||^2 (``ridge="fisher_diagonal"``, a Levenberg-Marquardt damping; solved in z = D^1/2 w, where it is
the problem above with A D^-1/2 and D^1/2 w_bar). Rank r holds
``At`` = A_r^T of shape (p_r, n) and the slices w_r, w_bar_r of length p_r; A w = sum_r A_r w_r is one all-reduce of
an n-vector. H is the projection onto C (:meth:`dist_chita.fisher.budget.Budget.project`), S the support of w.

The steps, one function each (paper Alg. 1 "IHT with line search" and Sec. 3's active set and back-solve):

* :func:`warm_start`: w^0 = H(w_bar) (magnitude pruning), then the back-solve on its support, so the result is never
  worse than magnitude pruning + back-solve.
* :func:`iht_step`, one iteration of Alg. 1: g = grad f(w) = -A^T (y - A w) + lambda (w - w_bar); along -g_S the
  exact minimiser tau* = ||g_S||^2 / (||A g_S||^2 + lambda ||g_S||^2); tau_c = the first tau at which the support of
  H(w - tau g) changes. If tau* <= tau_c the step keeps S and is exact. Otherwise trials t = tau_c+, 2 tau_c+,
  4 tau_c+, ... (support-changing; tau_c+ = (1 + 2^-10) tau_c, just past the crossing, where the leaving and the
  entering coordinate tie, see :func:`trial_steps`) compete with the support-keeping step tau*; the trial of lowest
  f wins, and only a decrease of f is accepted (monotone). 1/L (L the largest eigenvalue of A^T A + lambda I) is a
  last resort.
  A w is maintained incrementally: for a trial w_t = H(w - t g) with support S_t,
  A w_t = A w - t u + A_{S \\ S_t} (t g - w) - t A_{S_t \\ S} g with u = A g_S: only the rows of At in the symmetric
  difference of the supports are read.
* :func:`iht`: iht_step until f decreases by less than tol * f; A w is recomputed exactly every
  :data:`RECOMPUTE_EVERY` steps; after :data:`PATIENCE` support-keeping steps in a row IHT hands over to the
  back-solve (steepest descent on a fixed support is slow; the back-solve is exact).
* :func:`iht_active_set` and :func:`active_set_round`: IHT runs on the rows W (about active_set_factor * k
  coordinates: the support and the largest |w - tau g| outside it); after convergence one full iht_step over all p
  decides whether W must grow.
* :func:`backsolve_support` (:mod:`dist_chita.fisher.backsolve`): the exact ridge solution on a fixed support; after
  an IHT run that changed S, then IHT again from there until the support stops changing.
* :func:`escape` (lambda > 0 mostly): when IHT keeps the support of a back-solved point, candidate supports are
  back-solved and the best is taken if it lowers f: the IHT path H(w - t g) for t = tau_c+, 2 tau_c+, ...; the same path
  on OBS scores (|w_i| / sqrt([(A_S^T A_S + lambda I)^-1]_ii) inside S, the exact single-coordinate gain
  |g_j| / sqrt(s_j) outside, see :func:`dist_chita.fisher.backsolve.swap_curvatures`); for k <= :data:`PAIR_SWAP_MAX_K`
  the ``pair_swaps``^2 single swaps of the cheapest removals with the best additions. The Gram matrix of nearby
  supports is updated, not recomputed (:class:`dist_chita.fisher.backsolve.GramCache`).
* :func:`solve`: the warm start, then up to ``rounds`` rounds of IHT -> back-solve (or escape). CHITA++ calls it once
  per stage (:mod:`dist_chita.fisher.driver`).

Every decision is taken from all-reduced quantities (scalars reduced in float64), so all ranks agree and the result
does not depend on the number of ranks beyond float rounding. Collectives are counted under the phases "solver" and
"backsolve" of :mod:`dist_chita.distributed.comm`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dist_chita.distributed import comm
from dist_chita.fisher.backsolve import GramCache, chunk_bytes, rows_matvec, swap_curvatures
from dist_chita.fisher.backsolve import backsolve as ridge_backsolve
from dist_chita.fisher.budget import Budget
from dist_chita.fisher.select import check_finite, topk_mask

PHASE = "solver"
METHODS = ("chita", "iht_1L")
RIDGES = ("identity", "fisher_diagonal")
# Defaults of solve(): the run config's (launch/config.py SolverConfig), so the library and a run agree.
MAX_ITER = 200
TOL = 1e-4
ESCAPE_TRIALS = 0
# Settings no caller varies.
PATIENCE = 10  # support-keeping IHT steps in a row after which the back-solve (exact on a fixed support) takes over
RECOMPUTE_EVERY = 20  # IHT steps between exact recomputations of the incrementally updated A w
MAX_ACTIVE_ROUNDS = 10  # active-set growth rounds per IHT run
SWAP_CANDIDATES = 4096  # outside coordinates whose exact single-coordinate gain an escape computes
PAIR_SWAP_MAX_K = 4096  # escapes try pair swaps only up to this k (every pair costs a back-solve)
RIDGE_FLOOR = 1e-3  # the fisher_diagonal metric's floor, in units of mean(diag(A^T A))
PAST_CROSSING = 2.0**-10  # support-changing trials start this far (relative) past tau_c: see trial_steps
_CHUNK_BYTES = 1 << 25  # bytes of rows of At converted to float32 at once (non-float32 storage / gathers)
_FUSED_CHUNK_BYTES = 1 << 22  # bytes of rows of At per thread in the fused g / u pass (cache-resident)


@dataclass
class SolveResult:
    """Output of :func:`solve` (identical on every rank except the rank-local slices ``w`` and ``support``).

    Attributes:
        w: (p_r,) float32 pruned weights of this rank, zero off the support.
        support: (p_r,) bool, the kept coordinates of this rank.
        objective: f(w).
        objective_trace: f after the warm start and after every accepted step, backsolve or escape; non-increasing up
            to float32 rounding (A w is updated incrementally and recomputed exactly every :data:`RECOMPUTE_EVERY`
            steps).
        iterations: number of IHT iterations (all rounds, active-set and full steps).
        magnitude_objective: f of magnitude pruning followed by a backsolve (None when backsolve=False); with the
            ``fisher_diagonal`` ridge, magnitude pruning of z = D^1/2 w_bar, i.e. by the OBD saliency.
        plain_magnitude_objective: f of magnitude pruning, H(w_bar), without backsolve (of z, likewise).
        ridge_floor: lambda/2 ||w_bar - H(w_bar)||^2, the ridge term of magnitude pruning (of z, likewise): a lower
            bound of f over the budget (f(w) >= lambda/2 ||w - w_bar||^2 >= lambda/2 of the squares of w_bar off
            the support of w, smallest for the support H keeps), so (magnitude_objective - ridge_floor) /
            magnitude_objective bounds how much lower than its warm start any solver can end.
        timings: seconds spent in "iht" and "backsolve".
        bytes_communicated: payload bytes this rank sent during the solve, per comm phase ("solver", "backsolve").
        active_set_rounds: number of active-set rounds (0 when the active set was skipped).
        backsolves: number of ridge backsolves (warm start, after IHT rounds, escape candidates).
    """

    w: torch.Tensor
    support: torch.Tensor
    objective: float
    objective_trace: list[float]
    iterations: int
    magnitude_objective: float | None
    plain_magnitude_objective: float
    ridge_floor: float = math.nan
    timings: dict[str, float] = field(default_factory=dict)
    bytes_communicated: dict[str, int] = field(default_factory=dict)
    active_set_rounds: int = 0
    backsolves: int = 0


# ----------------------------------------------------------------------------------------------- local linear algebra
def _row_chunks(m: int, n: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * max(n, 1)))


def at_matvec(At: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A_r^T r = At @ r: (p_r,) float32 from r (n,). One full read of At."""
    r = r.to(torch.float32)
    if At.dtype == torch.float32:
        return At @ r
    out = torch.empty(At.shape[0], dtype=torch.float32, device=At.device)
    step = _row_chunks(*At.shape)
    for s in range(0, At.shape[0], step):
        out[s : s + step] = At[s : s + step].float() @ r
    return out


def column_norms_sq(At: torch.Tensor) -> torch.Tensor:
    """||a_j||^2 = diag(A_r^T A_r), (p_r,) float64 (one chunked read of At)."""
    step = _row_chunks(*At.shape)
    return torch.cat([At[s : s + step].double().pow(2).sum(1) for s in range(0, At.shape[0], step)]
                     or [torch.zeros(0, dtype=torch.float64, device=At.device)])


def fisher_diagonal_scale(At: torch.Tensor, floor: float) -> torch.Tensor:
    """D^1/2 of the ``fisher_diagonal`` ridge, (p_r,) float32: D_jj = ||a_j||^2 + floor * (mean over all p columns
    of ||a||^2), or 1 when A is zero. Collective (the mean)."""
    d = column_norms_sq(At)
    total, count = _sum(float(d.sum()), float(d.numel()))
    mean = total / count if count else 0.0
    if mean <= 0.0:
        return torch.ones(At.shape[0], dtype=torch.float32, device=At.device)
    return (d + floor * mean).sqrt().float()


def compact_rows_(At: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Move the rows ``rows`` (increasing local indices) of At to its front, in place; returns the view At[:m]
    (m = |rows|). Chunked: row j is read from rows[j] >= j before any write reaches it, so at most one chunk of
    rows (``_CHUNK_BYTES``) is held apart."""
    m = rows.numel()
    if m == At.shape[0]:
        return At
    step = _row_chunks(*At.shape)
    buf = torch.empty(min(step, max(m, 1)), At.shape[1], dtype=At.dtype, device=At.device)
    for s in range(0, m, step):
        e = min(s + step, m)
        torch.index_select(At, 0, rows[s:e], out=buf[: e - s])
        At[s:e].copy_(buf[: e - s])
    return At[:m]


def a_matvec(At: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Local A_r x = At^T x as (n,) float64 (not reduced); x: (p_r,)."""
    x = x.to(torch.float32)
    if At.dtype == torch.float32:
        return (At.T @ x).double()
    out = torch.zeros(At.shape[1], dtype=torch.float32, device=At.device)
    step = _row_chunks(*At.shape)
    for s in range(0, At.shape[0], step):
        out += At[s : s + step].float().T @ x[s : s + step]
    return out.double()


def _allreduce_vec_and_scalars(vec: torch.Tensor, *scalars: torch.Tensor | float) -> tuple[torch.Tensor, list[float]]:
    """One all-reduce of an n-vector plus float64 scalars (local partial sums)."""
    buf = torch.cat([vec.to(torch.float64),
                     torch.tensor([float(s) for s in scalars], dtype=torch.float64, device=vec.device)])
    comm.all_reduce(buf)
    n = vec.numel()
    return buf[:n], [float(v) for v in buf[n:]]


def _sum(*scalars: float) -> list[float]:
    """All-reduce of a few local float64 partial sums."""
    return comm.all_reduce_floats(scalars)


# ------------------------------------------------------------------------------------------------ the sub-problem
@dataclass
class _Problem:
    """f restricted to a set of rows of At (all of them, or an active set W).

    At: (m, n) rows of A^T; w_bar: (m,); y: (n,) float64 (global); lam: lambda; budget: C on these m columns.
    """

    At: torch.Tensor
    w_bar: torch.Tensor
    y: torch.Tensor
    lam: float
    budget: Budget
    reg_offset: float = 0.0  # ||w_bar||^2 over the columns left out (active set): f stays the full objective
    lipschitz: float | None = None
    col_sq: torch.Tensor | None = None

    def reg_local(self, w: torch.Tensor) -> float:
        d = (w - self.w_bar).double()
        return float(torch.dot(d, d))

    def objective(self, Aw: torch.Tensor, reg: float) -> float:
        """f from the global A w (n,) and the global ||w - w_bar||^2."""
        r = self.y - Aw
        return 0.5 * float(torch.dot(r, r)) + 0.5 * self.lam * (reg + self.reg_offset)

    def exact(self, w: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, float]:
        """A w from scratch (float64, rows of S only) and f(w). One n-vector all-reduce."""
        idx = torch.nonzero(S, as_tuple=True)[0]
        Aw, (reg,) = _allreduce_vec_and_scalars(rows_matvec(self.At, idx, w[idx]), self.reg_local(w))
        return Aw, self.objective(Aw, reg)

    def gradient(self, w: torch.Tensor, Aw: torch.Tensor) -> torch.Tensor:
        """g = -A^T (y - A w) + lambda (w - w_bar), (m,) float32: one full read of At."""
        g = -at_matvec(self.At, self.y - Aw)
        if self.lam:
            g += self.lam * (w - self.w_bar)
        return g

    def gradient_and_u(self, w: torch.Tensor, Aw: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g = grad f(w) (m,) float32 and the local u_r = A_r g_S (n,) float64 in ONE pass over At. Not reduced.

        At is read in row chunks of about ``_FUSED_CHUNK_BYTES``: g on a chunk is At_c (A w - y) (+ lambda (w -
        w_bar)_c), and while the chunk is still in cache its rows in S add At_c[S]^T g_c[S] to u. An IHT iteration
        then reads A once instead of once for g plus |S|/p of it (gathered into a temporary copy) for u = A g_S.
        """
        At, m, n = self.At, self.At.shape[0], self.At.shape[1]
        r = (Aw - self.y).to(torch.float32)  # g = A^T (A w - y) + lambda (w - w_bar)
        g = torch.empty(m, dtype=torch.float32, device=At.device)
        u = torch.zeros(n, dtype=torch.float32, device=At.device)
        reg = self.lam * (w - self.w_bar) if self.lam else None
        idx = torch.nonzero(S, as_tuple=True)[0]
        per_chunk = chunk_bytes(At.device, _FUSED_CHUNK_BYTES * torch.get_num_threads())  # cache-sized on a CPU
        step = max(1, per_chunk // (4 * max(n, 1)))
        starts = list(range(0, m, step))
        cuts = torch.searchsorted(idx, torch.tensor(starts + [m], dtype=idx.dtype, device=idx.device)).tolist()
        for j, s in enumerate(starts):
            e = min(s + step, m)
            c = At[s:e] if At.dtype == torch.float32 else At[s:e].float()
            gc = torch.mv(c, r, out=g[s:e])
            if reg is not None:
                gc.add_(reg[s:e])
            a, b = cuts[j], cuts[j + 1]
            if b - a == 0:
                continue
            if 3 * (b - a) < e - s:
                rows = idx[a:b] - s
                u.addmv_(c.index_select(0, rows).T, gc.index_select(0, rows))
            else:
                u.addmv_(c.T, gc * S[s:e])
        return g, u.double()

    def column_norms_sq(self) -> torch.Tensor:
        """||a_j||^2 = diag(A^T A) on these columns, (m,) float64 (cached; one full read of At)."""
        if self.col_sq is None:
            self.col_sq = column_norms_sq(self.At)
        return self.col_sq

    def L(self, iters: int = 30) -> float:
        """Largest eigenvalue of A^T A + lambda I by power iteration from the all-ones vector (cached)."""
        if self.lipschitz is None:
            v = torch.ones(self.At.shape[0], dtype=torch.float32, device=self.At.device)
            (nv,) = _sum(float(torch.dot(v, v)))
            est = 0.0
            for _ in range(iters):
                v = v / math.sqrt(max(nv, 1e-300))
                Av = comm.all_reduce(a_matvec(self.At, v))
                est = float(torch.dot(Av, Av))  # Rayleigh quotient v^T A^T A v with ||v|| = 1
                v = at_matvec(self.At, Av)
                (nv,) = _sum(float(torch.dot(v.double(), v.double())))
                if nv == 0:
                    break
            self.lipschitz = 1.01 * est + self.lam
        return self.lipschitz


# ------------------------------------------------------------------------------------------------- state of a solve
@dataclass
class _State:
    """An iterate: w (m,) float32, zero off S; S (m,) bool; A w (n,) float64 (global); f = f(w)."""

    w: torch.Tensor
    S: torch.Tensor
    Aw: torch.Tensor
    f: float
    moved: int = 0  # coordinates that entered the support in the step that produced this state (global)


@dataclass
class _Step:
    """What :func:`iht_step` returns: the new iterate, whether it was accepted (it decreased f), g = grad f at the
    previous iterate (m,) and tau, the step size the active set is widened with."""

    state: _State
    accepted: bool
    g: torch.Tensor
    tau: float


@dataclass
class _Context:
    """One solve's fixed settings and running tallies (the same on every rank but for the rank-local tensors of
    ``full``).

    full: f on this rank's columns (all of them, or the allowed ones with ``overwrite_at``); k: the budget's total;
    offset: global index of this rank's first column of ``full.At``; patience: :data:`PATIENCE`, or 0 without
    back-solves; trace, iterations, backsolves, active_set_rounds, timings: what :class:`SolveResult` reports.
    """

    full: _Problem
    method: str
    max_iter: int
    tol: float
    trials: int
    patience: int
    active_set_factor: float | None
    escape_trials: int
    pair_swaps: int
    k: int
    offset: int
    progress: Callable[[dict], None] | None
    gram_cache: GramCache = field(default_factory=GramCache)
    trace: list[float] = field(default_factory=list)
    iterations: int = 0
    backsolves: int = 0
    active_set_rounds: int = 0
    timings: dict[str, float] = field(default_factory=lambda: {"iht": 0.0, "backsolve": 0.0})
    magnitude_objective: float | None = None
    plain_magnitude_objective: float = math.nan
    ridge_floor: float = math.nan

    def exhausted(self) -> bool:
        """Whether the solve's IHT iterations (``max_iter``, over all rounds) are used up."""
        return self.iterations >= self.max_iter


def _exact_state(prob: _Problem, st: _State) -> _State:
    """``st`` with A w and f recomputed from scratch (one n-vector all-reduce)."""
    Aw, f = prob.exact(st.w, st.S)
    return _State(st.w, st.S, Aw, f)


# ------------------------------------------------------------------------------------------------- one IHT step
def _trial(prob: _Problem, st: _State, g: torch.Tensor, u: torch.Tensor, t: float, S_t: torch.Tensor | None = None):
    """w_t = H(w - t g) (support S_t, default from the budget) with A w_t updated incrementally; one all-reduce."""
    v = st.w - t * g
    if S_t is None:
        S_t = prob.budget.project(v)
    w_t = torch.where(S_t, v, torch.zeros_like(v))
    dropped, added = st.S & ~S_t, S_t & ~st.S
    rows = torch.nonzero(dropped | added, as_tuple=True)[0]
    coef = torch.where(dropped[rows], t * g[rows] - st.w[rows], -t * g[rows])
    delta, (reg, moved) = _allreduce_vec_and_scalars(
        rows_matvec(prob.At, rows, coef), prob.reg_local(w_t), float(added.sum())
    )
    Aw = st.Aw - t * u + delta
    return _State(w_t, S_t, Aw, prob.objective(Aw, reg), int(moved))


def _gradient_and_u(prob: _Problem, st: _State) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """g = grad f(w) (local, (m,)), u = A g_S (global, (n,) float64), ||g_S||^2 and ||u||^2.

    One pass over At (:meth:`_Problem.gradient_and_u`) and one n-vector all-reduce."""
    g, local = prob.gradient_and_u(st.w, st.Aw, st.S)
    gS = g[st.S].double()
    u, (gg,) = _allreduce_vec_and_scalars(local, float(torch.dot(gS, gS)))
    return g, u, gg, float(torch.dot(u, u))


def _converged(f_old: float, f_new: float, tol: float) -> bool:
    return f_old - f_new <= tol * max(f_old, 0.0) or f_new <= 0.0


def trial_steps(tau_c: float, count: int) -> list[float]:
    """The support-changing step sizes t_j = 2^j tau_c+, j < ``count``, with tau_c+ = (1 + :data:`PAST_CROSSING`)
    tau_c; none when tau_c is not a finite positive step.

    At tau_c itself the coordinate i leaving S and the best one j outside tie, |w_i - tau_c g_i| = tau_c |g_j|, and
    H would choose between them by the last bits of w, g and tau_c, which differ with the column split (sums over
    columns rounded in another order); just past the crossing the swap wins by PAST_CROSSING |w_i|."""
    if not (math.isfinite(tau_c) and tau_c > 0):
        return []
    first = tau_c * (1.0 + PAST_CROSSING)
    return [first * 2.0**j for j in range(count)]


def _support_changing_trials(prob: _Problem, st: _State, g, u, tau_c: float, trials: int, best: _State) -> _State:
    """The best of ``best`` and the trials H(w - t g), t in :func:`trial_steps` (at most ``trials``, stopping once f
    rises along the doubling path)."""
    prev = math.inf
    for t in trial_steps(tau_c, trials):
        cand = _trial(prob, st, g, u, t)
        if cand.f < best.f:
            best = cand
        if cand.f > prev:  # past the minimum along the doubling path
            break
        prev = cand.f
    return best


def iht_step(prob: _Problem, st: _State, method: str, trials: int, tol: float) -> _Step:
    """One iteration of Alg. 1 on ``prob`` from ``st`` (module docstring): g, tau*, tau_c, the trials, and the
    monotone acceptance.

    The support-keeping step tau* is taken alone when tau* <= tau_c and it decreases f by more than tol * f; otherwise
    (also at a minimiser on S, where it stalls) the support-changing trials compete with it. ``method`` "iht_1L" takes
    the plain step 1/L instead (a baseline).
    """
    g, u, gg, uu = _gradient_and_u(prob, st)
    if method == "iht_1L":
        t = 1.0 / prob.L()
        new = _trial(prob, st, g, u, t)
        return _Step(new, True, g, t) if new.f < st.f else _Step(st, False, g, t)

    curv = uu + prob.lam * gg
    tau_star = gg / curv if gg > 0 and curv > 0 else math.inf
    tau_c = prob.budget.tau_change(st.w, g, st.S)
    best = st
    if math.isfinite(tau_star):
        # the support-keeping step, exact line minimiser on S: f(w - tau g_S) is a quadratic in tau
        w_keep = torch.where(st.S, st.w - tau_star * g, torch.zeros_like(st.w))
        f_keep = st.f - tau_star * gg + 0.5 * tau_star**2 * curv
        keep = _State(w_keep, st.S, st.Aw - tau_star * u, f_keep)
        if tau_star <= tau_c and not _converged(st.f, f_keep, tol):
            return _Step(keep, True, g, tau_star)
        best = keep if f_keep < st.f else st
    best = _support_changing_trials(prob, st, g, u, tau_c, trials, best)
    if best is st:  # nothing decreased f: last resort, the majorisation step 1/L
        cand = _trial(prob, st, g, u, 1.0 / prob.L())
        if cand.f < st.f:
            best = cand
    tau = tau_star if math.isfinite(tau_star) else (tau_c if math.isfinite(tau_c) else 1.0 / prob.L())
    return _Step(best, best is not st, g, tau)


# ------------------------------------------------------------------------------------------------- IHT runs
def iht(ctx: _Context, prob: _Problem, st: _State) -> _State:
    """IHT iterations on ``prob`` until the relative decrease of f is below tol (or the solve's ``max_iter`` is used
    up); with ``ctx.patience`` also once that many consecutive steps kept the support (the caller then back-solves,
    which solves the problem on the fixed support exactly instead of by steepest descent). Returns the last iterate
    with A w and f recomputed exactly."""
    kept = it = 0
    while not ctx.exhausted():
        if it and it % RECOMPUTE_EVERY == 0:
            st = _exact_state(prob, st)
        step = iht_step(prob, st, ctx.method, ctx.trials, ctx.tol)
        ctx.iterations += 1
        it += 1
        if not step.accepted:
            break
        done = _converged(st.f, step.state.f, ctx.tol)
        kept = kept + 1 if step.state.moved == 0 else 0
        st = step.state
        ctx.trace.append(st.f)
        if ctx.progress is not None:
            ctx.progress({"iteration": ctx.iterations, "objective": st.f, "entered": st.moved})
        if done or (ctx.patience and kept >= ctx.patience):
            break
    return _exact_state(prob, st)


def _restrict(budget: Budget, W: torch.Tensor) -> Budget:
    """The budget on the columns W only (same k per segment; columns outside W are dropped). Collective."""
    everything = bool(W.all())  # then no copies of p_r entries (the constructors' check is the same collective)
    allowed = None if budget.allowed is None else (budget.allowed if everything else budget.allowed[W])
    if allowed is not None and bool(allowed.all()):
        allowed = None
    if budget.segment_ids is None:
        return Budget.global_topk(W.numel() if everything else int(W.sum()), int(budget.k[0]), allowed)
    return Budget.per_segment(budget.segment_ids if everything else budget.segment_ids[W], budget.k, allowed,
                              local=budget.local)


def active_set_round(ctx: _Context, st: _State, wide: Budget, g: torch.Tensor, tau: float):
    """IHT on the active set W = S | H_wide(w - tau g) (H_wide: the budget widened to active_set_factor * k), the
    other columns fixed at zero; f stays the full objective (lambda/2 ||w_bar||^2 over the columns left out is added
    as a constant). Returns (the iterate on all m columns, W)."""
    full = ctx.full
    W = st.S | wide.project(st.w - tau * g)
    rows = torch.nonzero(W, as_tuple=True)[0]
    wb_out = full.w_bar[~W].double()
    (left_out,) = _sum(float(torch.dot(wb_out, wb_out)))
    sub = _Problem(full.At.index_select(0, rows), full.w_bar[rows], full.y, full.lam, _restrict(full.budget, W),
                   reg_offset=left_out + full.reg_offset)
    sub_st = iht(ctx, sub, _State(st.w[rows], st.S[rows], st.Aw, st.f))
    w = torch.zeros_like(st.w)
    w[rows] = sub_st.w
    S = torch.zeros_like(st.S)
    S[rows] = sub_st.S
    return _State(w, S, sub_st.Aw, sub_st.f), W


def iht_active_set(ctx: _Context, st: _State) -> _State:
    """IHT with an active set W of about active_set_factor * k rows, grown until a full step over all p keeps to W
    (at most :data:`MAX_ACTIVE_ROUNDS` rounds); plain :func:`iht` when W would be most of p or the budget is N:M."""
    full, factor = ctx.full, ctx.active_set_factor
    budget = full.budget
    p_allowed = int(_sum(float(full.At.shape[0] if budget.allowed is None else budget.allowed.sum()))[0])
    if factor is None or factor <= 1 or budget.kind != "topk" or factor * budget.total() >= 0.5 * p_allowed:
        return iht(ctx, full, st)
    wide = budget.widened(factor)
    g, u, gg, uu = _gradient_and_u(full, st)
    tau = gg / (uu + full.lam * gg) if gg > 0 else 1.0 / full.L()
    for _ in range(MAX_ACTIVE_ROUNDS):
        ctx.active_set_rounds += 1
        st, W = active_set_round(ctx, st, wide, g, tau)
        if ctx.exhausted():
            break
        step = iht_step(full, st, ctx.method, ctx.trials, ctx.tol)  # one full step over all p: does it leave W?
        ctx.iterations += 1
        if not step.accepted:
            break
        outside = int(_sum(float((step.state.S & ~W).sum()))[0])
        done = _converged(st.f, step.state.f, ctx.tol)
        st, g, tau = step.state, step.g, step.tau
        ctx.trace.append(st.f)
        if outside == 0 or done:
            break
    return _exact_state(full, st)


def _timed_iht(ctx: _Context, st: _State) -> _State:
    """One IHT run of the solve (on active sets for CHITA), timed as "iht"; the trace ends with the exact f."""
    t0 = time.perf_counter()
    with comm.phase(PHASE):
        st = iht_active_set(ctx, st) if ctx.method == "chita" else iht(ctx, ctx.full, st)
    ctx.timings["iht"] += time.perf_counter() - t0
    if ctx.trace[-1] != st.f:  # the exact recomputation at the end of IHT
        ctx.trace.append(st.f)
    return st


# ------------------------------------------------------------------------------------------ back-solve and escapes
def backsolve_support(ctx: _Context, st: _State) -> _State:
    """The exact ridge solution on the support of ``st`` (Sec. 3's back-solve), taken when it does not increase f."""
    t0 = time.perf_counter()
    ctx.backsolves += 1
    full = ctx.full
    w = ridge_backsolve(full.At, full.w_bar, full.lam, st.S, full.y, w0=st.w, cache=ctx.gram_cache)
    with comm.phase("backsolve"):
        Aw, f = full.exact(w, st.S)
    ctx.timings["backsolve"] += time.perf_counter() - t0
    return _State(w, st.S, Aw, f) if f <= st.f else st


def _obs_scores(ctx: _Context, st: _State, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v_in, v_out, allowed_out), (p_r,) each: the exact removal cost score |w_i| / sqrt(d_inv_i) on S, the gain
    score |g_j| / sqrt(s_j) outside (exact for the :data:`SWAP_CANDIDATES` best by the approximate gain
    |g_j| / sqrt(||a_j||^2 + lambda), that approximation elsewhere), and the outside columns that may enter."""
    full = ctx.full
    t0 = time.perf_counter()
    ga = g.double().abs()
    v_out = ga / (full.column_norms_sq() + full.lam).sqrt()  # gain without re-optimisation (a lower bound)
    allowed_out = ~st.S if full.budget.allowed is None else (~st.S & full.budget.allowed)
    with comm.phase(PHASE):
        m = min(int(_sum(float(allowed_out.sum()))[0]), max(SWAP_CANDIDATES, 1))
        scored = topk_mask(v_out.float(), m, None, allowed_out)
    d_inv, s_add = swap_curvatures(full.At, st.S, full.lam, scored, cache=ctx.gram_cache)
    ctx.timings["backsolve"] += time.perf_counter() - t0
    v_in = st.w.double().abs() / d_inv.clamp(min=1e-300).sqrt()
    v_out = torch.where(scored, ga / s_add.sqrt(), v_out)
    return v_in, v_out, allowed_out


def _pair_swap_supports(budget, S, v_in, v_out, allowed_out, q, offset):
    """Supports S - i + j for the q coordinates i in S of lowest OBS score v_in and the q outside j of highest
    gain score v_out, in a fixed global order (identical on all ranks). Each is the projection H of a score vector
    that forces i out and j in (for per-segment / N:M budgets H repairs the counts with the next best coordinates)."""
    with comm.phase(PHASE):
        low = topk_mask((1.0 / (1.0 + v_in)).float(), q, None, S)
        high = topk_mask(v_out.float(), q, None, allowed_out)
        picked = comm.all_gather_object(
            ([(float(v_in[i]), offset + int(i)) for i in torch.nonzero(low).flatten()],
             [(-float(v_out[j]), offset + int(j)) for j in torch.nonzero(high).flatten()]))
    outs = sorted(x for part in picked for x in part[0])
    ins = sorted(x for part in picked for x in part[1])
    base = torch.where(S, 2.0 + v_in / (1.0 + v_in), v_out / (1.0 + v_out)).float()
    m = base.numel()
    for _, i in outs:
        for _, j in ins:
            v = base.clone()
            if 0 <= i - offset < m:
                v[i - offset] = 0.0
            if 0 <= j - offset < m:
                v[j - offset] = 4.0
            with comm.phase(PHASE):
                yield budget.project(v)


def _escape_path(ctx: _Context, st: _State, v: torch.Tensor, dv: torch.Tensor, best: _State) -> _State:
    """The best of ``best`` and the back-solved supports of H(v - t dv), t in :func:`trial_steps` of this path's tau_c
    (at most ``escape_trials``; steps that add no coordinate are skipped; stops once f rises)."""
    budget = ctx.full.budget
    with comm.phase(PHASE):
        tau_c = budget.tau_change(v, dv, st.S)
    prev, f_prev = st.S, math.inf
    for t in trial_steps(tau_c, ctx.escape_trials):
        with comm.phase(PHASE):
            S_t = budget.project(v - t * dv)
            new_coords = int(_sum(float((S_t & ~prev).sum()))[0])
        if new_coords == 0:
            continue
        prev = S_t
        cand = backsolve_support(ctx, _State(st.w, S_t, st.Aw, math.inf))
        if cand.f < best.f:
            best = cand
        if cand.f > f_prev:  # larger steps swap more coordinates; stop once that gets worse
            break
        f_prev = cand.f
    return best


def escape(ctx: _Context, st: _State) -> _State | None:
    """At a stall (IHT keeps the support of a back-solved point), back-solve candidate supports and return the best if
    it improves f by more than tol * f, else None. Candidates: the IHT path H(w - t g); with lambda > 0 the pair swaps
    (k <= :data:`PAIR_SWAP_MAX_K`) and the same path on the OBS scores of :func:`_obs_scores`."""
    full = ctx.full
    with comm.phase(PHASE):
        g = full.gradient(st.w, st.Aw)
    paths = [(st.w, g)]
    best = st
    if full.lam > 0:
        v_in, v_out, allowed_out = _obs_scores(ctx, st, g)
        paths.append((torch.where(st.S, v_in, 0.0).float(), torch.where(st.S, 0.0, -v_out).float()))
        if ctx.pair_swaps > 0 and ctx.k <= PAIR_SWAP_MAX_K:
            for S_t in _pair_swap_supports(full.budget, st.S, v_in, v_out, allowed_out, ctx.pair_swaps, ctx.offset):
                cand = backsolve_support(ctx, _State(st.w, S_t, st.Aw, math.inf))
                if cand.f < best.f:
                    best = cand
    for v, dv in paths:
        best = _escape_path(ctx, st, v, dv, best)
    return best if best is not st and not _converged(st.f, best.f, ctx.tol) else None


# -------------------------------------------------------------------------------------------------------- solve
@dataclass
class _Prepared:
    """The problem as solved, and how to map its answer back: ``problem`` holds At (scaled rows in z = D^1/2 w with
    the fisher_diagonal ridge; only the allowed rows when they were compacted), w_bar, y, lambda, the budget;
    ``p_r`` the caller's row count, ``kept_rows`` the rows kept by compaction (None: all), ``scale`` D^1/2 (or None).
    """

    problem: _Problem
    p_r: int
    kept_rows: torch.Tensor | None
    scale: torch.Tensor | None


def _checked_inputs(At, w_bar, lam, budget, y, method, ridge, check_at):
    """(w_bar, budget, y) on At's device (the solve runs where the factor lives) and k = the budget's total, after
    the checks of the arguments and, collectively, of At (``check_at``) and w_bar for NaN/Inf."""
    _check_arguments(At, w_bar, lam, budget, method, ridge)
    w_bar, budget = w_bar.to(At.device), budget.to(At.device)
    y = None if y is None else y.to(At.device)
    _check_factor(At, check_at)
    check_finite(w_bar, "w_bar")
    k = budget.total()
    if k <= 0:
        raise ValueError("the budget keeps no weight (k = 0)")
    return w_bar, budget, y, k


def _check_arguments(At: torch.Tensor, w_bar: torch.Tensor, lam: float, budget: Budget, method: str, ridge: str):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if ridge not in RIDGES:
        raise ValueError(f"unknown ridge {ridge!r}; expected one of {RIDGES}")
    if At.dim() != 2 or w_bar.shape != (At.shape[0],):
        raise ValueError(f"At must be (p_r, n) and w_bar (p_r,), got {tuple(At.shape)} and {tuple(w_bar.shape)}")
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lambda must be finite and >= 0, got {lam}")
    if budget.p_local != At.shape[0]:
        raise ValueError(f"the budget covers {budget.p_local} columns but At has {At.shape[0]} rows")


def _check_factor(At: torch.Tensor, check_at: bool) -> None:
    """Raise ValueError on every rank if ``check_at`` and some rank's At holds NaN or Inf. Collective."""
    # NaN/Inf anywhere in At makes its column sums A_r^T 1 non-finite (NaN and Inf propagate through + and *1): one
    # product instead of an elementwise pass; only then the exact chunked check (a finite overflow is not an error)
    bad = check_at and not bool(torch.isfinite(a_matvec(At, torch.ones(At.shape[0], device=At.device))).all())
    if bad:
        step = _row_chunks(*At.shape)  # chunked: torch.isfinite on all of At would allocate p_r * n bools
        bad = any(not bool(torch.isfinite(At[i : i + step]).all()) for i in range(0, At.shape[0], step))
    check_finite(torch.tensor([math.nan if bad else 0.0], device=comm.device()), "the Fisher factor A")


def _divide_rows(At: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """At[j] /= scale[j] in place, chunked: in float32, then stored (one rounding in a 16-bit storage)."""
    step = _row_chunks(*At.shape)
    for s in range(0, At.shape[0], step):
        c = At[s : s + step]
        if c.dtype == torch.float32:
            c.div_(scale[s : s + step, None])
        else:
            c.copy_(c.float().div_(scale[s : s + step, None]))
    return At


def target(At: torch.Tensor, w_bar: torch.Tensor, y: torch.Tensor | None, first_order: bool) -> torch.Tensor:
    """y (n,) float64: the given one (checked), else A w_bar, minus 1/sqrt(n) with ``first_order`` (At (p_r, n),
    w_bar (p_r,) this rank's). Collective."""
    n = At.shape[1]
    if y is None:
        nz = torch.nonzero(w_bar, as_tuple=True)[0]
        y = comm.all_reduce(rows_matvec(At, nz, w_bar[nz]))  # float64: exact to rounding
        return y - 1.0 / math.sqrt(n) if first_order else y
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},), got {tuple(y.shape)}")
    check_finite(y, "y")
    return y.to(torch.float64)


def _drop_fixed_columns(At: torch.Tensor, w_bar: torch.Tensor, budget: Budget):
    """Solve on the allowed rows only: returns (At compacted in place, w_bar on them, the budget restricted to them,
    the kept rows or None when none is dropped on this rank, lambda-free ||w_bar||^2 over the dropped columns)."""
    dropped = ~budget.allowed
    out = w_bar[dropped].double()
    (reg_offset,) = _sum(float(torch.dot(out, out)))
    kept_rows = None
    if bool(dropped.any()):  # (no index copies of p_r entries when nothing is dropped on this rank)
        kept_rows = torch.nonzero(budget.allowed, as_tuple=True)[0]
        At, w_bar = compact_rows_(At, kept_rows), w_bar[kept_rows]
    return At, w_bar, _restrict(budget, budget.allowed), kept_rows, reg_offset  # _restrict: collective, every rank


def _prepare(At, w_bar, lam, budget, y, first_order, overwrite_at, ridge) -> _Prepared:
    """The problem :func:`solve` iterates on: At in z = D^1/2 w for the fisher_diagonal ridge (rows divided by
    D^1/2, in place with ``overwrite_at``, else in a copy), y, and with ``overwrite_at`` and a top-k budget with
    columns fixed at zero, only the allowed rows (moved to the front of At in place). Collective."""
    with comm.phase(PHASE):
        scale = None
        if ridge == "fisher_diagonal":
            scale = fisher_diagonal_scale(At, RIDGE_FLOOR)
            At = _divide_rows(At if overwrite_at else At.clone(), scale)
            w_bar = w_bar * scale
        y = target(At, w_bar, y, first_order)
        p_r, kept_rows, reg_offset = At.shape[0], None, 0.0
        if overwrite_at and budget.kind == "topk" and budget.allowed is not None:
            At, w_bar, budget, kept_rows, reg_offset = _drop_fixed_columns(At, w_bar, budget)
        return _Prepared(_Problem(At, w_bar, y, lam, budget, reg_offset=reg_offset), p_r, kept_rows, scale)


def _on_problem_rows(support: torch.Tensor | None, prep: _Prepared) -> torch.Tensor | None:
    """A (p_r,) support of the caller's columns on the rows the problem is solved on (None stays None)."""
    if support is None:
        return None
    support = support.to(prep.problem.At.device)
    return support if prep.kept_rows is None else support[prep.kept_rows]


def _column_offset(At: torch.Tensor) -> int:
    """Global index of this rank's first row of At (rank order). Collective."""
    with comm.phase(PHASE):
        return sum(comm.all_gather_object(At.shape[0])[: comm.rank()])


def warm_start(ctx: _Context, with_backsolve: bool, start_support: torch.Tensor | None = None) -> _State:
    """w^0 = H(w_bar), magnitude pruning (of z with the fisher_diagonal ridge: the OBD saliency); with
    ``with_backsolve`` the back-solve on its support. Records both objectives and starts the trace. With
    ``start_support`` (a support the budget allows, e.g. the solution of a neighbouring lambda) that support,
    back-solved, is the start instead when its f is lower."""
    full = ctx.full
    with comm.phase(PHASE):
        S0 = full.budget.magnitude_support(full.w_bar)
        st = _exact_state(full, _State(torch.where(S0, full.w_bar, torch.zeros_like(full.w_bar)), S0, None, math.nan))
    ctx.plain_magnitude_objective = st.f
    with comm.phase(PHASE):
        (off,) = _sum(full.reg_local(st.w))
    ctx.ridge_floor = 0.5 * full.lam * (off + full.reg_offset)
    ctx.trace.append(st.f)
    if with_backsolve:
        st = backsolve_support(ctx, st)
        ctx.magnitude_objective = st.f
        ctx.trace.append(st.f)
    if start_support is not None:
        with comm.phase(PHASE):
            given = _exact_state(full, _State(torch.where(start_support, full.w_bar, torch.zeros_like(full.w_bar)),
                                              start_support, None, math.nan))
        if with_backsolve:
            given = backsolve_support(ctx, given)
        if given.f < st.f:
            st = given
            ctx.trace.append(st.f)
    return st


def _result(ctx: _Context, st: _State, prep: _Prepared, bytes0: dict[str, int]) -> SolveResult:
    """The :class:`SolveResult` on the caller's p_r columns and in w (not z)."""
    bytes1 = comm.bytes_by_phase()
    moved = {ph: bytes1.get(ph, 0) - bytes0.get(ph, 0) for ph in set(bytes1) | {PHASE, "backsolve"}}
    w, S = st.w, st.S.clone()
    if prep.kept_rows is not None:  # back to all p_r columns: the dropped ones are zero
        w = torch.zeros(prep.p_r, dtype=st.w.dtype, device=st.w.device).index_copy_(0, prep.kept_rows, st.w)
        S = torch.zeros(prep.p_r, dtype=torch.bool, device=st.S.device).index_copy_(0, prep.kept_rows, st.S)
    if prep.scale is not None:  # back from z = D^1/2 w
        w = w / prep.scale
    return SolveResult(
        w=w,
        support=S,
        objective=st.f,
        objective_trace=ctx.trace,
        iterations=ctx.iterations,
        magnitude_objective=ctx.magnitude_objective,
        plain_magnitude_objective=ctx.plain_magnitude_objective,
        ridge_floor=ctx.ridge_floor,
        timings=ctx.timings,
        bytes_communicated={ph: b for ph, b in moved.items() if b or ph in (PHASE, "backsolve")},
        active_set_rounds=ctx.active_set_rounds,
        backsolves=ctx.backsolves,
    )


def solve(
    At: torch.Tensor,
    w_bar: torch.Tensor,
    lam: float,
    budget: Budget,
    y: torch.Tensor | None = None,
    first_order: bool = False,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    active_set_factor: float | None = 1.5,
    backsolve: bool = True,
    progress: Callable[[dict], None] | None = None,
    *,
    method: str = "chita",
    rounds: int = 10,
    escape_trials: int = ESCAPE_TRIALS,
    pair_swaps: int = 4,
    trials: int = 6,
    overwrite_at: bool = False,
    check_at: bool = True,
    ridge: str = "identity",
    start_support: torch.Tensor | None = None,
    gram_cache: GramCache | None = None,
) -> SolveResult:
    """Prune: minimise f(w) = 1/2 ||y - A w||^2 + lambda/2 ||w - w_bar||^2 over the constraint set C. Collective.

    Args:
        At: (p_r, n) A_r^T, this rank's rows of A^T (float32/bfloat16/float16 storage). The solve runs on its
            device: w_bar, y and the budget are moved there, and the result's w and support live there.
        w_bar: (p_r,) dense weights w_bar of this rank.
        lam: lambda >= 0, the ridge weight.
        budget: the constraint C (:class:`dist_chita.fisher.budget.Budget`) on this rank's columns.
        y: (n,) target; default y = A w_bar, minus 1/sqrt(n) when ``first_order`` (ignored when y is given).
        max_iter: cap on IHT iterations over the whole solve (0: the warm start alone); tol: stop when f decreases
            by less than tol * f.
        active_set_factor: W holds about factor * k coordinates; None or <= 1 disables the active set.
        backsolve: warm start with magnitude + backsolve, backsolve the final support and re-run IHT (``rounds``).
        progress: called as progress({"iteration", "objective", "entered"}) after each accepted IHT step (every rank;
            "entered" = coordinates that joined the support in that step).
        method: "chita" (line search above) or "iht_1L" (plain IHT with step 1/L from magnitude pruning: a baseline).
        rounds: cap on IHT -> backsolve/escape rounds.
        escape_trials: support-changing candidates tried per escape path (0 disables escapes, pair swaps included).
        pair_swaps: q of the escapes' q x q pair swaps (0: none).
        trials: support-changing step sizes tried per IHT step (tau_c doubling).
        overwrite_at: allow At to be overwritten: with a top-k budget that fixes columns at zero (``allowed``, e.g.
            the weights pruned by earlier CHITA++ stages), their rows are dropped by moving the allowed rows to the
            front of At in place, and the problem is solved on those alone (same answer; IHT reads only them).
        check_at: check At for NaN/Inf (one extra read of At); False when the caller has checked every entry (the
            pipeline's :func:`~dist_chita.fisher.factor.fisher_block` does, naming the layer).
        ridge: the metric D of the ridge term lambda/2 (w - w_bar)^T D (w - w_bar): "identity" (the paper's, D = I)
            or "fisher_diagonal": D = diag(A^T A) + :data:`RIDGE_FLOOR` * mean(diag(A^T A)), so that with n << p,
            where the rank-n term can be fitted exactly on almost any support, each weight still costs its own
            curvature; the warm start's magnitude pruning then ranks weights by the OBD saliency |w_j| sqrt(D_jj).
            Solved in z = D^1/2 w: the rows of At are divided by D^1/2 (in place when ``overwrite_at``, else in a
            copy).
        start_support: (p_r,) bool, a support the budget allows to start from besides magnitude pruning's (e.g. the
            solution of a neighbouring lambda): the warm start is the one of lower f after its back-solve.
        gram_cache: a :class:`~dist_chita.fisher.backsolve.GramCache` shared by solves on the same At, w_bar and y
            (e.g. one per lambda of a path: the Gram matrix of a support is formed once); default a fresh one.

    Returns:
        :class:`SolveResult`.
    """
    w_bar, budget, y, k = _checked_inputs(At, w_bar, lam, budget, y, method, ridge, check_at)
    bytes0 = comm.bytes_by_phase()
    chita = backsolve and method == "chita"  # CHITA's rounds: IHT, then back-solve or escape
    prep = _prepare(At, w_bar.to(torch.float32), lam, budget, y, first_order, overwrite_at, ridge)
    ctx = _Context(prep.problem, method, max_iter, tol, trials, PATIENCE if chita else 0, active_set_factor,
                   escape_trials, pair_swaps, k, _column_offset(prep.problem.At), progress,
                   gram_cache=gram_cache or GramCache())
    st = warm_start(ctx, chita, _on_problem_rows(start_support, prep))
    for _ in range(max(1, rounds) if chita and max_iter > 0 else int(max_iter > 0)):
        S_before = st.S
        st = _timed_iht(ctx, st)
        if not chita:
            break
        if int(_sum(float((st.S ^ S_before).sum()))[0]):  # IHT changed the support: back-solve the new one
            st = backsolve_support(ctx, st)
        else:
            escaped = escape(ctx, st) if escape_trials else None
            if escaped is None:
                break
            st = escaped
        ctx.trace.append(st.f)
        if ctx.exhausted():
            break
    return _result(ctx, st, prep, bytes0)
