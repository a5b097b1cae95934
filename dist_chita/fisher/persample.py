"""Per-sample gradients of prunable weights from one batched forward + backward.

For a micro-batch of b samples with per-sample losses l_i (a (b,) tensor, see
:mod:`dist_chita.fisher.losses`), one ``losses.sum().backward()`` gives, for every
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
  groups): x is padded and unfolded (im2col, one ``index_select``, into reused
  scratch buffers) to (b, C_in k, L) and, per group, g_i = dy_i (C_out/G, L) @ cols_i^T
  (one bmm into the result buffer); for L = 1 (one output position) an outer product, and for a few
  positions (L <= ``MINOR_MAX_POSITIONS``, groups = 1) a sum of L outer products laid out sample-minor, when
  the streaming-store kernel of :mod:`dist_chita.fisher.ntstore` is available;
* any other module with a ``.weight``: torch.func fallback, per sample
  grad_W <dy_i, f_W(x_i)> with ``functional_call`` + ``vmap`` + ``grad``
  (the module must treat dim 0 of its positional tensor inputs as the batch).

Sequence inputs are summed over tokens. Each layer's (b, numel) float32
gradient (flattened like ``weight.reshape(-1)``) goes to a callback as soon as
its hook fires, so only one layer's gradients exist at a time (streaming). They
are written into one reused buffer (fresh large allocations cost more in page
faults than the arithmetic), valid only during the callback; layers computed
sample-minor (outer products) can instead be written straight into a caller's
destination (``target``, e.g. the columns of At in :func:`dist_chita.fisher.factor.fisher_block`).
On x86 CPUs the sample-minor products are written with streaming stores
(:mod:`dist_chita.fisher.ntstore`, about 1.9x torch's write rate); elsewhere with torch.

The model must be in eval mode: in train mode BatchNorm couples the samples of
a batch and dy[i] would no longer be dl_i/dy[i] (:func:`check_no_batch_coupling`).
Within :class:`PerSampleGrads` the hooked weights do not require grad (the
batched weight gradient is never formed); layer outputs that would then not
require grad are made to (``y + 0`` with a zero leaf).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dist_chita.fisher import ntstore
from dist_chita.io import params

LayerCallback = Callable[[int, torch.Tensor], None]
"""callback(layer_index, grads): grads is (b, numel) float32 (or the dtype of a ``target`` it was written into),
row i = grad of l_i w.r.t. the layer's weight.
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


def _into(out: torch.Tensor | None, res: torch.Tensor) -> torch.Tensor:
    """``res`` (b, numel) copied into the destination ``out`` if given (and not already there)."""
    if out is None or (out.data_ptr() == res.data_ptr() and out.stride() == res.stride() and out.dtype == res.dtype):
        return res
    return out.copy_(res)


def _bmm(a: torch.Tensor, c: torch.Tensor, b: int, out: torch.Tensor | None) -> torch.Tensor:
    """a (B, m, t) @ c (B, t, k) -> (b, B / b * m * k) (B = b * groups): straight into ``out`` when it is
    contiguous in a's dtype, else computed and copied into it."""
    B, m, k = a.shape[0], a.shape[1], c.shape[2]
    if out is not None and out.is_contiguous() and out.dtype == a.dtype:
        torch.bmm(a, c, out=out.view(B, m, k))
        return out
    return _into(out, torch.bmm(a, c).view(b, -1))


def sample_minor(out: torch.Tensor) -> bool:
    """Whether the (b, numel) tensor ``out`` is laid out sample-minor (``out.t()`` has unit-stride rows, as
    the (numel, b) shared buffer or a column block of At): what outer products write fastest."""
    return out.shape[0] == 1 or out.stride(0) == 1


def _outer(a: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a: (b, T, m), c: (b, T, k) -> (b, m * k), row i = sum_t a[i, t]^T c[i, t].

    ``out``: optional (b, m * k) destination of any strides and float dtype, written and returned. For T = 1
    (no tokens) the result is computed sample-minor, (m * k, b) in memory (returned as its transposed
    (b, m * k) view when ``out`` is None): computing it that way costs the same, and the column exchange
    of :mod:`dist_chita.fisher.factor` then needs no transpose."""
    b, m, k = a.shape[0], a.shape[-1], c.shape[-1]
    if a.shape[1] == 1:
        aT, cT = a[:, 0].t().contiguous(), c[:, 0].t().contiguous()  # (m, b), (k, b)
        if out is None:
            res = torch.empty((m * k, b), dtype=aT.dtype, device=aT.device)
            if ntstore.outer_sum(aT[:, None, :], cT[:, None, :], res):
                return res.t()
            return torch.mul(aT[:, None, :], cT[None, :, :], out=res.view(m, k, b)).view(m * k, b).t()
        if sample_minor(out):  # written in place, any strides (e.g. a column block of At), cast on store
            if not ntstore.outer_sum(aT[:, None, :], cT[:, None, :], out.t()):
                torch.mul(aT[:, None, :], cT[None, :, :], out=out.t().view(m, k, b))
            return out
        return out.copy_((aT[:, None, :] * cT[None, :, :]).view(m * k, b).t())
    return _bmm(a.transpose(1, 2), c, b, out)


MINOR_MAX_POSITIONS = 8
"""A convolution (groups = 1) with at most this many output positions L is computed sample-minor, as a sum of
L outer products, when :mod:`dist_chita.fisher.ntstore` is available: written with streaming stores that beats the
batched matrix product's sample-major writes up to about 8 positions (the 2 x 2 maps of a ResNet's third stage on
32 x 32 images: 22-24 against 15-17 GB/s; 8 positions: 12 against 12; 9: 10.7 against 11.1)."""


def minor_conv(positions: int, device: torch.device) -> bool:
    """Whether a convolution (groups = 1) with ``positions`` output positions per sample has its gradients
    computed sample-minor (then ``target`` / the shared buffer are laid out that way)."""
    return positions == 1 or (positions <= MINOR_MAX_POSITIONS and device.type == "cpu" and ntstore.available())


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


class Scratch:
    """Reused flat work buffers, one per slot name, grown on demand and freed by :meth:`clear`.

    On this kind of machine a fresh large allocation costs more in page faults (first touch of every
    4 KiB page) than the arithmetic done on it, so the transient tensors of a rule (padded input,
    im2col columns; the exchange buffers of :mod:`dist_chita.fisher.factor`) live here instead."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device (valid until the next
        ``get`` of the same slot)."""
        numel = math.prod(shape)
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            self._bufs.pop(slot, None)
            buf = self._bufs[slot] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(tuple(shape))

    def clear(self) -> None:
        self._bufs = {}


@functools.lru_cache(maxsize=64)
def _im2col_index(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    out_size: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """Flat positions in a contiguous image of shape ``spatial`` of the im2col entries, ordered
    (*kernel, *out_size): entry (t, o) reads position sum_d (t_d dilation_d + o_d stride_d) * step_d."""
    nd = len(spatial)
    steps = [math.prod(spatial[d + 1 :]) for d in range(nd)]
    idx = torch.zeros((1,) * (2 * nd), dtype=torch.long, device=device)
    for d in range(nd):
        t = torch.arange(kernel[d], device=device) * dilation[d] * steps[d]
        o = torch.arange(out_size[d], device=device) * stride[d] * steps[d]
        idx = idx + t.view([-1 if a == d else 1 for a in range(2 * nd)])
        idx = idx + o.view([-1 if a == nd + d else 1 for a in range(2 * nd)])
    return idx.reshape(-1)


def unfold(
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    out_size: Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """im2col of an already padded x (b, C, *spatial) -> (b, C * prod(kernel), prod(out_size)), the same as
    ``F.unfold`` (1-D or 2-D): one ``index_select`` of the flattened images with a cached index (several
    times faster than aten im2col or a strided copy when the spatial sizes are small), written into ``out``
    (any tensor of that many elements, x's dtype) if given."""
    b, c = x.shape[:2]
    idx = _im2col_index(tuple(x.shape[2:]), tuple(kernel), tuple(stride), tuple(dilation), tuple(out_size), x.device)
    flat = x.reshape(b * c, -1)  # a view when x is contiguous (the padded copy always is)
    cols = torch.index_select(flat, 1, idx, out=None if out is None else out.view(b * c, idx.numel()))
    return cols.view(b, c * math.prod(kernel), math.prod(out_size))


PAD_SCRATCH_MIN_BYTES = 4 << 20
"""Padded inputs from this size go to the reused scratch buffer; smaller ones are fresh ``F.pad`` results, which
cost less than the scratch path's five indexing operations (32 x 32 x 8 x 8 floats: 0.04 against 0.08 ms)."""


def zero_pad(x: torch.Tensor, pads: Sequence[int], scratch: Scratch | None = None) -> torch.Tensor:
    """``F.pad(x, pads)`` (constant zeros, pads >= 0 in F.pad order: last dim first); with ``scratch``, when
    the result has at least ``PAD_SCRATCH_MIN_BYTES``, written into its "pad" buffer: only the border is
    zeroed, the interior is one copy."""
    nd = len(pads) // 2
    lo = [pads[2 * (nd - 1 - d)] for d in range(nd)]  # per spatial dim, first dim first
    hi = [pads[2 * (nd - 1 - d) + 1] for d in range(nd)]
    spatial = x.shape[x.dim() - nd :]
    shape = (*x.shape[: x.dim() - nd], *(s + a + z for s, a, z in zip(spatial, lo, hi, strict=True)))
    if scratch is None or math.prod(shape) * x.element_size() < PAD_SCRATCH_MIN_BYTES:
        return F.pad(x, list(pads))
    out = scratch.get("pad", shape, x)
    lead = (slice(None),) * (x.dim() - nd)
    for d in range(nd):
        before = (slice(None),) * d
        out[(*lead, *before, slice(0, lo[d]))] = 0
        out[(*lead, *before, slice(lo[d] + spatial[d], None))] = 0
    out[(*lead, *(slice(a, a + s) for a, s in zip(lo, spatial, strict=True)))] = x
    return out


def conv_grad(
    module: nn.Conv1d | nn.Conv2d,
    x: torch.Tensor,
    gy: torch.Tensor,
    out: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """nn.Conv1d / nn.Conv2d, W (C_out, C_in/G, *k): x (b, C_in, *spatial), gy (b, C_out, *spatial_out)
    -> (b, W.numel()). Padding (any padding mode) is applied to x, which is then unfolded; per group
    g_i = dy_i (C_out/G, L) @ cols_i^T (L, C_in/G * prod(k)). With ``scratch`` the padded input and the
    columns go to reused buffers (no page faults of fresh allocations)."""
    nd = len(params.shape(module.weight)) - 2
    if x.dim() != nd + 2:
        raise ValueError(f"per-sample gradients need a batched input to {type(module).__name__}, got {tuple(x.shape)}")
    b, G = x.shape[0], module.groups
    x, gy = _work(x), _work(gy)
    pads = list(module._reversed_padding_repeated_twice)
    if any(pads):
        if module.padding_mode == "zeros":
            x = zero_pad(x, pads, scratch)
        else:
            x = F.pad(x, pads, mode=module.padding_mode)
    c_k, L = x.shape[1] * math.prod(module.kernel_size), math.prod(gy.shape[2:])
    cols = unfold(
        x,
        module.kernel_size,
        module.stride,
        module.dilation,
        gy.shape[2:],
        scratch.get("cols", (b, c_k, L), x) if scratch is not None else None,
    )  # (b, C_in * prod(k), L)
    if L == 1 and G == 1:  # one output position: an outer product, in the transpose-free layout of _outer
        return _outer(gy.reshape(b, 1, -1), cols.view(b, 1, -1), out)
    if G == 1 and out is not None and sample_minor(out):  # few positions (minor_conv): a sum of outer products
        a = gy.reshape(b, -1, L).permute(1, 2, 0).contiguous()  # (C_out, L, b)
        if ntstore.outer_sum(a, cols.permute(1, 2, 0).contiguous(), out.t()):
            return out
    return _bmm(gy.reshape(b * G, -1, L), cols.view(b * G, -1, L).transpose(1, 2), b, out)


def functional_grad(module: nn.Module, args: tuple, kwargs: dict, gy: torch.Tensor) -> torch.Tensor:
    """Fallback for any module with a ``.weight``: vmap over samples of grad_W <gy_i, module_W(x_i)>.

    Positional tensor arguments whose dim 0 equals b are split per sample; other
    arguments (and kwargs) are passed unchanged."""
    b = gy.shape[0]
    if params.is_partitioned(module.weight):
        raise ValueError(
            f"per-sample gradients of {type(module).__name__} layers need the weight, which ZeRO-3 "
            "partitions; only Linear, Conv1d/Conv2d and Conv1D layers are supported under ZeRO-3"
        )
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
    to dy, so it is free; :func:`dist_chita.fisher.factor.fisher_block` passes 1/sqrt(n)).
    While active, the hooked weights have
    ``requires_grad=False`` (restored on exit).

    ``target``: optional ``target(layer_index, b) -> (b, numel) tensor or None``, asked for layers called
    once whose gradients are computed sample-minor (outer products: no token / spatial dimension; with
    :mod:`dist_chita.fisher.ntstore` also convolutions with few output positions, :func:`minor_conv`): a
    destination of any strides and float dtype (e.g. a column block of At, so the gradients are computed
    straight into it: no buffer, no copy). The callback then receives that tensor itself. Other layers use a
    reused buffer.
    """

    def __init__(
        self,
        modules: Sequence[tuple[str, nn.Module]],
        callback: LayerCallback,
        scale: float = 1.0,
        target: Callable[[int, int], torch.Tensor | None] | None = None,
    ):
        self.scale = float(scale)
        self.target = target
        self.names = [name for name, _ in modules]
        self.layers = [_Layer(m, grad_fn_for(m)) for _, m in modules]
        self.callback = callback
        self._handles: list = []
        self._saved_flags: list[bool] = []
        self._busy = False
        self._zeros: dict[torch.dtype, torch.Tensor] = {}
        self._buf: torch.Tensor | None = None
        self._scratch = Scratch()
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
        self._scratch.clear()
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

    def _buffer(self, b: int, numel: int, device: torch.device, minor: bool) -> torch.Tensor:
        """The shared (b, numel) float32 result buffer, grown on demand (reusing it avoids page faults);
        ``minor``: laid out sample-minor, as the transposed view of a contiguous (numel, b)."""
        if self._buf is None or self._buf.numel() < b * numel or self._buf.device != device:
            self._buf = None
            self._buf = torch.empty(b * numel, dtype=torch.float32, device=device)
        flat = self._buf[: b * numel]
        return flat.view(numel, b).t() if minor else flat.view(b, numel)

    def _destination(self, index: int, layer: _Layer, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor | None:
        """Where layer ``index``'s (b, numel) gradients are written: None (fresh tensors) for a layer called
        several times; for layers computed sample-minor (no tokens, or few output positions: :func:`minor_conv`)
        the ``target`` if it gives one, else the shared buffer, sample-minor; for the others the shared buffer,
        sample-major."""
        if len(layer.inputs) != 1:
            return None
        b, numel = gy.shape[0], params.numel(layer.module.weight)
        if layer.rule == "conv":
            outer = layer.module.groups == 1 and minor_conv(math.prod(gy.shape[2:]), gy.device)
        else:
            outer = layer.rule in ("linear", "conv1d_hf") and x.numel() == b * x.shape[-1]
        if outer and self.target is not None:
            dst = self.target(index, b)
            if dst is not None:
                if dst.shape != (b, numel) or not dst.is_floating_point():
                    raise ValueError(f"target for layer {self.names[index]!r} must be a float ({b}, {numel}) tensor")
                return dst
        return self._buffer(b, numel, gy.device, minor=outer)

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
            return conv_grad(layer.module, x, gy, out, self._scratch)
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
        # a layer called once writes into the target or the shared buffer; shared-weight layers accumulate
        args, kwargs = entry
        out = self._destination(index, layer, args[0] if args else next(iter(kwargs.values())), gy)
        gy = gy.detach() if self.scale == 1.0 else gy.detach() * self.scale
        g = self._per_sample(layer, *entry, gy, out)
        if g.dtype != torch.float32 and g is not out:  # a target in another dtype is passed on as it is
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
