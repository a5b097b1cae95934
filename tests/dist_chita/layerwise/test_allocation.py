import pytest
import torch
from torch import nn

from dist_chita.layerwise.allocation import input_norms, outlier_ratios, owl_layer_targets, owl_targets
from dist_chita.layerwise.curvature import my_microbatches
from tests import multiproc


class _Tokens(nn.Module):
    """Two blocks of two layers each, on (b, T, 6) token inputs: blk.0.a, blk.0.b read x; blk.1.a reads blk.0.a's
    output, blk.1.b blk.0.b's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blk = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(6, 5), "b": nn.Linear(6, 4)}),
                                  nn.ModuleDict({"a": nn.Linear(5, 3), "b": nn.Linear(4, 3)})])

    def forward(self, batch):
        x = batch["x"]
        return self.blk[1]["a"](self.blk[0]["a"](x)) + self.blk[1]["b"](self.blk[0]["b"](x))


def _data():
    torch.manual_seed(1)
    x = torch.randn(11, 7, 6) * torch.linspace(0.1, 3.0, 6)  # features of different scales
    mask = (torch.arange(7)[None, :] < torch.randint(2, 8, (11,))[:, None]).long()  # padded sequences
    return x, mask


def _modules(model):
    return [(f"blk.{i}.{k}", model.blk[i][k]) for i in (0, 1) for k in ("a", "b")]


def _batches(x, mask, bs=3):
    return [({"x": x[s:s + bs], "attention_mask": mask[s:s + bs]}, list(range(s, min(s + bs, len(x)))))
            for s in range(0, len(x), bs)]


def _norms():
    torch.set_num_threads(1)
    model = _Tokens().eval()
    x, mask = _data()
    return input_norms(_modules(model), model, my_microbatches(_batches(x, mask)))


def test_input_norms_are_the_sums_of_squares_over_the_real_tokens():
    model = _Tokens().eval()
    x, mask = _data()
    norms = _norms()
    keep = mask.bool()
    with torch.no_grad():
        inputs = [x, x, model.blk[0]["a"](x), model.blk[0]["b"](x)]
    for got, h in zip(norms, inputs, strict=True):
        torch.testing.assert_close(got, h[keep].double().pow(2).sum(0), rtol=1e-6, atol=0)


def test_input_norms_have_the_same_bits_on_any_number_of_ranks():
    base = _norms()
    for world_size in (2, 3):
        for got in multiproc.run(_norms, world_size):
            assert all(torch.equal(a, b) for a, b in zip(got, base, strict=True)), world_size


def test_outlier_ratios_against_a_loop():
    model = _Tokens().eval()
    modules = _modules(model)
    norms = _norms()
    blocks = [[0, 1], [2, 3]]
    got = outlier_ratios(modules, norms, blocks, m=2.0)
    for block, ratio in zip(blocks, got, strict=True):
        scores = []
        for i in block:
            W = modules[i][1].weight.detach().double()
            for r in range(W.shape[0]):
                for j in range(W.shape[1]):
                    scores.append(abs(float(W[r, j])) * float(norms[i][j]) ** 0.5)
        mean = sum(scores) / len(scores)
        assert ratio == pytest.approx(sum(s > 2.0 * mean for s in scores) / len(scores), abs=1e-12)
    assert 0.0 < got[0] < 1.0  # the scales of x make some scores stand out


def test_owl_targets_have_mean_s_spread_two_lambda_and_favour_outliers():
    ratios = [0.01, 0.05, 0.02, 0.09]
    s = owl_targets(ratios, [10] * 4, 0.7, 0.08)  # blocks of one size: OWL's own formula
    assert sum(s) / 4 == pytest.approx(0.7) and max(s) - min(s) == pytest.approx(0.16)
    keep = [0.16 * (d - 0.01) / 0.08 for d in ratios]
    assert s == pytest.approx([1 - (k - sum(keep) / 4 + 0.3) for k in keep])
    assert sorted(range(4), key=lambda b: s[b]) == sorted(range(4), key=lambda b: -ratios[b])  # more outliers: denser
    sizes = [100, 100, 100, 7]  # a small block apart: the share of zeros over all weights is still S
    s = owl_targets(ratios, sizes, 0.7, 0.08)
    assert sum(a * n for a, n in zip(s, sizes, strict=True)) / sum(sizes) == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert owl_targets([0.03] * 3, [5, 6, 7], 0.6, 0.08) == pytest.approx([0.6] * 3)
    assert owl_targets(ratios, sizes, 0.7, 0.0) == pytest.approx([0.7] * 4)
    with pytest.raises(ValueError, match="OWL targets leave"):
        owl_targets(ratios, sizes, 0.95, 0.2)


def test_owl_layer_targets_give_every_layer_its_blocks_target():
    model = _Tokens().eval()
    modules = _modules(model)
    targets = owl_layer_targets(modules, _norms(), 0.5, m=2.0, lam=0.1)
    assert targets[0] == targets[1] and targets[2] == targets[3] and targets[0] != targets[2]
    sizes = [m.weight.numel() for _, m in modules]
    assert sum(t * n for t, n in zip(targets, sizes, strict=True)) / sum(sizes) == pytest.approx(0.5)
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="ungrouped layer"):
        input_norms([("g", grouped)], grouped, [])


def test_outlier_ratios_count_only_scores_strictly_above_m_times_the_mean():
    """D_b counts the scores strictly above M times the block's mean (hand-computed, ||X_j||^2 = 1): an all-zero
    block and a block of equal scores (M = 1) have no outliers, and in [[1, 1, 1], [1, 1, 10]] with M = 2 only the 10
    exceeds 2 x 15 / 6 = 5 (1 of 6)."""
    layers = [nn.Linear(3, 2, bias=False) for _ in range(3)]
    with torch.no_grad():
        layers[0].weight.zero_()
        layers[1].weight.fill_(0.5)
        layers[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 10.0]]))
    modules = [(f"l{i}", m) for i, m in enumerate(layers)]
    norms = [torch.ones(3, dtype=torch.float64)] * 3
    assert outlier_ratios(modules, norms, [[0], [1]], m=1.0) == [0.0, 0.0]
    assert outlier_ratios(modules, norms, [[0], [2]], m=2.0) == [0.0, pytest.approx(1 / 6)]


def test_owl_targets_refuse_a_block_at_full_sparsity_and_accept_zero():
    """Ratios (0, 1) on equal blocks, S = 0.5, lambda = 0.5: keep = (0, 1) exactly (by hand), so the first block's
    target is 1.0, a layer left with no weight: refused (targets must lie in [0, 1)). A target of exactly 0 is
    fine: lambda = 0.25 at S = 0.25 gives (0.5, 0.0)."""
    with pytest.raises(ValueError, match="OWL targets leave"):
        owl_targets([0.0, 1.0], [4, 4], 0.5, 0.5)
    assert owl_targets([0.0, 1.0], [4, 4], 0.25, 0.25) == [0.5, 0.0]
