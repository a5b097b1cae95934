"""OBD: its Fisher diagonal against per-sample gradients from torch.autograd, its masks against torch.topk of
F_jj w_j^2 / 2."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_chita.layerwise.driver import prune_layerwise
from dist_chita.methods.base import LayerProblem
from dist_chita.methods.obd import OBD
from dist_chita.sparsity import kept_count
from tests.fixtures.layerwise_nets import batches


def _net():
    """Conv1D (weights stored (inputs, outputs)) -> ReLU -> Linear, 3 classes."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(7)
    return nn.Sequential(Conv1D(8, 12), nn.ReLU(), nn.Linear(8, 3)).eval()


def _loss(model, batch, indices):
    return F.cross_entropy(model(batch), torch.as_tensor(indices) % 3, reduction="none")


def _autograd_fisher(model, x):
    """F_jj = (1/n) sum_i (dl_i/dw_j)^2 per layer, in the layer's rows (outputs, inputs), one sample at a time."""
    weights = [model[0].weight, model[2].weight]
    F_sum = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(_loss(model, x[i:i + 1], [i]).sum(), weights)
        for acc, g in zip(F_sum, grads, strict=True):
            acc += g.double().pow(2)
    return [F_sum[0].T / x.shape[0], F_sum[1] / x.shape[0]]  # Conv1D's rows are its columns


class _Seen(OBD):
    """OBD that also keeps the Fisher diagonal each layer was shown."""

    def __init__(self):
        self.fisher = []

    def prune(self, layer):
        self.fisher.append(layer.fisher.clone())
        return super().prune(layer)


@pytest.mark.parametrize("per_layer,nm", [(False, None), (True, None), (False, (2, 4))])
def test_fisher_diagonal_and_masks_against_autograd(per_layer, nm):
    """The F every layer is shown is the dense model's empirical Fisher diagonal (per-sample gradients by autograd,
    one sample at a time), also for the layer pruned after the first; the kept weights are the topk of
    F_jj w_j^2 / 2 of every row (of the layer; 2 of every 4), unchanged; the weights already zero stay zero."""
    model = _net()
    with torch.no_grad():
        model[2].weight[0, :3] = 0.0
    x = torch.randn(26, 12, generator=torch.Generator().manual_seed(8))
    expected = _autograd_fisher(model, x)
    rows = [model[0].weight.detach().T.clone(), model[2].weight.detach().clone()]
    seen = _Seen()
    out = prune_layerwise(model, [("0", model[0]), ("2", model[2])], 0.5, forward=pytest.fail, per_layer=per_layer,
                          nm=nm, make_batches=lambda: batches(x, 0, 26, 4), method=seen, loss_fn=_loss)
    got = [model[0].weight.detach().T, model[2].weight.detach()]
    for W_bar, F_true, F_seen, W in zip(rows, expected, seen.fisher, got, strict=True):
        torch.testing.assert_close(F_seen, F_true, rtol=1e-5, atol=1e-12)
        r, d = W_bar.shape
        score = (0.5 * W_bar.double().pow(2) * F_true).masked_fill(W_bar == 0, -1.0)
        keep = torch.zeros(r, d, dtype=torch.bool)
        if nm is not None:
            keep.view(-1, 4).scatter_(1, score.view(-1, 4).topk(2, dim=1).indices, True)
        elif per_layer:
            keep.view(-1)[score.flatten().topk(kept_count(r * d, 0.5)).indices] = True
        else:
            keep.scatter_(1, score.topk(kept_count(d, 0.5), dim=1).indices, True)
        assert torch.equal(W, W_bar * (keep & (W_bar != 0)))
    assert out.stages[0].objective is None and "fisher_diagonal" in out.stages[0].seconds


def test_the_method_needs_the_fisher_diagonal():
    layer = LayerProblem(W_bar=torch.ones(2, 4), sparsity=0.5)
    with pytest.raises(ValueError, match="OBD needs the Fisher diagonal"):
        OBD().prune(layer)
    fisher = torch.tensor([[1.0, 4.0, 0.0, 2.0], [3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    W = OBD().prune(LayerProblem(W_bar=torch.tensor([[1.0, 1.0, 9.0, -2.0], [1.0, 2.0, -1.5, 1.0]]), sparsity=0.5,
                                 fisher=fisher)).W
    # scores F w^2 / 2: row 0 (0.5, 2, 0, 4) keeps inputs 1 and 3; row 1 (1.5, 2, 1.125, 0.5) keeps 0 and 1
    assert torch.equal(W, torch.tensor([[0.0, 1.0, 0.0, -2.0], [1.0, 2.0, 0.0, 0.0]]))
