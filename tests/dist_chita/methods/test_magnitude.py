"""Magnitude pruning against torch.topk of |W|: the data-free baseline prune_magnitude and the method through
prune_layerwise (which then runs no calibration pass)."""

import pytest
import torch
from torch import nn

from dist_chita.layerwise.driver import prune_layerwise, prune_magnitude
from dist_chita.sparsity import kept_count
from tests.fixtures.layerwise_nets import mlp


def test_magnitude_baseline_keeps_the_largest_of_every_output():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    lin, c1d = nn.Linear(10, 6, bias=False), Conv1D(6, 10)  # Conv1D: weight (in, out); an output is a column
    ref_lin, ref_c1d = lin.weight.detach().clone(), c1d.weight.detach().clone()
    prune_magnitude([("lin", lin), ("c1d", c1d)], 0.7)
    top = ref_lin.abs().topk(3, dim=1).indices
    assert torch.equal(lin.weight != 0, torch.zeros_like(ref_lin, dtype=torch.bool).scatter_(1, top, True))
    assert torch.equal(lin.weight[lin.weight != 0], ref_lin[lin.weight != 0])
    top = ref_c1d.abs().topk(3, dim=0).indices
    assert torch.equal(c1d.weight != 0, torch.zeros_like(ref_c1d, dtype=torch.bool).scatter_(0, top, True))
    lin.weight.data.copy_(ref_lin)
    prune_magnitude([("lin", lin)], 0.7, per_layer=True)  # the layer's 18 largest, wherever they are
    top = ref_lin.abs().flatten().topk(18).indices
    expected = torch.zeros(60, dtype=torch.bool).scatter_(0, top, True).view(6, 10)
    assert torch.equal(lin.weight != 0, expected) and torch.equal(lin.weight[expected], ref_lin[expected])
    lin.weight.data.copy_(ref_lin)
    c1d.weight.data.copy_(ref_c1d)
    prune_magnitude([("lin", lin), ("c1d", c1d)], [0.2, 0.9])  # one target per layer: 8 and 1 of each output
    assert bool(((lin.weight != 0).sum(1) == 8).all()) and bool(((c1d.weight != 0).sum(0) == 1).all())
    assert torch.equal(c1d.weight.abs().amax(0), ref_c1d.abs().amax(0))


@pytest.mark.parametrize("per_layer,nm", [(False, None), (True, None), (False, (2, 4))])
def test_through_the_driver_without_any_pass(per_layer, nm):
    """prune_layerwise(method="magnitude") never calls forward or make_batches; every row keeps its largest |w|
    (or the layer its largest, or 2 of every 4: torch.topk), the weights unchanged; no curvature, so no objective;
    prune_magnitude gives the same weights."""
    model, twin = mlp(6), mlp(6)
    with torch.no_grad():
        model[2].weight[1, :5] = 0.0  # zeros that stay zeros
        twin[2].weight[1, :5] = 0.0
    modules = [(str(i), model[i]) for i in (0, 2, 4)]
    dense = [m.weight.detach().clone() for _, m in modules]
    never = pytest.fail
    out = prune_layerwise(model, modules, 0.5, forward=never, make_batches=never, per_layer=per_layer, nm=nm,
                          method="magnitude")
    for (_, m), W_bar in zip(modules, dense, strict=True):
        r, d = W_bar.shape
        score = W_bar.abs().masked_fill(W_bar == 0, -1.0)
        keep = torch.zeros(r, d, dtype=torch.bool)
        if nm is not None:
            keep.view(-1, 4).scatter_(1, score.view(-1, 4).topk(2, dim=1).indices, True)
        elif per_layer:
            keep.view(-1)[score.flatten().topk(kept_count(r * d, 0.5)).indices] = True
        else:
            keep.scatter_(1, score.topk(kept_count(d, 0.5), dim=1).indices, True)
        assert torch.equal(m.weight.detach(), W_bar * (keep & (W_bar != 0)))
    st = out.stages[0]
    assert st.objective is None and st.magnitude_objective is None and st.objective_trace == []
    assert st.kept == sum(int((m.weight != 0).sum()) for _, m in modules)
    prune_magnitude([(str(i), twin[i]) for i in (0, 2, 4)], 0.5, nm, per_layer=per_layer)
    assert all(torch.equal(twin[i].weight, model[i].weight) for i in (0, 2, 4))
