import gc
import math
import mmap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dist_chita.distributed import comm
from dist_chita.distributed.layout import ColumnLayout
from dist_chita.distributed.partition import sample_ranges
from dist_chita.fisher import factor, ntstore
from dist_chita.fisher.factor import empty_block, fisher_block
from dist_chita.fisher.losses import cross_entropy, sampled_fisher
from dist_chita.prunable import named_shapes, prunable_modules
from tests.multiproc import run


class Net(nn.Module):
    """Conv2d (stride 2, padding 1, dilation 2, groups 2) -> Linear -> HF Conv1D -> Linear head (not pruned).

    ``gpt`` is registered before ``fc``, so the backward pass reaches the layers out of the exchange order
    (reverse layer order: fc, gpt, conv) and fisher_block must buffer one of them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2)
        self.gpt = Conv1D(6, 8)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.gpt(torch.tanh(self.fc(h)))))


def setup(n):
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def make_loss(name):
    if name == "ce":
        return cross_entropy()
    if name == "sampled":
        return sampled_fisher(seed=3)

    ce = cross_entropy()
    if name == "bad_shape":
        return lambda model, batch, idx: ce(model, batch, idx)[: 1 if 6 in idx else None]

    def nan_loss(model, batch, idx):  # sample 5 has a NaN loss
        return ce(model, batch, idx) * torch.where(idx == 5, float("nan"), 1.0)

    return nan_loss


def full_A(n, loss_name):
    """Single-process truth: loop over samples, torch.autograd.grad of l_i, divided by sqrt(n)."""
    model, x, y = setup(n)
    model.eval()
    weights = [m.weight for _, m in prunable_modules(model)]
    loss = make_loss(loss_name)
    rows = []
    for i in range(n):
        li = loss(model, {"x": x[i : i + 1], "labels": y[i : i + 1]}, torch.tensor([i]))[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, weights)]))
    return torch.stack(rows) / math.sqrt(n)


def rank_block(n, micro, dtype, loss_name, align=1, reuse=False):
    torch.set_num_threads(1)
    model, x, y = setup(n)
    modules = prunable_modules(model)
    layout = ColumnLayout.build(named_shapes(modules), comm.world_size(), align)
    lo, hi = sample_ranges(n, comm.world_size())[comm.rank()]
    batches = [
        ({"x": x[a : min(a + micro, hi)], "labels": y[a : min(a + micro, hi)]}, range(a, min(a + micro, hi)))
        for a in range(lo, hi, micro)
    ]
    stats, seen = {}, []
    a, b = layout.block(comm.rank())
    out = torch.full((b - a, n), float("nan"), dtype=dtype) if reuse else None  # a spent block's storage
    at = fisher_block(
        model,
        modules,
        layout,
        batches,
        lo,
        n,
        make_loss(loss_name),
        dtype=dtype,
        progress=lambda d, t: seen.append((d, t)),
        stats=stats,
        out=out,
    )
    assert all(m.weight.grad is None and m.weight.requires_grad for _, m in modules)
    assert not reuse or at is out
    return at, layout.block(comm.rank()), stats, seen, hi - lo


@pytest.mark.parametrize("n", [7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_block_matches_single_process_autograd(world, n):
    truth = full_A(n, "ce")
    p = truth.shape[1]
    results = run(rank_block, world, n, 3, torch.float32, "ce")
    for at, (a, b), stats, seen, n_r in results:
        assert at.shape == (b - a, n) and at.dtype == torch.float32
        torch.testing.assert_close(at, truth[:, a:b].T, rtol=1e-5, atol=1e-7)
        assert seen[-1] == (n, n)
        steps = len(seen) + 1  # + the final all_gather that ends the loop
        if world > 1:  # payload: this rank's per-sample gradient rows over the columns of the OTHER ranks, + one
            # (4,) int64 per step: its own columns are written into At without a send (and outer-product layers
            # it owns whole are computed straight into At)
            assert stats["bytes"] == n_r * (p - (b - a)) * 4 + steps * 4 * 8
        else:
            assert stats["bytes"] == 0
        assert stats["seconds"] >= stats["exchange_seconds"] > 0
    assert sum(r[0].shape[0] for r in results) == p


def kernel_in_use():
    return ntstore.available()


def test_block_without_the_streaming_store_kernel(monkeypatch):
    """The same factor with torch's copies and products alone (the ranks are forked: they inherit the switch)."""
    monkeypatch.setattr(ntstore, "_lib", False)
    assert run(kernel_in_use, 3) == [False] * 3
    n = 10
    truth = full_A(n, "ce")
    for at, (a, b), *_ in run(rank_block, 3, n, 3, torch.float32, "ce"):
        torch.testing.assert_close(at, truth[:, a:b].T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("world", [1, 3])
def test_block_written_into_given_storage(world):
    """``out`` (the previous CHITA++ stage's block, here full of NaN) is overwritten entirely and returned."""
    n = 10
    truth = full_A(n, "ce")
    for at, (a, b), *_ in run(rank_block, world, n, 3, torch.float32, "ce", 1, True):
        torch.testing.assert_close(at, truth[:, a:b].T, rtol=1e-5, atol=1e-7)


def test_sampled_fisher_bfloat16_and_aligned_blocks():
    n = 10
    truth = full_A(n, "sampled")
    results = run(rank_block, 3, n, 4, torch.bfloat16, "sampled", 4)
    for at, (a, b), *_ in results:
        assert at.dtype == torch.bfloat16 and a % 4 == 0
        torch.testing.assert_close(at.float(), truth[:, a:b].T, rtol=1e-2, atol=1e-3)
    assert not torch.allclose(truth, full_A(n, "ce"))  # the sampled labels are not the given ones
    # one rank owns every layer: fc and gpt are computed straight into the bfloat16 At (cast on store)
    ((at, (a, b), stats, *_),) = run(rank_block, 1, n, 4, torch.bfloat16, "sampled")
    assert at.dtype == torch.bfloat16 and (a, b) == (0, truth.shape[1])
    torch.testing.assert_close(at.float(), truth.T, rtol=1e-2, atol=1e-3)


def test_non_finite_gradient_raises_on_every_rank_naming_the_layer():
    with pytest.raises(RuntimeError, match=r"non-finite.*'conv'"):
        run(rank_block, 2, 8, 2, torch.float32, "nan")
    with pytest.raises(ValueError, match=r"non-finite.*'conv'"):
        rank_block(8, 3, torch.float32, "nan")


def test_empty_block_is_an_ordinary_writable_tensor():
    """A 64 MB block is an anonymous mapping (Linux), populated: an ordinary contiguous writable tensor, and it
    is released with its last reference (its pages show in this process's resident memory from allocation on)."""

    def resident() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * mmap.PAGESIZE

    before = resident()
    at = empty_block((2048, 8192), torch.float32, torch.device("cpu"))
    if hasattr(mmap, "MADV_DONTNEED") and Path("/proc/self/statm").exists():
        assert resident() - before > 60 << 20  # populated before any write
        probe = empty_block((2048, 8192), torch.float32, torch.device("cpu"))
        mid = resident()
        del probe
        gc.collect()
        assert mid - resident() > 60 << 20  # unmapped with its last reference
    assert at.shape == (2048, 8192) and at.dtype == torch.float32 and at.is_contiguous()
    at[:, 1::2] = 2.0
    at[:, ::2] = -1.0
    assert at.sum().item() == 2048 * 4096 and at[-1, -1].item() == 2.0
    small = empty_block((3, 5), torch.bfloat16, torch.device("cpu"))
    assert small.shape == (3, 5) and small.dtype == torch.bfloat16
    half = empty_block((4096, 8192), torch.float16, torch.device("cpu"))
    half.fill_(1.5)
    assert half.dtype == torch.float16 and half.float().mean().item() == 1.5


def test_empty_block_huge_page_path(monkeypatch):
    """Blocks from _HUGE_PAGE_MIN_BYTES on (1 GiB; lowered here to 64 MiB) are mapped on 2 MiB boundaries for
    transparent huge pages, and are ordinary writable tensors too."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no transparent huge pages on this platform")
    monkeypatch.setattr(factor, "_HUGE_PAGE_MIN_BYTES", 64 << 20)
    at = empty_block((2048, 8192), torch.float32, torch.device("cpu"))
    assert at.data_ptr() % (2 << 20) == 0 and at.shape == (2048, 8192) and at.is_contiguous()
    at.fill_(3.0)
    assert at.sum().item() == 3.0 * 2048 * 8192
    below = empty_block((2048, 8191), torch.float32, torch.device("cpu"))  # 64 MiB - 8 KiB: small pages
    below.fill_(1.0)
    assert below.sum().item() == 2048 * 8191

    def advised_huge(t: torch.Tensor) -> bool:
        """Whether the mapping holding t has the MADV_HUGEPAGE flag ("hg" in /proc/self/smaps VmFlags)."""
        inside = False
        for line in open("/proc/self/smaps"):
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= t.data_ptr() < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
        raise AssertionError("mapping not found")

    if Path("/proc/self/smaps").exists():
        assert advised_huge(at) and not advised_huge(below)


def test_overflow_in_a_layer_computed_straight_into_at_is_caught():
    """At world size 1 the token-free Linear layers are computed in place into a float16 At; x * 1e6 makes
    layer '0''s gradients (dy x^T) overflow float16 (but not float32), which the end-of-batches check finds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    modules = prunable_modules(model)
    layout = ColumnLayout.build(named_shapes(modules), 1)
    batches = [({"x": torch.randn(6, 4) * 1e6, "labels": torch.randint(0, 3, (6,))}, range(6))]
    at = fisher_block(model, modules, layout, batches, 0, 6, cross_entropy(), dtype=torch.float32)
    assert torch.isfinite(at).all() and at.abs().max() > 7e4
    with pytest.raises(ValueError, match=r"non-finite per-sample gradient .* layer '0'"):
        fisher_block(model, modules, layout, batches, 0, 6, cross_entropy(), dtype=torch.float16)


def test_bad_arguments():
    model, x, y = setup(4)
    modules = prunable_modules(model)
    layout = ColumnLayout.build(named_shapes(modules), 1)
    batches = [({"x": x, "labels": y}, range(4))]
    with pytest.raises(ValueError, match="sample_start"):
        fisher_block(model, modules, layout, batches, 1, 4, cross_entropy())
    with pytest.raises(ValueError, match="does not match"):
        fisher_block(model, modules[::-1], ColumnLayout.build(named_shapes(modules), 1), batches, 0, 4, cross_entropy())
    with pytest.raises(ValueError, match="never given"):
        fisher_block(model, modules, layout, [({"x": x[:3], "labels": y[:3]}, range(3))], 0, 4, cross_entropy())
    with pytest.raises(ValueError, match="contiguous"):
        fisher_block(model, modules, layout, [({"x": x, "labels": y}, [0, 2, 1, 3])], 0, 4, cross_entropy())
    p = layout.block(0)[1]
    for bad in (torch.empty(p, 5), torch.empty(p, 4, dtype=torch.bfloat16), torch.empty(4, p).t()):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            fisher_block(model, modules, layout, batches, 0, 4, cross_entropy(), out=bad)
    model.train()
    fisher_block(model, modules, layout, batches, 0, 4, cross_entropy())
    assert model.training  # mode restored


def rank_error(*args):
    """rank_block's exception as (type name, message) on this rank, None if it returned."""
    try:
        rank_block(*args)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def test_error_on_one_rank_is_raised_on_every_rank_at_once():
    """The other ranks raise at once with the failing rank's name (had they waited for the process group's timeout,
    their error would be the collective's timeout instead)."""
    errors = run(rank_error, 2, 8, 2, torch.float32, "bad_shape")  # rank 1's loss has the wrong shape
    assert errors[1][0] == "ValueError" and "loss_fn must return a (2,) tensor" in errors[1][1]
    assert errors[0] == ("RuntimeError", "rank 1: its batches or loss_fn raised during fisher_block")
    errors = run(rank_error, 3, 9, 2, torch.float32, "nan")
    assert all(e[0] == "ValueError" and "non-finite" in e[1] and "'conv'" in e[1] for e in errors)
