"""CHITA: l0-constrained ridge regression on a column-sharded Fisher factor (Benbaki et al., ICML 2023).

Problem (paper eq. (4)/(6)), with A (n x p) the scaled per-sample gradients, w_bar the dense weights, lambda >= 0::

    min_w  f(w) = 1/2 ||y - A w||^2 + lambda/2 ||w - w_bar||^2   subject to  w in C  (the Budget: ||w||_0 <= k, ...)

with y = A w_bar (the Fisher/OBS quadratic) or y = A w_bar - 1/sqrt(n) 1 (adds the first-order term). Optionally
the ridge term is lambda/2 (w - w_bar)^T D (w - w_bar) with D = diag(A^T A) + floor * mean(diag(A^T A)) instead of
lambda/2 ||w - w_bar||^2 (``ridge="fisher_diagonal"``, a Levenberg-Marquardt damping; solved in z = D^1/2 w, where it is
the problem above with A D^-1/2 and D^1/2 w_bar). Rank r holds
``At`` = A_r^T of shape (p_r, n) and the slices w_r, w_bar_r of length p_r; A w = sum_r A_r w_r is one all-reduce of
an n-vector.

Algorithm (paper Sec. 3, Alg. 1 "IHT with line search", plus active sets and backsolve):

* IHT: w+ = H(w - tau g), g = grad f(w) = -A^T (y - A w) + lambda (w - w_bar), H the projection onto C.
* Step size tau: along -g_S (S = support of w) the exact minimiser tau* = ||g_S||^2 / (||A g_S||^2 + lambda ||g_S||^2);
  tau_c = the first tau at which the support of H(w - tau g) changes. If tau* <= tau_c the step keeps S and is exact.
  Otherwise trials t = tau_c, 2 tau_c, 4 tau_c, ... (support-changing) compete with the support-keeping step tau*;
  the trial of lowest f wins, and only a decrease of f is accepted (monotone). 1/L is a last resort.
* A w is maintained incrementally: for a trial w_t = H(w - t g) with support S_t,
  A w_t = A w - t u + A_{S \\ S_t} (t g - w) - t A_{S_t \\ S} g with u = A g_S: only the rows of At in the symmetric
  difference of the supports are read. A w is recomputed exactly every ``recompute_every`` iterations.
* Active set: IHT runs on the rows W (about active_set_factor * k coordinates: the support and the largest |w - tau g|
  outside it); after convergence one full step over all p decides whether W must grow.
* Backsolve (:mod:`dist_chita.fisher.backsolve`): the exact ridge solution on the final support, then IHT again from
  there until the support stops changing. The warm start is magnitude pruning H(w_bar) followed by a backsolve, so the
  result is never worse than magnitude pruning + backsolve. IHT also hands over to the backsolve once ``patience``
  steps in a row kept the support (steepest descent on a fixed support is slow; the backsolve is exact).
* Escapes (lambda > 0 mostly): when IHT keeps the support of a backsolved point, candidate supports are backsolved and
  the best is taken if it lowers f: the IHT path H(w - t g) for t = tau_c, 2 tau_c, ...; the same path on OBS scores
  (|w_i| / sqrt([(A_S^T A_S + lambda I)^-1]_ii) inside S, the exact single-coordinate gain |g_j| / sqrt(s_j) outside,
  see :func:`dist_chita.fisher.backsolve.swap_curvatures`); for k <= ``pair_swap_max_k`` the ``pair_swaps``^2 single
  swaps of the cheapest removals with the best additions. The Gram matrix of nearby supports is updated, not recomputed
  (:class:`dist_chita.fisher.backsolve.GramCache`).

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
            to float32 rounding (A w is updated incrementally and recomputed exactly every ``recompute_every`` steps).
        iterations: number of IHT iterations (all rounds, active-set and full steps).
        magnitude_objective: f of magnitude pruning followed by a backsolve (None when backsolve=False); with the
            ``fisher_diagonal`` ridge, magnitude pruning of z = D^1/2 w_bar, i.e. by the OBD saliency.
        plain_magnitude_objective: f of magnitude pruning, H(w_bar), without backsolve (of z, likewise).
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


@dataclass
class _State:
    w: torch.Tensor  # (m,) float32, zero off S
    S: torch.Tensor  # (m,) bool
    Aw: torch.Tensor  # (n,) float64, global A w
    f: float
    moved: int = 0  # coordinates that entered the support in the step that produced this state (global)


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


def _step(prob: _Problem, st: _State, method: str, trials: int, tol: float) -> tuple[_State, bool, torch.Tensor, float]:
    """One IHT iteration. Returns (new state, accepted, g, tau used for candidates).

    The support-keeping step is taken alone when tau* <= tau_c and it decreases f by more than tol * f; otherwise
    (also at a minimiser on S, where it stalls) the support-changing trials compete with it.
    """
    g, u, gg, uu = _gradient_and_u(prob, st)
    if method == "iht_1L":
        t = 1.0 / prob.L()
        new = _trial(prob, st, g, u, t)
        return (new, True, g, t) if new.f < st.f else (st, False, g, t)

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
            return keep, True, g, tau_star
        best = keep if f_keep < st.f else st
    if math.isfinite(tau_c) and tau_c > 0:
        t, prev = tau_c, math.inf
        for _ in range(trials):
            cand = _trial(prob, st, g, u, t)
            if cand.f < best.f:
                best = cand
            if cand.f > prev:  # past the minimum along the doubling path
                break
            prev, t = cand.f, 2 * t
    if best is st:  # nothing decreased f: last resort, the majorisation step 1/L
        t = 1.0 / prob.L()
        cand = _trial(prob, st, g, u, t)
        if cand.f < st.f:
            best = cand
    tau = tau_star if math.isfinite(tau_star) else (tau_c if math.isfinite(tau_c) else 1.0 / prob.L())
    return best, best is not st, g, tau


def _gradient_and_u(prob: _Problem, st: _State) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """g = grad f(w) (local, (m,)), u = A g_S (global, (n,) float64), ||g_S||^2 and ||u||^2.

    One pass over At (:meth:`_Problem.gradient_and_u`) and one n-vector all-reduce."""
    g, local = prob.gradient_and_u(st.w, st.Aw, st.S)
    gS = g[st.S].double()
    u, (gg,) = _allreduce_vec_and_scalars(local, float(torch.dot(gS, gS)))
    return g, u, gg, float(torch.dot(u, u))


def _converged(f_old: float, f_new: float, tol: float) -> bool:
    return f_old - f_new <= tol * max(f_old, 0.0) or f_new <= 0.0


def _iht(prob, st, *, method, max_iter, tol, trials, recompute_every, trace, progress, counter, patience):
    """IHT iterations on ``prob`` until the relative decrease of f is below tol (or max_iter / the global cap).

    With ``patience`` set, also stop once that many consecutive steps kept the support: the caller then backsolves,
    which solves the problem on the fixed support exactly instead of by steepest descent.
    """
    kept = 0
    for it in range(max_iter):
        if counter["left"] <= 0:
            break
        if it and it % recompute_every == 0:
            Aw, f = prob.exact(st.w, st.S)
            st = _State(st.w, st.S, Aw, f)
        new, accepted, _, _ = _step(prob, st, method, trials, tol)
        counter["left"] -= 1
        counter["iterations"] += 1
        if not accepted:
            break
        done = _converged(st.f, new.f, tol)
        kept = kept + 1 if new.moved == 0 else 0
        st = new
        trace.append(st.f)
        if progress is not None:
            progress({"iteration": counter["iterations"], "objective": st.f, "entered": st.moved})
        if done or (patience and kept >= patience):
            break
    Aw, f = prob.exact(st.w, st.S)
    return _State(st.w, st.S, Aw, f)


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


def _iht_active_set(At, w_bar, y, lam, budget, st, *, factor, max_rounds, trace, reg_offset=0.0, **kw):
    """IHT with an active set W of ~factor*k rows; returns (state, rounds). Falls back to plain IHT when W ~ p.
    ``reg_offset``: ||w_bar||^2 over columns not in At (see :class:`_Problem`)."""
    full = _Problem(At, w_bar, y, lam, budget, reg_offset=reg_offset)
    p_allowed = int(_sum(float(At.shape[0] if budget.allowed is None else budget.allowed.sum()))[0])
    if factor is None or factor <= 1 or budget.kind != "topk" or factor * budget.total() >= 0.5 * p_allowed:
        return _iht(full, st, trace=trace, **kw), 0
    wide = budget.widened(factor)
    g, u, gg, uu = _gradient_and_u(full, st)
    tau = gg / (uu + lam * gg) if gg > 0 else 1.0 / full.L()
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007
        W = st.S | wide.project(st.w - tau * g)
        rows = torch.nonzero(W, as_tuple=True)[0]
        wb_out = w_bar[~W].double()
        (offset,) = _sum(float(torch.dot(wb_out, wb_out)))
        sub = _Problem(At.index_select(0, rows), w_bar[rows], y, lam, _restrict(budget, W),
                       reg_offset=offset + reg_offset)
        sub_st = _iht(sub, _State(st.w[rows], st.S[rows], st.Aw, st.f), trace=trace, **kw)
        w = torch.zeros_like(st.w)
        w[rows] = sub_st.w
        S = torch.zeros_like(st.S)
        S[rows] = sub_st.S
        st = _State(w, S, sub_st.Aw, sub_st.f)
        del sub
        if kw["counter"]["left"] <= 0:
            break
        # one full step over all p: does it want coordinates outside W?
        new, accepted, g, tau = _step(full, st, kw["method"], kw["trials"], kw["tol"])
        kw["counter"]["left"] -= 1
        kw["counter"]["iterations"] += 1
        if not accepted:
            break
        outside = int(_sum(float((new.S & ~W).sum()))[0])
        done = _converged(st.f, new.f, kw["tol"])
        st = new
        trace.append(st.f)
        if outside == 0 or done:
            break
    Aw, f = full.exact(st.w, st.S)
    return _State(st.w, st.S, Aw, f), rounds


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


# -------------------------------------------------------------------------------------------------------- solve
def solve(
    At: torch.Tensor,
    w_bar: torch.Tensor,
    lam: float,
    budget: Budget,
    y: torch.Tensor | None = None,
    first_order: bool = False,
    max_iter: int = 500,
    tol: float = 1e-7,
    active_set_factor: float | None = 1.5,
    backsolve: bool = True,
    progress: Callable[[dict], None] | None = None,
    *,
    method: str = "chita",
    rounds: int = 10,
    patience: int = 10,
    escape_trials: int = 6,
    swap_candidates: int = 4096,
    pair_swaps: int = 4,
    pair_swap_max_k: int = 4096,
    trials: int = 6,
    recompute_every: int = 20,
    max_active_rounds: int = 10,
    overwrite_at: bool = False,
    check_at: bool = True,
    ridge: str = "identity",
    ridge_floor: float = 1e-3,
) -> SolveResult:
    """Prune: minimise f(w) = 1/2 ||y - A w||^2 + lambda/2 ||w - w_bar||^2 over the constraint set C. Collective.

    Args:
        At: (p_r, n) A_r^T, this rank's rows of A^T (float32/bfloat16/float16 storage). The solve runs on its
            device: w_bar, y and the budget are moved there, and the result's w and support live there.
        w_bar: (p_r,) dense weights w_bar of this rank.
        lam: lambda >= 0, the ridge weight.
        budget: the constraint C (:class:`dist_chita.fisher.budget.Budget`) on this rank's columns.
        y: (n,) target; default y = A w_bar, minus 1/sqrt(n) when ``first_order`` (ignored when y is given).
        max_iter: cap on IHT iterations over the whole solve; tol: stop when f decreases by less than tol * f.
        active_set_factor: W holds about factor * k coordinates; None or <= 1 disables the active set.
        backsolve: warm start with magnitude + backsolve, backsolve the final support and re-run IHT (``rounds``).
        progress: called as progress({"iteration", "objective", "entered"}) after each accepted IHT step (every rank;
            "entered" = coordinates that joined the support in that step).
        method: "chita" (line search above) or "iht_1L" (plain IHT with step 1/L from magnitude pruning: a baseline).
        rounds: cap on IHT -> backsolve/escape rounds; patience: consecutive support-keeping steps before a backsolve.
        trials: support-changing step sizes tried per IHT step (tau_c doubling); escape_trials: the same per escape
            path (0 disables escapes).
        recompute_every: IHT steps between exact recomputations of A w.
        max_active_rounds: cap on active-set growth rounds.
        overwrite_at: allow At to be overwritten: with a top-k budget that fixes columns at zero (``allowed``, e.g.
            the weights pruned by earlier CHITA++ stages), their rows are dropped by moving the allowed rows to the
            front of At in place, and the problem is solved on those alone (same answer; IHT reads only them).
        check_at: check At for NaN/Inf (one extra read of At); False when the caller has checked every entry (the
            pipeline's :func:`~dist_chita.fisher.factor.fisher_block` does, naming the layer).
        ridge: the metric D of the ridge term lambda/2 (w - w_bar)^T D (w - w_bar): "identity" (the paper's, D = I)
            or "fisher_diagonal": D = diag(A^T A) + ridge_floor * mean(diag(A^T A)), so that with n << p, where the
            rank-n term can be fitted exactly on almost any support, each weight still costs its own curvature; the
            warm start's magnitude pruning then ranks weights by the OBD saliency |w_j| sqrt(D_jj). Solved in
            z = D^1/2 w: the rows of At are divided by D^1/2 (in place when ``overwrite_at``, else in a copy).
        swap_candidates: outside coordinates whose exact gain is computed in an escape (the best by approximate gain).
        pair_swaps, pair_swap_max_k: escape pair swaps (q x q backsolves), only when k <= pair_swap_max_k.

    Returns:
        :class:`SolveResult`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if ridge not in RIDGES:
        raise ValueError(f"unknown ridge {ridge!r}; expected one of {RIDGES}")
    if not (ridge_floor > 0 and math.isfinite(ridge_floor)):
        raise ValueError(f"ridge_floor must be finite and > 0, got {ridge_floor}")
    if At.dim() != 2 or w_bar.shape != (At.shape[0],):
        raise ValueError(f"At must be (p_r, n) and w_bar (p_r,), got {tuple(At.shape)} and {tuple(w_bar.shape)}")
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lambda must be finite and >= 0, got {lam}")
    if budget.p_local != At.shape[0]:
        raise ValueError(f"the budget covers {budget.p_local} columns but At has {At.shape[0]} rows")
    w_bar, budget = w_bar.to(At.device), budget.to(At.device)  # the solve runs where the factor lives
    if y is not None:
        y = y.to(At.device)
    # NaN/Inf anywhere in At makes its column sums A_r^T 1 non-finite (NaN and Inf propagate through + and *1): one
    # product instead of an elementwise pass; only then the exact chunked check (a finite overflow is not an error)
    bad = check_at and not bool(torch.isfinite(a_matvec(At, torch.ones(At.shape[0], device=At.device))).all())
    if bad:
        step = _row_chunks(*At.shape)  # chunked: torch.isfinite on all of At would allocate p_r * n bools
        bad = any(not bool(torch.isfinite(At[i : i + step]).all()) for i in range(0, At.shape[0], step))
    # collective: all ranks raise
    check_finite(torch.tensor([math.nan if bad else 0.0], device=comm.device()), "the Fisher factor A")
    check_finite(w_bar, "w_bar")
    total = budget.total()
    if total <= 0:
        raise ValueError("the budget keeps no weight (k = 0)")
    n = At.shape[1]
    w_bar = w_bar.to(torch.float32)
    bytes0 = comm.bytes_by_phase()
    timings = {"iht": 0.0, "backsolve": 0.0}

    with comm.phase(PHASE):
        scale = None  # D^1/2 of the fisher_diagonal ridge: the solve runs in z = D^1/2 w
        if ridge == "fisher_diagonal":
            scale = fisher_diagonal_scale(At, ridge_floor)
            if not overwrite_at:
                At = At.clone()
            step = _row_chunks(*At.shape)
            for s in range(0, At.shape[0], step):  # in float32, then stored (one rounding in a 16-bit storage)
                c = At[s : s + step]
                if c.dtype == torch.float32:
                    c.div_(scale[s : s + step, None])
                else:
                    c.copy_(c.float().div_(scale[s : s + step, None]))
            w_bar = w_bar * scale
        if y is None:
            nz = torch.nonzero(w_bar, as_tuple=True)[0]  # (p_r int64: not kept beyond this line)
            y = comm.all_reduce(rows_matvec(At, nz, w_bar[nz]))  # float64: exact to rounding
            del nz
            if first_order:
                y = y - 1.0 / math.sqrt(n)
        else:
            if y.shape != (n,):
                raise ValueError(f"y must have shape ({n},), got {tuple(y.shape)}")
            check_finite(y, "y")
            y = y.to(torch.float64)
        p_r, kept_rows, reg_offset = At.shape[0], None, 0.0
        if overwrite_at and budget.kind == "topk" and budget.allowed is not None:  # solve on the allowed rows only
            dropped = ~budget.allowed
            out = w_bar[dropped].double()
            (reg_offset,) = _sum(float(torch.dot(out, out)))
            if bool(dropped.any()):  # (no index copies of p_r entries when nothing is dropped on this rank)
                kept_rows = torch.nonzero(budget.allowed, as_tuple=True)[0]
                At, w_bar = compact_rows_(At, kept_rows), w_bar[kept_rows]
            del dropped, out
            budget = _restrict(budget, budget.allowed)  # collective: on every rank
        full = _Problem(At, w_bar, y, lam, budget, reg_offset=reg_offset)
        S0 = budget.magnitude_support(w_bar)
        w0 = torch.where(S0, w_bar, torch.zeros_like(w_bar))
        Aw0, f_plain = full.exact(w0, S0)
    st = _State(w0, S0, Aw0, f_plain)
    trace = [f_plain]

    gram_cache = GramCache()
    backsolves = [0]

    def do_backsolve(st: _State) -> _State:
        t0 = time.perf_counter()
        backsolves[0] += 1
        w = ridge_backsolve(At, w_bar, lam, st.S, y, w0=st.w, cache=gram_cache)
        with comm.phase("backsolve"):
            Aw, f = full.exact(w, st.S)
        timings["backsolve"] += time.perf_counter() - t0
        return _State(w, st.S, Aw, f) if f <= st.f else st

    def escape(st: _State) -> _State | None:
        """At a stall (IHT keeps the support of a backsolved point), backsolve candidate supports and return the
        best if it improves f by more than tol * f. Candidates: H(w - t g) for t = tau_c, 2 tau_c, ... (the IHT
        path); the same path on OBS scores (exact removal cost inside S against exact single-coordinate gain
        outside); and, for small k, the pair swaps of the ``pair_swaps`` cheapest removals with the as many best
        additions."""
        with comm.phase(PHASE):
            g = full.gradient(st.w, st.Aw)
        families = [(st.w, g)]  # the IHT path H(w - t g)
        if lam > 0:  # the OBS path: exact removal cost on S against the single-coordinate gain outside
            t0 = time.perf_counter()
            ga = g.double().abs()
            v_out = ga / (full.column_norms_sq() + lam).sqrt()  # gain without re-optimisation (a lower bound)
            allowed_out = ~st.S if budget.allowed is None else (~st.S & budget.allowed)
            with comm.phase(PHASE):
                m = min(int(_sum(float(allowed_out.sum()))[0]), max(swap_candidates, 1))
                scored = topk_mask(v_out.float(), m, None, allowed_out)
            d_inv, s_add = swap_curvatures(At, st.S, lam, scored, cache=gram_cache)
            timings["backsolve"] += time.perf_counter() - t0
            v_in = st.w.double().abs() / d_inv.clamp(min=1e-300).sqrt()
            v_out = torch.where(scored, ga / s_add.sqrt(), v_out)
            families.append((torch.where(st.S, v_in, 0.0).float(), torch.where(st.S, 0.0, -v_out).float()))
        best = st
        if lam > 0 and pair_swaps > 0 and total <= pair_swap_max_k:
            for S_t in _pair_swap_supports(budget, st.S, v_in, v_out, allowed_out, pair_swaps, offset):
                cand = do_backsolve(_State(st.w, S_t, st.Aw, math.inf))
                if cand.f < best.f:
                    best = cand
        for v, dv in families:
            with comm.phase(PHASE):
                t = budget.tau_change(v, dv, st.S)
            prev, f_prev = st.S, math.inf
            for _ in range(escape_trials if math.isfinite(t) and t > 0 else 0):
                with comm.phase(PHASE):
                    S_t = budget.project(v - t * dv)
                    new_coords = int(_sum(float((S_t & ~prev).sum()))[0])
                t *= 2
                if new_coords == 0:
                    continue
                prev = S_t
                cand = do_backsolve(_State(st.w, S_t, st.Aw, math.inf))
                if cand.f < best.f:
                    best = cand
                if cand.f > f_prev:  # larger steps swap more coordinates; stop once that gets worse
                    break
                f_prev = cand.f
        return best if best is not st and not _converged(st.f, best.f, tol) else None

    with comm.phase(PHASE):
        offset = sum(comm.all_gather_object(At.shape[0])[: comm.rank()])  # global index of this rank's first column

    f_mag_bs = None
    if backsolve and method == "chita":
        st = do_backsolve(st)
        f_mag_bs = st.f
        trace.append(st.f)

    counter = {"left": max_iter, "iterations": 0}
    kw = dict(method=method, max_iter=max_iter, tol=tol, trials=trials, recompute_every=recompute_every,
              patience=patience if backsolve and method == "chita" else 0,
              progress=progress, counter=counter)
    active_rounds = 0
    for _ in range(max(1, rounds) if backsolve and method == "chita" else 1):
        S_before = st.S
        t0 = time.perf_counter()
        with comm.phase(PHASE):
            if method == "chita":
                st, r = _iht_active_set(At, w_bar, y, lam, budget, st, factor=active_set_factor,
                                        max_rounds=max_active_rounds, trace=trace, reg_offset=reg_offset, **kw)
                active_rounds += r
            else:
                st = _iht(full, st, trace=trace, **kw)
        timings["iht"] += time.perf_counter() - t0
        if trace[-1] != st.f:  # the exact recomputation at the end of IHT
            trace.append(st.f)
        changed = int(_sum(float((st.S ^ S_before).sum()))[0]) if backsolve else 0
        if backsolve and method == "chita":
            if changed:
                st = do_backsolve(st)
            else:
                esc = escape(st) if escape_trials else None
                if esc is None:
                    break
                st = esc
            trace.append(st.f)
            if counter["left"] <= 0:
                break
    bytes1 = comm.bytes_by_phase()
    moved = {ph: bytes1.get(ph, 0) - bytes0.get(ph, 0) for ph in set(bytes1) | {PHASE, "backsolve"}}
    w, S = st.w, st.S.clone()
    if kept_rows is not None:  # back to all p_r columns: the dropped ones are zero
        w = torch.zeros(p_r, dtype=st.w.dtype, device=st.w.device).index_copy_(0, kept_rows, st.w)
        S = torch.zeros(p_r, dtype=torch.bool, device=st.S.device).index_copy_(0, kept_rows, st.S)
    if scale is not None:  # back from z = D^1/2 w
        w = w / scale
    return SolveResult(
        w=w,
        support=S,
        objective=st.f,
        objective_trace=trace,
        iterations=counter["iterations"],
        magnitude_objective=f_mag_bs,
        plain_magnitude_objective=f_plain,
        timings=timings,
        bytes_communicated={ph: b for ph, b in moved.items() if b or ph in (PHASE, "backsolve")},
        active_set_rounds=active_rounds,
        backsolves=backsolves[0],
    )
