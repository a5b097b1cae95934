"""dist_chita.planning.costmodel: hand-checked arithmetic, monotonicity in R, smallest fitting R, calibration."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dist_chita.distributed import comm
from dist_chita.distributed.layout import ColumnLayout
from dist_chita.distributed.partition import sample_ranges
from dist_chita.fisher import losses
from dist_chita.fisher.factor import fisher_block  # imported here, so that the forked ranks of tests.multiproc have it
from dist_chita.planning import costmodel as cm
from dist_chita.prunable import named_shapes, prunable_modules

GPU = cm.Hardware(name="g", memory_bytes=80e9, memory_bandwidth=2e12, flops=1e14, link_bandwidth=25e9,
                  link_latency=1e-5, devices_per_node=8, node_bandwidth=200e9, node_latency=5e-6)
CPU = cm.Hardware(name="c", memory_bytes=16e9, memory_bandwidth=5e9, flops=5e10, link_bandwidth=2e9,
                  link_latency=5e-5, shared_cores=2)


FACTOR_N = 10  # calibration samples of the factor-allocation probe
FACTOR_ROW = 13  # the longest row of its MLP: Linear(13, 7) then Linear(7, 5), p = 91 + 35 = 126


def _allocated_factor(dtype_name: str, per_row: bool) -> tuple[int, int]:
    """On this rank: bytes of the block At that :func:`dist_chita.fisher.factor.fisher_block` allocates for a
    13-7-5 MLP (the layout the driver builds: an even column split, or cut at rows for per-row budgets), and the
    model's parameter bytes as its tensors hold them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5))
    x, labels = torch.randn(FACTOR_N, 13), torch.randint(0, 5, (FACTOR_N,))
    modules = prunable_modules(model, exclude_head=False)
    layout = ColumnLayout.build(named_shapes(modules), comm.world_size(), rows=per_row)
    lo, hi = sample_ranges(FACTOR_N, comm.world_size())[comm.rank()]
    cuts = [(i, min(i + 4, hi)) for i in range(lo, hi, 4)]
    batches = [({"pixel_values": x[i:j], "labels": labels[i:j]}, torch.arange(i, j)) for i, j in cuts]
    loss = losses.cross_entropy(lambda m, batch: m(batch["pixel_values"]))
    at = fisher_block(model, modules, layout, batches, lo, FACTOR_N, loss, dtype=getattr(torch, dtype_name))
    return at.numel() * at.element_size(), sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 4])  # 126 columns: 4 ranks split them unevenly
def test_factor_and_model_memory_are_what_the_code_allocates(ranks):
    """The factor term is the largest block At any rank's ``fisher_block`` allocates (``At.numel() *
    At.element_size()``, float32 and bfloat16) for the even column split; blocks cut at rows (per-row budgets) may
    pass the even split by less than one row of n entries. The model term is the parameters' bytes."""
    from tests.multiproc import run

    for dtype_name in ("float32", "bfloat16"):
        even = run(_allocated_factor, ranks, dtype_name, False)
        params = even[0][1]
        w = cm.Workload(p=126, n=FACTOR_N, model_params=params // 4, storage_dtype=dtype_name)
        mem = cm.memory_per_rank(w, ranks)
        assert mem.factor == max(nbytes for nbytes, _ in even), (dtype_name, even)
        assert mem.model == params
        one_row = FACTOR_N * FACTOR_ROW * cm.DTYPE_BYTES[dtype_name]
        rows = [nbytes for nbytes, _ in run(_allocated_factor, ranks, dtype_name, True)]
        assert sum(rows) == sum(nbytes for nbytes, _ in even) and max(rows) < mem.factor + one_row, rows


def test_solver_iteration_terms_by_hand():
    w = cm.Workload(p=10_000, n=100, model_params=10_000, iterations=10, kept=4000)
    rates = cm.Rates(memory_efficiency=0.5, read_efficiency=0.8, iteration_overhead=1e-3, row_gather_bytes=20.0)
    it = cm.solver_iteration_terms(w, 4, GPU, rates)
    # one fused float32 pass over the block: n p_R b bytes, streamed at e_r M (not at the vector passes' e_m)
    assert it["reads"] == pytest.approx(1 * 100 * 2500 * 4 / (2e12 * 0.8))
    # vector passes: 210 B per column + 2 trials x 500 B per column
    assert it["vectors"] == pytest.approx((210 + 2 * 500) * 2500 / (2e12 * 0.5))
    # 1 + T = 3 all-reduces of 8n bytes inside a node: 2 (R-1)/R * 8n / L + 2 log2 R * l each
    assert it["allreduce"] == pytest.approx(3 * (2 * 3 / 4 * 800 / 200e9 + 2 * 2 * 5e-6))
    # T (q + 3) + 2 = 2 * 6 + 2 = 14 small all-reduces of 2 log2 R = 4 hops
    assert it["selection"] == pytest.approx(14 * 4 * 5e-6)
    assert it["overhead"] == pytest.approx(1e-3)
    # 16 ranks leave the node: the slower link
    assert cm.solver_iteration_terms(w, 16, GPU, rates)["selection"] == pytest.approx(14 * 8 * 1e-5)
    assert cm.solver_iteration_terms(w, 1, GPU, rates)["allreduce"] == 0.0
    pred = cm.predict(w, 4, GPU, rates)
    # once per solve: the exact A w over the support's k / p = 0.4 of the rows, gathered (b + 8 = 12 B per entry and
    # 20 B per row, at e_r M), 45 B per column at e_m M, two all-reduces' latency
    setup = (0.4 * (100 * 12 + 20) / 0.8 + 45 / 0.5) * 2500 / 2e12 + 2 * 4 * 5e-6
    assert pred.terms["solver_setup"] == pytest.approx(setup)
    assert pred.seconds["solver"] == pytest.approx(10 * sum(it.values()) + setup)
    five = cm.predict(dataclasses.replace(w, solves=5), 4, GPU, rates)  # CHITA++ with 5 stages: 5 solves
    assert five.seconds["solver"] == pytest.approx(10 * sum(it.values()) + 5 * setup)
    # bfloat16: a pass moves b + 4 = 6 bytes per entry (the float32 copy of each chunk)
    bf = cm.solver_iteration_terms(dataclasses.replace(w, storage_dtype="bfloat16"), 4, GPU, rates)
    assert bf["reads"] == pytest.approx(100 * 2500 * 6 / (2e12 * 0.8))


def test_solver_per_stage_columns():
    """CHITA++ stage t solves on the columns stage t - 1 kept: its iterations read p_t columns, not p."""
    w = cm.Workload(p=1000, n=50, model_params=1000, solves=2, stages=((1000, 400, 3, 1), (400, 100, 2, 2)))
    rates = cm.Rates(memory_efficiency=0.25)
    pred = cm.predict(w, 2, CPU, rates)
    s = CPU.compute_share(2)
    m = CPU.memory_bandwidth * s * 0.25
    reads = (3 * 50 * 500 * 4 + 2 * 50 * 200 * 4) / (CPU.memory_bandwidth * s)  # streamed at e_r = 1
    assert pred.terms["solver_reads"] == pytest.approx(reads)
    assert pred.terms["solver_vectors"] == pytest.approx((3 * 500 + 2 * 200) * 1210 / m)
    lat = CPU.link_latency
    setup = ((0.4 * 50 * 12 * 500 + 0.25 * 50 * 12 * 200) / (CPU.memory_bandwidth * s) + 45 * (500 + 200) / m
             + 2 * (2 * 2 * lat))
    assert pred.terms["solver_setup"] == pytest.approx(setup)
    # backsolves: 1 on k = 400 and 2 on k = 100: Gram 2 n^2 k / R FLOPs each
    assert pred.terms["backsolve_gram"] == pytest.approx((400 + 2 * 100) * 2 * 50 * 50 / 2 / (CPU.flops * s))
    rep = {"p": 1000, "n": 50, "world_size": 2, "global": {"kept": 100},
           "stages": [{"kept": 400, "iterations": 3, "backsolves": 1}, {"kept": 100, "iterations": 2, "backsolves": 2}]}
    assert cm.workload_from_report(rep).stages == w.stages
    with pytest.raises(ValueError, match="one .* per solve"):
        cm.Workload(p=10, n=1, model_params=10, stages=((10, 5, 1, 1),), solves=2)


def test_solver_communication_flat_in_p():
    rates = cm.Rates()
    a = cm.solver_iteration_terms(cm.Workload(p=10_000, n=128, model_params=1), 8, GPU, rates)
    b = cm.solver_iteration_terms(cm.Workload(p=10_000_000, n=128, model_params=1), 8, GPU, rates)
    assert a["allreduce"] == b["allreduce"] and a["selection"] == b["selection"]
    assert b["reads"] == pytest.approx(1000 * a["reads"])
    pa = cm.predict(cm.Workload(p=10_000, n=128, model_params=1), 8, GPU)
    pb = cm.predict(cm.Workload(p=10_000_000, n=128, model_params=1), 8, GPU)
    assert pa.solver_bytes_per_iteration == pb.solver_bytes_per_iteration > 0


def test_selection_collectives_follow_the_budget_granularity():
    """A collective top-k (global: 3 histogram rounds of 2^11, 2^12, 2^8 bins; per layer: 4 rounds of 2^7, 2^8,
    2^8, 2^8 bins per layer) all-reduces its histograms, counts and ties; per-row and N:M budgets select locally and
    send only the NaN/Inf check's integer, and tau_c's minimum."""
    R, n = 4, 100
    assert cm.projection_collectives("global", 37, R) == (6, 8 * (1 + 1 + 2048 + 4096 + 256 + R))
    assert cm.projection_collectives("layer", 3, R) == (7, 8 * (1 + 3 + 3 * (128 + 3 * 256) + 3 * R))
    assert cm.projection_collectives("layer", 1, R) == cm.projection_collectives("global", 1, R)  # one segment
    assert cm.projection_collectives("row", 500, R) == cm.projection_collectives("nm", 1, R) == (1, 8)
    assert cm.tau_change_collectives("global", 5) == (2, 4 + 8)
    assert cm.tau_change_collectives("layer", 5) == (2, 4 * 5 + 8)
    assert cm.tau_change_collectives("row", 5) == cm.tau_change_collectives("nm", 5) == (1, 8)
    hops, lat = 2 * math.log2(R), GPU.node_latency
    T = cm.Rates().selections_per_iteration
    for gran, small in (("global", T * 6 + 2), ("layer", T * 7 + 2), ("row", T + 1), ("nm", T + 1)):
        w = cm.Workload(p=10_000, n=n, model_params=10_000, layers=3, granularity=gran)
        calls, nbytes = cm.iteration_collectives(w, R, T)
        c_h, b_h = cm.projection_collectives(gran, 3, R)
        c_tau, b_tau = cm.tau_change_collectives(gran, 3)
        assert calls == 1 + small + T and calls == 1 + c_tau + T * (c_h + 1)
        assert nbytes == 8 * (n + 1) + b_tau + T * (b_h + 8 * (n + 2))
        # the latency term counts the small all-reduces, the bytes figure all of them
        assert cm.solver_iteration_terms(w, R, GPU, cm.Rates())["selection"] == pytest.approx(small * hops * lat)
        assert cm.predict(w, R, GPU).solver_bytes_per_iteration == nbytes
        assert cm.iteration_collectives(w, 1, T) == (0.0, 0.0) and cm.predict(w, 1, GPU).solver_bytes_per_iteration == 0
    row = cm.Workload(p=10_000, n=n, model_params=10_000, granularity="row")
    assert cm.iteration_collectives(row, R, 2)[1] == 8 * 101 + 8 + 2 * (8 + 8 * 102)  # no histogram bytes
    with pytest.raises(ValueError, match="granularity"):
        cm.Workload(p=10, n=1, model_params=10, granularity="per_row")


def test_granularity_and_rates_from_reports():
    """A report's granularity comes from the config it records (older reports: per_layer, else global); a rates file
    written before selection_rounds was retired still loads."""
    base = {"p": 100, "n": 10, "world_size": 2}
    for prune, gran in (({"granularity": "row", "nm": None}, "row"), ({"granularity": "layer"}, "layer"),
                        ({"granularity": "row", "nm": "2:4"}, "nm"), ({"per_layer": False}, "global"),
                        ({"per_layer": True}, "layer"), (None, "global")):
        rep = {**base, "config": {} if prune is None else {"prune": prune}}
        assert cm.report_granularity(rep) == gran
        assert cm.workload_from_report(rep).granularity == gran
    old = {**cm.Rates().as_dict(), "selection_rounds": 3, "memory_efficiency": 0.3}
    assert cm.Rates.from_dict(old) == cm.Rates(memory_efficiency=0.3)
    with pytest.raises(ValueError, match="unknown rate 'warp'"):
        cm.Rates.from_dict({"warp": 1.0})


def test_calibration_with_per_row_reports_recovers_latency():
    """Per-row runs make T + 1 small all-reduces per iteration, global ones 6 T + 2 and per-layer ones 7 T + 2: the
    fit recovers the latency from a mix of them only when each report's workload carries its granularity."""
    truth = cm.Rates(memory_efficiency=0.4, collective_latency=2e-3, iteration_overhead=1e-3,
                     fixed={"backsolve": 0.05, "writeback": 0.01, "save": 0.3})
    w = cm.Workload(p=32_360, n=1000, model_params=32_360, iterations=200, kept=3236, largest_layer=31_360,
                    micro_batch=250, layers=3)
    reports = [synthetic_report(R, CPU, truth, dataclasses.replace(w, granularity=g))
               for R, g in ((1, "row"), (2, "row"), (4, "row"), (2, "global"), (4, "layer"))]
    fit = cm.calibrate(reports, CPU)
    assert fit.collective_latency == pytest.approx(2e-3, rel=1e-3)
    assert fit.iteration_overhead == pytest.approx(1e-3, rel=1e-3)


# a real solve on 2 gloo ranks: p = 960 columns split at 480 (a multiple of the rows' 20 and of M = 4), three layers
# of which the second straddles the ranks
SOLVE_N, SOLVE_P, SOLVE_ROW, SOLVE_LAYERS = 24, 960, 20, (300, 420, 240)


def _measured_iterations(granularity: str) -> tuple[list[tuple[int, int, int]], int]:
    """On this rank: two real solves with a budget of ``granularity``; per IHT iteration (``solver.iht_step``) that did
    not compute the 1/L fallback's Lipschitz constant, (support-changing trials, all-reduces, payload bytes) as
    :mod:`dist_chita.distributed.comm` counts them; and the solves' iteration count."""
    import torch

    from dist_chita.distributed import comm
    from dist_chita.fisher import solver
    from dist_chita.fisher.budget import Budget

    g = torch.Generator().manual_seed(0)
    A = torch.randn(SOLVE_N, SOLVE_P, generator=g) + 0.8 * torch.randn(SOLVE_N, 1, generator=g)
    w_bar = torch.randn(SOLVE_P, generator=g)
    lo, hi = (0, SOLVE_P // 2) if comm.rank() == 0 else (SOLVE_P // 2, SOLVE_P)
    if granularity == "global":
        budget = Budget.global_topk(hi - lo, SOLVE_P // 10)
    elif granularity == "layer":
        seg = torch.repeat_interleave(torch.arange(len(SOLVE_LAYERS)), torch.tensor(SOLVE_LAYERS))
        budget = Budget.per_segment(seg[lo:hi], torch.tensor([s // 10 for s in SOLVE_LAYERS]))
    elif granularity == "row":
        budget = Budget.per_row([((hi - lo) // SOLVE_ROW, SOLVE_ROW, 2)])
    else:
        budget = Budget.n_m(hi - lo, 2, 4)

    steps: list[tuple[int, int, int]] = []
    seen = {"trials": 0, "fresh_L": False}
    step, trial, lipschitz = solver.iht_step, solver._trial, solver._Problem.L

    def counted_trial(*args, **kwargs):
        seen["trials"] += 1
        return trial(*args, **kwargs)

    def counted_L(self, *args, **kwargs):
        seen["fresh_L"] |= self.lipschitz is None  # the power iteration's all-reduces, once per problem
        return lipschitz(self, *args, **kwargs)

    def counted_step(*args, **kwargs):
        seen.update(trials=0, fresh_L=False)
        calls0, bytes0 = sum(comm.calls_by_phase().values()), sum(comm.bytes_by_phase().values())
        out = step(*args, **kwargs)
        if not seen["fresh_L"]:
            steps.append((seen["trials"], sum(comm.calls_by_phase().values()) - calls0,
                          sum(comm.bytes_by_phase().values()) - bytes0))
        return out

    solver.iht_step, solver._trial, solver._Problem.L = counted_step, counted_trial, counted_L
    iterations = 0
    for trials in (1, 6):  # at most one support-changing trial per iteration, then up to 6 (the default)
        res = solver.solve(A.T[lo:hi].contiguous(), w_bar[lo:hi], 0.05, budget, max_iter=60, tol=1e-9, trials=trials,
                           escape_trials=6)
        iterations += res.iterations
    return steps, iterations


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["row", "global", "layer", "nm"])
def test_iteration_collectives_match_a_real_two_rank_solve(granularity):
    """The all-reduces and payload bytes the model counts per IHT iteration are those a real solve on 2 gloo ranks
    makes (dist_chita.distributed.comm's counters), iteration by iteration, for the number of trials each one ran:
    per-row and N:M budgets without histogram all-reduces, global and per-layer budgets with them. The prediction's
    bytes per iteration and its selection latency follow the same count at the mean number of trials."""
    from tests.multiproc import run

    w = cm.Workload(p=SOLVE_P, n=SOLVE_N, model_params=SOLVE_P, layers=len(SOLVE_LAYERS), granularity=granularity)
    out = run(_measured_iterations, 2, granularity)
    assert out[0][0] == out[1][0]  # every rank makes the same collectives
    steps, iterations = out[0]
    assert len(steps) >= 6 and len(steps) >= iterations - 2, (len(steps), iterations)
    # iterations with one and with two trials: the per-iteration and the per-trial counts are both pinned down
    assert {1, 2} <= {t for t, _, _ in steps}, steps
    for t, calls, nbytes in steps:
        assert (calls, nbytes) == cm.iteration_collectives(w, 2, t), (granularity, t, calls, nbytes)
    T = sum(t for t, _, _ in steps) / len(steps)
    pred = cm.predict(dataclasses.replace(w, iterations=1), 2, CPU,
                      cm.Rates(selections_per_iteration=T, collective_latency=1.0))
    assert pred.solver_bytes_per_iteration == pytest.approx(sum(b for _, _, b in steps) / len(steps))
    # the latency term: every all-reduce but the 1 + T n-vector ones, at 2 log2(2) = 2 hops of latency 1
    assert pred.terms["solver_selection"] / 2 + 1 + T == pytest.approx(sum(c for _, c, _ in steps) / len(steps))


def test_fisher_and_backsolve_by_hand():
    w = cm.Workload(p=1000, n=64, model_params=3000, kept=100, micro_batch=16, layers=2)
    rates = cm.Rates(persample_factor=2.0, grad_efficiency=0.5, exchange_efficiency=0.25, exchange_overhead=0.01)
    pred = cm.predict(w, 2, GPU, rates)
    t = pred.terms
    assert t["fisher_gradients"] == pytest.approx(2 * 6 * 3000 * 32 / (1e14 * 0.5))
    assert t["fisher_write"] == pytest.approx(32 * 1000 * 4 / 2e12)
    # each rank sends n p b (R-1)/R^2 bytes at e_x L; messages: ceil(32 / 16) micro-batches x 2 layers x
    # peers; x once per stage
    assert cm.exchange_bytes(64, 1000, 2, 4) == 64 * 1000 * 4 / 4
    assert t["fisher_exchange"] == pytest.approx(64000 / (200e9 * 0.25) + 2 * 2 * 1 * 5e-6 + 0.01)
    # n = 64 < 256: the full product R^T R (2 n^2 m FLOPs, m = 50 kept rows per rank); float64 Cholesky
    # (n^3 / 3 FLOPs) at F / 2; the preconditioner applied 2 + 3 times, 8 n^2 B each
    assert t["backsolve_gram"] == pytest.approx(2 * 64 * 64 * 100 / 2 / 1e14)
    assert t["backsolve_cholesky"] == pytest.approx(2 * 64**3 / 3 / 1e14)
    assert t["backsolve_precond"] == pytest.approx(5 * 8 * 64 * 64 / 2e12)
    # G, then 2 + 3 n-vectors (A_S b, the first A_S A_S^T x_0, 3 PCG steps), then 4 scalars
    hop = 2 * 5e-6
    assert t["backsolve_allreduce"] == pytest.approx(2 * 0.5 * 8 * 64 * 64 / 200e9 + hop
                                                     + 5 * (2 * 0.5 * 8 * 64 / 200e9 + hop) + 4 * (8 / 200e9 + hop))
    # gather (4 + 4 B per entry), then A_S^T y and A_S b (12 + 8 B per entry each) and 1 + 3 fused passes
    # (12 + 16 B) over the 64 x 50 float32 rows
    assert t["backsolve_rows"] == pytest.approx((8 + 2 * 20 + 4 * 28) * 64 * 50 / 2e12)
    assert pred.total == pytest.approx(sum(pred.seconds.values()))
    assert cm.predict(w, 1, GPU, rates).terms["fisher_exchange"] == 0.0
    assert t["fisher_allocation"] == 0.0  # no page population rate: allocation is free (a GPU's caching allocator)


def test_factor_allocation_once_per_prune():
    """On hardware with a page population rate Z, mapping and faulting in the factor's n p_R b bytes costs
    n p_R b / (Z s e_p), once: the CHITA++ stages after the first reuse the storage."""
    cpu = dataclasses.replace(CPU, page_population_bandwidth=1e9)
    w = cm.Workload(p=32_360, n=1000, model_params=32_360, micro_batch=250, layers=3, storage_dtype="bfloat16")
    rates = cm.Rates(population_efficiency=0.25)
    for R, share in ((1, 1.0), (2, 1.0), (4, 0.5)):
        one = cm.predict(w, R, cpu, rates).terms["fisher_allocation"]
        assert one == pytest.approx(1000 * math.ceil(32_360 / R) * 2 / (1e9 * share * 0.25))
        assert cm.predict(dataclasses.replace(w, solves=5), R, cpu, rates).terms["fisher_allocation"] == one
    with pytest.raises(ValueError, match="page_population_bandwidth"):
        dataclasses.replace(CPU, page_population_bandwidth=0.0)


def test_monotone_in_ranks():
    w = cm.Workload(p=7_000_000, n=256, model_params=7_000_000, iterations=50)
    preds = [cm.predict(w, R, GPU) for R in (1, 2, 4, 8)]
    mems = [p.memory.total for p in preds]
    assert mems == sorted(mems, reverse=True) and mems[0] > mems[-1]
    for key in ("fisher_gradients", "fisher_write", "solver_reads", "backsolve_gram"):
        vals = [p.terms[key] for p in preds]
        assert all(a > b for a, b in zip(vals, vals[1:], strict=False)), key


def test_cpu_oversubscription():
    w = cm.Workload(p=32_000, n=1000, model_params=32_000, iterations=10)
    assert CPU.compute_share(1) == 1 and CPU.compute_share(2) == 1 and CPU.compute_share(4) == 0.5
    assert CPU.compute_share(1, threads_per_rank=2) == 2 and CPU.time_slice(4) == 0.5
    # on 2 cores the block reads per rank stop shrinking past R = 2
    r2 = cm.predict(w, 2, CPU).terms["solver_reads"]
    r4 = cm.predict(w, 4, CPU).terms["solver_reads"]
    assert r4 == pytest.approx(r2)


def test_smallest_fitting_ranks():
    hw = dataclasses.replace(GPU, memory_bytes=10e9)
    w = cm.Workload(p=10_000_000_000 // 4, n=100, model_params=100, storage_dtype="float32", largest_layer=1)
    # factor 1e12 / R bytes dominates; brute force over R, against the 9e9 bytes a run may use (a tenth kept free)
    brute = next(R for R in range(1, 10_000) if cm.memory_per_rank(w, R).total <= 9e9)
    assert cm.smallest_fitting_ranks(w, hw) == brute
    assert cm.memory_per_rank(w, brute - 1).total > 9e9
    p2 = cm.smallest_fitting_ranks(w, hw, power_of_two=True)
    assert p2 == 2 ** math.ceil(math.log2(brute))
    huge = cm.Workload(p=10, n=10, model_params=10**12)  # the unsharded model alone exceeds the memory
    assert cm.smallest_fitting_ranks(huge, hw) is None
    sharded = dataclasses.replace(huge, model_sharded=True)
    assert cm.smallest_fitting_ranks(sharded, hw) == next(
        R for R in range(1, 1000) if cm.memory_per_rank(sharded, R).total <= 9e9) == 445


def test_hardware_from_dict_errors():
    hw = cm.Hardware.from_dict({"name": "x", "memory_bytes": "8e9", "memory_bandwidth": 1e9, "flops": 1e9,
                                "link_bandwidth": 1e9, "link_latency": 0, "shared_cores": 2})
    assert hw.memory_bytes == 8e9 and hw.shared_cores == 2
    with pytest.raises(ValueError, match="unknown hardware key 'bogus'"):
        cm.Hardware.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="missing hardware key"):
        cm.Hardware.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="flops must be > 0"):
        dataclasses.replace(hw, flops=0)
    with pytest.raises(ValueError, match="storage dtype"):
        cm.Workload(p=1, n=1, model_params=1, storage_dtype="int8")


def synthetic_report(R: int, hw: cm.Hardware, rates: cm.Rates, w: cm.Workload) -> dict:
    pred = cm.predict(w, R, hw, rates)
    gram_bytes = 8 * w.n**2 * rates.backsolve_rounds + 8 * w.n  # Gram all-reduces plus an n-vector
    return {
        "bytes_sent": {"backsolve": [gram_bytes if R > 1 else 0] * R},
        "world_size": R, "threads_per_rank": 1, "n": w.n, "p": w.p, "model_params": w.model_params,
        "storage_dtype": w.storage_dtype, "solver_iterations": w.iterations,
        "global": {"kept": w.kept}, "layers": [{"size": w.largest_layer}] * w.layers,
        "config": {"calibration": {"batch_size": w.micro_batch},
                   "prune": {"granularity": "global" if w.granularity == "nm" else w.granularity,
                             "nm": "2:4" if w.granularity == "nm" else None}},
        "phase_seconds": {ph: [pred.seconds[ph]] * R for ph in cm.PHASES},
    }


def test_calibration_recovers_rates():
    truth = cm.Rates(grad_efficiency=0.25, memory_efficiency=0.4, linalg_efficiency=0.5, collective_latency=2e-4,
                     backsolve_rounds=7, exchange_efficiency=0.5, exchange_overhead=0.02,
                     iteration_overhead=3e-3, fixed={"backsolve": 0.05, "writeback": 0.01, "save": 0.3})
    cpu = dataclasses.replace(CPU, page_population_bandwidth=2e9)
    pop = dataclasses.replace(truth, population_efficiency=0.3)
    w0 = cm.Workload(p=32_360, n=1000, model_params=32_360, iterations=40, kept=3236, largest_layer=31_360,
                     micro_batch=250, layers=3)
    mixed = []
    for R, n, s in ((1, 1000, 5), (2, 1000, 5), (4, 1000, 1), (1, 3000, 1), (2, 500, 3)):
        mixed.append(synthetic_report(R, cpu, pop, dataclasses.replace(w0, n=n, solves=s, iterations=8 * s)))
        mixed[-1]["stages"] = [{"iterations": 8}] * s
    fit = cm.calibrate(mixed, cpu)
    assert fit.population_efficiency == pytest.approx(0.3, rel=1e-3)
    assert fit.grad_efficiency == pytest.approx(0.25, rel=1e-3)
    w = cm.Workload(p=32_360, n=1000, model_params=32_360, iterations=40, kept=3236, largest_layer=31_360,
                    micro_batch=250, layers=3)
    reports = [synthetic_report(R, CPU, truth, w) for R in (1, 2, 4)]
    reports.append(synthetic_report(2, CPU, truth, dataclasses.replace(w, n=3000, iterations=25)))
    fit = cm.calibrate(reports, CPU)
    assert fit.memory_efficiency == pytest.approx(0.4, rel=1e-3)
    assert fit.collective_latency == pytest.approx(2e-4, rel=1e-3)
    assert fit.iteration_overhead == pytest.approx(3e-3, rel=1e-3)
    assert fit.grad_efficiency == pytest.approx(0.25, rel=1e-3)
    assert fit.exchange_efficiency == pytest.approx(0.5, rel=1e-3)
    assert fit.exchange_overhead == pytest.approx(0.02, rel=1e-3)
    assert fit.backsolve_rounds == 7
    assert fit.fixed["save"] == pytest.approx(0.3, rel=1e-3)  # the modelled 4 P / disk bytes are not counted twice
    for row in cm.compare(reports, CPU, fit):
        if row["phase"] in ("fisher", "solver", "backsolve", "save"):
            assert row["rel_error"] == pytest.approx(0.0, abs=1e-3), row
    # the model family holds the truth, so fitting without any one report still predicts it (within 5%)
    for row in cm.compare_held_out(reports, CPU):
        if row["phase"] in ("fisher", "solver"):
            assert row["rel_error"] == pytest.approx(0.0, abs=5e-2), row
    table = cm.format_comparison(cm.compare(reports[:1], CPU, fit))
    assert "solver" in table and "sum" in table
    with pytest.raises(ValueError):
        cm.calibrate([], CPU)


def test_allocation_fitted_from_stage_times_when_every_run_has_the_same_stage_count():
    """With 5 CHITA++ stages in every run, the run totals make the once-per-prune allocation proportional to the
    per-stage gradient term; the reports' per-stage gradient times (stage 1 alone pays the allocation) separate them."""
    cpu = dataclasses.replace(CPU, page_population_bandwidth=2e9)
    truth = cm.Rates(grad_efficiency=0.2, population_efficiency=0.25, collective_latency=1e-4,
                     exchange_efficiency=0.5, exchange_overhead=0.03)
    reports = []
    for R, n in ((1, 1000), (2, 1000), (4, 1000), (1, 250), (2, 500)):
        w = cm.Workload(p=32_360, n=n, model_params=32_360, micro_batch=250, layers=3, solves=5, iterations=10,
                        kept=3236, largest_layer=31_360)
        rep = synthetic_report(R, cpu, truth, w)
        terms = cm.predict(w, R, cpu, truth).terms
        per = (terms["fisher_gradients"] + terms["fisher_write"] + terms["fisher_exchange"]) / 5
        rep["stages"] = [{"iterations": 2, "seconds": {"fisher": per + (terms["fisher_allocation"] if i == 0 else 0)}}
                         for i in range(5)]
        reports.append(rep)
    assert cm.stage_one_share(reports[0], 5) > 0.2 and cm.stage_one_share(reports[0], 4) is None
    fit = cm.calibrate(reports, cpu)
    assert fit.population_efficiency == pytest.approx(0.25, rel=1e-3)
    assert fit.grad_efficiency == pytest.approx(0.2, rel=1e-3)
    for rep in reports:  # without the stage times the totals are fitted too, but the split is arbitrary
        del rep["stages"][0]["seconds"]
    assert cm.stage_one_share(reports[0], 5) is None


def test_calibration_uses_reported_backsolve_counts():
    """Reports that count their backsolves (stages[].backsolves) are modelled with their own count, so runs with
    different numbers of backsolves are fitted exactly (the byte-based inference would give them one count)."""
    truth = cm.Rates(linalg_efficiency=0.3, collective_latency=1e-4, fixed={"backsolve": 0.02})
    base = cm.Workload(p=32_360, n=800, model_params=32_360, iterations=20, kept=3236, largest_layer=31_360)
    reports = []
    for R, m in ((1, 5), (2, 40), (4, 12), (2, 3)):
        w = dataclasses.replace(base, backsolves=m)
        rep = synthetic_report(R, CPU, truth, w)
        rep["stages"] = [{"backsolves": m - m // 2}, {"backsolves": m // 2}]  # summed over stages
        reports.append(rep)
        assert cm.workload_from_report(rep).backsolves == m
    fit = cm.calibrate(reports, CPU)
    assert fit.linalg_efficiency == pytest.approx(0.3, rel=1e-3)
    for row in cm.compare(reports, CPU, fit):
        if row["phase"] == "backsolve":
            assert row["rel_error"] == pytest.approx(0.0, abs=1e-3), row
    assert cm.workload_from_report({**reports[0], "stages": [{"iterations": 3}]}).backsolves is None


def test_fisher_per_stage_and_exchange_overhead():
    """The gradient phase runs once per solve (CHITA++ stage); at R > 1 it pays the exchanged bytes at e_x L and a
    fitted overhead x per stage, which a single rank (writing straight into its block) does not."""
    w = cm.Workload(p=32_360, n=1000, model_params=32_360, micro_batch=250, layers=3)
    rates = cm.Rates(exchange_overhead=0.05, exchange_efficiency=0.5)
    one, five = cm.predict(w, 2, CPU, rates), cm.predict(dataclasses.replace(w, solves=5), 2, CPU, rates)
    for term in ("fisher_gradients", "fisher_write", "fisher_exchange"):
        assert five.terms[term] == pytest.approx(5 * one.terms[term])
    lat = CPU.link_latency
    # bytes n p b (R - 1) / R^2 at 0.5 L s; micro-batches (2 at R = 2, 1 at R = 4) x 3 layers x (R - 1) messages
    # and x, both / s'; on 2 cores R = 4 gets s = s' = 1/2
    for R, micro_batches, share in ((2, 2, 1.0), (4, 1, 0.5)):
        by_hand = (1000 * 32_360 * 4 * (R - 1) / R**2 / (0.5 * CPU.link_bandwidth * share)
                   + (micro_batches * 3 * (R - 1) * lat + 0.05) / share)
        assert cm.predict(w, R, CPU, rates).terms["fisher_exchange"] == pytest.approx(by_hand)
    assert cm.predict(w, 1, CPU, rates).terms["fisher_exchange"] == 0.0
    truth = cm.Rates(grad_efficiency=0.2, collective_latency=1e-4, exchange_overhead=0.12, exchange_efficiency=0.3)
    reports = [synthetic_report(R, CPU, truth, dataclasses.replace(w, n=n, solves=s, largest_layer=31_360,
                                                                  iterations=10, kept=3236))
               for R, n, s in ((1, 1000, 5), (2, 1000, 5), (4, 1000, 5), (1, 250, 1), (2, 500, 1))]
    for rep, s in zip(reports, (5, 5, 5, 1, 1), strict=True):
        rep["stages"] = [{"iterations": 2}] * s
    fit = cm.calibrate(reports, CPU)
    assert fit.exchange_overhead == pytest.approx(0.12, rel=1e-3)
    assert fit.exchange_efficiency == pytest.approx(0.3, rel=1e-3)
    assert fit.grad_efficiency == pytest.approx(0.2, rel=1e-3)


def test_measured_fisher_includes_exchange():
    """The report's "fisher" is the wall time of the gradient pass, exchange included: not added twice."""
    rep = {"phase_seconds": {"fisher": [3.0, 2.5], "exchange": [1.0, 2.0], "solver": [1.0, 1.5]}}
    meas = cm.measured_seconds(rep)
    assert meas["fisher"] == 3.0 and meas["solver"] == 1.5 and meas["save"] == 0.0


def test_sum_scored_only_with_a_scored_phase():
    rows = [{"phase": "fisher", "measured": 0.3, "rel_error": 0.5},
            {"phase": "sum", "measured": 0.6, "rel_error": 0.9, "largest_part": 0.3},
            {"phase": "sum", "measured": 2.0, "rel_error": -0.2, "largest_part": 1.5},
            {"phase": "solver", "measured": 0.8, "rel_error": 0.1}]
    assert cm.worst_errors(rows, 0.5) == {"sum": 0.2, "solver": 0.1}
    assert cm.worst_errors(rows, 0.0) == {"fisher": 0.5, "sum": 0.9, "solver": 0.1}


def test_backsolve_row_passes_term():
    """Each backsolve (no counted work: one Gram matrix, one PCG solve of q steps) gathers its kept rows (n k / R
    entries) into float32 and streams them 2 + (1 + q) times; rows too large to gather are re-read from the block,
    with g_row per row on every pass and for the Gram (fitted apart from the bytes, at M)."""
    w = cm.Workload(p=10_000, n=64, model_params=10_000, kept=3000, backsolves=7)
    rates = cm.Rates(row_efficiency=0.5, linalg_efficiency=2.0, pcg_steps=4.0)
    pred = cm.predict(w, 2, CPU, rates)
    s = CPU.compute_share(2)
    assert pred.terms["backsolve_rows"] == pytest.approx(
        7 * (8 + 2 * 20 + 5 * 28) * 64 * 1500 / (CPU.memory_bandwidth * s * 0.5 * 2.0))
    assert pred.seconds["backsolve"] == pytest.approx(sum(pred.terms[f"backsolve_{k}"] for k in cm.BACKSOLVE_TERMS))
    big = cm.Workload(p=20_000_000, n=32, model_params=20_000_000, storage_dtype="bfloat16", kept=10_000_000)
    rows = cm.backsolve_terms(big, 1, CPU, cm.Rates(), big.k)["rows"]  # 8 n k = 2.6 GB > 2^28: not gathered
    # index_select (2 + 2 B) and the float64 copy (2 + 8 B), then 8 B per product: 2 single and 1 + 3 fused passes
    assert rows == pytest.approx((2 * (14 + 8) + 4 * (14 + 16)) * 32 * 10_000_000 / CPU.memory_bandwidth)
    g = cm.Rates(row_gather_bytes=100.0)
    assert cm.backsolve_terms(big, 1, CPU, g, big.k)["rows"] == pytest.approx(rows + 7 * 100 * 10_000_000
                                                                              / CPU.memory_bandwidth)
    small = cm.backsolve_terms(w, 2, CPU, g, w.k)["rows"] - cm.backsolve_terms(w, 2, CPU, cm.Rates(), w.k)["rows"]
    assert small == 0.0


def _counted_backsolves(monkeypatch, n: int, p: int, k: int) -> tuple[dict, dict]:
    """Run backsolves as a lambda path and the solver run them (three lambdas on one support, a nearby support,
    a far one, a repeat) through one GramCache at world size 1, counting what the code runs: the rows multiplied into
    Gram matrices (``_syrk``), the Cholesky factorisations, the factor's applications, the row entries gathered,
    converted to float64 chunks and multiplied. Returns (counts, cache.work)."""
    import torch

    from dist_chita.fisher import backsolve as bs

    counts = dict.fromkeys(("syrk_rows", "syrk_flops", "cholesky", "solves", "gathered", "chunked", "products"), 0)
    syrk, chunks, rows_init = bs._syrk, bs._chunks, bs._Rows.__init__
    cholesky, cholesky_solve, mv, addmv = torch.linalg.cholesky_ex, torch.cholesky_solve, torch.mv, torch.Tensor.addmv_

    def counting_syrk(R):
        counts["syrk_rows"] += R.shape[0]
        counts["syrk_flops"] += 2 * R.shape[0] * R.shape[1] ** 2  # n < 256: the plain product R^T R
        return syrk(R)

    def counting_chunks(At, idx, dtype=torch.float64, nbytes=bs.CHUNK_BYTES):
        for s_, e, rows in chunks(At, idx, dtype, nbytes):
            counts["chunked"] += rows.numel() * (At.element_size() + rows.element_size())  # read, written
            yield s_, e, rows

    def counting_rows(self, At, idx):
        rows_init(self, At, idx)
        counts["gathered"] += idx.numel() * At.shape[1]

    def counting_cholesky(P, *a, **kw):
        counts["cholesky"] += 1
        return cholesky(P, *a, **kw)

    def counting_solve(v, L, *a, **kw):
        counts["solves"] += 1
        return cholesky_solve(v, L, *a, **kw)

    def counting_mv(M, v, *a, **kw):
        counts["products"] += M.numel()
        return mv(M, v, *a, **kw)

    def counting_addmv(self, M, v, *a, **kw):
        counts["products"] += M.numel()
        return addmv(self, M, v, *a, **kw)

    monkeypatch.setattr(bs, "_syrk", counting_syrk)
    monkeypatch.setattr(bs, "_chunks", counting_chunks)
    monkeypatch.setattr(bs._Rows, "__init__", counting_rows)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting_cholesky)
    monkeypatch.setattr(torch, "cholesky_solve", counting_solve)
    monkeypatch.setattr(torch, "mv", counting_mv)
    monkeypatch.setattr(torch.Tensor, "addmv_", counting_addmv)
    g = torch.Generator().manual_seed(0)
    At, w_bar = torch.randn(p, n, generator=g) / n**0.5, torch.randn(p, generator=g)
    y = At.T @ w_bar
    first = torch.zeros(p, dtype=torch.bool)
    first[:k] = True
    near = first.clone()
    near[:5], near[k : k + 5] = False, True  # 10 changed of k: the Gram matrix is updated
    far = torch.zeros(p, dtype=torch.bool)
    far[p - k :] = True
    cache = bs.GramCache()
    for support, lam in ((first, 1e-2), (first, 1e-1), (first, 1.0), (near, 1.0), (far, 1.0), (far, 1.0)):
        bs.backsolve(At, w_bar, lam, support, y, cache=cache)  # the last repeats the one before: recalled
    return counts, dict(cache.work)


def test_backsolve_terms_follow_the_work_the_code_runs(monkeypatch):
    """The backsolve's formula against an independent count of what ``dist_chita/fisher/backsolve.py`` runs on a
    lambda path (one Gram matrix for three lambdas), an update to a nearby support, a fresh support and a recalled
    repeat: with F = M = 1 (F / 2 for the float64 Cholesky) and e_a = 1 the terms are the counted FLOPs and bytes."""
    n, p, k = 48, 600, 200
    counts, work = _counted_backsolves(monkeypatch, n, p, k)
    # the cache's own counts agree with the operations: 2 Gram matrices formed (first, far) and 1 updated (near,
    # its 10 changed rows), one factorisation and one PCG solve per backsolve but the recalled one
    assert (work["grams"], work["gram_updates"], work["gram_update_rows"]) == (2, 1, 10)
    assert counts["syrk_rows"] == work["grams"] * k + work["gram_update_rows"]
    assert counts["cholesky"] == work["factorizations"] == work["pcg_runs"] == 5
    assert counts["solves"] == 2 * work["pcg_runs"] + work["pcg_steps"]
    unit = cm.Hardware(name="unit", memory_bytes=1e12, memory_bandwidth=1.0, flops=1.0, link_bandwidth=1.0,
                       link_latency=0.0)
    w = cm.Workload(p=p, n=n, model_params=p, kept=k)
    terms = cm.backsolve_terms(w, 1, unit, cm.Rates(), k, work)
    assert terms["gram"] == pytest.approx(counts["syrk_flops"])
    assert terms["cholesky"] == pytest.approx(2 * counts["cholesky"] * n**3 / 3)
    assert terms["precond"] == pytest.approx(counts["solves"] * 8 * n * n)
    # rows: each gathered entry read and written in float32 (8 B), each chunked entry read from At or the gathered
    # rows and written in the chunk's dtype (float64 for the products, float32 for a Gram update's rows), each entry
    # a product reads 8 B
    assert terms["rows"] == pytest.approx(8 * counts["gathered"] + counts["chunked"] + 8 * counts["products"])
    assert terms["allreduce"] == 0.0
    # the work of the workload's stages gives the same terms through predict
    staged = dataclasses.replace(w, stages=((p, k, 0, 6),), backsolve_work=(tuple(work[key] for key in
                                                                                   cm.WORK_KEYS),))
    pred = cm.predict(staged, 1, unit, cm.Rates(fixed={}))
    assert pred.terms["backsolve_gram"] == pytest.approx(terms["gram"])
    assert pred.seconds["backsolve"] == pytest.approx(sum(terms.values()))


def test_syrk_fraction_counts_backsolve_products(monkeypatch):
    """syrk_fraction(n) is the share of R^T R's 2 n^2 m FLOPs that dist_chita.fisher.backsolve._syrk computes (counted
    from the matrix products it runs)."""
    import torch

    from dist_chita.fisher import backsolve

    flops = []
    matmul = torch.Tensor.__matmul__

    def counting(a, b):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    m = 8
    for n in (100, 255, 256, 500, 512, 1000):
        flops.clear()
        G = backsolve._syrk(torch.randn(m, n))
        assert G.shape == (n, n)
        assert sum(flops) / (2 * n * n * m) == pytest.approx(cm.syrk_fraction(n), rel=2e-2), n
    assert cm.syrk_fraction(1000) == 10 / 16 and cm.syrk_fraction(100) == 1.0


def test_backsolve_oversubscribed_cores():
    """On 2 shared cores, R = 4 ranks each get half a core: the Gram products per rank cost what they cost at R = 2
    (half the rows at half the speed), every rank's redundant Cholesky takes twice as long, and each all-reduce
    hop waits for a time slice (l / s')."""
    w = cm.Workload(p=32_360, n=1000, model_params=32_360, kept=16_000, backsolves=1)
    r2, r4 = (cm.backsolve_terms(w, R, CPU, cm.Rates(), w.k) for R in (2, 4))
    assert r4["gram"] == pytest.approx(r2["gram"])
    assert r4["cholesky"] == pytest.approx(2 * r2["cholesky"])
    r1 = cm.backsolve_terms(w, 1, CPU, cm.Rates(), w.k)
    assert r1["cholesky"] == pytest.approx(r2["cholesky"]) and r1["allreduce"] == 0.0
    hops4 = 4 * (2 * math.log2(4) * CPU.link_latency / 0.5)  # the 4 scalar all-reduces: latency / s' only
    assert r4["allreduce"] > hops4


def test_gram_of_thin_rows_runs_at_a_width_dependent_rate():
    """With n_h (Hardware.gram_half_width) the Gram's f_syrk 2 n^2 m FLOPs run at F s e_a n / (n + n_h): at n = n_h
    half the rate, so twice the time; doubling n from 32 to 64 then costs (64 + n_h) / (32 + n_h) x 2, not 4x."""
    w = cm.Workload(p=100_000, n=32, model_params=100_000, kept=40_000)
    rates = cm.Rates(linalg_efficiency=0.5)
    thin = dataclasses.replace(CPU, gram_half_width=32.0)
    plain = cm.backsolve_terms(w, 2, CPU, rates, w.k)["gram"]
    assert plain == pytest.approx(2 * 32 * 32 * 20_000 / (CPU.flops * CPU.compute_share(2) * 0.5))
    assert cm.backsolve_terms(w, 2, thin, rates, w.k)["gram"] == pytest.approx(2 * plain)
    w64 = dataclasses.replace(w, n=64)
    ratio = cm.backsolve_terms(w64, 2, thin, rates, w.k)["gram"] / cm.backsolve_terms(w, 2, thin, rates, w.k)["gram"]
    assert ratio == pytest.approx(4 * (64 + 32) / 64 / 2)  # = 3, against 4 at n_h = 0
    other = cm.backsolve_terms(w, 2, thin, rates, w.k)
    assert {k: v for k, v in other.items() if k != "gram"} == {
        k: v for k, v in cm.backsolve_terms(w, 2, CPU, rates, w.k).items() if k != "gram"}
    with pytest.raises(ValueError, match="gram_half_width"):
        dataclasses.replace(CPU, gram_half_width=-1.0)
    assert cm.Hardware.from_dict({**dataclasses.asdict(CPU), "gram_half_width": 17.5}).gram_half_width == 17.5


def test_a_term_the_fit_gives_no_cost_stays_free():
    """When the fit puts zero weight on a feature that varied across the runs (here: the backsolve's Gram FLOPs,
    generated free), the fitted efficiency is inf (no cost), not the base value: the in-sample backsolve is exact."""
    truth = cm.Rates(grad_efficiency=0.25, memory_efficiency=0.4, linalg_efficiency=math.inf, collective_latency=2e-4,
                     iteration_overhead=3e-3, fixed={"backsolve": 0.2, "writeback": 0.01, "save": 0.3})
    w = cm.Workload(p=32_360, n=1000, model_params=32_360, iterations=40, kept=3236, largest_layer=31_360,
                    micro_batch=250, layers=3)
    reports = [synthetic_report(R, CPU, truth, dataclasses.replace(w, n=n)) for R, n in ((1, 1000), (2, 1000),
                                                                                        (4, 1000), (2, 500))]
    fit = cm.calibrate(reports, CPU)
    assert fit.linalg_efficiency == math.inf
    for row in cm.compare(reports, CPU, fit):
        if row["phase"] == "backsolve":
            assert row["rel_error"] == pytest.approx(0.0, abs=1e-3), row


@pytest.mark.parametrize("granularity", ["global", "row"])
def test_kept_imbalance_counts_the_kept_weights_of_the_fullest_block(granularity):
    """kept_imbalance against a count on a real layout (ColumnLayout, rows cut for the per-row budget): layers kept
    whole or not at all, so where the kept weights lie is known exactly; the busiest rank's kept rows set the
    backsolve's m."""
    shapes = [("a", (6, 10)), ("b", (4, 5)), ("c", (3, 4))]
    kept = {"a": 0, "b": 20, "c": 12}  # the first layer fully pruned, the others kept
    layers = tuple((r * c, kept[name], c) for name, (r, c) in shapes)
    w = cm.Workload(p=92, n=8, model_params=92, kept=32, kept_by_layer=layers, granularity=granularity)
    for R in (1, 2, 3, 4):
        layout = ColumnLayout.build(shapes, R, rows=granularity == "row")
        mask = torch.cat([torch.full((r * c,), kept[name] > 0) for name, (r, c) in shapes])
        held = [int(mask[lo:hi].sum()) for lo, hi in layout.blocks]
        assert cm.kept_imbalance(w, R) == pytest.approx(max(held) / (32 / R)), R
    even = dataclasses.replace(w, kept_by_layer=None)
    assert cm.kept_imbalance(even, 4) == 1.0
    m = {R: cm.backsolve_terms(w, R, CPU, cm.Rates(), 32)["gram"] / cm.backsolve_terms(even, R, CPU, cm.Rates(), 32)[
        "gram"] for R in (2, 4)}
    assert m[4] == pytest.approx(math.ceil(32 / 4 * cm.kept_imbalance(w, 4)) / 8)
    rep = {"p": 92, "n": 8, "layers": [{"name": nm, "shape": list(sh), "size": sh[0] * sh[1], "kept": kept[nm]}
                                       for nm, sh in shapes]}
    assert cm.workload_from_report(rep).kept_by_layer == layers
