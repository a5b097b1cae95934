"""Wanda against torch.topk of |W| ||X||, through the driver (sequential inputs) and on one layer."""

import pytest
import torch

from dist_chita.layerwise.driver import prune_layerwise
from dist_chita.layerwise.row_solver import objectives
from dist_chita.methods.base import LayerProblem
from dist_chita.methods.wanda import Wanda
from dist_chita.sparsity import kept_count
from tests.fixtures.layerwise_nets import batches as _batches
from tests.fixtures.layerwise_nets import mlp as _mlp


@pytest.mark.parametrize("per_layer,nm", [(False, None), (True, None), (False, (2, 4))])
def test_through_the_driver_matches_an_independent_recomputation(per_layer, nm):
    """Wanda through prune_layerwise, and the same recomputed here: layer l's inputs X from the model with layers
    < l already pruned; Wanda keeps the largest |W_ij| ||X_j||_2 of every row (of the layer, or 2 of every 4) by
    torch.topk, with no update. The report's objective is the reconstruction objective of the result."""
    torch.manual_seed(1)
    x = torch.randn(40, 12)
    model, ref = _mlp(), _mlp()
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    out = prune_layerwise(model, modules, 0.5, forward=model, make_batches=lambda: _batches(x, 0, 40),
                          per_layer=per_layer, nm=nm, method="wanda")
    h, f = x, 0.0
    for i in (0, 2, 4):
        W_bar = ref[i].weight.detach()
        r, d = W_bar.shape
        H = (h.double().T @ h.double()) / h.shape[0]
        score = W_bar.abs() * h.norm(dim=0)[None, :]
        keep = torch.zeros(r, d, dtype=torch.bool)
        if nm is not None:
            groups = score.view(-1, 4)
            keep.view(-1, 4).scatter_(1, groups.topk(2, dim=1).indices, True)
        elif per_layer:
            keep.view(-1)[score.flatten().topk(kept_count(r * d, 0.5)).indices] = True
        else:
            keep.scatter_(1, score.topk(kept_count(d, 0.5), dim=1).indices, True)
        W = W_bar * keep
        torch.testing.assert_close(model[i].weight.detach(), W, rtol=0, atol=0)
        Q = H + 0.01 * float(H.diagonal().mean()) * torch.eye(d, dtype=H.dtype)
        f += float(objectives((model[i].weight.detach() - W_bar).double(), Q).sum())
        with torch.no_grad():
            ref[i].weight.copy_(model[i].weight)
            h = ref[: i + 2](x) if i < 4 else h
    st = out.stages[0]
    assert st.objective == pytest.approx(f, rel=1e-5) and st.magnitude_objective is None
    assert st.iterations == 0 and st.objective_trace == [st.objective]


def test_each_part_is_scored_on_its_own_curvature():
    """Two parts (a grouped conv's groups) with different H: part j's rows keep their largest |w| sqrt(H_j,jj)
    (torch.topk per row), only the runs given are pruned, already-zero weights stay zero, and with per_layer the
    layer keeps its kept_count(r d, s) largest scores over both parts."""
    g = torch.Generator().manual_seed(3)
    W_bar = torch.randn(6, 8, generator=g)
    W_bar[0, :2] = 0.0
    X = [torch.randn(50, 8, generator=g, dtype=torch.float64) * torch.rand(8, generator=g, dtype=torch.float64)
         for _ in range(2)]
    H = torch.stack([x.T @ x / 50 for x in X])
    score = torch.cat([W_bar[:3].abs() * X[0].norm(dim=0).float(), W_bar[3:].abs() * X[1].norm(dim=0).float()])
    parts = ((0, 3), (3, 6))
    got = Wanda().prune(LayerProblem(W_bar=W_bar, sparsity=0.5, parts=parts, runs=((0, 1, 3), (1, 3, 6)), H=H,
                                     lams=(0.1, 0.1))).W
    keep = torch.zeros(6, 8, dtype=torch.bool).scatter_(1, score.masked_fill(W_bar == 0, -1).topk(4).indices, True)
    keep[0] = False  # not this rank's row
    assert torch.equal(got, W_bar * keep) and bool((got[0] == 0).all())
    layer = Wanda().prune(LayerProblem(W_bar=W_bar, sparsity=0.5, per_layer=True, parts=parts, H=H, lams=(0.1, 0.1))).W
    top = score.masked_fill(W_bar == 0, -1).flatten().topk(kept_count(48, 0.5)).indices
    assert torch.equal(layer != 0, torch.zeros(48, dtype=torch.bool).scatter_(0, top, True).view(6, 8))
