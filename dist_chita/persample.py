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
its hook fires, so only one layer's gradients exist at a time (streaming). They
are written into one reused buffer (fresh large allocations cost more in page
faults than the arithmetic), valid only during the callback.

The model must be in eval mode: in train mode BatchNorm couples the samples of
a batch and dy[i] would no longer be dl_i/dy[i] (:func:`check_no_batch_coupling`).
Within :class:`PerSampleGrads` the hooked weights do not require grad (the
batched weight gradient is never formed); layer outputs that would then not
require grad are made to (``y + 0`` with a zero leaf).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dist_chita import params

LayerCallback = Callable[[int, torch.Tensor], None]
"""callback(layer_index, grads): grads is (b, numel) float32, row i = grad of l_i w.r.t. the layer's weight.
``grads`` is only valid during the call (it is usually a reused buffer): copy what must be kept; in-place
changes are allowed. It may be non-contiguous: layers without a token dimension give the transposed view of
a contiguous (numel, b) array (``grads.t().is_contiguous()``)."""


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


def _result(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """``out`` (b, numel) viewed as ``shape`` when it can take the result (same dtype), else None."""
    if out is None or out.dtype != like.dtype:
        return None
    return out.view(shape)


def _outer(a: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a: (b, T, m), c: (b, T, k) -> (b, m * k), row i = sum_t a[i, t]^T c[i, t]; written into ``out`` if given.

    For T = 1 (no tokens) the result is laid out sample-minor, (m * k, b) in memory, and returned as its
    transposed (b, m * k) view: computing it that way costs the same, and the column exchange of
    :mod:`dist_chita.fisher` then needs no transpose."""
    b, m, k = a.shape[0], a.shape[-1], c.shape[-1]
    if a.shape[1] == 1:
        aT, cT = a[:, 0].t().contiguous(), c[:, 0].t().contiguous()  # (m, b), (k, b)
        dst = _result(out, (m, k, b), a)
        res = torch.mul(aT[:, None, :], cT[None, :, :], out=dst) if dst is not None else aT[:, None, :] * cT[None, :, :]
        return res.view(m * k, b).t()
    dst = _result(out, (b, m, k), a)
    res = torch.bmm(a.transpose(1, 2), c, out=dst) if dst is not None else torch.bmm(a.transpose(1, 2), c)
    return res.view(b, m * k)


def linear_grad(module: nn.Module, x: torch.Tensor, gy: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """nn.Linear, W (out, in): x (b, ..., in), gy (b, ..., out) -> (b, out * in)."""
    b = x.shape[0]
    x, gy = _work(x).reshape(b, -1, x.shape[-1]), _work(gy).reshape(b, -1, gy.shape[-1])
    return _outer(gy, x, out)


def conv1d_hf_grad(
    module: nn.Module, x: torch.Tensor, gy: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """transformers Conv1D, W (in, out), y = x W + bias: x (b, ..., in), gy (b, ..., out) -> (b, in * out)."""
    b = x.shape[0]
    x, gy = _work(x).reshape(b, -1, x.shape[-1]), _work(gy).reshape(b, -1, gy.shape[-1])
    return _outer(x, gy, out)


def unfold(
    x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], out_size: Sequence[int]
) -> torch.Tensor:
    """im2col of an already padded x (b, C, *spatial) -> (b, C * prod(kernel), prod(out_size)), the same as
    ``F.unfold`` (1-D or 2-D), built as one strided copy of an ``as_strided`` view (faster than aten im2col)."""
    b, c = x.shape[:2]
    sb, sc, *ss = x.stride()
    view = x.as_strided(
        (b, c, *kernel, *out_size),
        (
            sb,
            sc,
            *(d * st for d, st in zip(dilation, ss, strict=True)),
            *(s * st for s, st in zip(stride, ss, strict=True)),
        ),
    )
    return view.reshape(b, c * math.prod(kernel), math.prod(out_size))


def conv_grad(
    module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, gy: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """nn.Conv1d / nn.Conv2d, W (C_out, C_in/G, *k): x (b, C_in, *spatial), gy (b, C_out, *spatial_out)
    -> (b, W.numel()). Padding (any padding mode) is applied to x, which is then unfolded; per group
    g_i = dy_i (C_out/G, L) @ cols_i^T (L, C_in/G * prod(k))."""
    nd = len(params.shape(module.weight)) - 2
    if x.dim() != nd + 2:
        raise ValueError(f"per-sample gradients need a batched input to {type(module).__name__}, got {tuple(x.shape)}")
    b, G = x.shape[0], module.groups
    x, gy = _work(x), _work(gy)
    pads = list(module._reversed_padding_repeated_twice)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    cols = unfold(x, module.kernel_size, module.stride, module.dilation, gy.shape[2:])  # (b, C_in * prod(k), L)
    L = cols.shape[-1]
    if L == 1 and G == 1:  # one output position: an outer product, in the transpose-free layout of _outer
        return _outer(gy.reshape(b, 1, -1), cols.view(b, 1, -1), out)
    cols = cols.view(b * G, -1, L)
    gy = gy.reshape(b * G, -1, L)
    dst = _result(out, (b * G, gy.shape[1], cols.shape[1]), gy)
    res = torch.bmm(gy, cols.transpose(1, 2), out=dst) if dst is not None else torch.bmm(gy, cols.transpose(1, 2))
    return res.view(b, -1)


def functional_grad(module: nn.Module, args: tuple, kwargs: dict, gy: torch.Tensor) -> torch.Tensor:
    """Fallback for any module with a ``.weight``: vmap over samples of grad_W <gy_i, module_W(x_i)>.

    Positional tensor arguments whose dim 0 equals b are split per sample; other
    arguments (and kwargs) are passed unchanged."""
    b = gy.shape[0]
    if params.is_partitioned(module.weight):
        raise ValueError(f"per-sample gradients of {type(module).__name__} layers need the weight, which ZeRO-3 "
                         "partitions; only Linear, Conv1d/Conv2d and Conv1D layers are supported under ZeRO-3")
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
    ``torch.no_grad`` are ignored; a forward inside a backward pass (activation
    checkpointing) raises ValueError. ``scale`` multiplies every gradient (applied
    to dy, so it is free; :func:`dist_chita.fisher.fisher_block` passes 1/sqrt(n)).
    While active, the hooked weights have
    ``requires_grad=False`` (restored on exit).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], callback: LayerCallback, scale: float = 1.0):
        self.scale = float(scale)
        self.names = [name for name, _ in modules]
        self.layers = [_Layer(m, grad_fn_for(m)) for _, m in modules]
        self.callback = callback
        self._handles: list = []
        self._saved_flags: list[bool] = []
        self._busy = False
        self._zeros: dict[torch.dtype, torch.Tensor] = {}
        self._buf: torch.Tensor | None = None
        self._batch = 0  # b of the running backward(): rows of a layer input flattened over tokens are split by it

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
        self._handles, self._saved_flags, self._buf = [], [], None
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
            if torch._C._current_graph_task_id() != -1:
                raise ValueError(
                    f"layer {self.names[index]!r} ran forward inside a backward pass (activation checkpointing?); "
                    "per-sample gradients need it disabled"
                )
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

    def _buffer(self, b: int, numel: int, device: torch.device) -> torch.Tensor:
        """The shared (b, numel) float32 result buffer, grown on demand (reusing it avoids page faults)."""
        if self._buf is None or self._buf.numel() < b * numel or self._buf.device != device:
            self._buf = None
            self._buf = torch.empty(b * numel, dtype=torch.float32, device=device)
        return self._buf[: b * numel].view(b, numel)

    def _per_sample(
        self, layer: _Layer, args: tuple, kwargs: dict, gy: torch.Tensor, out: torch.Tensor | None
    ) -> torch.Tensor:
        if layer.rule == "functional":
            self._busy = True
            try:
                with torch.enable_grad():
                    return functional_grad(layer.module, args, kwargs, gy)
            finally:
                self._busy = False
        x = args[0] if args else next(iter(kwargs.values()))
        if layer.rule == "linear":
            return linear_grad(layer.module, x, gy, out)
        if layer.rule == "conv":
            return conv_grad(layer.module, x, gy, out)
        return conv1d_hf_grad(layer.module, x, gy, out)

    def _on_grad(self, index: int, call: int, gy: torch.Tensor) -> None:
        layer = self.layers[index]
        entry = layer.inputs[call]
        if entry is None or layer.emitted:
            raise RuntimeError(f"layer {self.names[index]!r} got a second gradient; call backward() once per forward")
        layer.inputs[call] = None
        b = self._batch or gy.shape[0]
        if layer.rule in ("linear", "conv1d_hf") and gy.shape[0] != b and gy.dim() == 2 and gy.shape[0] % b == 0:
            # the model flattened (b, T, d) to (b * T, d) before this layer (OPT's fc1 / fc2): sample-major rows
            args, kwargs = entry
            x = args[0] if args else next(iter(kwargs.values()))
            entry = ((x.reshape(b, -1, x.shape[-1]),), {})
            gy = gy.reshape(b, -1, gy.shape[-1])
        # a layer called once writes into the shared buffer; shared-weight layers accumulate in their own tensor
        out = None
        if len(layer.inputs) == 1:
            out = self._buffer(gy.shape[0], params.numel(layer.module.weight), gy.device)
        gy = gy.detach() if self.scale == 1.0 else gy.detach() * self.scale
        g = self._per_sample(layer, *entry, gy, out)
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
        b = self._batch = losses.shape[0]
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
                        layer.total = torch.zeros((b, params.numel(w)), dtype=torch.float32, device=w.device)
                    self._emit(i)
        finally:
            self._batch = 0
            for layer in self.layers:
                layer.reset()
