"""Layerwise CHITA (Benbaki et al., *Fast as CHITA: Neural Network Pruning with Combinatorial Optimization*, ICML
2023) on one layer: every row's sparse ridge problem on the layer's curvature, by the row solver.

Paper's letters, per row i of a part of the layer: A = X / sqrt(N) (the part's inputs), y = A w_bar_i,
H = A^T A = X^T X / N, lambda the ridge (``lams``), k the row's budget; the problem

    min_w 1/2 (w - w_bar_i)^T (H + lambda I) (w - w_bar_i)   s.t. ||w||_0 <= k  (or N:M),

solved by IHT from the better of the magnitude and the OBS warm starts, with CHITA's step size and the back-solve
(:func:`dist_chita.layerwise.row_solver.solve_rows`). With a layer budget, the rows share it by the OBS saliency
w_j^2 / [Q^-1]_jj, Q = H + lambda I (:func:`~dist_chita.layerwise.row_solver.row_budgets`).
"""

from __future__ import annotations

import torch

from dist_chita.layerwise.row_solver import obs_denominator, ridged, solve_rows
from dist_chita.methods.base import LayerMethod, LayerProblem, LayerResult, register


@register
class Chita(LayerMethod):
    """CHITA on every row of the layer (module docstring); rows shared among ranks in chunks of ``row_chunk``,
    each chunk solved alone (the same bits on any number of ranks)."""

    name = "chita"

    def prune(self, layer: LayerProblem) -> LayerResult:
        W_bar, H = layer.W_bar, layer.H
        q_inv_diags = [None] * len(layer.parts)  # each part's [Q^-1]_jj, when the budgets need it (else solve_rows)
        if layer.shares_budget:  # the same budgets on every rank: computed from the whole layer
            q_inv_diags = [obs_denominator(ridged(h, lam)) for h, lam in zip(H, layer.lams, strict=True)]
            k = layer.row_budget(torch.cat([W_bar[lo:hi].pow(2) / q for (lo, hi), q
                                            in zip(layer.parts, q_inv_diags, strict=True)]))
        else:
            k = layer.row_budget()
        out = LayerResult(W=torch.zeros_like(W_bar), objective=0.0, warm_objective=0.0, magnitude_objective=0.0)
        for j, lo, hi in layer.runs:
            res = solve_rows(W_bar[lo:hi], H[j], layer.lams[j], k=k[lo:hi] if isinstance(k, torch.Tensor) else k,
                             nm=layer.nm, allowed=layer.allowed[lo:hi], row_chunk=layer.row_chunk,
                             q_inv_diag=q_inv_diags[j], **layer.options)
            out.W[lo:hi] = res.W
            out.objective += res.objective
            out.magnitude_objective += res.magnitude_objective
            out.warm_objective += res.warm_objective
            out.iterations = max(out.iterations, res.iterations)
        return out
