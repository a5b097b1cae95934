"""dist_chita.planning.layerwise_fit: the work read from a layerwise report, the features against hand counts, the
fit recovering known coefficients, leave-one-out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dist_chita.planning import layerwise_fit as lf
from dist_chita.planning.costmodel import Hardware, allreduce_seconds

HW = Hardware(name="t", memory_bytes=1e10, memory_bandwidth=1e10, flops=1e10, link_bandwidth=1e9, link_latency=1e-4,
              flops_float32=1e10, flops_float64=5e9)


def report(R: int, n: int = 10, method: str = "chita", layers=None, solver=None, seconds=None) -> dict:
    """A layerwise prune_report.json dict (docs/report-format.md) with chosen shapes and per-rank seconds."""
    layers = layers or [("enc.layer.0.q", [128, 16]), ("enc.layer.0.fc", [64, 16]), ("enc.layer.1.q", [128, 16])]
    seconds = seconds or {"curvature": 1.0, "solver": 2.0, "writeback": 0.1}
    ps = {ph: [v] * R for ph, v in seconds.items()}
    if solver is not None:
        ps["solver"] = solver
    return {"objective": "layerwise", "method": method, "world_size": R, "threads_per_rank": 1, "n": n, "p": 10,
            "config": {"calibration": {"batch_size": 3, "max_length": 8}},
            "layers": [{"name": name, "shape": shape} for name, shape in layers], "phase_seconds": ps}


def test_work_from_report_groups_blocks_and_folds_kernels():
    rep = report(1, layers=[("enc.layer.0.q", [8, 4]), ("enc.layer.0.fc", [16, 4]), ("enc.layer.1.conv", [6, 2, 3, 3]),
                            ("head", [3, 8])])
    w = lf.work_from_report(rep)
    assert w.blocks == (((8, 4), (16, 4)), ((6, 18),), ((3, 8),))
    assert (w.n, w.micro_batch, w.tokens, w.ranks, w.method, w.zero3) == (10, 3, 8, 1, "chita", False)
    with pytest.raises(ValueError, match="not a layerwise report"):
        lf.work_from_report({**rep, "objective": "fisher"})
    with pytest.raises(ValueError, match="2 or more dimensions"):
        lf.work_from_report(report(1, layers=[("a", [4])]))


def test_busiest_rank_batches_by_hand():
    # n = 10 in micro-batches of 3: sizes 3, 3, 3, 1; on 2 ranks dealt 0, 1 | 1, 0: rank 0 has 3 + 1, rank 1 3 + 3
    assert lf.work_from_report(report(2)).rank_batches() == (6, 2)
    assert lf.work_from_report(report(1)).rank_batches() == (10, 4)
    # 3 ranks: 0, 1, 2 | 2: rank 2 has 3 + 1 samples, rank 0 and 1 3 each
    assert lf.work_from_report(report(3)).rank_batches() == (4, 2)


def test_curvature_features_by_hand():
    w = lf.work_from_report(report(2))
    given, (compute, calls) = lf.phase_features(w, HW)["curvature"]
    tokens = 6 * 8  # the busiest rank's samples times max_length
    # block 0 (q 128 x 16, fc 64 x 16) forwarded twice, block 1 (the last) once; X^T X of every layer's input
    by_hand = (2 * tokens * 2 * (128 * 16 + 64 * 16) + 1 * tokens * 2 * 128 * 16) / 1e10 + tokens * 3 * 16**2 / 1e10
    assert compute == pytest.approx(by_hand)
    assert calls == 2 * 2 + 1 * 2  # block forwards of the rank's 2 micro-batches
    assert given == pytest.approx(3 * allreduce_seconds(8 * 16**2, 2, 1e9, 1e-4))


def test_solver_and_writeback_features_by_hand():
    w1, w2 = lf.work_from_report(report(1)), lf.work_from_report(report(2))
    # one IHT step of a row: 12 products of (1, d) x (d, d) at the solver defaults (no trials, 10 refit steps, the
    # new gradient, 4 moves of a quarter each); d = 16 makes every layer one chunk (chunk_rows(16) = 4096 rows), so
    # a layer's rows stay on one rank: the busiest rank's rows are 128 + 64 + 128 on one rank and on two
    per_step = lambda rows: rows * 12 * 2 * 16**2 / 1e10  # noqa: E731
    assert lf.phase_features(w1, HW)["solver"][1][0] == pytest.approx(per_step(320))
    assert lf.phase_features(w2, HW)["solver"][1][0] == pytest.approx(per_step(320))
    assert lf.phase_features(w1, HW)["solver"][1][1] == pytest.approx(3)  # one chunk per layer
    assert lf.phase_features(w2, HW)["solver"][1][1] == pytest.approx(3)
    w3 = lf.work_from_report(report(2, layers=[("enc.layer.0.q", [128, 1024]), ("enc.layer.0.fc", [64, 1024]),
                                               ("enc.layer.1.q", [128, 1024])]))
    # d = 1024: chunks of 64 rows (2 + 1 + 2), shared on two ranks: 64 + 64 + 64 rows in 3 chunks
    assert lf.phase_features(w3, HW)["solver"][1][0] == pytest.approx(192 * 12 * 2 * 1024**2 / 1e10)
    assert lf.phase_features(w3, HW)["solver"][1][1] == pytest.approx(3)
    given, (allreduce,) = lf.phase_features(w2, HW)["writeback"]
    assert given == pytest.approx(8 * (2 * 128 * 16 + 64 * 16) / 1e10)
    assert allreduce == pytest.approx(sum(allreduce_seconds(4 * r * 16, 2, 1e9, 1e-4) for r in (128, 64, 128)))


def test_measured_seconds_are_the_busiest_solvers_rank():
    rep = report(2, solver=[1.0, 3.0])
    rep["phase_seconds"]["writeback"] = [0.9, 0.2]  # rank 0 waited for rank 1
    assert lf.measured_seconds(rep) == {"curvature": 1.0, "solver": 3.0, "writeback": 0.2}


def _synthetic(reps: list[dict], coef: dict[str, tuple[float, ...]]) -> list[dict]:
    """``reps`` with every phase set to given + sum c x (the model's own form with known coefficients)."""
    out = []
    for rep in reps:
        feats = lf.phase_features(lf.work_from_report(rep), HW)
        secs = {ph: g + sum(c * v for c, v in zip(coef[ph], x, strict=True)) for ph, (g, x) in feats.items()}
        out.append({**rep, "phase_seconds": {ph: [v] * rep["world_size"] for ph, v in secs.items()}})
    return out


def test_fit_recovers_known_coefficients_and_held_out_is_exact():
    coef = {"curvature": (1.7, 0.003), "solver": (25.0, 0.02), "writeback": (2.5,)}
    layers = [("enc.layer.0.q", [100, 1024]), ("enc.layer.0.fc", [64, 1024]), ("enc.layer.1.q", [128, 1024])]
    # rows of the busiest rank 292 in 5 chunks at R = 1, 192 in 3 at R = 2 (100 rows: chunks of 64 and 36): steps
    # and chunk seconds can be told apart; (samples, micro-batches) of the busiest rank (10, 4), (6, 2), (11, 4),
    # (20, 7): without any one run the others still tell the curvature's two features apart
    reps = _synthetic([report(R, n=n, layers=layers) for R, n in ((1, 10), (2, 10), (2, 20), (1, 20))], coef)
    fitted = lf.fit(reps, HW)
    for ph, cs in coef.items():
        assert fitted.coefficients[ph] == pytest.approx(cs, rel=1e-6)
    assert fitted.as_dict()["chunk_step_seconds"] == pytest.approx(0.02 / 27)
    for row in lf.compare_held_out(reps, HW):
        assert row["rel_error"] == pytest.approx(0.0, abs=1e-6)
    rows = lf.compare(reps[:1], HW, fitted)
    assert [r["phase"] for r in rows] == ["curvature", "solver", "writeback", "sum"]
    assert rows[-1]["measured"] == pytest.approx(sum(r["measured"] for r in rows[:3]))
    assert rows[-1]["largest_part"] == max(r["measured"] for r in rows[:3])


def test_features_in_the_same_ratio_fit_the_first():
    # 128, 64, 128 rows: 320 rows in 5 chunks on one rank, 192 in 3 on two, the same ratio: only s is fitted
    reps = _synthetic([report(1), report(2)], {"curvature": (1.0, 0.0), "solver": (25.0, 0.02), "writeback": (1.0,)})
    steps, chunk = lf.fit(reps, HW).coefficients["solver"]
    assert chunk == 0.0 and steps > 25.0
    for row in lf.compare_held_out(reps, HW):
        assert row["rel_error"] == pytest.approx(0.0, abs=1e-6)


def test_one_run_fits_a_scale_and_an_unobserved_allreduce_keeps_the_link_rate():
    coef = {"curvature": (2.0, 0.0), "solver": (30.0, 0.0), "writeback": (4.0,)}
    one = _synthetic([report(1)], coef)
    fitted = lf.fit(one, HW)
    assert fitted.coefficients["curvature"] == pytest.approx((2.0, 0.0))
    assert fitted.coefficients["solver"] == pytest.approx((30.0, 0.0))
    assert fitted.coefficients["writeback"] == (1.0,)  # no run with R > 1: the all-reduce at the link's rate
    two = _synthetic([report(2)], coef)
    assert lf.fit(two, HW).coefficients["writeback"] == pytest.approx((4.0,))


def test_sparsegpt_solver_takes_the_most_loaded_rank_and_methods_do_not_mix():
    layers = [("b.0.q", [32, 16]), ("b.0.k", [32, 16]), ("b.0.fc", [64, 24])]
    w = lf.work_from_report(report(2, method="sparsegpt", layers=layers))
    _, (seconds, columns) = lf.phase_features(w, HW)["solver"]
    layer = lambda r, d: (4 * d**3 / 3 + r * d * d + r * d * 128) / 5e9  # noqa: E731  (F64 = 5e9)
    # owners by d (r + d), largest first to the least loaded rank: fc -> rank 0, q -> rank 1, k -> rank 1; rank 0
    # has the most seconds (251904 against 2 x 79189 FLOPs), its columns are fc's 24
    assert layer(64, 24) > 2 * layer(32, 16)
    assert seconds == pytest.approx(layer(64, 24))
    assert columns == 24
    with pytest.raises(ValueError, match="different methods"):
        lf.fit([report(1), report(1, method="sparsegpt")], HW)


def test_effective_cores_of_a_shared_machine_are_fitted():
    shared = replace(HW, shared_cores=2)
    coef = {"curvature": (1.7, 0.003), "solver": (25.0, 0.02), "writeback": (2.5,)}
    layers = [("enc.layer.0.q", [100, 1024]), ("enc.layer.0.fc", [64, 1024]), ("enc.layer.1.q", [128, 1024])]
    reps = [report(R, n=n, layers=layers) for R, n in ((1, 10), (2, 10), (2, 20), (1, 20))]
    for rep in reps:  # two ranks got 1.5 cores between them: each 0.75 of its core, one rank alone a whole one
        feats = lf.phase_features(lf.work_from_report(rep), shared, cores=1.5)
        rep["phase_seconds"] = {ph: [g + sum(c * v for c, v in zip(coef[ph], x, strict=True))] * rep["world_size"]
                                for ph, (g, x) in feats.items()}
    by_hand = lf.phase_features(lf.work_from_report(reps[1]), HW)["solver"][1][0] / 0.75
    assert lf.phase_features(lf.work_from_report(reps[1]), shared, cores=1.5)["solver"][1][0] == pytest.approx(by_hand)
    fitted = lf.fit(reps, shared)
    assert fitted.cores == pytest.approx(1.5) and fitted.as_dict()["effective_cores"] == pytest.approx(1.5)
    for ph, cs in coef.items():
        assert fitted.coefficients[ph] == pytest.approx(cs, rel=1e-6)
    assert lf.fit(reps, HW).cores is None  # one device per rank: nothing shared to fit
    assert lf.fit(reps[:1], shared).cores is None  # one R: the runs cannot tell
    assert lf.fit(reps[:2], shared).cores is None  # one run per R: C' would take up the work per row
