"""Cost model of the layerwise objective on a Llama-architecture transformer: memory per rank, time per phase.

The model is described by its shape (:class:`TransformerShape`), not loaded: L decoder blocks of hidden size d,
MLP size I, h query heads and h_kv key/value heads of size d / h, vocabulary V. The prunable layers of a block are
those of :func:`dist_chita.prunable.prunable_modules` on a Llama model (the head and the embeddings excluded), in
model order, with rows r (outputs) and inputs d_in:

    q (h d_h, d), k (h_kv d_h, d), v (h_kv d_h, d), o (d, h d_h), gate (I, d), up (I, d), down (d, I)

and one block of :func:`dist_chita.layerwise.curvature.blocks_in_order` per decoder layer. The job (:class:`Job`):
n calibration windows of T tokens, micro-batches of B windows, R ranks, the model in ``model_bytes`` per parameter,
ZeRO-3 or not, the method (``chita`` or ``sparsegpt``). N = n T tokens; a rank forwards its N / R of them.

Memory per rank (:func:`memory_parts`), what :func:`dist_chita.planning.memory.estimate_run` counts for a
layerwise run, from the shape instead of the modules:

* model: P ``model_bytes`` (P / R under ZeRO-3);
* gathered: under ZeRO-3, the parameters gathered during a forward: the module running (at most a block's or
  the head's weights) and those DeepSpeed prefetches ahead of it (its ``stage3_prefetch_bucket_size``, 5e7
  parameters by default: :data:`ZERO3_PREFETCH`), at most P, in ``model_bytes``;
* curvature: the largest block's H matrices, 2 x 8 d_in^2 bytes per prunable layer (float64, accumulated and
  all-reduced: :func:`dist_chita.layerwise.driver.memory_bytes` counts every layer, including those that share
  an input's H);
* solver: the method's working set (:meth:`~dist_chita.methods.base.LayerMethod.solve_bytes` of the library, on the
  same (r, d_in) and blocks);
* cached inputs: the inputs of two blocks for every micro-batch of the rank, ceil(ceil(n / B) / R) of them, each
  (B T d + 2 T d_h) ``act_bytes`` (hidden states and the rotary cos / sin, shared by the batch); none under ZeRO-3
  (the library runs the model's whole forward for each block there instead of caching);
* activations: one block's forward of one micro-batch, B T (3 d + 2 I + 2 d_h) ``act_bytes`` plus the attention
  scores B h T^2 ``act_bytes`` (eager attention; an upper bound for fused attention kernels), plus the head's
  logits B T V ``act_bytes`` (the model's whole forward, which a curvature pass runs at least once).

Time per phase per rank (:func:`phase_seconds`), from the hardware's F (the forward's dtype), F32 and F64
(:class:`~dist_chita.planning.costmodel.Hardware` ``flops_float32`` / ``flops_float64``), its links and memory
bandwidth M:

* curvature, per block: forwards of the block on the rank's N / R tokens, 2 P_block + 4 T d FLOPs per token
  (weights and causal attention scores at full width); with cached inputs two forwards per block (its H, then its
  outputs; the last block one). Under ZeRO-3 a forward is collective and is not cut short
  (:func:`dist_chita.layerwise.curvature.layer_curvature`): every block's pass runs the whole model on every
  micro-batch, L block forwards and the head's 2 d V FLOPs per token, L^2 block forwards in all, and each such
  forward gathers every parameter ((R - 1) / R P ``model_bytes`` over the link, and ceil(log2 R) latencies for
  each of the 9 L + 3 parameter tensors);
  the products X^T X of every distinct input (q, k, v share one, gate and up one: 3 of size d and one of size I),
  upper triangle only, (N / R) d_in^2 FLOPs at F32; one all-reduce of those H in float64, 8 sum d_in^2 bytes.
* solve, CHITA (:func:`dist_chita.layerwise.row_solver.solve_rows`, counted from the code): a layer's rows are cut
  into chunks of c(d) rows (:func:`~dist_chita.layerwise.row_solver.chunk_rows`: 64 for d >= 1024) and the chunks
  shared among the ranks, so a rank solves at most ceil(ceil(r / c) / R) chunks. A row costs (c_w + c_s s)
  products of (1, d) x (d, d), 2 d^2 FLOPs each at F32, with c_w = 2 (2 + refit_iters) for the two warm starts
  (each a back-solve of 1 + refit_iters products and one objective-and-gradient product),
  c_s = 2 trials + [trials] + refit_iters + 1 + moves / 4 per IHT step (the support-changing candidates'
  objectives and, after them, the back-solve's starting gradient; the back-solve; the new gradient; each move's
  gradient update, a product over the inputs the chunk's rows changed, counted as a quarter of a product: 7% to 37%
  of the inputs on MiniLM's layers): 24 and 12 at the defaults (no trials, 4 moves); s the mean IHT steps a row
  takes (rows stop early; ``max_iter`` = 200 bounds it, the default here). The rest of a move and of a step, (r, d)
  arithmetic and small gathers, is in the fixed ``chunk_step_seconds`` each chunk's step pays (with the kernel
  launches and Python).
  Every rank that holds rows of a layer sets up its Q once per layer: diag(Q^-1) by a float64 Cholesky and
  triangular solves (2 d^3 / 3 at F64), with trials the Lipschitz constant (50 float64 products Q v, 100 d^2 at
  F64), and the preconditioner (8 products of Q with 48 vectors, 768 d^2 at F32).
* solve, SparseGPT (:func:`dist_chita.methods.sparsegpt.sparsegpt_rows`): a layer goes whole to one rank
  (:func:`dist_chita.methods.sparsegpt.sparsegpt_owners`, the library's balance of a block's layers); a layer costs
  4 d^3 / 3 (Cholesky, inverse, Cholesky) + r d^2 (the updates of later blocks of columns) + r d 128 (inside a
  block) FLOPs at F64 and ``column_seconds`` per column; a block takes its most loaded rank's time.
* writeback, per layer: an all-reduce of its rows, 4 r d bytes, and their write, 8 r d bytes at M. Under ZeRO-3
  with R > 1 the write is collective (:func:`dist_chita.io.params.write`, DeepSpeed's ``GatheredParameters`` with
  rank 0 modifying): the partitioned weight is gathered, (R - 1) / R r d ``model_bytes`` received by each rank, and
  rank 0's written value broadcast to be re-partitioned, r d ``model_bytes`` (its ceil(log2 R) latencies), both at
  the link's bandwidth times the hardware's ``zero3_gather_efficiency`` (DeepSpeed's gather and partitioning copies
  and hooks run on the ranks' cores: on this machine's gloo over loopback benchmarks/results/llama_scale.json
  measured far less than the link's rate, :func:`zero3_gather_efficiency`; a GPU file keeps 1, the assumption being
  that NCCL's gathers run at the link's rate).

Assumptions: the hardware rates are effective (not peak) rates; links are as in the hardware file (within a node
while R fits on one, across nodes beyond); communication does not overlap computation; the embedding and the head
cost nothing but memory; the fixed per-step costs are 0 unless given (:class:`LayerwiseRates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dist_chita.layerwise.row_solver import chunk_rows
from dist_chita.methods.base import resolve_method
from dist_chita.methods.sparsegpt import BLOCK, sparsegpt_owners
from dist_chita.planning.costmodel import Hardware, allreduce_seconds
from dist_chita.planning.memory import usable_bytes

PHASES = ("curvature", "solver", "writeback")
LAYER_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHARED_INPUT = (0, 0, 0, 1, 2, 2, 3)  # which of a block's distinct inputs each layer reads (q, k, v share one)
_LIPSCHITZ_ITERS = 50  # row_solver.lipschitz
ZERO3_PREFETCH = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size (parameters gathered ahead)
_PRECONDITIONER_PRODUCTS = 8 * 48  # row_solver.preconditioner: 8 subspace products with 1.5 x 32 vectors


@dataclass(frozen=True)
class TransformerShape:
    """A Llama-architecture decoder: ``layers`` blocks, hidden size ``hidden`` (d), MLP size ``intermediate`` (I),
    ``heads`` query heads and ``kv_heads`` key/value heads of ``hidden // heads``, vocabulary ``vocab``;
    ``tied``: the head shares the embedding's weights."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
            if not getattr(self, f) >= 1:
                raise ValueError(f"model {f} must be >= 1, got {getattr(self, f)}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"model hidden ({self.hidden}) must divide by heads ({self.heads}) and heads by "
                             f"kv_heads ({self.kv_heads})")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> TransformerShape:
        """From a Hugging Face ``config.json`` of a Llama-architecture model (its keys)."""
        try:
            return cls(layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]),
                       intermediate=int(cfg["intermediate_size"]), heads=int(cfg["num_attention_heads"]),
                       kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                       vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise ValueError(f"model config lacks {e.args[0]!r}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_dims(self) -> list[tuple[int, int]]:
        """(rows r, inputs d_in) of a block's prunable layers, in :data:`LAYER_NAMES` order."""
        d, i, hd = self.hidden, self.intermediate, self.head_dim
        q, kv = self.heads * hd, self.kv_heads * hd
        return [(q, d), (kv, d), (kv, d), (d, q), (i, d), (i, d), (d, i)]

    @property
    def block_params(self) -> int:
        """Weights of one decoder block: its linear layers and two RMSNorm vectors."""
        return sum(r * c for r, c in self.block_dims()) + 2 * self.hidden

    @property
    def params(self) -> int:
        """P: embeddings, blocks, the final norm and the head (unless tied)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.block_params + self.hidden


PRESETS = {  # the published configurations (Llama 2; 7B as Llama 1 / 2, 70B with grouped-query attention)
    "llama-7b": TransformerShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "llama-70b": TransformerShape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000),
}


@dataclass(frozen=True)
class Job:
    """A layerwise prune: ``n`` windows of ``tokens`` tokens in micro-batches of ``micro_batch``, on ``ranks``
    ranks, the model in ``model_bytes`` per parameter (4: float32, 2: bfloat16), activations in ``act_bytes``,
    ``zero3``: parameters partitioned; ``method``: ``chita`` or ``sparsegpt``."""

    n: int
    tokens: int
    ranks: int
    micro_batch: int = 1
    model_bytes: int = 2
    act_bytes: int = 2
    zero3: bool = False
    method: str = "chita"

    def __post_init__(self) -> None:
        for f in ("n", "tokens", "ranks", "micro_batch", "model_bytes", "act_bytes"):
            if not getattr(self, f) >= 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.method not in ("chita", "sparsegpt"):
            raise ValueError(f"layerwise plan: method must be chita or sparsegpt, got {self.method!r}")

    @property
    def rank_batches(self) -> int:
        """Micro-batches of the rank with the most: ceil(ceil(n / B) / R)."""
        return math.ceil(math.ceil(self.n / self.micro_batch) / self.ranks)

    @property
    def rank_tokens(self) -> int:
        """Tokens the busiest rank forwards: its micro-batches' windows times T."""
        return min(self.n, self.rank_batches * self.micro_batch) * self.tokens


@dataclass(frozen=True)
class LayerwiseRates:
    """The solvers' counts and fixed costs (module docstring): ``steps`` s, mean IHT steps per row (default the
    ``max_iter`` bound); ``refit_iters``, ``trials`` and ``moves`` as in
    :func:`~dist_chita.layerwise.row_solver.solve_rows`; ``chunk_step_seconds``: fixed seconds per chunk and step of
    CHITA; ``column_seconds``: fixed seconds per column of SparseGPT."""

    steps: float = 200.0
    refit_iters: int = 10
    trials: int = 0
    moves: int = 4
    chunk_step_seconds: float = 0.0
    column_seconds: float = 0.0

    @property
    def warm_products(self) -> int:
        """c_w: products per row of the two warm starts."""
        return 2 * (2 + self.refit_iters)

    @property
    def step_products(self) -> int:
        """c_s: products per row of one IHT step."""
        return 2 * self.trials + int(self.trials > 0) + self.refit_iters + 1 + self.moves / 4


def memory_parts(shape: TransformerShape, job: Job) -> dict[str, int]:
    """Bytes per rank by part (module docstring) and their ``total``."""
    dims = shape.block_dims()
    method = resolve_method(job.method)
    blocks = [list(range(len(dims)))]
    curvature = 2 * 8 * sum(c * c for _, c in dims) if method.needs_curvature else 0
    call = job.tokens * (job.micro_batch * shape.hidden + 2 * shape.head_dim) * job.act_bytes
    parts = {
        "model": shape.params * job.model_bytes // (job.ranks if job.zero3 else 1),
        "gathered": min(shape.params, max(shape.block_params, shape.vocab * shape.hidden) + ZERO3_PREFETCH)
        * job.model_bytes if job.zero3 else 0,
        "curvature": curvature,
        "solver": method.solve_bytes(dims, blocks),
        "cached_inputs": 0 if job.zero3 else 2 * job.rank_batches * call,
        "activations": job.micro_batch * job.tokens * job.act_bytes * (
            3 * shape.hidden + 2 * shape.intermediate + 2 * shape.head_dim + shape.heads * job.tokens
            + shape.vocab),
    }
    return {**parts, "total": sum(parts.values())}


def _flops(hw: Hardware) -> tuple[float, float]:
    """(F32, F64) of ``hw``."""
    return hw.flops_float32 or hw.flops, hw.flops_float64 or hw.flops / 2


def curvature_seconds(shape: TransformerShape, job: Job, hw: Hardware) -> dict[str, float]:
    """The curvature phase's terms, summed over the blocks: ``forward``, ``gather`` (ZeRO-3), ``products``
    (X^T X), ``allreduce`` (module docstring)."""
    L, R, N_r = shape.layers, job.ranks, job.rank_tokens
    f32, _ = _flops(hw)
    per_token = 2 * shape.block_params + 4 * job.tokens * shape.hidden
    if job.zero3:  # every block's pass: the whole model (L blocks and the head) on every micro-batch
        forward_flops = L * N_r * (L * per_token + 2 * shape.hidden * shape.vocab)
    else:
        forward_flops = (2 * L - 1) * N_r * per_token
    dims = shape.block_dims()
    distinct = {_SHARED_INPUT[j]: c for j, (_, c) in enumerate(dims)}
    bw, lat = hw.link(R)
    gather = 0.0
    if job.zero3 and R > 1:
        tensors = len(LAYER_NAMES) * L + 2 * L + 3  # a block's linear layers and 2 norms; embedding, norm, head
        gather = L * job.rank_batches * ((R - 1) / R * shape.params * job.model_bytes / bw
                                         + tensors * math.ceil(math.log2(R)) * lat)
    return {
        "forward": forward_flops / hw.flops,
        "gather": gather,
        "products": L * N_r * sum(c * c for c in distinct.values()) / f32,
        "allreduce": L * allreduce_seconds(8 * sum(c * c for c in distinct.values()), R, bw, lat),
    }


def chita_layer_seconds(r: int, d: int, ranks: int, hw: Hardware, rates: LayerwiseRates) -> float:
    """CHITA's solve of one layer (r rows, d inputs) on its busiest rank (module docstring)."""
    f32, f64 = _flops(hw)
    chunk = chunk_rows(d)
    chunks = math.ceil(math.ceil(r / chunk) / ranks)
    rows = min(r, chunks * chunk)
    products = rows * (rates.warm_products + rates.step_products * rates.steps) * 2 * d * d / f32
    lipschitz = _LIPSCHITZ_ITERS * 2 * d * d if rates.trials else 0
    setup = (2 * d**3 / 3 + lipschitz) / f64 + _PRECONDITIONER_PRODUCTS * 2 * d * d / f32
    return products + setup + chunks * (rates.steps + 2) * rates.chunk_step_seconds


def sparsegpt_layer_seconds(r: int, d: int, hw: Hardware, rates: LayerwiseRates) -> float:
    """SparseGPT on one layer (r rows, d inputs), on the rank that owns it (module docstring)."""
    _, f64 = _flops(hw)
    return (4 * d**3 / 3 + r * d * d + r * d * BLOCK) / f64 + d * rates.column_seconds


def solver_seconds(shape: TransformerShape, job: Job, hw: Hardware, rates: LayerwiseRates) -> float:
    """The solve phase of the busiest rank over all blocks."""
    dims = shape.block_dims()
    if job.method == "chita":
        return shape.layers * sum(chita_layer_seconds(r, d, job.ranks, hw, rates) for r, d in dims)
    owners = sparsegpt_owners({(j, 0): rd for j, rd in enumerate(dims)}, job.ranks)
    load = [0.0] * job.ranks
    for j, (r, d) in enumerate(dims):
        load[owners[(j, 0)]] += sparsegpt_layer_seconds(r, d, hw, rates)
    return shape.layers * max(load)


def writeback_seconds(shape: TransformerShape, job: Job, hw: Hardware) -> float:
    """Every layer's rows all-reduced (4 r d bytes) and written (8 r d bytes at M); under ZeRO-3 also the gather
    and re-partitioning broadcast of the written weight (:func:`zero3_write_seconds`)."""
    bw, lat = hw.link(job.ranks)
    return shape.layers * sum(allreduce_seconds(4 * r * d, job.ranks, bw, lat) + 8 * r * d / hw.memory_bandwidth
                              for r, d in shape.block_dims()) + zero3_write_seconds(shape, job, hw)


def zero3_write_seconds(shape: TransformerShape, job: Job, hw: Hardware) -> float:
    """Under ZeRO-3 with R > 1, every layer's gather ((R - 1) / R r d ``model_bytes``) and rank 0's broadcast
    (r d ``model_bytes``, ceil(log2 R) latencies) at the link's bandwidth times ``hw.zero3_gather_efficiency``;
    else 0 (module docstring)."""
    R = job.ranks
    if not job.zero3 or R == 1:
        return 0.0
    bw, lat = hw.link(R)
    weights = shape.layers * sum(r * d for r, d in shape.block_dims())
    layers = shape.layers * len(shape.block_dims())
    return ((R - 1) / R + 1) * weights * job.model_bytes / (bw * hw.zero3_gather_efficiency) + (
        layers * (1 + math.ceil(math.log2(R))) * lat)


def zero3_gather_efficiency(measured_writeback: float, shape: TransformerShape, job: Job, hw: Hardware) -> float:
    """The ``zero3_gather_efficiency`` a measured ZeRO-3 write-back phase gives: the gathers' and broadcasts' bytes
    at the link's rate over what the measurement leaves after the plain write-back (all-reduce and write) and the
    latencies. The measurement is the rank with the most solver seconds (the others wait for it in the write-back's
    all-reduce); it still holds waits on layers that another rank solved longer, so the efficiency is a lower
    bound."""
    if not job.zero3 or job.ranks == 1:
        raise ValueError("zero3_gather_efficiency needs a ZeRO-3 job on more than one rank")
    at_link = replace(hw, zero3_gather_efficiency=1.0)
    plain = writeback_seconds(shape, replace(job, zero3=False), hw)
    latency = zero3_write_seconds(shape, job, replace(at_link, link_bandwidth=math.inf, node_bandwidth=math.inf))
    by_bytes = zero3_write_seconds(shape, job, at_link) - latency
    left = measured_writeback - plain - latency
    if left <= 0:
        raise ValueError(f"the measured write-back ({measured_writeback:.3g} s) is no longer than the plan without the "
                         f"ZeRO-3 gathers ({plain + latency:.3g} s)")
    return min(1.0, by_bytes / left)


def phase_seconds(shape: TransformerShape, job: Job, hw: Hardware,
                  rates: LayerwiseRates | None = None) -> dict[str, float]:
    """Seconds per phase of the busiest rank (``curvature``, ``solver``, ``writeback``) and their ``total``."""
    rates = rates or LayerwiseRates()
    out = {"curvature": sum(curvature_seconds(shape, job, hw).values()),
           "solver": solver_seconds(shape, job, hw, rates),
           "writeback": writeback_seconds(shape, job, hw)}
    return {**out, "total": sum(out.values())}


def smallest_fitting(shape: TransformerShape, job: Job, hw: Hardware, max_ranks: int = 1 << 16) -> int | None:
    """The smallest R whose memory per rank fits the usable part of ``hw.memory_bytes``
    (:func:`~dist_chita.planning.memory.usable_bytes`; memory per rank does not grow with R, so the first that fits
    on a doubling search, then bisection); None if ``max_ranks`` does not fit."""

    def fits(r: int) -> bool:
        return memory_parts(shape, replace(job, ranks=r))["total"] <= usable_bytes(hw.memory_bytes)

    if not fits(max_ranks):
        return None
    lo, hi = 1, 1
    while not fits(hi):
        lo, hi = hi + 1, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo
