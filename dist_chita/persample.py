"""Per-sample gradients of prunable weights from one batched forward + backward.

For a micro-batch of b samples with per-sample losses l_i (a (b,) tensor, see
:mod:`dist_chita.losses`), one ``losses.sum().backward()`` gives, for every
prunable layer, the per-sample gradients grad_W l_i, i = 1..b, which are the
rows of the Fisher factor A (before the 1/sqrt(n) scaling) restricted to that
layer's columns.

Mechanism (hooks, no per-sample loop): a forward hook stores the layer input x
and registers a tensor hook on the layer output y; when the backward pass
reaches y the hook receives dy = d(sum_i l_i)/dy, and since sample i's loss only
depends on sample i's rows, dy[i] = dl_i/dy[i]. The per-sample weight gradient
is then formed from (x, dy):

* ``nn.Linear`` (W: (out, in)), x: (b, ..., in): g_i = sum_t dy[i, t]^T x[i, t];
* ``transformers`` ``Conv1D`` (W: (in, out)): g_i = sum_t x[i, t]^T dy[i, t];
* ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, padding mode, dilation,
  groups): x is unfolded (im2col, ``F.unfold``) to (b, C_in k, L) and, per
  group, g_i = dy_i (C_out/G, L) @ cols_i^T;
* any other module with a ``.weight``: torch.func fallback, per sample
  grad_W <dy_i, f_W(x_i)> with ``functional_call`` + ``vmap`` + ``grad``
  (the module must treat dim 0 of its positional tensor inputs as the batch).

Sequence inputs are summed over tokens. Each layer's (b, numel) float32
gradient (flattened like ``weight.reshape(-1)``) goes to a callback as soon as
its hook fires, so only one layer's gradients exist at a time (streaming).

The model must be in eval mode: in train mode BatchNorm couples the samples of
a batch and dy[i] would no longer be dl_i/dy[i] (:func:`check_no_batch_coupling`).
Within :class:`PerSampleGrads` the hooked weights do not require grad (the
batched weight gradient is never formed); layer outputs that would then not
require grad are made to (``y + 0`` with a zero leaf).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

LayerCallback = Callable[[int, torch.Tensor], None]
"""callback(layer_index, grads): grads is (b, numel) float32, row i = grad of l_i w.r.t. layer's weight."""


def _conv1d_hf() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


_CONV1D_HF = _conv1d_hf()


def check_no_batch_coupling(model: nn.Module) -> None:
    """Raise ValueError if a BatchNorm layer of ``model`` is in training mode (it couples the samples)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"BatchNorm layer {name!r} is in training mode; call model.eval() first")


def _work(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _outer(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a: (b, T, m), c: (b, T, k) -> (b, m, k) = sum_t a[:, t]^T c[:, t]."""
    if a.shape[1] == 1:
        return a[:, 0, :, None] * c[:, 0, None, :]
    return torch.bmm(a.transpose(1, 2), c)


def linear_grad(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """nn.Linear, W (out, in): x (b, ..., in), gy (b, ..., out) -> (b, out * in)."""
    b = x.shape[0]
    x, gy = _work(x).reshape(b, -1, x.shape[-1]), _work(gy).reshape(b, -1, gy.shape[-1])
    return _outer(gy, x).reshape(b, -1)


def conv1d_hf_grad(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """transformers Conv1D, W (in, out), y = x W + bias: x (b, ..., in), gy (b, ..., out) -> (b, in * out)."""
    b = x.shape[0]
    x, gy = _work(x).reshape(b, -1, x.shape[-1]), _work(gy).reshape(b, -1, gy.shape[-1])
    return _outer(x, gy).reshape(b, -1)


def conv_grad(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d / nn.Conv2d, W (C_out, C_in/G, *k): x (b, C_in, *spatial), gy (b, C_out, *spatial_out)
    -> (b, W.numel())."""
    nd = module.weight.dim() - 2
    if x.dim() != nd + 2:
        raise ValueError(f"per-sample gradients need a batched input to {type(module).__name__}, got {tuple(x.shape)}")
    b, G = x.shape[0], module.groups
    x, gy = _work(x), _work(gy)
    pads = list(module._reversed_padding_repeated_twice)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    symmetric = module.padding_mode == "zeros" and all(pads[2 * i] == pads[2 * i + 1] for i in range(nd))
    if symmetric:
        padding = tuple(reversed(pads[::2]))
    else:
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        padding = (0,) * nd
    if nd == 1:
        x, kernel, stride, dilation, padding = (
            x.unsqueeze(2),
            (1, *kernel),
            (1, *stride),
            (1, *dilation),
            (0, *padding),
        )
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (b, C_in * prod(k), L)
    L = cols.shape[-1]
    cols = cols.view(b, G, -1, L)
    gy = gy.reshape(b, G, -1, L)
    return torch.matmul(gy, cols.transpose(-1, -2)).reshape(b, -1)


def functional_grad(module: nn.Module, args: tuple, kwargs: dict, gy: torch.Tensor) -> torch.Tensor:
    """Fallback for any module with a ``.weight``: vmap over samples of grad_W <gy_i, module_W(x_i)>.

    Positional tensor arguments whose dim 0 equals b are split per sample; other
    arguments (and kwargs) are passed unchanged."""
    b = gy.shape[0]
    in_dims = tuple(0 if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == b else None for a in args)
    weight = module.weight.detach()

    def inner(w, a, g):
        a = tuple(t.unsqueeze(0) if d == 0 else t for t, d in zip(a, in_dims, strict=True))
        out = functional_call(module, {"weight": w}, a, kwargs, strict=False)
        return (out * g.unsqueeze(0)).sum()

    per = vmap(grad(inner), in_dims=(None, in_dims, 0))(weight, args, gy)
    return per.reshape(b, -1).float()


def grad_fn_for(module: nn.Module) -> str:
    """Which rule computes ``module``'s per-sample gradients: 'linear', 'conv', 'conv1d_hf' or 'functional'."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if _CONV1D_HF is not None and isinstance(module, _CONV1D_HF):
        return "conv1d_hf"
    return "functional"


class _Layer:
    def __init__(self, module: nn.Module, rule: str):
        self.module, self.rule = module, rule
        self.inputs: list[tuple[tuple, dict] | None] = []
        self.total: torch.Tensor | None = None
        self.received = 0
        self.emitted = False

    def reset(self) -> None:
        self.inputs, self.total, self.received, self.emitted = [], None, 0, False


class PerSampleGrads:
    """Hooks on ``modules`` that stream per-sample weight gradients to ``callback``.

    Usage::

        with PerSampleGrads(modules, callback) as psg:
            for batch in ...:
                losses = loss_fn(model, batch, indices)   # (b,)
                psg.backward(losses)                       # callback(g, (b, numel_g)) once per layer g

    ``modules``: the ordered (name, module) list of :mod:`dist_chita.prunable`;
    the callback's layer index refers to it. ``callback`` is called exactly once
    per layer per :meth:`backward`, mostly from inside the backward pass in the
    order the hooks fire; layers whose output did not reach the loss get zeros
    after the backward pass. A layer that was not called in the forward pass
    raises ValueError. A module called several times in one forward gets the
    sum of the contributions (shared weights). Forward passes under
    ``torch.no_grad`` are ignored. While active, the hooked weights have
    ``requires_grad=False`` (restored on exit).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], callback: LayerCallback):
        self.names = [name for name, _ in modules]
        self.layers = [_Layer(m, grad_fn_for(m)) for _, m in modules]
        self.callback = callback
        self._handles: list = []
        self._saved_flags: list[bool] = []
        self._busy = False
        self._zeros: dict[torch.dtype, torch.Tensor] = {}

    def __enter__(self) -> PerSampleGrads:
        for i, layer in enumerate(self.layers):
            self._handles.append(
                layer.module.register_forward_hook(self._make_forward_hook(i), with_kwargs=True, always_call=False)
            )
            self._saved_flags.append(layer.module.weight.requires_grad)
            layer.module.weight.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for layer, flag in zip(self.layers, self._saved_flags, strict=False):
            layer.module.weight.requires_grad_(flag)
        self._handles, self._saved_flags = [], []
        for layer in self.layers:
            layer.reset()

    def _zero(self, t: torch.Tensor) -> torch.Tensor:
        z = self._zeros.get(t.dtype)
        if z is None or z.device != t.device:
            z = self._zeros[t.dtype] = torch.zeros((), dtype=t.dtype, device=t.device, requires_grad=True)
        return z

    def _make_forward_hook(self, index: int):
        def hook(module, args, kwargs, output):
            if self._busy or not torch.is_grad_enabled():
                return None
            if not torch.is_tensor(output):
                raise TypeError(f"layer {self.names[index]!r} returns {type(output).__name__}, expected a tensor")
            layer = self.layers[index]
            call = len(layer.inputs)
            args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            layer.inputs.append((args, kwargs))
            replaced = None
            if not output.requires_grad:
                output = replaced = output + self._zero(output)
            output.register_hook(lambda gy: self._on_grad(index, call, gy))
            return replaced

        return hook

    def _per_sample(self, layer: _Layer, args: tuple, kwargs: dict, gy: torch.Tensor) -> torch.Tensor:
        if layer.rule == "functional":
            self._busy = True
            try:
                with torch.enable_grad():
                    return functional_grad(layer.module, args, kwargs, gy)
            finally:
                self._busy = False
        x = args[0] if args else next(iter(kwargs.values()))
        if layer.rule == "linear":
            return linear_grad(layer.module, x, gy)
        if layer.rule == "conv":
            return conv_grad(layer.module, x, gy)
        return conv1d_hf_grad(layer.module, x, gy)

    def _on_grad(self, index: int, call: int, gy: torch.Tensor) -> None:
        layer = self.layers[index]
        entry = layer.inputs[call]
        if entry is None or layer.emitted:
            raise RuntimeError(f"layer {self.names[index]!r} got a second gradient; call backward() once per forward")
        layer.inputs[call] = None
        g = self._per_sample(layer, *entry, gy.detach())
        if g.dtype != torch.float32:
            g = g.float()
        layer.total = g if layer.total is None else layer.total.add_(g)
        layer.received += 1
        if layer.received == len(layer.inputs):
            self._emit(index)

    def _emit(self, index: int) -> None:
        layer = self.layers[index]
        layer.emitted = True
        total, layer.total = layer.total, None
        self.callback(index, total)

    def backward(self, losses: torch.Tensor) -> None:
        """Run ``losses.sum().backward()`` (losses: (b,) per-sample l_i) and deliver every layer's gradients."""
        if losses.dim() != 1:
            raise ValueError(f"losses must be a (b,) tensor of per-sample losses, got shape {tuple(losses.shape)}")
        b = losses.shape[0]
        try:
            for i, layer in enumerate(self.layers):
                if not layer.inputs:
                    raise ValueError(
                        f"layer {self.names[i]!r} was not called in the forward pass "
                        "(is its weight used functionally? exclude it from the prunable layers)"
                    )
            if losses.requires_grad:
                losses.sum().backward()
            for i, layer in enumerate(self.layers):
                if not layer.emitted:
                    w = layer.module.weight
                    if layer.total is None:
                        layer.total = torch.zeros((b, w.numel()), dtype=torch.float32, device=w.device)
                    self._emit(i)
        finally:
            for layer in self.layers:
                layer.reset()
