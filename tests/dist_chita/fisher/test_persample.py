import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from dist_chita.fisher import ntstore, persample
from dist_chita.fisher.persample import PerSampleGrads, Scratch, check_no_batch_coupling, grad_fn_for, unfold, zero_pad


class TanhLinear(nn.Module):
    """A module type the hook rules do not know: y = tanh(x W^T) (torch.func fallback)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.weight.t())


class Shared(nn.Module):
    """One Linear applied twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def per_sample_losses(out, seed=0):
    """Nonlinear per-sample losses l_i(out[i]) (b,)."""
    c = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (torch.sin(out) * c).flatten(1).sum(1) + (out**2).flatten(1).sum(1) * 0.1


def autograd_truth(model, modules, x):
    """Loop over samples: torch.autograd.grad of l_i w.r.t. each layer's weight -> list of (b, numel)."""
    losses = per_sample_losses(model(x))
    weights = [m.weight for _, m in modules]
    rows = [torch.autograd.grad(losses[i], weights, retain_graph=True) for i in range(x.shape[0])]
    return [torch.stack([r[g].reshape(-1) for r in rows]) for g in range(len(weights))]


def hooked(model, modules, x):
    got = {}

    def cb(index, g):
        assert index not in got, "callback called twice for a layer"
        assert g.dtype == torch.float32 and g.shape == (x.shape[0], modules[index][1].weight.numel())
        got[index] = g.clone()

    with PerSampleGrads(modules, cb) as psg:
        psg.backward(per_sample_losses(model(x)))
    return [got[i] for i in range(len(modules))]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def check(model, x, modules=None):
    model.eval()
    if modules is None:
        modules = [(n, m) for n, m in model.named_modules() if getattr(m, "weight", None) is not None and n]
    truth = autograd_truth(model, modules, x)
    got = hooked(model, modules, x)
    for (name, _), a, t in zip(modules, got, truth, strict=True):
        assert t.norm() > 0, name
        assert rel_err(a, t) <= 1e-5, (name, rel_err(a, t))
    for _, m in modules:  # state restored, no batched gradient accumulated
        assert m.weight.requires_grad and m.weight.grad is None
    return modules


@pytest.fixture(params=["native", "torch"])
def native(request, monkeypatch):
    """Run a test with the streaming-store kernel of dist_chita.fisher.ntstore and with torch alone."""
    if request.param == "torch":
        monkeypatch.setattr(ntstore, "_lib", False)
    elif not ntstore.available():
        pytest.skip("streaming-store kernel unavailable")
    return request.param == "native"


def test_linear_2d(native):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    check(model, torch.randn(7, 5))


def test_linear_3d_sums_over_tokens():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3))
    check(model, torch.randn(4, 9, 5))


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2),
        dict(in_channels=3, out_channels=4, kernel_size=(2, 3), padding="same", padding_mode="reflect"),
        dict(in_channels=2, out_channels=4, kernel_size=3, stride=(1, 2), padding=(2, 0), padding_mode="circular"),
        dict(in_channels=3, out_channels=4, kernel_size=(2, 4), padding="same"),  # asymmetric zero padding
    ],
)
def test_conv2d(conv):
    torch.manual_seed(2)
    c_in = conv["in_channels"]
    model = nn.Sequential(nn.Conv2d(**conv), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, c_in, 9, 8)
    model(x)  # materialise the lazy layer
    check(model, x)


def test_conv2d_single_output_position(native):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(5, 2))
    check(model, torch.randn(4, 3, 3, 3))


@pytest.mark.parametrize("size", [4, 5, 6])  # output maps 2 x 2 (L = 4), 2 x 3 (6), 3 x 3 (9: beyond the limit)
def test_conv2d_few_output_positions(native, size):
    """Convolutions with at most MINOR_MAX_POSITIONS output positions are summed outer products, laid out
    sample-minor with the kernel; more positions, or torch alone, the batched product, sample-major."""
    torch.manual_seed(12)
    conv = nn.Conv2d(3, 5, 3, stride=(2, 1 if size == 5 else 2), padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(6, 3, size, size if size != 5 else 2)
    L = math.prod(model[0](x).shape[2:])
    model(x)
    layouts = []

    def cb(i, g):
        layouts.append(persample.sample_minor(g))

    modules = check(model, x)
    with PerSampleGrads(modules[:1], cb) as psg:
        psg.backward(per_sample_losses(model(x)))
    assert layouts == [native and L <= persample.MINOR_MAX_POSITIONS]


@pytest.mark.parametrize(
    "shape, kernel, stride, dilation, pads",
    [
        ((2, 3, 9, 8), (3, 2), (2, 1), (1, 2), (1, 0, 2, 1)),
        ((3, 4, 11), (3,), (2,), (2,), (2, 1)),
        ((2, 5, 1, 1), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    ],
)
def test_unfold_and_zero_pad_match_torch(shape, kernel, stride, dilation, pads, monkeypatch):
    """index_select im2col into a scratch buffer == F.unfold (2-D; 1-D as a height-1 image); zero_pad == F.pad,
    also in the scratch buffer (used for large inputs only: the threshold lowered to 0 here)."""
    monkeypatch.setattr(persample, "PAD_SCRATCH_MIN_BYTES", 0)
    x = torch.randn(shape)
    scratch = Scratch()
    scratch.get("pad", (10**4,), x).fill_(float("nan"))  # stale contents must not leak into the border
    xp = zero_pad(x, pads, scratch)
    assert torch.equal(xp, F.pad(x, pads))
    out_size = [
        (s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(xp.shape[2:], kernel, stride, dilation, strict=True)
    ]
    numel = shape[0] * shape[1] * math.prod(kernel) * math.prod(out_size)
    cols = unfold(xp, kernel, stride, dilation, out_size, scratch.get("cols", (numel,), x))
    if len(kernel) == 1:
        kernel, stride, dilation, xp = (1, *kernel), (1, *stride), (1, *dilation), xp.unsqueeze(2)
    assert torch.equal(cols, F.unfold(xp, kernel, dilation=dilation, stride=stride))


def test_buffers_reused_across_steps_of_other_sizes():
    """Two backward passes with different batch and image sizes through the same hooks (reused result and
    scratch buffers): both match autograd."""
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    ).eval()
    modules = [("0", model[0]), ("2", model[2]), ("5", model[5])]
    xs = [torch.randn(5, 3, 9, 9), torch.randn(3, 3, 5, 5)]
    truths = [autograd_truth(model, modules, x) for x in xs]
    got = []
    with PerSampleGrads(modules, lambda i, g: got.append((i, g.clone()))) as psg:
        for x, truth in zip(xs, truths, strict=True):
            got.clear()
            psg.backward(per_sample_losses(model(x)))
            assert sorted(i for i, _ in got) == [0, 1, 2]
            for i, g in got:
                assert rel_err(g, truth[i]) <= 1e-5, i


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_target_takes_sample_minor_layers_in_place(native, dtype):
    """``target`` is asked for the layers computed sample-minor only (token-free Linear layers; with the
    kernel also a convolution with 4 output positions); their gradients are written straight into it (here
    columns of a (numel, n) block, as At: float32 by the kernel, float16 by torch), the callback receives the
    target itself. Another layout (tokens) does not ask."""
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3)
    ).eval()
    modules = [("0", model[0]), ("3", model[3]), ("5", model[5])]
    x = torch.randn(4, 2, 4, 4)
    truth = autograd_truth(model, modules, x)
    blocks = [torch.full((m.weight.numel(), 7), float("nan"), dtype=dtype) for _, m in modules]
    asked, got = [], {}

    def target(i, b):
        asked.append(i)
        return blocks[i][:, 2 : 2 + b].t()

    with PerSampleGrads(modules, lambda i, g: got.update({i: g}), target=target) as psg:
        psg.backward(per_sample_losses(model(x)))
    assert sorted(asked) == ([0, 1, 2] if native else [1, 2])
    tol = dict(rtol=2e-3, atol=1e-4) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    for i in sorted(asked):
        block = blocks[i]
        assert got[i].data_ptr() == block[:, 2:].data_ptr() and got[i].dtype == dtype
        torch.testing.assert_close(block[:, 2:6].t().float(), truth[i], **tol)
        assert block[:, :2].isnan().all() and block[:, 6:].isnan().all()  # nothing written outside
    if not native:
        assert blocks[0].isnan().all() and rel_err(got[0], truth[0]) <= 1e-5
    linears = modules[1:]
    with PerSampleGrads(linears, lambda i, g: None, target=target) as psg:  # tokens: the target is not asked
        asked.clear()
        psg.backward(per_sample_losses(model[3:](torch.randn(4, 3, 16))))
    assert asked == []


def test_conv1d_and_batchnorm_eval():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Conv1d(6, 2, 2, padding="same"),
    )
    model[1].running_mean.normal_()
    check(model, torch.randn(5, 4, 11))


def test_hf_conv1d():
    torch.manual_seed(4)
    model = nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(3, 6))
    assert model[0].weight.shape == (5, 6)  # (in, out)
    assert grad_fn_for(model[0]) == "conv1d_hf"
    check(model, torch.randn(4, 7, 5))
    check(model, torch.randn(4, 5))


def test_functional_fallback():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 4), TanhLinear(4, 6), nn.Linear(6, 2))
    assert grad_fn_for(model[1]) == "functional"
    check(model, torch.randn(6, 3, 5))


def test_shared_weights_sum_over_calls():
    torch.manual_seed(6)
    model = Shared()
    check(model, torch.randn(5, 4), modules=[("lin", model.lin), ("out", model.out)])


def test_first_layer_without_grad_input_and_all_params_frozen():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    modules = [("0", model[0]), ("2", model[2])]
    x = torch.randn(4, 5)
    truth = autograd_truth(model, modules, x)
    for p in model.parameters():
        p.requires_grad_(False)
    got = hooked(model, modules, x)
    for a, t in zip(got, truth, strict=True):
        assert rel_err(a, t) <= 1e-5


def test_streaming_order_and_unused_layer_gets_zeros():
    torch.manual_seed(8)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            self.unused(h)  # called, output not part of the loss
            return self.b(h)

    model = TwoHeads()
    modules = [("a", model.a), ("b", model.b), ("unused", model.unused)]
    calls = []
    with PerSampleGrads(modules, lambda i, g: calls.append((i, g.clone()))) as psg:
        psg.backward(per_sample_losses(model(torch.randn(3, 3))))
    assert [i for i, _ in calls] == [1, 0, 2]  # backward order, then the unused layer
    assert calls[2][1].shape == (3, 8) and not calls[2][1].any()


def test_layer_not_called_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    extra = nn.Linear(3, 3)
    with PerSampleGrads([("0", model[0]), ("extra", extra)], lambda i, g: None) as psg:
        with pytest.raises(ValueError, match="extra"):
            psg.backward(model(torch.randn(2, 3)).sum(1))


def test_batchnorm_in_training_mode_is_rejected():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="BatchNorm"):
        check_no_batch_coupling(model)
    model.eval()
    check_no_batch_coupling(model)


def test_activation_checkpointing_is_rejected():
    from torch.utils.checkpoint import checkpoint

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(2, 3, requires_grad=True)
    with PerSampleGrads([("0", model[0])], lambda i, g: None) as psg:
        with pytest.raises(ValueError, match="checkpointing"):
            psg.backward(checkpoint(model, x, use_reentrant=False).sum(1))
