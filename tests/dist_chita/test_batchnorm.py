"""BatchNorm re-estimation against a plain forward pass written out in the test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_chita import batchnorm
from dist_chita.io.data import Samples
from tests import multiproc


class _Net(nn.Module):
    """conv-bn-relu, then a branch whose BatchNorm is registered before the one it follows in the forward pass."""

    def __init__(self):
        super().__init__()
        self.late = nn.BatchNorm2d(6)  # runs last, registered first
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, bias=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.late(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    net = _Net()
    for bn in (net.bn1, net.late):  # statistics far from the data's: what pruning leaves
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(0.1, 5)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    return net.eval()


def _samples(n: int = 23, seed: int = 1) -> Samples:
    g = torch.Generator().manual_seed(seed)
    return Samples({"pixel_values": torch.randn(n, 2, 7, 7, generator=g) * 2 + 0.5}, torch.arange(n))


def _forward(net):
    return lambda batch: net(batch["pixel_values"])


def _truth(net: _Net, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm's input over all samples in one batch, the earlier one already re-estimated: (mean,
    unbiased variance) per channel, in float64."""
    def stats(a):
        a = a.double().transpose(0, 1).reshape(a.shape[1], -1)
        return a.mean(1), a.var(1, unbiased=True)

    with torch.no_grad():
        a1 = net.conv1(x)
        m1, v1 = stats(a1)
        h = torch.relu(nn.functional.batch_norm(a1, m1.float(), v1.float(), net.bn1.weight, net.bn1.bias,
                                                eps=net.bn1.eps))
        m2, v2 = stats(net.conv2(h))
    return {"bn1": (m1, v1), "late": (m2, v2)}


def test_statistics_are_those_of_each_layers_input_over_all_samples_in_forward_order():
    net, samples = _net(), _samples()
    truth = _truth(net, samples.fields["pixel_values"])
    assert batchnorm.reestimate(net, _forward(net), samples, batch_size=5) == 2
    for name, (mean, var) in truth.items():
        bn = getattr(net, name)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_forward_order_follows_the_calls_not_the_registration():
    net = _net()
    names = [n for n, _ in batchnorm.forward_order(net, _forward(net), _samples().batch(range(2)))]
    assert names == ["bn1", "late"] and [n for n, _ in batchnorm.batchnorm_layers(net)] == ["late", "bn1"]


def test_a_model_without_batchnorm_is_left_as_it_is():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(98, 3)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert batchnorm.reestimate(net, lambda b: net(b["pixel_values"]), _samples(), 4) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_buffers_and_restore_round_trip():
    net, samples = _net(), _samples()
    saved = batchnorm.buffers(net)
    old = [(m.running_mean.clone(), m.running_var.clone()) for _, m in batchnorm.batchnorm_layers(net)]
    batchnorm.reestimate(net, _forward(net), samples, 6)
    assert not torch.equal(net.bn1.running_mean, old[1][0])
    batchnorm.restore(net, saved)
    for (_, m), (mean, var) in zip(batchnorm.batchnorm_layers(net), old, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


def _reestimated(batch_size: int):
    net = _net()
    batchnorm.reestimate(net, _forward(net), _samples(), batch_size)
    return [(m.running_mean.clone(), m.running_var.clone()) for _, m in batchnorm.batchnorm_layers(net)]


@pytest.mark.parametrize("batch_size", [4, 23])
def test_the_same_bits_on_any_number_of_ranks(batch_size):
    single = _reestimated(batch_size)
    for world_size in (2, 3):
        for got in multiproc.run(_reestimated, world_size, batch_size):
            for (m, v), (m1, v1) in zip(got, single, strict=True):
                assert torch.equal(m, m1) and torch.equal(v, v1)


def test_prune_reestimates_after_pruning_and_reports_the_metric_before():
    import dist_chita

    def run(reestimate: bool):
        net, samples = _net(), _samples()
        calls = []

        def evaluate(stage):
            calls.append(stage)
            return {"accuracy": float(net.bn1.running_mean.sum())}

        rep = dist_chita.prune(net, samples, target=dist_chita.Target(sparsity=0.5, granularity="layer"),
                               objective=dist_chita.Layerwise(), method="magnitude", evaluate=evaluate,
                               check_memory=False, reestimate_batchnorm=reestimate)
        return net, rep, calls

    net, rep, calls = run(True)
    assert rep.batchnorm_reestimated == 2 and calls == ["before", "after_stale_bn", "after"]
    assert rep.metric["after_stale_bn"] == rep.metric["before"] != rep.metric["after"]
    truth = _truth(net, _samples().fields["pixel_values"])  # the pruned weights' statistics
    torch.testing.assert_close(net.bn1.running_mean.double(), truth["bn1"][0], rtol=1e-5, atol=1e-6)
    net, rep, calls = run(False)
    assert rep.batchnorm_reestimated == 0 and calls == ["before", "after"]
    assert torch.equal(net.bn1.running_mean, _net().bn1.running_mean)
