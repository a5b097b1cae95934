"""The sparsity constraint of the pruning problem and its projection H.

CHITA solves  min f(w)  subject to  w in C,  where C is one of

* a global budget ||w||_0 <= k over all prunable weights (all ranks);
* per-segment budgets ||w_g||_0 <= k_g, a segment being one layer's weights
  (a layer may straddle ranks), or one row of a layer (the weights of one output,
  ``weight[i]``; the column blocks are then cut at rows, so a row never straddles
  ranks and its projection needs no histogram all-reduce);
* N:M sparsity: at most N nonzeros in every group of M consecutive weights of
  the flattened layer (for nn.Linear, M consecutive inputs of one output).
  Column blocks are aligned to M, so N:M groups never straddle ranks.

Coordinates that are not ``allowed`` (weights already pruned) stay zero.

Every tensor a :class:`Budget` holds or creates lives on one device (:attr:`Budget.device`, that of ``allowed``
or ``segment_ids`` when given); :meth:`Budget.to` moves it next to the factor (the solver does).

A :class:`Budget` holds this rank's share of the description. Its
:meth:`project` returns the support of the hard-thresholding operator H(v),
the coordinates kept when v is projected onto C; :meth:`tau_change` gives the
first step size at which the support of H(w - tau g) differs from the current
support, which CHITA's step-size rule needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_chita.distributed import comm
from dist_chita.fisher.select import check_finite, topk_mask


@dataclass(frozen=True)
class Budget:
    """This rank's part of the constraint set C.

    Attributes:
        p_local: p_r, the number of columns on this rank.
        k: (G,) int64 budget per segment (kind "topk"); unused for "nm".
        segment_ids: (p_r,) int64 segment of each local column, or None for
            a single global segment.
        n, m: N and M of N:M sparsity (kind "nm").
        allowed: (p_r,) bool, False for weights fixed at zero; None = all.
        local: every segment lies on this rank alone (per-row budgets): ``k`` and
            ``segment_ids`` are this rank's own, and projections need no histogram all-reduce.
    """

    kind: str
    p_local: int
    k: torch.Tensor
    segment_ids: torch.Tensor | None = None
    n: int = 0
    m: int = 0
    allowed: torch.Tensor | None = None
    local: bool = False

    # --- constructors -----------------------------------------------------
    @staticmethod
    def global_topk(p_local: int, k: int, allowed: torch.Tensor | None = None) -> Budget:
        """||w||_0 <= k over all ranks."""
        device = allowed.device if allowed is not None else torch.device("cpu")
        b = Budget("topk", p_local, torch.tensor([int(k)], dtype=torch.int64, device=device), None, allowed=allowed)
        b._check_topk()
        return b

    @staticmethod
    def per_segment(
        segment_ids: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None = None, local: bool = False
    ) -> Budget:
        """||w_g||_0 <= k_g for every segment g (segments may straddle ranks). ``local``: every segment lies
        on this rank alone; ``segment_ids`` and ``k`` then number this rank's segments only (not collective)."""
        k = torch.as_tensor(k, dtype=torch.int64, device=segment_ids.device).reshape(-1)
        b = Budget("topk", segment_ids.numel(), k, segment_ids.to(torch.int64),
                   allowed=None if allowed is None else allowed.to(segment_ids.device), local=local)
        b._check_topk()
        return b

    @staticmethod
    def per_row(rows: list[tuple[int, int, int]], allowed: torch.Tensor | None = None,
                device: torch.device | str = "cpu") -> Budget:
        """||w_i||_0 <= keep for every row i of this rank's columns: ``rows`` lists them in column order as runs
        ``(count, length, keep)`` of whole rows (the blocks of a row-cut layout, so no row straddles ranks;
        sum of count * length = p_r); a row with fewer than ``keep`` allowed weights keeps those. Projections
        then need no histogram all-reduce (only the NaN/Inf check's one integer). Collective (the budget check)."""
        if allowed is not None:
            device = allowed.device
        counts = torch.tensor([c for c, _, _ in rows], dtype=torch.int64, device=device)
        lengths = torch.tensor([n for _, n, _ in rows], dtype=torch.int64, device=device)
        keep = torch.tensor([k for _, _, k in rows], dtype=torch.int64, device=device)
        seg = torch.repeat_interleave(torch.arange(int(counts.sum()), device=device),
                                      torch.repeat_interleave(lengths, counts))
        k = torch.repeat_interleave(keep, counts)
        if allowed is not None:
            k = torch.minimum(k, torch.zeros_like(k).index_add_(0, seg, allowed.to(torch.int64)))
        return Budget.per_segment(seg, k, allowed, local=True)

    @staticmethod
    def n_m(p_local: int, n: int, m: int, allowed: torch.Tensor | None = None) -> Budget:
        """At most n nonzeros in every group of m consecutive local columns."""
        if not 0 < n < m:
            raise ValueError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
        if p_local % m:
            raise ValueError(f"{p_local} columns on this rank are not a whole number of {m}-groups")
        device = allowed.device if allowed is not None else torch.device("cpu")
        return Budget("nm", p_local, torch.zeros(0, dtype=torch.int64, device=device), None, n=n, m=m,
                      allowed=allowed)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def to(self, device: torch.device | str) -> Budget:
        """The same budget with its tensors on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.device == device:
            return self
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return Budget(self.kind, self.p_local, move(self.k), move(self.segment_ids), self.n, self.m,
                      move(self.allowed), self.local)

    def _allowed_per_segment(self) -> torch.Tensor:
        seg = self._segments()
        ones = (torch.ones(self.p_local, dtype=torch.int64, device=self.device) if self.allowed is None
                else self.allowed.to(torch.int64))
        counts = torch.zeros(self.k.numel(), dtype=torch.int64, device=self.device).index_add_(0, seg, ones)
        return counts if self.local else comm.all_reduce(counts)

    def _check_topk(self) -> None:
        if self.allowed is not None and self.allowed.shape != (self.p_local,):
            raise ValueError("allowed must have one entry per local column")
        if bool((self.k < 0).any()):
            raise ValueError("sparsity budgets must be non-negative")
        counts = self._allowed_per_segment()
        if self.total() == 0:
            raise ValueError("the budget k is 0: nothing would be kept (lower the sparsity)")
        over = torch.nonzero(self.k > counts).flatten()
        if over.numel():
            g = int(over[0])
            raise ValueError(
                f"budget k = {int(self.k[g])} exceeds the {int(counts[g])} prunable weights"
                + ("" if self.k.numel() == 1 else f" of segment {g}")
            )

    def _segments(self) -> torch.Tensor:
        if self.segment_ids is not None:
            return self.segment_ids
        return torch.zeros(self.p_local, dtype=torch.int64, device=self.device)

    # --- queries ----------------------------------------------------------
    def total(self) -> int:
        """Number of coordinates a projection keeps, over all ranks."""
        if self.kind == "topk" and self.local:
            return int(comm.all_reduce(self.k.sum().reshape(1))[0])
        if self.kind == "topk":
            return int(self.k.sum())
        groups = self._allowed_mask().reshape(-1, self.m).sum(1).clamp(max=self.n)
        return int(comm.all_reduce(groups.sum().reshape(1))[0])

    def _allowed_mask(self) -> torch.Tensor:
        return torch.ones(self.p_local, dtype=torch.bool, device=self.device) if self.allowed is None else self.allowed

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Support of H(v): (p_r,) bool mask of the coordinates kept. Collective."""
        if self.kind == "topk":
            return topk_mask(v.abs(), self.k, self.segment_ids, self.allowed, self.local)
        return self._project_nm(v)

    def magnitude_support(self, w_bar: torch.Tensor) -> torch.Tensor:
        """Support of magnitude pruning, H(w_bar)."""
        return self.project(w_bar)

    def _project_nm(self, v: torch.Tensor) -> torch.Tensor:
        check_finite(v, "the values to threshold")
        scores = v.detach().float().abs()
        scores = torch.where(self._allowed_mask().to(v.device), scores, torch.full_like(scores, -1.0))
        groups = scores.reshape(-1, self.m)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, : self.n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
        return (keep & (groups >= 0)).reshape(-1)

    def widened(self, factor: float) -> Budget:
        """The same constraint with every budget multiplied by ``factor`` (capped
        at the allowed count): the size of IHT's active set."""
        if self.kind != "topk":
            raise ValueError("an active set is defined for top-k budgets only")
        counts = self._allowed_per_segment()
        k = torch.minimum(torch.ceil(self.k.double() * factor).to(torch.int64), counts)
        return Budget("topk", self.p_local, k, self.segment_ids, allowed=self.allowed, local=self.local)

    def tau_change(self, w: torch.Tensor, g: torch.Tensor, support: torch.Tensor) -> float:
        """Smallest tau > 0 with support(H(w - tau g)) != ``support``; inf if none.

        For i in S the magnitude |w_i - tau g_i| first meets the largest
        outside magnitude tau * G_out (G_out = max_{j not in S} |g_j| of the
        same segment) at tau_i = |w_i| / (G_out + sign(w_i) g_i) when that
        denominator is positive; tau_change = min_i tau_i. Collective.
        """
        w, g = w.float(), g.float()
        blocked = support if self.allowed is None else support | ~self.allowed  # not outside: in S or fixed at 0
        ga = g.abs().masked_fill_(blocked, -math.inf)  # |g_j| for j outside S, -inf elsewhere
        if self.kind == "topk" and self.segment_ids is None:
            g_out = ga.amax().reshape(1) if ga.numel() else torch.full((1,), -math.inf, device=w.device)
            comm.all_reduce(g_out, op="max")
        elif self.kind == "topk":
            g_out = torch.full((self.k.numel(),), -math.inf, dtype=torch.float32, device=w.device)
            g_out.scatter_reduce_(0, self.segment_ids, ga, reduce="amax")
            if not self.local:
                comm.all_reduce(g_out, op="max")
        else:
            g_out = ga.reshape(-1, self.m).amax(1)
        idx = torch.nonzero(support, as_tuple=True)[0]  # only S can leave first: tau_i for i in S
        ws, gs = w[idx], g[idx]
        if self.kind == "topk" and self.segment_ids is None:
            g_out_i = g_out
        else:
            g_out_i = g_out[self.segment_ids[idx] if self.kind == "topk" else idx // self.m]
        denom = g_out_i + torch.sign(ws) * gs
        t = torch.where(denom > 0, ws.abs() / denom, torch.full_like(ws, math.inf))
        local = t.min() if t.numel() else torch.tensor(math.inf, device=w.device)
        out = comm.all_reduce(local.reshape(1).double(), op="min")
        return float(out[0])
