"""Memory per rank: the estimate printed before a run, and the peak measured during it.

The dominant term is this rank's block of the Fisher factor, n x ceil(p / R)
entries of the storage dtype. Around it:

* the model (every rank holds a copy, or 1/R of it under ZeRO-3);
* one micro-batch of per-sample gradients of the largest layer, in float32,
  three times over (computed, sent, received) while rows become columns;
* the solver's vectors (about a dozen float32 vectors of p_r) and, when the
  active set is used, a gathered copy of its rows of the factor;
* the backsolve's n x n Gram matrix in float64 (twice: G and its factor) and its gathered kept rows A_{r,S}^T,
  counted at 12 |S_r| n bytes (|S_r| <= p_r), at most 1.5 x ``backsolve.GATHER_BYTES`` = 384 MiB. The backsolve
  keeps only the float32 gather (4 |S_r| n bytes; its float64 products convert cache-sized chunks), so 8 of the 12
  bytes are headroom for what the estimate does not count (allocator slack, freed heap still resident);
* a baseline measured in the running process (:func:`baseline_bytes`): the interpreter, torch and the
  other libraries, the data (the resident memory on CPU before anything is pruned);
* the activations of the largest forward pass the run makes (a calibration micro-batch, an evaluation batch),
  measured before the run on one such pass (:func:`peak_growth`; on the host after the C heap's free pages are
  given back, so that memory the process freed before and the pass reuses counts too).

A run starts only when its estimate leaves ``HEADROOM`` of the available memory free (:func:`usable_bytes`; the
plans count the same way): the estimate aims at the peak itself, and a run's peak varies by a few percent from one
run to the next (allocator slack, the kernel's own timing of page reuse).

``DIST_CHITA_AVAILABLE_BYTES`` in the environment (bytes, e.g. ``8e9``) overrides the available memory (tests of
the refusal).
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from dist_chita.fisher.backsolve import GATHER_BYTES

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.1  # the share of the available memory a run's estimate leaves free (module docstring)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by part."""

    factor: int
    model: int
    gradient_buffer: int
    solver: int
    backsolve: int
    baseline: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return (self.factor + self.model + self.gradient_buffer + self.solver + self.backsolve + self.baseline
                + self.activations)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def estimate(
    p: int,
    n: int,
    world_size: int,
    storage_dtype: str,
    model_params: int,
    largest_layer: int,
    micro_batch: int,
    active_fraction: float = 0.0,
    model_sharded: bool = False,
    baseline: int = 0,
) -> MemoryEstimate:
    """Estimate the peak bytes one rank needs.

    Args:
        p: prunable weights; n: calibration samples; world_size: R.
        storage_dtype: float32, bfloat16 or float16 (the factor's storage).
        model_params: all parameters of the model (float32).
        largest_layer: weights in the largest prunable layer.
        micro_batch: samples per backward pass.
        active_fraction: |W| / p of the solver's active set (0 when unused).
        model_sharded: parameters partitioned across ranks (ZeRO-3).
        baseline: bytes the process holds besides these parts (:func:`baseline_bytes`).
    """
    if storage_dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown storage dtype {storage_dtype!r}")
    p_r = math.ceil(p / world_size)
    factor = n * p_r * _DTYPE_BYTES[storage_dtype]
    model = 4 * model_params // (world_size if model_sharded else 1)
    grads = 3 * 4 * micro_batch * largest_layer
    solver = 12 * 4 * p_r + int(active_fraction * factor)
    backsolve = 2 * 8 * n * n + min(12 * p_r * n, 3 * GATHER_BYTES // 2)  # G + factor; kept rows (see above)
    return MemoryEstimate(factor, model, grads, solver, backsolve, max(0, int(baseline)))


def baseline_bytes(device: torch.device, model_bytes: int = 0) -> int:
    """What this process holds now besides the model's ``model_bytes`` (counted in the estimate's ``model``):
    resident memory on CPU (interpreter, libraries, data), 0 on GPU (only allocations count there)."""
    if device.type == "cuda":
        return 0
    return max(0, _in_use(device) - int(model_bytes))


def available_bytes(device: torch.device, ranks_on_device: int = 1) -> int:
    """Memory this rank may use: free device memory, or the host's available
    memory shared among the ranks on this node."""
    override = available_override()
    if override is not None:
        return override
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil ships with accelerate
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(avail // max(1, ranks_on_device))


def available_override() -> int | None:
    """The available memory ``DIST_CHITA_AVAILABLE_BYTES`` sets, in bytes (``8e9`` or ``8000000000``; 1 or more);
    None when it is unset or empty."""
    text = os.environ.get("DIST_CHITA_AVAILABLE_BYTES")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"DIST_CHITA_AVAILABLE_BYTES={text!r} in the environment is not a number of bytes (1 or "
                         "more, e.g. 8e9); unset it to use the available memory")
    return int(value)


_earlier_peak = {"cuda": 0, "cpu": 0}  # the peak before :func:`peak_growth` reset the counter


def _current_peak(device: torch.device) -> int:
    """The peak counter: device allocations, or this process's resident high-water mark (VmHWM; getrusage's
    maxrss would also count the parent's resident set at the fork before this process's exec)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # pragma: no cover


def peak_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: device allocations on GPU, resident set size on CPU."""
    key = "cuda" if device.type == "cuda" else "cpu"
    return max(_earlier_peak[key], _current_peak(device))


def _in_use(device: torch.device) -> int:
    """Memory held now: device allocations, or the resident set on the host (its peak where /proc is missing)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return peak_bytes(device)


def _reset_peak(device: torch.device) -> bool:
    """Restart the peak counter at the memory in use now (keeping the old peak for :func:`peak_bytes`); False
    where that is not possible."""
    key = "cuda" if device.type == "cuda" else "cpu"
    before = peak_bytes(device)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:  # Linux: "5" resets the resident set's high-water mark (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    except OSError:
        return False
    _earlier_peak[key] = before
    return True


def peak_growth(run: Callable[[], object], device: torch.device) -> int:
    """Bytes by which the memory in use rises at most while ``run()`` runs (its temporaries: e.g. a forward
    pass's activations), on the device (allocations) or the host (resident set). On the host the C heap's free
    pages go back to the system first (:func:`_return_free_heap`): memory freed earlier and reused by ``run``
    would otherwise not raise the resident set at all. Where the peak counter cannot be reset (not Linux), the
    rise of the process's peak, which may be less."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:
        _return_free_heap()
    start = _in_use(device)
    if not _reset_peak(device):  # pragma: no cover - not Linux
        start = peak_bytes(device)
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return max(0, _current_peak(device) - start)


def _return_free_heap() -> None:
    """Give the free pages of the C heap back to the system (glibc's ``malloc_trim``); nothing where the C library
    has no such call."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not glibc (TypeError: no CDLL(None))
        pass


def usable_bytes(available: float) -> float:
    """The memory a run's estimate may take of ``available`` bytes: all but ``HEADROOM`` of it."""
    return (1.0 - HEADROOM) * available


def advice(est: MemoryEstimate, available: int, n: int, world_size: int, storage_dtype: str) -> str:
    """One line saying how to make a run that does not fit, fit."""
    tips = [f"use fewer calibration samples (n = {n})"]
    if storage_dtype == "float32":
        tips.append("store the factor in bfloat16 (storage_dtype bfloat16 halves it)")
    tips.append(f"run on more ranks (now {world_size})")
    tips.append("prune one group of layers at a time (group_size: the most weights in a group)")
    gib = 1024**3
    return (
        f"estimated {est.total / gib:.2f} GiB per rank (factor {est.factor / gib:.2f} GiB) exceeds the "
        f"{usable_bytes(available) / gib:.2f} GiB a run may use of the {available / gib:.2f} GiB available "
        f"({HEADROOM:.0%} kept free): " + "; ".join(tips)
    )


def estimate_run(
    *,
    objective: str,
    p: int,
    n: int,
    world_size: int,
    sizes: list[int],
    model_params: int,
    micro_batch: int,
    storage_dtype: str = "float32",
    active_set_factor: float = 1.5,
    mean_sparsity: float = 0.5,
    group_size: int | None = None,
    layerwise_solver: int = 0,
    cached_block_bytes: int = 0,
    activations: int = 0,
    dense_copy: bool = False,
    model_sharded: bool = False,
    baseline: int = 0,
) -> MemoryEstimate:
    """The estimate of one prune per rank, by objective:

    * ``fisher``: :func:`estimate` for the factor of all p weights, or of the largest layer group with
      ``group_size`` (:func:`dist_chita.fisher.groups.largest_group`);
    * ``layerwise``: no factor, no per-sample gradients and no back-solve; the solver part is
      ``layerwise_solver`` (one block's H and one layer's solve, :func:`dist_chita.layerwise.driver.memory_bytes`)
      plus the cached inputs of two blocks for this rank's micro-batches (``cached_block_bytes`` per micro-batch);
    * ``magnitude``: the model and the baseline only.

    ``activations``: the largest forward's measured growth; ``dense_copy``: the dense prunable weights are kept
    (float32) while a magnitude baseline is evaluated."""
    from dist_chita.fisher.groups import largest_group

    est = estimate(p=largest_group(sizes, group_size) if group_size is not None else p, n=n,
                   world_size=world_size, storage_dtype=storage_dtype, model_params=model_params,
                   largest_layer=max(sizes), micro_batch=micro_batch,
                   active_fraction=0.0 if objective == "magnitude" else min(1.0, active_set_factor
                                                                            * (1 - mean_sparsity)),
                   model_sharded=model_sharded, baseline=baseline)
    est = replace(est, activations=activations)
    if objective == "magnitude":
        est = replace(est, factor=0, gradient_buffer=0, backsolve=0)
    elif objective == "layerwise":
        batches = math.ceil(math.ceil(n / micro_batch) / world_size)
        est = replace(est, factor=0, gradient_buffer=0, backsolve=0,
                      solver=layerwise_solver + 2 * batches * cached_block_bytes)
    if dense_copy:
        est = replace(est, model=est.model + 4 * p)
    return est
