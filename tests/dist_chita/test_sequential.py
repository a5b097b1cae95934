import itertools

import pytest
import torch
from torch import nn

from dist_chita.layerwise import objectives, solve_rows
from dist_chita.schedule import kept_count
from dist_chita.sequential import (
    blocks_in_order,
    input_rows,
    layer_curvature,
    my_microbatches,
    prune_layerwise,
    weight_rows,
)
from tests import multiproc


def test_blocks_follow_the_first_numeric_component():
    names = ["enc.layer.0.q", "enc.layer.0.k", "enc.layer.1.q", "enc.layer.10.q", "fc1", "pool.dense",
             "enc.layer.1.out"]
    groups = blocks_in_order([(n, None) for n in names])
    assert groups == [[0, 1], [2, 6], [3], [4], [5]]


def test_rows_and_inputs_reproduce_each_layer_type():
    """weight_rows(W) applied to input_rows(x) gives the layer's own output (so H = X^T X is the curvature of the
    rows the solver prunes): Linear on padded sequences, Conv2d with stride/padding/dilation, transformers' Conv1D."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False)
    x = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    rows = input_rows(lin, x, mask)
    assert rows.shape == (9, 6)
    torch.testing.assert_close(rows @ weight_rows(lin, lin.weight).double().T, lin(x)[mask.bool()].double())

    conv = nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=(1, 2), bias=False)
    img = torch.randn(2, 3, 9, 8)
    out = conv(img)  # (2, 4, H', W')
    rows = input_rows(conv, img, None)
    expected = out.permute(0, 2, 3, 1).reshape(-1, 4).double()
    torch.testing.assert_close(rows @ weight_rows(conv, conv.weight).double().T, expected)

    c1d = Conv1D(5, 6)  # weight stored (in, out)
    torch.nn.init.normal_(c1d.bias, std=0.0)
    y = c1d(x)
    rows = input_rows(c1d, x, None)
    torch.testing.assert_close(rows @ weight_rows(c1d, c1d.weight).double().T, y.reshape(-1, 5).double())

    with pytest.raises(ValueError, match="groups=1"):
        input_rows(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5), None)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _batches(x, lo, hi, bs=5):
    return [(x[s:min(s + bs, hi)], list(range(s, min(s + bs, hi)))) for s in range(lo, hi, bs)]


def test_sequential_prune_matches_an_independent_recomputation():
    """Every layer of a small MLP pruned to 50% of each row, and the same result recomputed here: layer l's H from
    the inputs of the model with layers < l already pruned, solved with solve_rows."""
    torch.manual_seed(1)
    x = torch.randn(40, 12)
    model, ref = _mlp(), _mlp()
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    out = prune_layerwise(model, modules, 0.5, forward=model, make_batches=lambda: _batches(x, 0, 40))
    h = x
    for i in (0, 2, 4):
        W_bar = ref[i].weight.detach()
        H = (h.double().T @ h.double()) / h.shape[0]
        lam = 0.01 * float(H.diagonal().mean())
        res = solve_rows(W_bar, H, lam, k=kept_count(W_bar.shape[1], 0.5))
        torch.testing.assert_close(model[i].weight.detach(), res.W, rtol=1e-4, atol=1e-5)
        Q = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
        top = torch.zeros_like(W_bar).scatter_(1, W_bar.abs().topk(kept_count(W_bar.shape[1], 0.5), 1).indices, 1.0)
        f_mag = float(objectives((W_bar * top - W_bar).double(), Q).sum())
        assert res.objective < f_mag  # better than plain magnitude pruning of the layer
        with torch.no_grad():
            ref[i].weight.copy_(res.W)
            h = ref[: i + 2](x) if i < 4 else h
    assert (out.masks["0"].sum(1) == 6).all() and (out.masks["2"].sum(1) == 8).all()
    assert out.stages[0].kept == 16 * 6 + 8 * 8 + 3 * 4
    assert out.stages[0].objective <= out.stages[0].magnitude_objective


def test_curvature_skips_padding_tokens():
    lin = nn.Linear(4, 2, bias=False)
    x = torch.randn(2, 3, 4)
    batch = {"x": x, "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    (H,) = layer_curvature([("lin", lin)], lambda b: lin(b["x"]), [(batch, [0, 1])])
    rows = torch.stack([x[0, 0], x[0, 1], x[1, 0]]).double()
    torch.testing.assert_close(H, rows.T @ rows / 3)


def test_curvature_has_the_same_bits_in_any_order_of_micro_batches():
    """Ranks sum their micro-batches, then the all-reduce sums the ranks: H must not depend on that order."""
    torch.manual_seed(3)
    lin = nn.Linear(24, 2, bias=False)
    x = torch.randn(60, 24) * torch.logspace(-3, 3, 24)  # features of very different scales
    batches = _batches(x, 0, 60, 7)
    (H,) = layer_curvature([("lin", lin)], lin, batches)
    (H_rev,) = layer_curvature([("lin", lin)], lin, batches[::-1])
    (H_odd_even,) = layer_curvature([("lin", lin)], lin, batches[1::2] + batches[0::2])
    assert torch.equal(H, H_rev) and torch.equal(H, H_odd_even)
    ref = x.double().T @ x.double() / 60
    scale = (ref.diagonal()[:, None] * ref.diagonal()[None, :]).sqrt()  # float32 rounding, relative to |x_i| |x_j|
    assert bool(((H - ref).abs() <= 1e-6 * scale).all())


def _prune_mlp(nm):
    torch.manual_seed(2)
    x = torch.randn(37, 12)
    model = _mlp(3)
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    out = prune_layerwise(model, modules, 0.6, forward=model, nm=nm, row_chunk=3,  # rows of a layer on every rank
                          make_batches=lambda: my_microbatches(_batches(x, 0, 37, 4)))
    return [m.weight.detach().clone() for _, m in modules], out.stages[0].objective


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_same_masks_and_weights_on_any_world_size(nm):
    (base, f1), = multiproc.run(_prune_mlp, 1, nm)
    for world_size in (2, 3, 4):
        results = multiproc.run(_prune_mlp, world_size, nm)
        for weights, f in results:
            assert f == pytest.approx(f1, rel=1e-12)  # the objective's float64 sum over ranks is in another order
            for w, b in zip(weights, base, strict=True):
                assert torch.equal(w, b)  # the same micro-batches, H summed exactly, rows solved in the same chunks


def test_each_rank_takes_every_r_th_micro_batch():
    assert list(my_microbatches(iter(range(7)))) == list(range(7))  # world size 1
    got = multiproc.run(lambda: list(my_microbatches(iter(range(7)))), 3)
    assert got == [[0, 3, 6], [1, 4], [2, 5]]


def test_rows_are_shared_in_whole_chunks():
    from dist_chita.sequential import _my_rows

    for r in (1, 5, 64, 100, 384, 1536):
        for world in (1, 2, 3, 4):
            ranges = [_my_rows(r, world, k, 64) for k in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == r
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, covering
            assert all(lo % 64 == 0 for lo, hi in ranges if hi > lo)  # cut at chunk boundaries
            sizes = [-(-(hi - lo) // 64) for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1  # balanced in chunks


def test_magnitude_baseline_keeps_the_largest_of_every_output():
    from transformers.pytorch_utils import Conv1D

    from dist_chita.sequential import prune_magnitude

    torch.manual_seed(5)
    lin, c1d = nn.Linear(10, 6, bias=False), Conv1D(6, 10)  # Conv1D: weight (in, out); an output is a column
    ref_lin, ref_c1d = lin.weight.detach().clone(), c1d.weight.detach().clone()
    prune_magnitude([("lin", lin), ("c1d", c1d)], 0.7)
    top = ref_lin.abs().topk(3, dim=1).indices
    assert torch.equal(lin.weight != 0, torch.zeros_like(ref_lin, dtype=torch.bool).scatter_(1, top, True))
    assert torch.equal(lin.weight[lin.weight != 0], ref_lin[lin.weight != 0])
    top = ref_c1d.abs().topk(3, dim=0).indices
    assert torch.equal(c1d.weight != 0, torch.zeros_like(ref_c1d, dtype=torch.bool).scatter_(0, top, True))


def test_bad_input_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="sparsity"):
        prune_layerwise(model, [("0", model[0])], 1.0, forward=model, make_batches=list)
    with pytest.raises(ValueError, match="saw no calibration inputs"):
        prune_layerwise(model, [("0", model[0])], 0.5, forward=model, make_batches=list)
    conv = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=4))
    never = pytest.fail  # refused before any forward pass
    with pytest.raises(ValueError, match=r"^1: objective layerwise supports Conv2d with groups=1 .*groups=4"):
        prune_layerwise(conv, [("0", conv[0]), ("1", conv[1])], 0.5, forward=never, make_batches=never)
