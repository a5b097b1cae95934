"""Cost model: time per phase and memory per rank of a distributed CHITA prune.

Symbols: the Fisher factor A is n x p (n calibration samples, p prunable
weights), split into R column blocks of p_R = ceil(p / R) columns; k weights
are kept; b is the storage dtype's bytes per entry; P is the model's parameter
count. Hardware is described per *device* (one rank's GPU, or one CPU core):
F FLOP/s, M B/s of memory bandwidth, and a link of bandwidth L B/s and latency
l s (within a node when all R ranks fit on one node, across nodes otherwise).

Phases (what ``launch/prune.py`` reports in ``phase_seconds``; the measured "fisher" is the wall time of the
gradient pass *including* the exchange, which the report also gives apart as "exchange"). A prune runs one solve
per CHITA++ stage t on p_t columns (stage 1: p; stage t: the k_{t-1} columns stage t - 1 kept, to which the solver
compacts A), keeping k_t, with i_t IHT iterations and m_t backsolves (:attr:`Workload.stages`, read from the
report). p_R below is ceil(p_t / R) of the solve at hand.

* fisher: per-sample gradients of this rank's n / R samples, written into rows, then exchanged so that every
  rank holds its column block, once per solve::

      t = n p_R b / (Z s e_p)                                (once per prune: mapping and faulting in the factor's
                                                              storage, on CPUs whose hardware file gives Z; the
                                                              CHITA++ stages after the first reuse it)
        + solves * ( c_g * f * (n / R) / (F s e_g)          (f = forward + backward FLOPs per sample, ~6 P)
        + (n / R) * p * b / (M s e_m)                        (writing the rows)
        + [R > 1] (n p b (R - 1) / R^2 / (L s e_x)           (all_to_all bytes at e_x times the link rate; on
                                                              shared CPU cores times s: gloo's loopback copies run
                                                              on the ranks' own cores)
                   + (m (R - 1) l + x) / s') )               (m = micro-batches x layers messages; x: seconds
                                                              per stage a multi-rank exchange pays beyond its
                                                              bytes: result buffers, packing, and one
                                                              synchronisation per micro-batch step and layer that
                                                              a single rank, writing straight into its block,
                                                              does not have; single-threaded work and waiting,
                                                              so it takes 1 / s' longer on a time-shared core)

  The allocation term is what a report's first CHITA++ stage takes beyond each later one; its rate depends on the
  kernel's and the hypervisor's memory state (small or transparent huge pages), so e_p is fitted.

* solver (the timed IHT), per iteration::

      t_it = r * n p_R b' / (M s e_r)                        (r = 1 fused pass over A: g = A^T (A w - y) and
                                                              u = A g_S; b' = b, + 4 for the float32 copy of a
                                                              bfloat16 / float16 chunk)
           + (v_it + T v_sel) p_R / (M s e_m)                (passes over p_R-vectors: v_it = 210 B per column
                                                              for g, g_S, tau_c and the support-keeping step; T = 2
                                                              support-changing trials of v_sel = 500 B per column,
                                                              each a radix-select top-k (int64 keys, candidate
                                                              gathers, a bincount) and its updates of w, the
                                                              support difference and ||w - w_bar||^2)
           + (1 + T) * (2 (R - 1) / R * 8 n / L + 2 log2(R) l)   (n-vector all-reduces: u and each trial's A w)
           + (T c_H + c_tau) * 2 log2(R) l                   (small all-reduces of each trial's projection H and of
                                                              tau_c, set by the budget's granularity
                                                              (:attr:`Workload.granularity`): a collective top-k,
                                                              one global budget or one per layer (segments that
                                                              straddle ranks), makes c_H = q + 3 (q histogram
                                                              rounds: 3 for one segment, 4 for several; the
                                                              NaN/Inf check, the allowed counts, the ties) and
                                                              c_tau = 2; per-row and N:M budgets, whose segments
                                                              lie on one rank, select locally: c_H = 1 (the
                                                              NaN/Inf check's integer) and c_tau = 1)
           + o / s'                                          (fixed per-iteration overhead)

  plus, once per solve, the exact A w and f after the iterations (and c extra block reads, e.g. an active set's
  gathered rows; 0 in the recorded runs)::

      t_solve = (c n b' / e_r + ((k_t / p_t) n (b + 8) + v_s) / e_m) p_R / (M s) + 2 * 2 log2(R) l

  (the support's k_t / p_t of the rows gathered and converted to float64; v_s = 45 B per column). The byte
  counts v_it, v_sel, v_s are counted from ``dist_chita/fisher/solver.py`` and ``dist_chita/fisher/select.py``; T = 2
  is what the recorded runs' solver bytes show (3 radix selects per solve, one of them the magnitude support before the
  timed iterations). Their rate is the one fitted memory efficiency e_m: the element-wise, gather and bincount
  passes run well below the GEMV read rate M of the hardware file. The all-reduces of one iteration and the payload
  bytes a rank sends in them (what ``dist_chita/distributed/comm.py`` counts,
  :attr:`Prediction.solver_bytes_per_iteration`) are counted by :func:`iteration_collectives`; a test compares
  them with the counters of real two-rank solves, per granularity.

* backsolve, the backsolves of a solve keeping k_t (the dual path of ``dist_chita/fisher/backsolve.py``, k_t >= n),
  on the busiest rank's m = ceil(k_t / R x i_R) kept rows (i_R = :func:`kept_imbalance`, from where the report's
  layers keep their weights; the other ranks wait for it), counted by what they ran
  (:attr:`Workload.backsolve_work`, the report's ``stages[].backsolve_work``): g Gram matrices formed (a lambda
  path's backsolves share one: the support is the same, only lambda changes), u updated from a nearby support
  (r rows over all ranks), c Cholesky factorisations, j PCG solves with q steps in all::

      t = f_syrk(n) 2 n^2 (g m + r / R) / (F s e_a) (n + n_h) / n  (float32 Gram matrices by the blocked syrk: f_syrk =
                                                              (nb + 1) / (2 nb), nb = min(4, n // 128) column
                                                              blocks, 10/16 at n >= 512; 1 below 256; a thin
                                                              product's rate F n / (n + n_h), n_h measured)
        + c n^3 / 3 / (F s / 2)                              (float64 Cholesky of lambda I + G at half the float32
                                                              rate, given; redundantly on every rank: at R t > C
                                                              the R copies share the C cores, s = C / R)
        + (2 j + q) 8 n^2 / (M s)                            (the preconditioner: 2 + q applications of the factor
                                                              per PCG solve, two triangular solves reading L)
        + (((g + u) G_b + j (2 P_1 + P_2) + q P_2) m + G_b r / R) n / (M s e_a e_b)  (per support the rows gathered in
                                                              float32 and an update's changed rows, G_b
                                                              = 2 b (+ b + 4 from a 2-byte factor); per PCG solve
                                                              the passes over them, A_S^T y and A_S b (P_1 = 12 + 8
                                                              B per entry: the float32 read, the float64 chunk
                                                              written and read once) and 1 + q fused ones (P_2 = 12
                                                              + 16 B: the chunk read by both products); rows too
                                                              large to gather, 8 n m > 2^28 B, are gathered from
                                                              the block on every pass, 3 b + 8 instead of 12, plus
                                                              g_row per row)
        + (g + u) AR(8 n^2) + (2 j + q) AR(8 n) + 4 j AR(8)  (all-reduces of G, of the n-vectors and of 4 scalars)

  with AR(B) = 2 (R - 1) / R * B / (L s) + 2 log2(R) l / s' (gloo's copies on the ranks' shared cores; a rank
  that waits for a message also waits for its turn on a time-shared core). e_a is fitted, one efficiency for the
  Gram's FLOPs and the row passes' bytes, which both stream the m kept rows; e_b is given (1). A report without
  ``backsolve_work`` counts, per backsolve, one Gram matrix, one factorisation and one PCG solve of
  ``Rates.pcg_steps`` steps. Not modelled: the exact A w after a solver's backsolve (one more pass over the kept
  rows) and the escapes' exact curvatures (off in the recorded runs).

* writeback: 2 * 4 p_R / (M s); save: 4 P / disk bandwidth.

The backsolve, writeback and save phases also get a fixed term (``Rates.fixed``; launch and Python overhead,
waiting, work that does not shrink with R), fitted by :func:`calibrate`; it is not scaled by the core share
(ranks that wait do not compete for cores). ``s`` is the share of a device one rank gets
(:meth:`Hardware.compute_share`): 1 on GPUs; on a CPU node with C shared cores and t threads per rank,
min(t, C / R), so ranks that oversubscribe the cores slow down; ``s'`` (:meth:`Hardware.time_slice`) is the share
of one core for single-threaded overhead, min(1, C / (R t)).

Memory per rank is :func:`dist_chita.planning.memory.estimate` (factor n p_R b, model,
gradient buffers, solver vectors, backsolve Gram), compared with the device's
memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dist_chita.distributed.partition import column_blocks, row_blocks
from dist_chita.fisher.backsolve import WORK_KEYS, gathers, syrk_tiles
from dist_chita.fisher.select import radix_bits
from dist_chita.planning.memory import MemoryEstimate, estimate, usable_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PHASES = ("fisher", "solver", "backsolve", "writeback", "save")
BACKSOLVE_TERMS = ("gram", "allreduce", "cholesky", "precond", "rows")  # backsolve_terms' keys
WEIGHT_FLOOR_SECONDS = 0.5  # calibrate: rows weighted by 1 / max(measured, floor) (relative errors above it)
GRANULARITIES = ("global", "layer", "row", "nm")  # Workload.granularity: the sparsity budget the solver projects on
# Keys of rates files that Rates.from_dict accepts and drops: selection_rounds (the histogram rounds of a projection
# follow from Workload.granularity, :func:`projection_collectives`), backsolve_row_passes (the passes over the kept
# rows per PCG solve are counted from the code, :func:`backsolve_terms`)
RETIRED_RATES = ("selection_rounds", "backsolve_row_passes")


@dataclass(frozen=True)
class Hardware:
    """A device and its links.

    Attributes:
        name: label.
        memory_bytes: usable memory per device (bytes).
        memory_bandwidth: M, B/s per device.
        flops: F, FLOP/s per device (effective, at the arithmetic precision used).
        link_bandwidth: L across nodes, B/s per rank per direction.
        link_latency: l across nodes, s per message.
        devices_per_node: ranks that share a node (and its faster links).
        node_bandwidth, node_latency: the link within a node (None: same as across).
        shared_cores: CPU only: cores shared by all ranks (one node; 0: one device per rank).
        disk_bandwidth: B/s for saving the pruned model.
        page_population_bandwidth: Z, B/s at which a fresh process maps and faults in the factor's storage (CPU;
            None: allocation is free, as with a GPU's caching allocator).
        gram_half_width: n_h, the Gram matrix R^T R of a tall R (m x n) runs at F n / (n + n_h): a skinny matrix
            product's rate grows with its width n (``benchmarks/machine_rates.py`` fits n_h from R^T R at n = 16 ...
            512). 0: F at every n.
        flops_float32, flops_float64: effective FLOP/s of float32 and float64 matrix products (the layerwise
            solvers' arithmetic, :mod:`dist_chita.planning.layerwise`); None: F and F / 2.
        zero3_gather_efficiency: the share of the link's bandwidth that DeepSpeed's gather of a partitioned
            parameter and the re-partitioning broadcast of its written value reach (the layerwise write-back under
            ZeRO-3, :func:`dist_chita.planning.layerwise.writeback_seconds`); 1: at the link's rate.
    """

    name: str
    memory_bytes: float
    memory_bandwidth: float
    flops: float
    link_bandwidth: float
    link_latency: float
    devices_per_node: int = 1
    node_bandwidth: float | None = None
    node_latency: float | None = None
    shared_cores: int = 0
    disk_bandwidth: float = 1e9
    page_population_bandwidth: float | None = None
    gram_half_width: float = 0.0
    flops_float32: float | None = None
    flops_float64: float | None = None
    zero3_gather_efficiency: float = 1.0

    def __post_init__(self) -> None:
        for f in ("memory_bytes", "memory_bandwidth", "flops", "link_bandwidth", "disk_bandwidth"):
            if not getattr(self, f) > 0:
                raise ValueError(f"hardware {f} must be > 0, got {getattr(self, f)}")
        if self.page_population_bandwidth is not None and not self.page_population_bandwidth > 0:
            raise ValueError(f"hardware page_population_bandwidth must be > 0, got {self.page_population_bandwidth}")
        for f in ("flops_float32", "flops_float64"):
            if getattr(self, f) is not None and not getattr(self, f) > 0:
                raise ValueError(f"hardware {f} must be > 0, got {getattr(self, f)}")
        if not 0 < self.zero3_gather_efficiency <= 1:
            raise ValueError(f"hardware zero3_gather_efficiency must be in (0, 1], got {self.zero3_gather_efficiency}")
        if not self.gram_half_width >= 0:
            raise ValueError(f"hardware gram_half_width must be >= 0, got {self.gram_half_width}")
        if self.link_latency < 0 or (self.node_latency is not None and self.node_latency < 0):
            raise ValueError("hardware latency must be >= 0")
        if self.devices_per_node < 1 or self.shared_cores < 0:
            raise ValueError("hardware devices_per_node must be >= 1 and shared_cores >= 0")

    @classmethod
    def from_dict(cls, data: dict) -> Hardware:
        """Build from a plain dict (e.g. a parsed YAML file); unknown or missing keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"hardware description must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown hardware key {unknown[0]!r}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing hardware key {missing[0]!r}")
        ints = {"devices_per_node", "shared_cores"}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is None}  # null: not described
        values = {}
        try:
            for k, v in data.items():
                if v is None and k not in optional:
                    raise ValueError
                values[k] = v if k == "name" or v is None else (int(v) if k in ints else float(v))
        except (TypeError, ValueError):
            raise ValueError(f"hardware {k}: expected a number, got {v!r}") from None
        return cls(**values)

    def link(self, ranks: int) -> tuple[float, float]:
        """(bandwidth B/s, latency s) of the links a collective over ``ranks`` ranks uses."""
        if ranks <= self.devices_per_node and self.node_bandwidth is not None:
            lat = self.node_latency if self.node_latency is not None else self.link_latency
            return self.node_bandwidth, lat
        return self.link_bandwidth, self.link_latency

    def compute_share(self, ranks: int, threads_per_rank: int = 1) -> float:
        """s: devices' worth of compute one rank gets (1 on GPUs; min(t, C / R) on C shared cores)."""
        if self.shared_cores <= 0:
            return 1.0
        return min(float(threads_per_rank), self.shared_cores / ranks)

    def time_slice(self, ranks: int, threads_per_rank: int = 1) -> float:
        """s': share of one core a rank's single-threaded code gets, min(1, C / (R t)) (1 on GPUs)."""
        if self.shared_cores <= 0:
            return 1.0
        return min(1.0, self.shared_cores / (ranks * threads_per_rank))


@dataclass(frozen=True)
class Rates:
    """Machine rates, assumed or fitted by :func:`calibrate` (see the module docstring for the formulas).

    Attributes:
        persample_factor: c_g, cost of a per-sample gradient pass relative to 6 P FLOPs per sample.
        grad_efficiency: e_g, fraction of F the per-sample gradient pass achieves.
        memory_efficiency: e_m, fraction of M the solver's vector passes (element-wise, gathers, selections) and
            the gradient phase's row writes achieve (fitted).
        read_efficiency: e_r, fraction of M the solver's streaming passes over the block achieve (given, 1: M is
            measured as exactly such a read, A @ v; a fit of e_r next to e_m would charge the time of solves whose
            time does not depend on n to the n-proportional reads).
        linalg_efficiency: e_a, fraction of the hardware's rates the backsolve's work on its m = k / R kept rows
            achieves: the float32 Gram's FLOPs at F n / (n + n_h) and the passes' counted bytes at e_b M (fitted; one
            efficiency for both: measured apart on the MLPNet back-solve, n = 800, each ran 2.4-2.6x the hardware
            file's rate, the row passes' chunks staying in cache).
        collective_latency, collective_bandwidth: override the hardware link's l and L (None: hardware).
        block_reads: r, passes over the rank's block per solver iteration (1: the fused pass that forms
            g = A^T (A w - y) and u = A g_S together).
        setup_reads: c, extra passes over the rank's block per solve outside the iterations (the active set's
            gathered rows; 0 when the active set is not used, as in the recorded runs).
        iteration_vector_bytes: v_it, bytes per column of the rank's p_R moved per IHT iteration by the
            elementwise passes over p_R-vectors outside the selections (g and g_S, tau_c, the support-keeping step),
            counted from ``dist_chita/fisher/solver.py``.
        selection_bytes: v_sel, bytes per column of one support-changing trial: the radix select of
            ``dist_chita/fisher/select.py`` (int64 keys, candidate gathers, a bincount) and the trial's updates of w,
            the support difference and ||w - w_bar||^2, counted from the code.
        selections_per_iteration: T, support-changing trials (each one collective top-k) per IHT iteration; the
            recorded runs' solver bytes show T = 2 (3 radix selects per solve, one of them the magnitude support
            before the timed iterations).
        solve_vector_bytes: v_s, bytes per column per solve of the exact recomputation of A w and f after the
            iterations (the support's indices and ||w - w_bar||^2; its gathered rows are counted as block reads).
        pcg_steps: q, PCG steps per backsolve, each one fused pass over the kept rows, one application of the
            factor and one n-vector all-reduce, for workloads that do not count them (``Workload.backsolve_work``;
            2-3 on the recorded runs).
        row_gather_bytes: g_row, the cost of gathering one kept row (``index_select``) beyond its bytes, in bytes at
            M (fitted: rows of 32-64 B, as in a bfloat16 factor with n = 16-32, cost several times their size).
        row_efficiency: e_b, the backsolve's row passes' rate relative to the Gram's, as a fraction of M (given,
            1; both are scaled by the fitted e_a).
        iteration_overhead: o, fixed seconds per solver iteration.
        backsolve_rounds: backsolves per prune.
        exchange_efficiency: e_x, fraction of the link bandwidth L (times the core share s on shared CPU cores,
            where gloo's loopback copies run on the ranks' own cores) the row -> column exchange achieves.
        population_efficiency: e_p, fraction of the hardware's page population rate Z the factor's allocation
            achieves (fitted; only on hardware that gives Z).
        exchange_overhead: x, seconds per stage that a multi-rank (R > 1) row -> column exchange pays beyond its
            bytes (buffers, packing, a synchronisation per micro-batch step and layer).
        fixed: fixed seconds per phase (launch / Python overhead; calibrate fits backsolve, writeback and save).
    """

    persample_factor: float = 2.0
    grad_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    read_efficiency: float = 1.0
    linalg_efficiency: float = 1.0
    collective_latency: float | None = None
    collective_bandwidth: float | None = None
    block_reads: float = 1.0
    setup_reads: float = 0.0
    iteration_vector_bytes: float = 210.0
    selection_bytes: float = 500.0
    selections_per_iteration: float = 2.0
    solve_vector_bytes: float = 45.0
    pcg_steps: float = 3.0
    row_efficiency: float = 1.0
    row_gather_bytes: float = 0.0
    iteration_overhead: float = 0.0
    backsolve_rounds: int = 1
    exchange_efficiency: float = 1.0
    exchange_overhead: float = 0.0
    population_efficiency: float = 1.0
    fixed: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Rates:
        """Build from a plain dict (a rates file, a study summary's "rates"). Keys of :data:`RETIRED_RATES` are
        dropped; other unknown keys, and values that are not rates (not numbers; an efficiency or bandwidth, which
        divides, not > 0; another rate < 0; ``fixed`` not seconds by phase; ``backsolve_rounds`` not a whole
        number >= 1), raise ValueError naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"rates must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - set(RETIRED_RATES))
        if unknown:
            raise ValueError(f"unknown rate {unknown[0]!r}")
        data = {k: v for k, v in data.items() if k in names}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is None}  # None: the hardware's own
        for k, v in data.items():
            if v is None and k in optional:
                continue
            if k == "fixed":  # seconds by phase
                if not isinstance(v, dict) or not set(v) <= set(PHASES):
                    raise ValueError(f"fixed must map phases ({', '.join(PHASES)}) to seconds, got {v!r}")
                values = [(f"fixed.{ph}", x) for ph, x in v.items()]
            else:
                values = [(k, v)]
            for rate, x in values:  # efficiencies and bandwidths divide
                positive = rate.endswith("_efficiency") or rate == "collective_bandwidth"
                if isinstance(x, bool) or not isinstance(x, int | float) or not (x > 0 if positive else x >= 0):
                    raise ValueError(f"{rate} must be a number {'>' if positive else '>='} 0, got {x!r}")
        if "backsolve_rounds" in data:
            rounds = data["backsolve_rounds"]
            if not (rounds >= 1 and float(rounds).is_integer()):
                raise ValueError(f"backsolve_rounds must be a whole number >= 1, got {rounds!r}")
            data["backsolve_rounds"] = int(rounds)
        return cls(**data)


@dataclass(frozen=True)
class Workload:
    """What is pruned.

    Attributes:
        p: prunable weights; n: calibration samples; model_params: P (all parameters).
        storage_dtype: the factor's storage (b = 4 or 2 bytes).
        iterations: solver (IHT) iterations.
        kept: k, weights kept (default p // 2).
        largest_layer: weights of the largest prunable layer (default p).
        micro_batch: samples per backward pass; layers: prunable layers (messages of the exchange).
        active_fraction: |W| / p of the solver's active set; model_sharded: ZeRO-3.
        threads_per_rank: t (CPU).
        backsolves: ridge backsolves run by the solver (counted in the report); None: ``Rates.backsolve_rounds``.
        solves: solver calls (CHITA++: one per stage).
        stages: per solve (p_t, k_t, iterations_t, backsolves_t): the columns the solve runs on (CHITA++ stage t
            solves on the k_{t-1} columns stage t - 1 kept; the solver compacts A to them), the weights it keeps,
            its IHT iterations and backsolves. None: ``solves`` equal solves of p columns sharing ``iterations``
            and the backsolves.
        flops_per_sample: forward + backward FLOPs of one sample (default 6 P; a causal LM on T tokens:
            6 P T; a convolutional net: 3x its forward FLOPs, since weights are reused across positions).
        granularity: the sparsity budget the solver projects onto (:data:`GRANULARITIES`), which sets what its
            selections communicate (:func:`iteration_collectives`): "global" (one top-k over all ranks, the
            default here: the CHITA paper's, and that of reports whose config has no ``prune.granularity``),
            "layer" (one top-k per layer, ``layers`` segments straddling ranks), "row" (one per output row, each on
            one rank: no histogram all-reduce) or "nm" (N:M groups, local too).
        backsolve_work: per solve, what its backsolves ran, the counts of
            :data:`~dist_chita.fisher.backsolve.WORK_KEYS` in that order (a report's ``stages[].backsolve_work``:
            a lambda path's backsolves share one Gram matrix, each factors and solves its own system); None: each
            backsolve forms its own Gram matrix, factors it and runs ``Rates.pcg_steps`` PCG steps.
        kept_by_layer: per prunable layer in column order (size, kept, row length), the report's ``layers``: where
            the kept weights lie, hence how many of them each rank's column block holds
            (:func:`kept_imbalance`); None: evenly spread.
    """

    p: int
    n: int
    model_params: int
    storage_dtype: str = "float32"
    iterations: int = 100
    kept: int | None = None
    largest_layer: int | None = None
    micro_batch: int = 1
    layers: int = 1
    active_fraction: float = 0.0
    model_sharded: bool = False
    threads_per_rank: int = 1
    backsolves: int | None = None
    solves: int = 1
    flops_per_sample: float | None = None
    stages: tuple[tuple[int, int, int, int], ...] | None = None
    granularity: str = "global"
    backsolve_work: tuple[tuple[float, ...], ...] | None = None
    kept_by_layer: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.storage_dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown storage dtype {self.storage_dtype!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; expected one of {', '.join(GRANULARITIES)}")
        for f in ("p", "n", "model_params", "micro_batch", "layers", "threads_per_rank"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.stages is not None and (len(self.stages) != self.solves or any(
                len(st) != 4 or st[0] < 1 or st[1] < 0 or st[2] < 0 or st[3] < 0 for st in self.stages)):
            raise ValueError("stages must hold one (p_t >= 1, k_t, iterations_t, backsolves_t) >= 0 per solve")
        if self.backsolve_work is not None and (len(self.backsolve_work) != self.solves or any(
                len(wk) != len(WORK_KEYS) or min(wk) < 0 for wk in self.backsolve_work)):
            raise ValueError(f"backsolve_work must hold {len(WORK_KEYS)} counts >= 0 ({', '.join(WORK_KEYS)}) "
                             "per solve")

    @property
    def k(self) -> int:
        return self.kept if self.kept is not None else self.p // 2

    @property
    def sample_flops(self) -> float:
        return self.flops_per_sample if self.flops_per_sample is not None else 6.0 * self.model_params

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.storage_dtype]

    def solve_list(self, backsolve_rounds: int = 1) -> list[tuple[float, float, float, float]]:
        """(p_t, k_t, iterations_t, backsolves_t) per solve: ``stages``, or ``solves`` equal shares of p, k,
        ``iterations`` and the backsolves (``backsolves``, else ``backsolve_rounds``)."""
        if self.stages is not None:
            return [tuple(float(v) for v in st) for st in self.stages]
        m = self.backsolves if self.backsolves is not None else backsolve_rounds
        return [(float(self.p), float(self.k), self.iterations / self.solves, m / self.solves)] * self.solves


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds per phase (``seconds``), their terms (``terms``), memory per rank and whether it fits.

    ``solver_bytes_per_iteration``: payload bytes one rank sends in the all-reduces of one IHT iteration with
    ``Rates.selections_per_iteration`` trials (:func:`iteration_collectives`; 0 at R = 1), as
    ``dist_chita/distributed/comm.py`` counts them; the per-solve set-up's collectives are not in it."""

    ranks: int
    seconds: dict[str, float]
    terms: dict[str, float]
    memory: MemoryEstimate
    memory_available: float
    solver_bytes_per_iteration: float

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def fits(self) -> bool:
        return self.memory.total <= usable_bytes(self.memory_available)


def allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring/tree all-reduce of ``nbytes``: 2 (R - 1) / R * nbytes / L + 2 log2(R) l (0 at R = 1)."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * math.log2(ranks) * latency


def exchange_bytes(n: int, p: int, ranks: int, dtype_bytes: int) -> float:
    """Bytes one rank sends in the row -> column exchange: its n / R rows, (R - 1) / R of their p columns,
    n p b (R - 1) / R^2."""
    return n * p * dtype_bytes * (ranks - 1) / ranks**2


def memory_per_rank(w: Workload, ranks: int) -> MemoryEstimate:
    """Bytes per rank by part: :func:`dist_chita.planning.memory.estimate` (factor n ceil(p / R) b, model, buffers)."""
    return estimate(
        p=w.p,
        n=w.n,
        world_size=ranks,
        storage_dtype=w.storage_dtype,
        model_params=w.model_params,
        largest_layer=w.largest_layer if w.largest_layer is not None else w.p,
        micro_batch=w.micro_batch,
        active_fraction=w.active_fraction,
        model_sharded=w.model_sharded,
    )


def read_bytes_per_entry(dtype_bytes: int) -> int:
    """Bytes a pass over A moves per entry: b, plus the float32 copy a bfloat16 / float16 chunk is converted into."""
    return dtype_bytes if dtype_bytes == 4 else dtype_bytes + 4


def _link(hw: Hardware, ranks: int, rates: Rates) -> tuple[float, float]:
    bw, lat = hw.link(ranks)
    bw = rates.collective_bandwidth or bw
    lat = rates.collective_latency if rates.collective_latency is not None else lat
    return bw, lat


def projection_collectives(granularity: str, segments: int, ranks: int) -> tuple[int, int]:
    """(all-reduces, payload bytes one rank sends) of one projection H onto a top-k / N:M budget
    (``Budget.project`` -> :func:`dist_chita.fisher.select.topk_mask`) on ``ranks`` > 1 ranks.

    "global" / "layer" (a collective top-k over G = ``segments`` segments; G = 1 for "global"): the NaN/Inf check
    (one int64), the allowed count per segment (G int64), one histogram per radix round (G 2^bits int64 for each
    round's bits, :func:`dist_chita.fisher.select.radix_bits`: 3 rounds for G = 1, 4 for more) and the ties per rank and
    segment (R G int64). "row" / "nm" (every segment on one rank): the NaN/Inf check alone."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    if granularity in ("row", "nm"):
        return 1, 8
    g = 1 if granularity == "global" else segments
    bits = radix_bits(g)
    return 3 + len(bits), 8 * (1 + g + g * sum(1 << b for b in bits) + ranks * g)


def tau_change_collectives(granularity: str, segments: int) -> tuple[int, int]:
    """(all-reduces, payload bytes one rank sends) of ``Budget.tau_change`` on more than one rank: the largest
    |g| outside the support per segment (float32, max: 1 for "global", G = ``segments`` for "layer"; none for "row"
    and "nm", whose segments are local) and the first support change tau_c (one float64, min)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    if granularity in ("row", "nm"):
        return 1, 8
    return 2, 4 * (1 if granularity == "global" else segments) + 8


def iteration_collectives(w: Workload, ranks: int, trials: float) -> tuple[float, float]:
    """(all-reduces, payload bytes one rank sends) of one IHT iteration (``dist_chita.fisher.solver.iht_step``) of
    ``w`` with ``trials`` support-changing trials on ``ranks`` ranks (0, 0 at R = 1): the n-vector u = A g_S with
    ||g_S||^2 (n + 1 float64), tau_c (:func:`tau_change_collectives`) and per trial the projection H
    (:func:`projection_collectives`) and the incremental A w with two scalars (n + 2 float64)::

        calls = 1 + c_tau + T (c_H + 1),    bytes = 8 (n + 1) + b_tau + T (b_H + 8 (n + 2))

    A global budget on R = 2 ranks with n = 32: c_H = 6, b_H = 51,232 B (the three histograms' 6,400 int64 bins),
    so 17 all-reduces and 103,284 B at T = 2; a per-row budget: 6 all-reduces and 832 B."""
    if ranks <= 1:
        return 0.0, 0.0
    c_h, b_h = projection_collectives(w.granularity, w.layers, ranks)
    c_tau, b_tau = tau_change_collectives(w.granularity, w.layers)
    return 1 + c_tau + trials * (c_h + 1), 8 * (w.n + 1) + b_tau + trials * (b_h + 8 * (w.n + 2))


def solver_iteration_terms(w: Workload, ranks: int, hw: Hardware, rates: Rates,
                           columns: float | None = None) -> dict[str, float]:
    """Seconds of one solver iteration on ``columns`` (default p) by term: block reads, vector passes
    (selections), n-vector all-reduces, latency of the selections' small all-reduces (those of the budget's
    granularity, :func:`iteration_collectives`), overhead."""
    bw, lat = _link(hw, ranks, rates)
    s = hw.compute_share(ranks, w.threads_per_rank)
    p_r = math.ceil((w.p if columns is None else columns) / ranks)
    mem_bw = hw.memory_bandwidth * s * rates.memory_efficiency
    hops = 2 * math.log2(ranks) if ranks > 1 else 0.0
    T = rates.selections_per_iteration
    c_h, _ = projection_collectives(w.granularity, w.layers, ranks)
    c_tau, _ = tau_change_collectives(w.granularity, w.layers)
    return {
        "reads": rates.block_reads * w.n * p_r * read_bytes_per_entry(w.dtype_bytes)
                 / (hw.memory_bandwidth * s * rates.read_efficiency),
        "vectors": (rates.iteration_vector_bytes + T * rates.selection_bytes) * p_r / mem_bw,
        "allreduce": (1 + T) * allreduce_seconds(8 * w.n, ranks, bw, lat),
        "selection": (T * c_h + c_tau) * hops * lat,
        "overhead": rates.iteration_overhead / hw.time_slice(ranks, w.threads_per_rank),
    }


def solver_setup_seconds(w: Workload, ranks: int, hw: Hardware, rates: Rates, columns: float | None = None,
                         kept: float | None = None) -> float:
    """Seconds per solve on ``columns`` (default p) keeping ``kept`` (default k) outside the iterations but
    inside the timed IHT: c extra block reads, the exact A w over the support's k / p of the rows (gathered and
    converted to float64: b + 8 bytes per entry), v_s bytes per column, and its two all-reduces' latency."""
    _, lat = _link(hw, ranks, rates)
    s = hw.compute_share(ranks, w.threads_per_rank)
    cols = w.p if columns is None else columns
    p_r = math.ceil(cols / ranks)
    frac = min(1.0, (w.k if kept is None else kept) / cols)
    reads = (rates.setup_reads * w.n * read_bytes_per_entry(w.dtype_bytes)
             + frac * (w.n * (w.dtype_bytes + 8) + rates.row_gather_bytes)) / rates.read_efficiency
    per_column = rates.solve_vector_bytes
    hops = 2 * math.log2(ranks) if ranks > 1 else 0.0
    return (reads + per_column / rates.memory_efficiency) * p_r / (hw.memory_bandwidth * s) + 2 * hops * lat


def syrk_fraction(n: int) -> float:
    """Share of the 2 n^2 m FLOPs of R^T R (R: m x n) that ``dist_chita.fisher.backsolve._syrk`` computes: with nb =
    :func:`~dist_chita.fisher.backsolve.syrk_tiles` column tiles (nb >= 2) the lower tile triangle, (nb + 1) / (2 nb)
    (10/16 at n >= 512); else the full product."""
    nb = syrk_tiles(n)
    return 1.0 if nb < 2 else (nb + 1) / (2 * nb)


def kept_imbalance(w: Workload, ranks: int) -> float:
    """The most kept weights a rank's column block holds over the mean k / R: each layer's kept weights spread evenly
    over the layer (``Workload.kept_by_layer``), the blocks those of ``dist_chita/distributed/partition.py`` (cut at
    rows for the per-row budget); 1 without ``kept_by_layer``. The backsolve's work on the kept rows is the slowest
    rank's: the others wait for it in the next all-reduce."""
    layers = w.kept_by_layer
    total = sum(kept for _, kept, _ in layers) if layers else 0
    if ranks <= 1 or not total:
        return 1.0
    p = sum(size for size, _, _ in layers)
    blocks = (row_blocks([(size // length, length) for size, _, length in layers], ranks) if w.granularity == "row"
              else column_blocks(p, ranks))
    held = []
    for lo, hi in blocks:
        start, kept_here = 0, 0.0
        for size, kept, _ in layers:
            kept_here += kept * max(0, min(hi, start + size) - max(lo, start)) / size
            start += size
        held.append(kept_here)
    return max(held) / (total / ranks)


def backsolve_work(kept_work: dict | None, rates: Rates) -> dict[str, float]:
    """The work of one stage's backsolves (keys of :data:`~dist_chita.fisher.backsolve.WORK_KEYS`): a report's
    ``backsolve_work`` as given; without one (``None``), that of one backsolve that forms its own Gram matrix,
    factors it once and runs q = ``rates.pcg_steps`` PCG steps (multiply by the backsolves)."""
    if kept_work is not None:
        return {k: float(kept_work.get(k, 0)) for k in WORK_KEYS}
    return {"grams": 1.0, "gram_updates": 0.0, "gram_update_rows": 0.0, "factorizations": 1.0, "pcg_runs": 1.0,
            "pcg_steps": rates.pcg_steps}


def row_pass_bytes(products: int, gathered: bool, dtype_bytes: int) -> int:
    """Bytes moved per kept-row entry by one pass of ``products`` float64 products over the kept rows
    (``dist_chita/fisher/backsolve.py``'s ``_chunks``): from the gathered float32 rows, read 4 and write the
    float64 chunk (8); else gathered from the block on the fly, index_select (read b, write b) and the float64 copy
    (read b, write 8); then each product reads the chunk (8)."""
    return (12 if gathered else 3 * dtype_bytes + 8) + 8 * products


def gather_bytes(dtype_bytes: int) -> int:
    """Bytes per entry of gathering kept rows into float32 (``At.index_select(0, idx).float()``: read b, write b,
    and for a 2-byte factor the float32 copy, read b, write 4)."""
    return 2 * dtype_bytes + (0 if dtype_bytes == 4 else dtype_bytes + 4)


def backsolve_terms(w: Workload, ranks: int, hw: Hardware, rates: Rates, kept: float,
                    work: dict | None = None) -> dict[str, float]:
    """Seconds of the backsolves of one solve keeping ``kept`` columns (dual path of
    ``dist_chita/fisher/backsolve.py``, |S| >= n), by term, on the busiest rank's m = ceil(kept / R x
    :func:`kept_imbalance`) kept rows, for ``work``
    (:func:`backsolve_work`: the Gram matrices formed and updated, factorisations, PCG solves and steps; None: one
    backsolve):

    * gram: per Gram matrix formed, the float32 A_{r,S} A_{r,S}^T of the m rows by the blocked syrk,
      :func:`syrk_fraction` x 2 n^2 m FLOPs, at F s e_a n / (n + n_h) (:attr:`Hardware.gram_half_width`: the
      product of m x n rows is thin for small n); an update from a nearby support the same per row changed (its
      rows over all ranks / R);
    * cholesky: per factorisation the float64 factor of lambda I + G, n^3 / 3 FLOPs at half the float32 rate F
      (given), computed redundantly by every rank on its own share s of the cores;
    * precond: per PCG solve 2 + q applications of the factor (``cholesky_solve``: two triangular solves, each a
      read of the n^2 / 2 float64 entries of L: 8 n^2 B at M s, given);
    * rows: per Gram matrix formed or updated (a new support) the gather of the m rows into float32
      (:func:`gather_bytes`, when :func:`~dist_chita.fisher.backsolve.gathers` says they fit) and an update's
      changed rows, and per PCG solve
      the passes over them: A_S^T y and A_S b (one product each) and 1 + q fused ones (A_S A_S^T v, two
      products), :func:`row_pass_bytes` per entry, at e_b M s; when the rows are too large to keep gathered
      (:func:`~dist_chita.fisher.backsolve.gathers`), g_row bytes per row on every pass and Gram (``row_gather_bytes``);
    * allreduce: per Gram matrix formed or updated the n x n float64 G; per PCG solve 2 + q n-vectors (A_S b, the
      first A_S A_S^T x_0, one per step) and 4 scalars (the support size, the recall check, the change count, PCG's
      scale), at the link's rate times s (gloo copies on the ranks' own cores) and its latency / s' (a rank waiting
      for its turn on a shared core).
    """
    bw, lat = _link(hw, ranks, rates)
    s = hw.compute_share(ranks, w.threads_per_rank)
    slice_ = hw.time_slice(ranks, w.threads_per_rank)
    n, b = w.n, w.dtype_bytes
    m = math.ceil(kept / ranks * kept_imbalance(w, ranks))
    wk = backsolve_work(work, rates)
    runs, steps = wk["pcg_runs"], wk["pcg_steps"]
    gram_rows = wk["grams"] * m + wk["gram_update_rows"] / ranks
    gathered = gathers(m, n)
    pass_bytes = runs * 2 * row_pass_bytes(1, gathered, b) + (runs + steps) * row_pass_bytes(2, gathered, b)
    gathered_rows = (wk["grams"] + wk["gram_updates"]) * m * gathered + wk["gram_update_rows"] / ranks
    row_bytes = n * (m * pass_bytes + gathered_rows * gather_bytes(b))
    # index_select of each kept row per pass and per Gram when they are not kept gathered: a cost per row beyond
    # its bytes (at M, not e_b M: it is fitted on its own)
    regathered = 0.0 if gathered else (m * (3 * runs + steps) + gram_rows) * rates.row_gather_bytes
    link = (bw * s, lat / slice_)
    collectives = ((wk["grams"] + wk["gram_updates"]) * allreduce_seconds(8 * n * n, ranks, *link)
                   + (2 * runs + steps) * allreduce_seconds(8 * n, ranks, *link)
                   + 4 * runs * allreduce_seconds(8, ranks, *link))
    return {
        "gram": syrk_fraction(n) * 2 * n * n * gram_rows / (hw.flops * rates.linalg_efficiency * s)
        * (n + hw.gram_half_width) / n,
        "allreduce": collectives,
        "cholesky": wk["factorizations"] * n**3 / 3 / (hw.flops / 2 * s),
        "precond": (2 * runs + steps) * 8 * n * n / (hw.memory_bandwidth * s),
        "rows": (row_bytes / (rates.row_efficiency * rates.linalg_efficiency) + regathered) / (hw.memory_bandwidth * s),
    }


def predict(w: Workload, ranks: int, hw: Hardware, rates: Rates | None = None) -> Prediction:
    """Seconds per phase and memory per rank for ``w`` on ``ranks`` ranks of ``hw`` (formulas: module docstring)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    rates = rates or Rates()
    bw, lat = _link(hw, ranks, rates)
    s = hw.compute_share(ranks, w.threads_per_rank)
    n, p, b, R = w.n, w.p, w.dtype_bytes, ranks
    p_r = math.ceil(p / R)
    mem_bw = hw.memory_bandwidth * s * rates.memory_efficiency
    fixed = rates.fixed

    micro_batches = math.ceil(n / R / w.micro_batch)
    grad_flops = rates.persample_factor * w.sample_flops * (n / R)
    slice_ = hw.time_slice(R, w.threads_per_rank)
    exchange = (exchange_bytes(n, p, R, b) / (bw * s * rates.exchange_efficiency)
                + (micro_batches * w.layers * (R - 1) * lat + rates.exchange_overhead) / slice_) if R > 1 else 0.0
    Z = hw.page_population_bandwidth
    terms = {
        # once per prune: CHITA++ stages reuse the first stage's storage
        "fisher_allocation": n * p_r * b / (Z * s * rates.population_efficiency) if Z else 0.0,
        "fisher_gradients": w.solves * grad_flops / (hw.flops * s * rates.grad_efficiency),
        "fisher_write": w.solves * (n / R) * p * b / mem_bw,
        "fisher_exchange": w.solves * exchange,
    }
    solves = w.solve_list(rates.backsolve_rounds)
    it_names = ("reads", "vectors", "allreduce", "selection", "overhead")
    terms.update({f"solver_{k}": 0.0 for k in it_names})
    terms["solver_setup"] = 0.0
    for k in BACKSOLVE_TERMS:
        terms[f"backsolve_{k}"] = 0.0
    for t, (p_t, k_t, i_t, m_t) in enumerate(solves):
        for k, v in solver_iteration_terms(w, R, hw, rates, p_t).items():
            terms[f"solver_{k}"] += i_t * v
        terms["solver_setup"] += solver_setup_seconds(w, R, hw, rates, p_t, k_t)
        work = None if w.backsolve_work is None else dict(zip(WORK_KEYS, w.backsolve_work[t], strict=True))
        for k, v in backsolve_terms(w, R, hw, rates, k_t, work).items():
            terms[f"backsolve_{k}"] += (1 if work is not None else m_t) * v

    seconds = {
        "fisher": (terms["fisher_allocation"] + terms["fisher_gradients"] + terms["fisher_write"]
                   + terms["fisher_exchange"]),
        "solver": sum(terms[f"solver_{k}"] for k in it_names) + terms["solver_setup"],
        "backsolve": sum(terms[f"backsolve_{k}"] for k in BACKSOLVE_TERMS),
        "writeback": 2 * 4 * p_r / (hw.memory_bandwidth * s),
        "save": 4 * w.model_params / hw.disk_bandwidth,
    }
    seconds = {ph: seconds[ph] + fixed.get(ph, 0.0) for ph in PHASES}
    return Prediction(
        ranks=R,
        seconds=seconds,
        terms=terms,
        memory=memory_per_rank(w, R),
        memory_available=hw.memory_bytes,
        solver_bytes_per_iteration=iteration_collectives(w, R, rates.selections_per_iteration)[1],
    )


def smallest_fitting_ranks(
    w: Workload, hw: Hardware, power_of_two: bool = False, max_ranks: int = 1 << 20
) -> int | None:
    """Smallest R whose memory per rank fits the usable part of ``hw.memory_bytes``
    (:func:`~dist_chita.planning.memory.usable_bytes`; any integer R >= 1, or only powers of two).

    Memory per rank is non-increasing in R, so a binary search is exact. None if even ``max_ranks`` does not fit.
    """

    def fits(r: int) -> bool:
        return memory_per_rank(w, r).total <= usable_bytes(hw.memory_bytes)

    if not fits(max_ranks):
        return None
    if power_of_two:
        r = 1
        while not fits(r):
            r *= 2
        return r
    lo, hi = 1, max_ranks
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---------------------------------------------------------------- calibration from measured reports


def report_granularity(report: dict) -> str:
    """The budget granularity (:data:`GRANULARITIES`) a ``prune_report.json`` dict's run pruned with, read from the
    config it records: "nm" when ``prune.nm`` is set, else ``prune.granularity``; a config without that key means
    one global budget, or one per layer with ``prune.per_layer``."""
    prune = (report.get("config") or {}).get("prune") or {}
    if prune.get("nm"):
        return "nm"
    if "granularity" in prune:
        return str(prune["granularity"])
    return "layer" if prune.get("per_layer") else "global"


def workload_from_report(report: dict) -> Workload:
    """The :class:`Workload` of a ``prune_report.json`` dict (format: docs/report-format.md)."""
    cfg = report.get("config") or {}
    layers = report.get("layers") or []
    largest = max((int(layer["size"]) for layer in layers), default=int(report["p"]))
    micro = int((cfg.get("calibration") or {}).get("batch_size") or report["n"])
    kept = (report.get("global") or {}).get("kept")
    stages = report.get("stages") or []
    backsolves = sum(int(st["backsolves"]) for st in stages) if stages and all(
        "backsolves" in st for st in stages) else None
    per_solve = None
    if stages and all(k in st for st in stages for k in ("kept", "iterations", "backsolves")):
        cols = [int(report["p"])] + [int(st["kept"]) for st in stages[:-1]]  # stage t solves on what t - 1 kept
        per_solve = tuple((c, int(st["kept"]), int(st["iterations"]), int(st["backsolves"]))
                          for c, st in zip(cols, stages, strict=True))
    work = None
    if per_solve and all(st.get("backsolve_work") for st in stages):
        work = tuple(tuple(float(st["backsolve_work"].get(k, 0)) for k in WORK_KEYS) for st in stages)
    return Workload(
        p=int(report["p"]),
        n=int(report["n"]),
        model_params=int(report.get("model_params") or report["p"]),
        storage_dtype=str(report.get("storage_dtype", "float32")),
        iterations=int(report.get("solver_iterations") or 0),
        kept=int(kept) if kept is not None else None,
        largest_layer=largest,
        micro_batch=max(1, micro),
        layers=max(1, len(layers)),
        threads_per_rank=int(report.get("threads_per_rank") or 1),
        backsolves=backsolves,
        solves=max(1, len(stages)),
        stages=per_solve,
        granularity=report_granularity(report),
        backsolve_work=work,
        kept_by_layer=tuple((int(layer["size"]), int(layer["kept"]), _row_length(layer)) for layer in layers)
        if layers and all("size" in layer and "kept" in layer for layer in layers) else None,
    )


def _row_length(layer: dict) -> int:
    """Weights per row of a report's layer (its ``shape`` past the first dimension; the size without a shape)."""
    shape = layer.get("shape") or [layer["size"]]
    return int(math.prod(shape[1:])) if len(shape) > 1 else int(layer["size"])


def measured_seconds(report: dict) -> dict[str, float]:
    """Max over ranks of each phase of ``phase_seconds`` (0 when missing).

    The report's "fisher" is the wall time of :func:`dist_chita.fisher.factor.fisher_block`, which already contains the
    row -> column exchange; its "exchange" entry is the part of that time spent packing, exchanging and unpacking,
    so it is not added again."""
    ps = report.get("phase_seconds") or {}
    return {ph: max(float(v) for v in ps[ph]) if ps.get(ph) else 0.0 for ph in PHASES}


def _nnls(columns: list[list[float]], target: list[float], measured: list[float] | None = None) -> list[float]:
    """Non-negative least squares min ||W (X c - y)|| s.t. c >= 0 (X given by columns); scipy when available.

    With ``measured`` (the phase's measured seconds per row), W = diag(1 / max(measured, WEIGHT_FLOOR_SECONDS)):
    the fit minimises relative errors (what the validation scores) instead of letting the longest runs dominate,
    and phases under the floor (timer and launch noise) count by their absolute error only."""
    import numpy as np

    X = np.array(columns, dtype=float).T
    y = np.array(target, dtype=float)
    if measured is not None:
        wts = 1.0 / np.maximum(np.array(measured, dtype=float), WEIGHT_FLOOR_SECONDS)
        X, y = X * wts[:, None], y * wts
    scale = np.where(np.abs(X).max(axis=0) > 0, np.abs(X).max(axis=0), 1.0)
    try:
        from scipy.optimize import nnls

        c, _ = nnls(X / scale, y)
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        c = np.clip(np.linalg.lstsq(X / scale, y, rcond=None)[0], 0.0, None)
    return [float(v) for v in c / scale]


def stage_one_share(report: dict, solves: int) -> float | None:
    """Stage 1's share of the gradient phase (its "fisher" seconds over all stages') when the report times each of
    its ``solves`` > 1 stages; else None."""
    stages = report.get("stages") or []
    if solves < 2 or len(stages) != solves:
        return None
    try:
        secs = [float(st["seconds"]["fisher"]) for st in stages]
    except (KeyError, TypeError, ValueError):
        return None
    total = sum(secs)
    return secs[0] / total if total > 0 else None


def _efficiency(inverse: float, feature: list[float], base: float) -> float:
    """An efficiency from its fitted inverse: 1 / inverse; a zero coefficient on a ``feature`` that varied is the
    fit's answer (no cost: inf); on a feature that was always 0 the fit says nothing (``base``)."""
    if inverse > 0:
        return 1.0 / inverse
    return math.inf if any(feature) else base


Load = tuple[Workload, int, dict[str, float]]  # a report's workload, world size R and measured seconds per phase


def _fit_solver(loads: list[Load], hw: Hardware, base: Rates) -> Rates:
    """``base`` with the solver's fitted e_m, latency l and per-iteration overhead o: t = (all bytes of the passes
    at M s) * 1/e_m + (latency hops) * l + sum_t i_t / s' * o, plus the all-reduces' bandwidth part at L (given)."""

    def solver_at(w: Workload, R: int, **kw) -> float:
        zero = dict(memory_efficiency=math.inf, collective_latency=0.0, iteration_overhead=0.0)
        return predict(w, R, hw, dataclasses.replace(base, **{**zero, **kw}, fixed={})).seconds["solver"]

    cols: list[list[float]] = [[], [], []]
    y: list[float] = []
    for w, R, t in loads:
        bandwidth = solver_at(w, R)  # the all-reduces' bytes at L
        cols[0].append(solver_at(w, R, memory_efficiency=1.0) - bandwidth)
        cols[1].append(solver_at(w, R, collective_latency=1.0) - bandwidth)
        cols[2].append(solver_at(w, R, iteration_overhead=1.0) - bandwidth)
        y.append(max(0.0, t["solver"] - bandwidth))
    inv_em, lat, overhead = _nnls(cols, y, [t["solver"] for _, _, t in loads])
    mem_eff = _efficiency(inv_em, cols[0], base.memory_efficiency)
    if not any(cols[1]):
        lat = base.collective_latency if base.collective_latency is not None else hw.link(1)[1]
    return dataclasses.replace(base, memory_efficiency=mem_eff, collective_latency=lat, iteration_overhead=overhead)


def _fisher_rows(loads: list[Load], reports: list[dict], hw: Hardware,
                 rates: Rates) -> tuple[list[list[float]], list[float], list[float]]:
    """Least-squares rows of the gradient phase: columns (gradients at F s, exchanged bytes at L s, stages / s',
    allocation at Z s), targets net of the row writes and message latency at ``rates``, and the measured seconds.

    A CHITA++ report that times every stage gives two rows, stage 1 (which alone pays the allocation) and the later
    stages together, the measured phase split in the stages' proportions (:func:`stage_one_share`): that separates
    the allocation from the per-stage terms, which a run total with the same stage count in every run cannot."""
    cols: list[list[float]] = [[], [], [], []]
    y: list[float] = []
    meas: list[float] = []
    for (w, R, t), rep in zip(loads, reports, strict=True):
        wf = dataclasses.replace(w, iterations=0)
        unit = dataclasses.replace(rates, grad_efficiency=1.0, exchange_efficiency=math.inf, exchange_overhead=0.0,
                                   population_efficiency=1.0)
        pred = predict(wf, R, hw, unit)
        per_stage = [pred.terms["fisher_gradients"],
                     predict(wf, R, hw, dataclasses.replace(unit, exchange_efficiency=1.0)).terms["fisher_exchange"]
                     - pred.terms["fisher_exchange"],  # the exchanged bytes at L
                     w.solves / hw.time_slice(R, w.threads_per_rank) if R > 1 else 0.0]
        given = pred.terms["fisher_write"] + pred.terms["fisher_exchange"]
        share = stage_one_share(rep, w.solves)
        parts = [(1.0, 1.0, 1.0)] if share is None else [(1.0 / w.solves, 1.0, share),
                                                         (1.0 - 1.0 / w.solves, 0.0, 1.0 - share)]
        for frac, alloc, part in parts:
            for c, v in zip(cols, [*(frac * v for v in per_stage), alloc * pred.terms["fisher_allocation"]],
                            strict=True):
                c.append(v)
            y.append(max(0.0, part * t["fisher"] - frac * given))
            meas.append(part * t["fisher"])
    return cols, y, meas


def _fit_fisher(loads: list[Load], reports: list[dict], hw: Hardware, rates: Rates,
                base: Rates) -> tuple[Rates, float]:
    """``rates`` with the fitted exchange efficiency e_x, exchange overhead x and population efficiency e_p, and
    the fitted gradient efficiency e_g (applied by :func:`calibrate`). No fixed term: a single rank's gradient
    phase is its gradients. e_x is inf when the fit gives the exchanged bytes no cost beyond x."""
    cols, y, meas = _fisher_rows(loads, reports, hw, rates)
    inv_eg, inv_ex, x_over, inv_ep = _nnls(cols, y, meas)
    grad_eff = 1.0 / inv_eg if inv_eg > 0 else base.grad_efficiency
    ex_eff = 1.0 / inv_ex if inv_ex > 0 else math.inf
    pop_eff = _efficiency(inv_ep, cols[3], base.population_efficiency)
    if not any(cols[2]):  # every report at R = 1: the exchange is not observed
        ex_eff, x_over = base.exchange_efficiency, base.exchange_overhead
    return dataclasses.replace(rates, exchange_efficiency=ex_eff, exchange_overhead=x_over,
                               population_efficiency=pop_eff), grad_eff


def _with_backsolve_rounds(loads: list[Load], reports: list[dict], rates: Rates) -> Rates:
    """``rates`` with ``backsolve_rounds`` the median count of backsolves the reports give; for reports without
    it, the payload bytes of the backsolve phase / 8 n^2 (one n x n float64 Gram all-reduce each) over the
    multi-rank reports; unchanged when neither is there."""
    counts = [float(w.backsolves) for w, _, _ in loads if w.backsolves is not None]
    for rep in reports if not counts else []:
        sent = (rep.get("bytes_sent") or {}).get("backsolve")
        if int(rep["world_size"]) > 1 and sent:
            counts.append(max(float(v) for v in sent) / (8.0 * int(rep["n"]) ** 2))
    if counts:
        rates = dataclasses.replace(rates, backsolve_rounds=max(1, round(sorted(counts)[len(counts) // 2])))
    return rates


def _fit_backsolve(loads: list[Load], hw: Hardware, rates: Rates, base: Rates) -> tuple[Rates, float, float]:
    """``rates`` with the fitted per-row gather cost g_row, the fitted e_a (applied by :func:`calibrate`) and the
    backsolve's fixed term.

    t - (Cholesky FLOPs at F s / 2, the factor's applications at M s, all-reduces at L s and the fitted l / s') =
    (Gram FLOPs at F s n / (n + n_h) + kept-row bytes at e_b M s) * 1/e_a + (re-gathered rows) * g_row
    + f_backsolve. The Gram matrices, factorisations and PCG solves are the reports' counts (a lambda path's
    backsolves share one Gram matrix); g_row is the cost of the many small gathers of rows too large to keep
    gathered, beyond their bytes."""
    cols: list[list[float]] = [[], [], []]
    y: list[float] = []
    unit = dataclasses.replace(rates, linalg_efficiency=1.0, row_gather_bytes=0.0, fixed={})
    for w, R, t in loads:
        pred = predict(w, R, hw, unit)
        cols[0].append(pred.terms["backsolve_gram"] + pred.terms["backsolve_rows"])
        cols[1].append(predict(w, R, hw, dataclasses.replace(unit, row_gather_bytes=1.0)).terms["backsolve_rows"]
                       - pred.terms["backsolve_rows"])
        cols[2].append(1.0)
        given = sum(pred.terms[f"backsolve_{k}"] for k in ("allreduce", "cholesky", "precond"))
        y.append(max(0.0, t["backsolve"] - given))
    inv_ea, gather_cost, fixed_back = _nnls(cols, y, [t["backsolve"] for _, _, t in loads])
    lin_eff = _efficiency(inv_ea, cols[0], base.linalg_efficiency)
    return dataclasses.replace(rates, row_gather_bytes=gather_cost), lin_eff, fixed_back


def _fixed_transfer_terms(loads: list[Load], hw: Hardware, rates: Rates) -> dict[str, float]:
    """Fixed seconds of writeback and save: the mean of what their modelled bytes (2 * 4 p_R at M s; 4 P at the
    disk bandwidth) leave unexplained (>= 0)."""
    fixed = {}
    for ph in ("writeback", "save"):
        modelled = [predict(w, R, hw, dataclasses.replace(rates, fixed={})).seconds[ph] for w, R, _ in loads]
        fixed[ph] = max(0.0, sum(t[ph] - m for (_, _, t), m in zip(loads, modelled, strict=True)) / len(loads))
    return fixed


def calibrate(reports: list[dict], hw: Hardware, base: Rates | None = None) -> Rates:
    """Fit the machine rates to measured runs (non-negative least squares per phase, over all reports, each row
    weighted by 1 / max(measured, ``WEIGHT_FLOOR_SECONDS``) so that relative errors count).

    Only efficiencies, latency and overheads are fitted; the byte and selection counts per column (v_it, v_sel, T,
    v_s, r, c) and the hardware's M, F, L stay as given (module docstring):

    * solver (:func:`_fit_solver`): t = (all bytes of the passes at M s) * 1/e_m + (latency hops) * l
      + sum_t i_t / s' * o, plus the all-reduces' bandwidth part at L; fitting 1/e_m, l and o;
    * fisher (:func:`_fit_fisher`): t = solves (c_g f n / R / (F s) * 1/e_g + [R > 1] (n p b (R - 1) / R^2 / (L s)
      * 1/e_x + x / s')) + n p_R b / (Z s) * 1/e_p (once) + row writes and message latency at the fitted e_m and
      l; fitting 1/e_g, 1/e_x, x and 1/e_p; a CHITA++ report that times its stages gives two rows (stage 1, which
      alone allocates, and the rest; :func:`stage_one_share`);
    * backsolve (:func:`_fit_backsolve`): t = (Gram FLOPs at F s n / (n + n_h) + kept-row bytes at e_b M s) *
      1/e_a + g_row per re-gathered row + (Cholesky FLOPs at F s / 2, the factor's applications at M s, all-reduces
      at L s and the fitted l / s') + f_backsolve, fitting 1/e_a, g_row and f_backsolve; the counts per stage from
      the report's ``backsolve_work`` (else per backsolve, :func:`_with_backsolve_rounds`);
    * writeback, save: the modelled bytes plus the mean of what they leave unexplained as the fixed term.

    A rate whose feature never varies (e.g. latency when every report has R = 1) keeps its base value; one whose
    feature varied but which the fit gave no cost is infinite (:func:`_efficiency`).
    """
    if not reports:
        raise ValueError("calibrate needs at least one report")
    base = base or Rates()
    loads = [(workload_from_report(r), int(r["world_size"]), measured_seconds(r)) for r in reports]
    rates = _fit_solver(loads, hw, base)
    rates, grad_eff = _fit_fisher(loads, reports, hw, rates, base)
    rates = _with_backsolve_rounds(loads, reports, rates)
    rates, lin_eff, fixed_back = _fit_backsolve(loads, hw, rates, base)
    fixed = {"fisher": 0.0, "backsolve": fixed_back, **_fixed_transfer_terms(loads, hw, rates)}
    return dataclasses.replace(rates, grad_efficiency=grad_eff, linalg_efficiency=lin_eff, fixed=fixed)


def compare(reports: list[dict], hw: Hardware, rates: Rates) -> list[dict]:
    """Predicted vs measured seconds per phase and world size: rows of
    {world_size, n, phase, measured, predicted, rel_error} (rel_error = (predicted - measured) / measured, None at 0).
    Phase "sum" is the sum of the modelled phases (fisher, solver, backsolve, writeback, save), not the run's
    total (which also holds loading and evaluation)."""
    rows = []
    for r in sorted(reports, key=lambda r: int(r["world_size"])):
        R = int(r["world_size"])
        pred = predict(workload_from_report(r), R, hw, rates)
        meas = measured_seconds(r)
        pairs = [(ph, meas[ph], pred.seconds[ph]) for ph in PHASES]
        pairs.append(("sum", sum(meas.values()), pred.total))
        for ph, m, pr in pairs:
            rel = (pr - m) / m if m > 0 else None
            row = {"world_size": R, "n": int(r["n"]), "phase": ph, "measured": m, "predicted": pr, "rel_error": rel}
            if ph == "sum":
                row["largest_part"] = max(meas.values())
            rows.append(row)
    return rows


def scored(row: dict, min_seconds: float) -> bool:
    """Whether a :func:`compare` row counts: measured at ``min_seconds`` or more; a "sum" row also needs one of its
    phases to count (a sum of phases that are each timer and launch noise is no better a measurement)."""
    return (row["rel_error"] is not None and row["measured"] >= min_seconds
            and row.get("largest_part", row["measured"]) >= min_seconds)


def worst_errors(rows: list[dict], min_seconds: float) -> dict[str, float]:
    """Largest |rel_error| per phase of :func:`compare` rows, over the rows that count (:func:`scored`)."""
    out: dict[str, float] = {}
    for row in rows:
        if scored(row, min_seconds):
            out[row["phase"]] = max(out.get(row["phase"], 0.0), abs(row["rel_error"]))
    return out


def compare_held_out(reports: list[dict], hw: Hardware, base: Rates | None = None) -> list[dict]:
    """Leave-one-out validation: each report predicted with rates fitted to the *other* reports
    (rows as :func:`compare`). Needs at least two reports; with few reports some rates are poorly determined
    (e.g. latency when only one multi-rank run remains), so expect larger errors than in-sample."""
    if len(reports) < 2:
        raise ValueError("held-out comparison needs at least two reports")
    rows = []
    for i, rep in enumerate(reports):
        rates = calibrate(reports[:i] + reports[i + 1:], hw, base)
        rows += compare([rep], hw, rates)
    return sorted(rows, key=lambda row: row["world_size"])


def format_comparison(rows: list[dict], noise_seconds: float = 0.05) -> str:
    """The :func:`compare` rows as a text table; errors of phases under ``noise_seconds`` are marked "*"."""
    lines = [f"{'R':>3} {'phase':<10} {'measured s':>11} {'predicted s':>12} {'error':>9}"]
    marked = False
    for row in rows:
        err = "-" if row["rel_error"] is None else f"{100 * row['rel_error']:+.0f}%"
        if row["rel_error"] is not None and row["measured"] < noise_seconds:
            err, marked = err + "*", True
        lines.append(f"{row['world_size']:>3} {row['phase']:<10} {row['measured']:>11.3f} {row['predicted']:>12.3f} "
                     f"{err:>9}")
    if marked:
        lines.append(f"  * measured under {noise_seconds * 1000:.0f} ms: timer noise, not a model error")
    return "\n".join(lines)
