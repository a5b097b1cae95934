
import pytest
import torch
from torch import nn

from dist_chita.layerwise.driver import (
    block_call_bytes,
    blocks_in_order,
    chained_blocks,
    input_rows,
    layer_curvature,
    my_microbatches,
    prune_layerwise,
    weight_rows,
)
from dist_chita.layerwise.row_solver import keep_mask, objectives, solve_rows
from dist_chita.methods.sparsegpt import sparsegpt_rows
from dist_chita.sparsity import kept_count
from tests import multiproc


def test_blocks_follow_the_first_numeric_component():
    names = ["enc.layer.0.q", "enc.layer.0.k", "enc.layer.1.q", "enc.layer.10.q", "fc1", "pool.dense",
             "enc.layer.1.out"]
    groups = blocks_in_order([(n, None) for n in names])
    assert groups == [[0, 1], [2, 6], [3], [4], [5]]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's note on its own padding
def test_rows_and_inputs_reproduce_each_layer_type():
    """weight_rows(W) applied to input_rows(x) gives the layer's own output (so H = X^T X is the curvature of the
    rows the solver prunes): Linear on padded sequences, Conv2d with stride/padding/dilation and with groups (each
    group's rows on its own inputs), transformers' Conv1D."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False)
    x = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    rows = input_rows(lin, x, mask)
    assert rows.shape == (9, 6)
    torch.testing.assert_close(rows.double() @ weight_rows(lin, lin.weight).double().T, lin(x)[mask.bool()].double())

    conv = nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=(1, 2), bias=False)
    img = torch.randn(2, 3, 9, 8)
    out = conv(img)  # (2, 4, H', W')
    rows = input_rows(conv, img, None)
    expected = out.permute(0, 2, 3, 1).reshape(-1, 4).double()
    torch.testing.assert_close(rows.double() @ weight_rows(conv, conv.weight).double().T, expected)

    c1d = Conv1D(5, 6)  # weight stored (in, out)
    torch.nn.init.normal_(c1d.bias, std=0.0)
    y = c1d(x)
    rows = input_rows(c1d, x, None)
    torch.testing.assert_close(rows.double() @ weight_rows(c1d, c1d.weight).double().T, y.reshape(-1, 5).double())

    grouped = nn.Conv2d(6, 9, 3, padding=1, groups=3, bias=False)  # 3 groups: 3 outputs, 2 x 3 x 3 inputs each
    img = torch.randn(2, 6, 5, 4)
    rows = input_rows(grouped, img, None)  # all channels; group j's inputs are columns [18 j, 18 (j + 1))
    per_group = rows.view(-1, 3, 18)
    W_rows = weight_rows(grouped, grouped.weight).double().view(3, 3, 18)  # (group, output in group, input)
    got = torch.einsum("ngd,god->ngo", per_group.double(), W_rows).reshape(-1, 9)
    torch.testing.assert_close(got, grouped(img).permute(0, 2, 3, 1).reshape(-1, 9).double())

    for same in (nn.Conv2d(3, 2, (4, 3), padding="same", dilation=(1, 2), bias=False),  # even kernel: uneven pad
                 nn.Conv2d(3, 2, 3, padding="valid", bias=False)):
        rows = input_rows(same, img[:, :3], None)
        expected = same(img[:, :3]).permute(0, 2, 3, 1).reshape(-1, 2).double()
        torch.testing.assert_close(rows.double() @ weight_rows(same, same.weight).double().T, expected,
                                   rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="zero padding only"):
        input_rows(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), torch.randn(1, 4, 5, 5), None)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _batches(x, lo, hi, bs=5):
    return [(x[s:min(s + bs, hi)], list(range(s, min(s + bs, hi)))) for s in range(lo, hi, bs)]


@pytest.mark.parametrize("per_layer,targets", [(False, 0.5), (True, 0.5), (False, (0.3, 0.7, 0.5)),
                                               (True, (0.3, 0.7, 0.5))])
def test_sequential_prune_matches_an_independent_recomputation(per_layer, targets):
    """Every layer of a small MLP pruned to 50% (or to its own target: 30%, 70%, 50%) of each row, or of each layer
    with the budget shared among its rows by the OBS saliency, and the same result recomputed here: layer l's H
    from the inputs of the model with layers < l already pruned, the row budgets from an inverse and a top-k of
    the whole layer, solved with solve_rows."""
    torch.manual_seed(1)
    x = torch.randn(40, 12)
    model, ref = _mlp(), _mlp()
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    exact = dict(refit_iters=60)
    out = prune_layerwise(model, modules, targets, forward=model, make_batches=lambda: _batches(x, 0, 40),
                          per_layer=per_layer, solver_options=exact)
    sparsity = dict(zip((0, 2, 4), targets if isinstance(targets, tuple) else (targets,) * 3, strict=True))
    kept = 0
    h = x
    for i in (0, 2, 4):
        s = sparsity[i]
        W_bar = ref[i].weight.detach()
        r, d = W_bar.shape
        H = (h.double().T @ h.double()) / h.shape[0]
        lam = 0.01 * float(H.diagonal().mean())
        Q = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
        if per_layer:
            saliency = W_bar.double().pow(2) / torch.linalg.inv(Q).diagonal()
            top = saliency.flatten().topk(kept_count(r * d, s)).indices
            k = torch.zeros(r * d).scatter_(0, top, 1.0).view(r, d).sum(1).long()
            assert not torch.equal(k, torch.full_like(k, kept_count(d, s)))  # the rows do share the budget
            kept += int(k.sum())
        else:
            k = kept_count(d, s)
            kept += r * k
            assert (out.masks[str(i)].sum(1) == k).all()
        res = solve_rows(W_bar, H, lam, k=k, **exact)
        torch.testing.assert_close(model[i].weight.detach(), res.W, rtol=1e-4, atol=1e-5)
        assert torch.equal(out.masks[str(i)].sum(1), res.support.sum(1))
        top = keep_mask(W_bar.abs(), k, None, None)
        f_mag = float(objectives((W_bar * top - W_bar).double(), Q).sum())
        assert res.objective < f_mag  # better than plain magnitude pruning of the layer with the same budgets
        with torch.no_grad():
            ref[i].weight.copy_(res.W)
            h = ref[: i + 2](x) if i < 4 else h
    assert out.stages[0].kept == kept
    assert out.stages[0].objective <= out.stages[0].magnitude_objective


@pytest.mark.parametrize("method,per_layer,nm", [("wanda", False, None), ("wanda", True, None),
                                                 ("wanda", False, (2, 4)), ("sparsegpt", True, None),
                                                 ("sparsegpt", False, None), ("sparsegpt", False, (2, 4))])
def test_baselines_match_an_independent_recomputation(method, per_layer, nm):
    """Wanda and SparseGPT through prune_layerwise, and the same recomputed here: layer l's inputs X from the model
    with layers < l already pruned; Wanda keeps the largest |W_ij| ||X_j||_2 of every row (of the layer, or 2 of
    every 4) by torch.topk, with no update; SparseGPT is sparsegpt_rows on X^T X (tested against a direct OBS in
    test_sparsegpt.py). The report's objective is the reconstruction objective of the result."""
    torch.manual_seed(1)
    x = torch.randn(40, 12)
    model, ref = _mlp(), _mlp()
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    out = prune_layerwise(model, modules, 0.5, forward=model, make_batches=lambda: _batches(x, 0, 40),
                          per_layer=per_layer, nm=nm, method=method)
    h, f = x, 0.0
    for i in (0, 2, 4):
        W_bar = ref[i].weight.detach()
        r, d = W_bar.shape
        H = (h.double().T @ h.double()) / h.shape[0]
        if method == "wanda":
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
        else:
            W = sparsegpt_rows(W_bar, H, 0.5, nm=nm, per_row=not per_layer)
            torch.testing.assert_close(model[i].weight.detach(), W, rtol=1e-5, atol=1e-6)
        Q = H + 0.01 * float(H.diagonal().mean()) * torch.eye(d, dtype=H.dtype)
        f += float(objectives((model[i].weight.detach() - W_bar).double(), Q).sum())
        with torch.no_grad():
            ref[i].weight.copy_(model[i].weight)
            h = ref[: i + 2](x) if i < 4 else h
    st = out.stages[0]
    assert st.objective == pytest.approx(f, rel=1e-5) and st.magnitude_objective is None
    assert st.iterations == 0 and st.objective_trace == [st.objective]


def test_an_unknown_layerwise_method_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="unknown layerwise method"):
        prune_layerwise(model, [("0", model[0])], 0.5, forward=model, make_batches=lambda: [], method="obs")


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return torch.relu(self.a(x)) + self.b(x)


class _Pairs(nn.Module):
    """Two blocks of two layers each (blocks.0.a, blocks.0.b, blocks.1.a, blocks.1.b)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.blocks = nn.ModuleList([_Pair(), _Pair()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _sparsegpt_events():
    """prune_layerwise(method="sparsegpt") on _Pairs, recording this rank's SparseGPT solves and layer writes."""
    from dist_chita.layerwise import driver as layerwise_driver

    events, solve, write = [], layerwise_driver.sparsegpt_rows, layerwise_driver._from_rows
    layerwise_driver.sparsegpt_rows = lambda *a, **kw: (events.append("solve"), solve(*a, **kw))[1]
    layerwise_driver._from_rows = lambda *a, **kw: (events.append("write"), write(*a, **kw))[1]
    try:
        model = _Pairs().eval()
        modules = [(f"blocks.{b}.{n}", getattr(model.blocks[b], n)) for b in (0, 1) for n in "ab"]
        x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        prune_layerwise(model, modules, 0.5, forward=model, per_layer=True, method="sparsegpt",
                        make_batches=lambda: my_microbatches(_batches(x, 0, 30, 5)))
    finally:
        layerwise_driver.sparsegpt_rows, layerwise_driver._from_rows = solve, write
    return events, [m.weight.detach().clone() for _, m in modules]


def test_sparsegpt_owners_balance_the_block_by_cost():
    """A transformer block's six layers (d (r + d): four 384 x 384, one 1536 x 384, one 384 x 1536) on 2 ranks: the
    largest alone on one rank, the rest on the other; 3 ranks; a grouped conv's parts spread; the same owners
    whatever the order of the calls (a pure function)."""
    from dist_chita.layerwise.driver import sparsegpt_owners

    mods = [(n, nn.Linear(a, b, bias=False)) for n, a, b in [("q", 384, 384), ("k", 384, 384), ("v", 384, 384),
                                                             ("o", 384, 384), ("up", 384, 1536), ("down", 1536, 384)]]
    assert sparsegpt_owners(mods, range(6), 2) == {(5, 0): 0, (4, 0): 1, (0, 0): 1, (1, 0): 1, (2, 0): 1, (3, 0): 1}
    three = sparsegpt_owners(mods, range(6), 3)
    assert three[(5, 0)] == 0 and three[(4, 0)] == 1 and sorted(three.values()) == [0, 1, 1, 2, 2, 2]
    assert set(sparsegpt_owners(mods, range(6), 1).values()) == {0}
    conv = [("c", nn.Conv2d(8, 8, 3, groups=4, bias=False))]  # 4 parts of 2 rows, equal cost
    assert sparsegpt_owners(conv, [0], 2) == {(0, 0): 0, (0, 1): 1, (0, 2): 0, (0, 3): 1}


def test_sparsegpt_solves_a_blocks_layers_on_all_ranks_at_once():
    """SparseGPT's layers go whole to the ranks by turns; every rank solves its layers of a block before the block
    is written back (a layer at a time, the ranks would wait for each other): on 2 ranks, rank 1 solves
    blocks.0.b before blocks.0.a (rank 0's) is written. Same weights as on one rank."""
    (one, base), = multiproc.run(_sparsegpt_events, 1)
    assert one == ["solve", "solve", "write", "write"] * 2
    (e0, w0), (e1, w1) = multiproc.run(_sparsegpt_events, 2)
    assert e0 == e1 == ["solve", "write", "write"] * 2
    for w in (w0, w1):
        assert all(torch.equal(a, b) for a, b in zip(w, base, strict=True))


def _grouped_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).eval()


def test_grouped_conv_prune_matches_an_independent_recomputation():
    """Grouped and depthwise Conv2d: each group of output rows is pruned on its own group's H (built here from
    F.unfold of the group's input channels), on the inputs of the already pruned earlier layers."""
    torch.manual_seed(4)
    x = torch.randn(30, 2, 6, 6)
    model, ref = _grouped_net(), _grouped_net()
    idx = (0, 2, 4, 7)
    modules = [(str(i), model[i]) for i in idx]
    exact = dict(refit_iters=60)  # back-solves run to convergence, so float noise of H stays in the noise
    out = prune_layerwise(model, modules, 0.5, forward=model, make_batches=lambda: _batches(x, 0, 30, 7),
                          solver_options=exact)
    dead = []
    for i in idx:
        layer = ref[i]
        with torch.no_grad():
            h = ref[:i](x)
        W_bar = weight_rows(layer, layer.weight.detach())
        g = layer.groups if isinstance(layer, nn.Conv2d) else 1
        if isinstance(layer, nn.Conv2d):
            cols = torch.nn.functional.unfold(h, layer.kernel_size, padding=layer.padding).transpose(1, 2)
            X = cols.reshape(-1, cols.shape[-1]).double()
        else:
            X = h.double()
        per_out = W_bar.shape[0] // g
        d = W_bar.shape[1]
        pruned = torch.empty_like(W_bar)
        for j in range(g):
            Xj = X[:, j * d:(j + 1) * d]
            H = Xj.T @ Xj / Xj.shape[0]
            rows = slice(j * per_out, (j + 1) * per_out)
            if float(H.diagonal().mean()) == 0:  # a dead group (its inputs are all zero): magnitude is optimal
                dead.append((i, j))
                pruned[rows] = W_bar[rows] * keep_mask(W_bar[rows].abs(), kept_count(d, 0.5), None, None)
                continue
            res = solve_rows(W_bar[rows], H, 0.01 * float(H.diagonal().mean()), k=kept_count(d, 0.5), **exact)
            pruned[rows] = res.W
        got = weight_rows(model[i], model[i].weight.detach())
        assert torch.equal(got != 0, pruned != 0), i
        torch.testing.assert_close(got, pruned, rtol=0, atol=1e-4 * float(pruned.abs().max()))
        with torch.no_grad():
            layer.weight.copy_(pruned.view_as(layer.weight))
    assert out.stages[0].objective <= out.stages[0].magnitude_objective
    assert (out.masks["4"].view(6, -1).sum(1) == kept_count(9, 0.5)).all()  # depthwise: 5 of 9 per channel
    assert dead == [(4, 2)]  # this seed has a depthwise channel whose input ReLU is always 0: that path is covered


def _prune_grouped(per_layer=False):
    torch.manual_seed(5)
    x = torch.randn(23, 2, 6, 6)
    model = _grouped_net(1)
    modules = [(str(i), model[i]) for i in (0, 2, 4, 7)]
    prune_layerwise(model, modules, 0.6, forward=model, row_chunk=2, per_layer=per_layer,
                    make_batches=lambda: my_microbatches(_batches(x, 0, 23, 4)))
    return [m.weight.detach().clone() for _, m in modules]


@pytest.mark.parametrize("per_layer", [False, True])
def test_grouped_conv_same_weights_on_any_world_size(per_layer):
    (base,) = multiproc.run(_prune_grouped, 1, per_layer)
    if per_layer:  # one budget per layer, across its groups
        for w in base:
            assert int((w != 0).sum()) == kept_count(w.numel(), 0.6)
    for world_size in (2, 3):
        for weights in multiproc.run(_prune_grouped, world_size, per_layer):
            assert all(torch.equal(w, b) for w, b in zip(weights, base, strict=True)), world_size


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


class _Chain(nn.Module):
    """a -> b -> c, counting the forwards that reach c; ``reuse_a``: a runs again after b (out of block order)."""

    def __init__(self, reuse_a: bool = False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.reuse_a, self.reached_c = reuse_a, 0

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        if self.reuse_a:
            h = self.a(h)
        self.reached_c += 1
        return self.c(torch.relu(h))


@pytest.mark.parametrize("reuse_a", [False, True])
def test_curvature_stops_the_forward_after_the_block_only_when_that_is_safe(reuse_a):
    """With the later layers named, forwards after the first stop before them, and H has the same bits as from
    whole forwards; a block layer that also runs after a later one (a shared module) keeps every forward whole."""
    torch.manual_seed(1)
    net = _Chain(reuse_a)
    batches = _batches(torch.randn(40, 5), 0, 40, 8)  # 5 micro-batches
    whole = layer_curvature([("a", net.a)], net, batches)
    assert net.reached_c == 5
    net.reached_c = 0
    cut = layer_curvature([("a", net.a)], net, batches, later=[net.b, net.c])
    assert net.reached_c == (5 if reuse_a else 1)
    assert torch.equal(whole[0], cut[0])
    rows = [batch for batch, _ in batches]
    X = torch.cat(rows + ([torch.tanh(net.a(r)) @ net.b.weight.T + net.b.bias for r in rows] if reuse_a else []))
    X = X.detach().double()
    torch.testing.assert_close(whole[0], X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)


class _Fork(nn.Module):
    """a and b read the same tensor (as query and key do); ``split_after``: from that many forwards on, b reads a
    copy of it instead."""

    def __init__(self, split_after: int | None = None):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 2)
        self.split_after, self.forwards = split_after, 0

    def forward(self, x):
        h = torch.tanh(x)
        split = self.split_after is not None and self.forwards >= self.split_after
        self.forwards += 1
        return self.c(self.a(h) * self.b(h.clone() if split else h))


@pytest.mark.parametrize("split_after", [None, 0, 2])
def test_layers_reading_the_same_tensor_share_one_curvature(split_after):
    """a and b share one H (the same object) while every forward hands them the same tensor; when a later forward
    does not, each gets its own. Either way H has the bits of H formed for every layer on its own."""
    torch.manual_seed(4)
    batches = _batches(torch.randn(30, 6), 0, 30, 7)
    net = _Fork(split_after)
    layers = [("a", net.a), ("b", net.b), ("c", net.c)]
    H = layer_curvature(layers, net, batches)
    net.forwards = 0
    alone = layer_curvature(layers, net, batches, share_inputs=False)
    assert all(torch.equal(h, r) for h, r in zip(H, alone, strict=True))
    assert (H[1] is H[0]) == (split_after is None)
    assert H[2] is not H[0]
    X = torch.tanh(torch.cat([x for x, _ in batches])).double()
    torch.testing.assert_close(H[0], X.T @ X / 30, rtol=1e-5, atol=1e-6)
    assert torch.equal(H[0], H[0].T)  # exactly symmetric


def _fork_curvature(n):
    torch.manual_seed(4)
    net = _Fork()
    batches = list(my_microbatches(_batches(torch.randn(n, 6), 0, n, 7)))
    H = layer_curvature([("a", net.a), ("b", net.b), ("c", net.c)], net, batches)
    return [h.clone() for h in H], H[1] is H[0]


def test_shared_curvature_on_ranks_with_and_without_micro_batches():
    """3 ranks, 2 micro-batches (rank 2 has none and sees no sharing): every rank gets H[b] = H[a], with the
    bits of one process."""
    (base, _), = multiproc.run(_fork_curvature, 1, 12)
    for H, is_shared in multiproc.run(_fork_curvature, 3, 12):
        assert is_shared
        assert all(torch.equal(h, b) for h, b in zip(H, base, strict=True))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 9), nn.Linear(9, 6)

    def forward(self, h, gate=None):
        return (h + self.down(torch.tanh(self.up(h)) * gate),)


class _Stack(nn.Module):
    """Four blocks called as block(h, gate=...), returning (h,); between blocks 0 and 1 the hidden states are
    scaled, so block 1's call does not follow from block 0's output."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(4))

    def forward(self, x):
        gate = torch.sigmoid(x[:, :1].repeat(1, 9))
        h = x
        for j, block in enumerate(self.layers):
            (h,) = block(h, gate=gate)
            if j == 0:
                h = 0.5 * h
        return h


def _prune_stack(cache):
    torch.manual_seed(5)
    x = torch.randn(45, 6)
    model = _Stack()
    modules = [(f"layers.{j}.{part}", getattr(model.layers[j], part)) for j in range(4) for part in ("up", "down")]
    forward = model
    chained = chained_blocks(list(model.layers), forward, x[:7])
    prune_layerwise(model, modules, 0.5, forward=forward, row_chunk=4, cache_inputs=cache,
                    make_batches=lambda: my_microbatches(_batches(x, 0, 45, 7)))
    return chained, [m.weight.detach().clone() for _, m in modules]


def test_blocks_run_on_cached_inputs_where_their_calls_follow():
    """Blocks 1-3 (called with a keyword tensor, returning a tuple) run on cached inputs; block 0's output is
    scaled before block 1 so block 0 takes the model's forward. The weights are those of the model's forwards
    bit for bit, on 1-3 ranks (rank 2 of 3 has 2 of the 7 micro-batches)."""
    (chained, cached), = multiproc.run(_prune_stack, 1, True)
    assert chained == (1, 4)
    stack = _Stack()
    modules = [(f"layers.{j}.up", stack.layers[j].up) for j in range(4)]
    assert block_call_bytes(stack, modules, stack, torch.randn(7, 6)) == 4 * 7 * (6 + 9)  # h and the gate
    (_, whole), = multiproc.run(_prune_stack, 1, False)
    assert all(torch.equal(a, b) for a, b in zip(cached, whole, strict=True))
    for world_size in (2, 3):
        for _, weights in multiproc.run(_prune_stack, world_size, True):
            assert all(torch.equal(a, b) for a, b in zip(weights, whole, strict=True)), world_size


def _prune_mlp(nm, per_layer=False, sparsity=0.6, method="chita"):
    torch.manual_seed(2)
    x = torch.randn(37, 12)
    model = _mlp(3)
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    out = prune_layerwise(model, modules, sparsity, forward=model, nm=nm, row_chunk=3,  # rows of a layer on every rank
                          per_layer=per_layer, make_batches=lambda: my_microbatches(_batches(x, 0, 37, 4)),
                          method=method)
    return [m.weight.detach().clone() for _, m in modules], out.stages[0].objective


@pytest.mark.parametrize("nm,per_layer,sparsity,method", [
    (None, False, 0.6, "chita"), ((2, 4), False, 0.6, "chita"), (None, True, 0.6, "chita"),
    (None, True, (0.3, 0.7, 0.5), "chita"), (None, False, 0.6, "wanda"), (None, True, (0.3, 0.7, 0.5), "wanda"),
    (None, True, 0.6, "sparsegpt"), (None, False, (0.3, 0.7, 0.5), "sparsegpt"), ((2, 4), False, 0.6, "sparsegpt")])
def test_same_masks_and_weights_on_any_world_size(nm, per_layer, sparsity, method):
    (base, f1), = multiproc.run(_prune_mlp, 1, nm, per_layer, sparsity, method)
    for world_size in (2, 3, 4):
        results = multiproc.run(_prune_mlp, world_size, nm, per_layer, sparsity, method)
        for weights, f in results:
            assert f == pytest.approx(f1, rel=1e-12)  # the objective's float64 sum over ranks is in another order
            for w, b in zip(weights, base, strict=True):
                assert torch.equal(w, b)  # the same micro-batches, H summed exactly, rows solved in the same chunks


def test_each_rank_takes_every_r_th_micro_batch():
    assert list(my_microbatches(iter(range(7)))) == list(range(7))  # world size 1
    got = multiproc.run(lambda: list(my_microbatches(iter(range(7)))), 3)
    assert got == [[0, 3, 6], [1, 4], [2, 5]]


def test_rows_are_shared_in_whole_chunks():
    from dist_chita.layerwise.driver import _my_runs

    for parts in ([(0, 1)], [(0, 5)], [(0, 64)], [(0, 100)], [(0, 384)], [(0, 1536)],
                  [(0, 3), (3, 6), (6, 9)], [(j * 96, (j + 1) * 96) for j in range(8)], [(j, j + 1) for j in range(7)]):
        for world in (1, 2, 3, 4):
            runs = [_my_runs(parts, world, k, 64) for k in range(world)]
            flat = [run for rank_runs in runs for run in rank_runs]
            rows = [i for j, lo, hi in flat for i in range(lo, hi)]
            assert rows == list(range(parts[-1][1]))  # every row once, in order, ranks in order
            for j, lo, hi in flat:  # inside one part, starting at a chunk boundary of that part
                assert parts[j][0] <= lo < hi <= parts[j][1] and (lo - parts[j][0]) % 64 == 0
            chunks = [sum(-(-(hi - lo) // 64) for _, lo, hi in rank_runs) for rank_runs in runs]
            assert max(chunks) - min(chunks) <= 1  # balanced in chunks


def test_magnitude_baseline_keeps_the_largest_of_every_output():
    from transformers.pytorch_utils import Conv1D

    from dist_chita.layerwise.driver import prune_magnitude

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


def test_bad_input_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="sparsity"):
        prune_layerwise(model, [("0", model[0])], 1.0, forward=model, make_batches=list)
    with pytest.raises(ValueError, match="saw no calibration inputs"):
        prune_layerwise(model, [("0", model[0])], 0.5, forward=model, make_batches=list)
    conv = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"))
    never = pytest.fail  # refused before any forward pass
    with pytest.raises(ValueError, match=r"^1: objective layerwise supports Conv2d with zero padding only"):
        prune_layerwise(conv, [("0", conv[0]), ("1", conv[1])], 0.5, forward=never, make_batches=never)
