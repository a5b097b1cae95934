import pytest
import torch
from torch import nn

from dist_chita.layerwise.curvature import (
    block_call_bytes,
    blocks_in_order,
    chained_blocks,
    dealt_to,
    layer_curvature,
    my_microbatches,
)
from dist_chita.layerwise.driver import prune_layerwise
from tests import multiproc
from tests.fixtures.layerwise_nets import batches as _batches


def test_blocks_follow_the_first_numeric_component():
    names = ["enc.layer.0.q", "enc.layer.0.k", "enc.layer.1.q", "enc.layer.10.q", "fc1", "pool.dense",
             "enc.layer.1.out"]
    groups = blocks_in_order([(n, None) for n in names])
    assert groups == [[0, 1], [2, 6], [3], [4], [5]]


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


class _Counted(nn.Linear):
    """A Linear that counts its forwards."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("reuse_a", [False, True])
def test_curvature_stops_the_forward_after_the_block_only_when_that_is_safe(reuse_a):
    """Forwards after the first stop at the input of the block's last layer (a, which then does not run), with or
    without the later layers named, and H has the bits of whole forwards; a block layer that runs twice in a forward
    (a shared module) keeps every forward whole."""
    torch.manual_seed(1)
    net = _Chain(reuse_a)
    net.a = _Counted(5, 5)
    batches = _batches(torch.randn(40, 5), 0, 40, 8)  # 5 micro-batches
    cut = layer_curvature([("a", net.a)], net, batches)
    assert net.reached_c == (5 if reuse_a else 1) and net.a.calls == (10 if reuse_a else 1)
    net.reached_c = 0
    with_later = layer_curvature([("a", net.a)], net, batches, later=[net.b, net.c])
    assert net.reached_c == (5 if reuse_a else 1)
    assert torch.equal(cut[0], with_later[0])
    # one micro-batch per call: a first forward, never cut (a's rows per sample: 1 or 2, the same in every batch)
    whole = sum(layer_curvature([("a", net.a)], net, [b])[0] * len(b[0]) for b in batches) / 40
    torch.testing.assert_close(cut[0], whole, rtol=1e-12, atol=0.0)
    rows = [batch for batch, _ in batches]
    X = torch.cat(rows + ([torch.tanh(net.a(r)) @ net.b.weight.T + net.b.bias for r in rows] if reuse_a else []))
    X = X.detach().double()
    torch.testing.assert_close(cut[0], X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)


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


def test_micro_batches_are_dealt_in_rounds_every_other_one_reversed():
    assert list(my_microbatches(iter(range(7)))) == list(range(7))  # world size 1
    got = multiproc.run(lambda: list(my_microbatches(iter(range(7)))), 3)
    assert got == [[0, 5, 6], [1, 4], [2, 3]]
    sizes = [8, 7, 6, 5, 4, 3, 2, 1]  # tokens of micro-batches sorted longest first
    shares = [sum(s for j, s in enumerate(sizes) if dealt_to(j, 2) == r) for r in (0, 1)]
    assert shares == [18, 18]  # every 2nd: 20 and 16


def test_the_chaining_check_runs_on_one_sample():
    """The check of which blocks' calls follow one from another (:func:`chained_blocks`) runs on the first sample of
    the first micro-batch only, and finds what the whole micro-batch shows (blocks 1-3 of _Stack)."""
    from dist_chita.layerwise.curvature import _cached_range

    torch.manual_seed(5)
    x = torch.randn(45, 6)
    model = _Stack()
    names = [f"layers.{j}" for j in range(4)]
    rows = []
    handle = model.layers[0].register_forward_pre_hook(lambda m, args, kwargs: rows.append(args[0].shape[0]),
                                                       with_kwargs=True)
    _, start, stop = _cached_range(model, names, model, lambda: _batches(x, 0, 45, 7), True)
    handle.remove()
    assert (start, stop) == chained_blocks(list(model.layers), model, x[:7]) == (1, 4)
    assert rows == [1, 1]  # the model's forward and block 0 run again on its recorded call
