"""dist_chita.costmodel: hand-checked arithmetic, monotonicity in R, smallest fitting R, calibration."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dist_chita import costmodel as cm
from dist_chita.memory import estimate

GPU = cm.Hardware(name="g", memory_bytes=80e9, memory_bandwidth=2e12, flops=1e14, link_bandwidth=25e9,
                  link_latency=1e-5, devices_per_node=8, node_bandwidth=200e9, node_latency=5e-6)
CPU = cm.Hardware(name="c", memory_bytes=16e9, memory_bandwidth=5e9, flops=5e10, link_bandwidth=2e9,
                  link_latency=5e-5, shared_cores=2)


def test_factor_memory_by_hand():
    w = cm.Workload(p=1000, n=100, model_params=2000, storage_dtype="bfloat16", largest_layer=600, micro_batch=10)
    m = cm.memory_per_rank(w, 3)
    assert m.factor == 100 * 334 * 2  # n * ceil(p / R) * bytes
    assert m.model == 4 * 2000
    assert m.gradient_buffer == 3 * 4 * 10 * 600
    assert m.backsolve == 2 * 8 * 100 * 100 + 12 * 334 * 100  # G and factor; the gathered kept rows (<= p_r)
    assert m == estimate(1000, 100, 3, "bfloat16", 2000, 600, 10)
    assert cm.memory_per_rank(dataclasses.replace(w, model_sharded=True), 4).model == 2000


def test_solver_iteration_terms_by_hand():
    w = cm.Workload(p=10_000, n=100, model_params=10_000, iterations=10)
    rates = cm.Rates(memory_efficiency=0.5, iteration_overhead=1e-3)
    it = cm.solver_iteration_terms(w, 4, GPU, rates)
    assert it["reads"] == pytest.approx(2 * 100 * 2500 * 4 / (2e12 * 0.5))
    # all-reduce of 8n bytes inside a node: 2 (R-1)/R * 8n / L + 2 log2 R * l
    assert it["allreduce"] == pytest.approx(2 * 3 / 4 * 800 / 200e9 + 2 * 2 * 5e-6)
    assert it["selection"] == pytest.approx(4 * 2 * 2 * 5e-6)
    assert it["overhead"] == pytest.approx(1e-3)
    # 16 ranks leave the node: the slower link
    assert cm.solver_iteration_terms(w, 16, GPU, rates)["selection"] == pytest.approx(4 * 2 * 4 * 1e-5)
    assert cm.solver_iteration_terms(w, 1, GPU, rates)["allreduce"] == 0.0
    pred = cm.predict(w, 4, GPU, rates)
    setup = 2.0 * 100 * 2500 * 4 / (2e12 * 0.5)  # c = 2 block reads once per solve (y = A w_bar, active set)
    assert pred.terms["solver_setup"] == pytest.approx(setup)
    assert pred.seconds["solver"] == pytest.approx(10 * sum(it.values()) + setup)
    five = cm.predict(dataclasses.replace(w, solves=5), 4, GPU, rates)  # CHITA++ with 5 stages: 5 solves
    assert five.seconds["solver"] == pytest.approx(10 * sum(it.values()) + 5 * setup)


def test_solver_communication_flat_in_p():
    rates = cm.Rates()
    a = cm.solver_iteration_terms(cm.Workload(p=10_000, n=128, model_params=1), 8, GPU, rates)
    b = cm.solver_iteration_terms(cm.Workload(p=10_000_000, n=128, model_params=1), 8, GPU, rates)
    assert a["allreduce"] == b["allreduce"] and a["selection"] == b["selection"]
    assert b["reads"] == pytest.approx(1000 * a["reads"])
    pa = cm.predict(cm.Workload(p=10_000, n=128, model_params=1), 8, GPU)
    pb = cm.predict(cm.Workload(p=10_000_000, n=128, model_params=1), 8, GPU)
    assert pa.solver_bytes_per_iteration == pb.solver_bytes_per_iteration > 0


def test_fisher_and_backsolve_by_hand():
    w = cm.Workload(p=1000, n=64, model_params=3000, kept=100, micro_batch=16, layers=2)
    rates = cm.Rates(persample_factor=2.0, grad_efficiency=0.5)
    pred = cm.predict(w, 2, GPU, rates)
    t = pred.terms
    assert t["fisher_gradients"] == pytest.approx(2 * 6 * 3000 * 32 / (1e14 * 0.5))
    assert t["fisher_write"] == pytest.approx(32 * 1000 * 4 / 2e12)
    # each rank sends n p b (R-1)/R^2 bytes; messages: ceil(32 / 16) micro-batches x 2 layers x peers
    assert cm.exchange_bytes(64, 1000, 2, 4) == 64 * 1000 * 4 / 4
    assert t["fisher_exchange"] == pytest.approx(64000 / 200e9 + 2 * 2 * 1 * 5e-6)
    assert t["backsolve_gram"] == pytest.approx(2 * 64 * 64 * 100 / 2 / 1e14)
    assert t["backsolve_cholesky"] == pytest.approx(64**3 / 3 / 1e14)
    assert t["backsolve_allreduce"] == pytest.approx(2 * 0.5 * 8 * 64 * 64 / 200e9 + 2 * 5e-6)
    assert pred.total == pytest.approx(sum(pred.seconds.values()))
    assert cm.predict(w, 1, GPU, rates).terms["fisher_exchange"] == 0.0


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
    # factor 1e12 / R bytes dominates; brute force over R
    brute = next(R for R in range(1, 10_000) if cm.memory_per_rank(w, R).total <= 10e9)
    assert cm.smallest_fitting_ranks(w, hw) == brute
    assert cm.memory_per_rank(w, brute - 1).total > 10e9
    p2 = cm.smallest_fitting_ranks(w, hw, power_of_two=True)
    assert p2 == 2 ** math.ceil(math.log2(brute))
    huge = cm.Workload(p=10, n=10, model_params=10**12)  # the unsharded model alone exceeds the memory
    assert cm.smallest_fitting_ranks(huge, hw) is None
    sharded = dataclasses.replace(huge, model_sharded=True)
    assert cm.smallest_fitting_ranks(sharded, hw) == next(
        R for R in range(1, 1000) if cm.memory_per_rank(sharded, R).total <= 10e9) == 401


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
        "config": {"calibration": {"batch_size": w.micro_batch}},
        "phase_seconds": {ph: [pred.seconds[ph]] * R for ph in cm.PHASES},
    }


def test_calibration_recovers_rates():
    truth = cm.Rates(grad_efficiency=0.25, memory_efficiency=0.4, linalg_efficiency=0.5, collective_latency=2e-4,
                     backsolve_rounds=7,
                     iteration_overhead=3e-3, fixed={"fisher": 0.2, "backsolve": 0.05, "writeback": 0.01,
                                                     "save": 0.3})
    w = cm.Workload(p=32_360, n=1000, model_params=32_360, iterations=40, kept=3236, largest_layer=31_360,
                    micro_batch=250, layers=3)
    reports = [synthetic_report(R, CPU, truth, w) for R in (1, 2, 4)]
    reports.append(synthetic_report(2, CPU, truth, dataclasses.replace(w, n=3000, iterations=25)))
    fit = cm.calibrate(reports, CPU)
    assert fit.memory_efficiency == pytest.approx(0.4, rel=1e-3)
    assert fit.collective_latency == pytest.approx(2e-4, rel=1e-3)
    assert fit.iteration_overhead == pytest.approx(3e-3, rel=1e-3)
    assert fit.grad_efficiency == pytest.approx(0.25, rel=1e-3)
    assert fit.backsolve_rounds == 7
    for row in cm.compare(reports, CPU, fit):
        if row["phase"] in ("fisher", "solver", "backsolve"):
            assert row["rel_error"] == pytest.approx(0.0, abs=1e-3), row
    # the model family holds the truth, so fitting without any one report still predicts it (within 5%)
    for row in cm.compare_held_out(reports, CPU):
        if row["phase"] in ("fisher", "solver"):
            assert row["rel_error"] == pytest.approx(0.0, abs=5e-2), row
    table = cm.format_comparison(cm.compare(reports[:1], CPU, fit))
    assert "solver" in table and "sum" in table
    with pytest.raises(ValueError):
        cm.calibrate([], CPU)


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
    """The gradient phase runs once per solve (CHITA++ stage); at R > 1 it pays a fitted exchange overhead per extra
    rank and stage on top of the exchanged bytes, which a single rank (writing straight into its block) does not."""
    w = cm.Workload(p=32_360, n=1000, model_params=32_360, micro_batch=250, layers=3)
    rates = cm.Rates(exchange_overhead=0.05)
    one, five = cm.predict(w, 2, CPU, rates), cm.predict(dataclasses.replace(w, solves=5), 2, CPU, rates)
    for term in ("fisher_gradients", "fisher_write", "fisher_exchange"):
        assert five.terms[term] == pytest.approx(5 * one.terms[term])
    bare = cm.predict(w, 2, CPU, cm.Rates())
    assert one.terms["fisher_exchange"] == pytest.approx(bare.terms["fisher_exchange"] + 0.05)
    assert cm.predict(w, 1, CPU, rates).terms["fisher_exchange"] == 0.0
    truth = cm.Rates(grad_efficiency=0.2, collective_latency=1e-4, exchange_overhead=0.12, fixed={"fisher": 0.3})
    reports = [synthetic_report(R, CPU, truth, dataclasses.replace(w, n=n, solves=s, largest_layer=31_360,
                                                                  iterations=10, kept=3236))
               for R, n, s in ((1, 1000, 5), (2, 1000, 5), (4, 1000, 5), (1, 250, 1), (2, 500, 1))]
    for rep, s in zip(reports, (5, 5, 5, 1, 1), strict=True):
        rep["stages"] = [{"iterations": 2}] * s
    fit = cm.calibrate(reports, CPU)
    assert fit.exchange_overhead == pytest.approx(0.12, rel=1e-3)
    assert fit.grad_efficiency == pytest.approx(0.2, rel=1e-3)


def test_backsolve_row_passes_term():
    """Each backsolve also streams its kept rows (n k / R entries): the gather and PCG's exact products."""
    w = cm.Workload(p=10_000, n=64, model_params=10_000, kept=3000, backsolves=7)
    rates = cm.Rates(memory_efficiency=0.5, backsolve_row_passes=3.0)
    pred = cm.predict(w, 2, CPU, rates)
    s = CPU.compute_share(2)
    assert pred.terms["backsolve_rows"] == pytest.approx(7 * 3.0 * 64 * 1500 * 4 / (CPU.memory_bandwidth * s * 0.5))
    assert pred.seconds["backsolve"] == pytest.approx(sum(pred.terms[k] for k in (
        "backsolve_gram", "backsolve_allreduce", "backsolve_cholesky", "backsolve_rows")))
