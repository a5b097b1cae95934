"""dist_chita.planning.scaling: CSV rows against hand computation, mask comparison, PNG plots."""

from __future__ import annotations

import pytest

from dist_chita.planning import scaling

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(R: int, total: list[float], n: int = 1000, mask: str = "ab" * 32, threads: int = 1) -> dict:
    """A recorded-style prune_report.json dict (docs/report-format.md) with hand-chosen per-rank values."""
    return {
        "version": 1,
        "name": "t",
        "world_size": R,
        "threads_per_rank": threads,
        "n": n,
        "p": 32360,
        "model_params": 32360,
        "storage_dtype": "float32",
        "phase_seconds": {
            "load": [0.5] * R,
            "fisher": [2.0 / R + 0.1 * r for r in range(R)],  # max = 2/R + 0.1 (R - 1)
            "solver": [1.0 / R] * R,
            "backsolve": [0.2] * R,
            "writeback": [0.0] * R,
            "save": [0.1] + [0.0] * (R - 1),
            "total": total,
        },
        "bytes_sent": {
            "fisher": [1000 * r for r in range(R)],
            "solver": [500] * R,
            "backsolve": [100] * R,
            "writeback": [10] * R,
        },
        "solver_iterations": 12,
        "bytes_per_solver_iteration": 41.5,
        "peak_memory_bytes": [100 + r for r in range(R)],
        "mask_sha256": mask,
    }


def test_strong_rows_match_hand_computation():
    reps = [report(4, [2.0, 2.5, 2.2, 2.4]), report(1, [8.0]), report(2, [4.0, 5.0])]
    rows = scaling.rows(reps, "strong", cores=2)
    assert [r["world_size"] for r in rows] == [1, 2, 4]
    r1, r2, r4 = rows
    assert r4["time_fisher"] == pytest.approx(0.5 + 0.3)
    assert r4["time_solver"] == pytest.approx(0.25)
    assert r4["time_save"] == pytest.approx(0.1)
    assert r4["time_total"] == pytest.approx(2.5)
    # strong: speedup T1 / TR = 8 / 5 and 8 / 2.5; efficiency T1 / (R TR)
    assert r2["speedup"] == pytest.approx(1.6) and r2["efficiency"] == pytest.approx(0.8)
    assert r4["speedup"] == pytest.approx(3.2) and r4["efficiency"] == pytest.approx(0.8)
    assert r1["speedup"] == pytest.approx(1.0) and r1["efficiency"] == pytest.approx(1.0)
    assert r4["ideal_speedup"] == 4
    assert r4["peak_memory_per_rank"] == 103
    assert r4["bytes_fisher"] == 3000 and r4["bytes_solver"] == 500
    assert r4["bytes_per_solver_iteration"] == 41.5
    assert [r["oversubscribed"] for r in rows] == [False, False, True]
    assert list(r1) == list(scaling.COLUMNS)


def test_fisher_time_already_contains_the_exchange():
    # the report's "fisher" is fisher_block's wall time, which contains its "exchange": per rank fisher >= exchange
    # (as in docs/scaling/mlpnet/reports/ws2.json: fisher 0.81 / 0.80 s, exchange 0.67 / 0.64 s)
    rep = report(2, [4.0, 5.0])
    rep["phase_seconds"]["fisher"] = [0.81, 0.80]
    rep["phase_seconds"]["exchange"] = [0.67, 0.64]
    rep["bytes_sent"]["fisher"] = [323600480, 313600480]  # all bytes of the fisher collectives, exchange included
    (row,) = scaling.rows([rep])
    assert row["time_fisher"] == pytest.approx(0.81)  # max over ranks of "fisher" alone (not 0.81 + 0.67)
    assert row["time_exchange"] == pytest.approx(0.67)
    assert row["time_fisher"] >= row["time_exchange"]
    assert row["bytes_fisher"] == 323600480 and row["bytes_exchange"] == 0
    # an "exchange" bytes entry, if a report had one, is its own column and is not added to fisher either
    rep["bytes_sent"]["exchange"] = [7, 9]
    (row,) = scaling.rows([rep])
    assert row["bytes_fisher"] == 323600480 and row["bytes_exchange"] == 9
    assert scaling.rows([report(1, [1.0])])[0]["time_exchange"] == 0.0


def test_stacked_fisher_bar_is_gradient_part_plus_exchange(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    rep = report(2, [4.0, 5.0])
    rep["phase_seconds"]["fisher"] = [0.81, 0.80]
    rep["phase_seconds"]["exchange"] = [0.67, 0.64]
    rows = scaling.rows([report(1, [8.0]), rep], "strong", cores=2)
    bars = {}
    real_bar = matplotlib.axes.Axes.bar

    def record(self, x, height, *args, label=None, **kwargs):
        bars.setdefault(label, list(height))  # the stacked time plot draws first: keep each label's first bars
        return real_bar(self, x, height, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", record)
    scaling.plot(rows, tmp_path, title="t")
    gradients, exchange = bars["fisher (per-sample gradients)"], bars["exchange"]
    # stacked: (fisher - exchange) + exchange = time_fisher, the reported fisher time
    for g, e, row in zip(gradients, exchange, rows, strict=True):
        assert g + e == pytest.approx(row["time_fisher"])
    assert gradients[1] == pytest.approx(0.81 - 0.67)


def test_weak_rows_and_non_unit_base():
    reps = [report(2, [4.0, 4.0], n=2000), report(4, [5.0] * 4, n=4000)]
    r2, r4 = scaling.rows(reps, "weak")
    # weak: efficiency T0 / TR = 4 / 5; scaled speedup (R / R0) T0 / TR = 2 * 0.8
    assert r4["efficiency"] == pytest.approx(0.8)
    assert r4["speedup"] == pytest.approx(1.6)
    assert r4["ideal_speedup"] == 2
    assert r2["efficiency"] == pytest.approx(1.0)
    assert r4["oversubscribed"] is None
    # strong with base R0 = 2: efficiency = T0 R0 / (R TR) = 4 * 2 / (4 * 5)
    assert scaling.rows(reps, "strong")[1]["efficiency"] == pytest.approx(0.4)


def test_rows_reject_bad_input():
    with pytest.raises(ValueError, match="mode"):
        scaling.rows([report(1, [1.0])], "medium")
    with pytest.raises(ValueError, match="duplicate"):
        scaling.rows([report(1, [1.0]), report(1, [2.0])])
    with pytest.raises(ValueError, match="no reports"):
        scaling.rows([])


def test_mask_statement_equal_and_differing():
    ok, msg = scaling.mask_statement([report(1, [1.0]), report(2, [1.0, 1.0]), report(4, [1.0] * 4)])
    assert ok and msg.startswith("all 3 world sizes produced the same mask")
    ok, msg = scaling.mask_statement([report(1, [1.0]), report(2, [1.0, 1.0], mask="cd" * 32),
                                      report(4, [1.0] * 4)])
    assert not ok
    assert "[2]" in msg and "[1, 4]" in msg and "differ" in msg
    ok, msg = scaling.mask_statement([report(1, [1.0], mask=None), report(2, [1.0, 1.0])])
    assert not ok and "missing" in msg


def test_csv_round_trip(tmp_path):
    rows = scaling.rows([report(1, [8.0]), report(2, [4.0, 5.0])], "strong", cores=2)
    path = scaling.write_csv(rows, tmp_path / "s" / "scaling.csv")
    back = scaling.read_csv(path)
    assert list(back[0]) == list(scaling.COLUMNS)
    assert float(back[1]["speedup"]) == pytest.approx(1.6)
    assert float(back[1]["time_fisher"]) == pytest.approx(1.1)
    assert back[1]["oversubscribed"] == "False" and back[0]["mode"] == "strong"


def test_plots_are_valid_png(tmp_path):
    rows = scaling.rows([report(1, [8.0]), report(2, [4.0, 5.0]), report(4, [2.0] * 4)], "strong", cores=2)
    paths = scaling.plot(rows, tmp_path, title="t")
    names = sorted(p.name for p in paths)
    assert names == ["bytes_per_phase.png", "peak_memory.png", "speedup_efficiency.png", "time_per_phase.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_median_of_runs_by_hand():
    runs = [report(2, [4.0, 5.0]), report(2, [3.0, 9.0]), report(2, [6.0, 1.0])]
    runs[1]["phase_seconds"]["fisher"] = [10.0, 0.0]  # an outlier run: the median ignores it per rank
    runs[2]["peak_memory_bytes"] = [50, 900]
    for r, (a, b) in zip(runs, [(0.3, 0.1), (0.2, 0.7), (0.9, 0.4)], strict=True):
        r["stages"] = [{"kept": 5, "seconds": {"fisher": a, "solver": b}}, {"kept": 2, "seconds": {"fisher": b}}]
    m = scaling.median_of_runs(runs)
    assert m["phase_seconds"]["total"] == [4.0, 5.0]
    assert m["phase_seconds"]["fisher"] == pytest.approx([1.0, 1.1])  # medians of (1, 10, 1) and (1.1, 0, 1.1)
    assert m["stages"][0]["seconds"] == pytest.approx({"fisher": 0.3, "solver": 0.4})
    assert m["stages"][1]["seconds"] == pytest.approx({"fisher": 0.4})
    assert m["peak_memory_bytes"] == [100, 900]  # max per rank
    assert m["repeats"] == 3 and m["total_seconds_runs"] == [5.0, 9.0, 6.0]
    assert runs[0]["phase_seconds"]["total"] == [4.0, 5.0] and "repeats" not in runs[0]  # inputs untouched
    assert scaling.median_of_runs(runs[:1]) is runs[0]
    row = scaling.rows([m])[0]
    assert row["time_total"] == 5.0 and row["time_fisher"] == pytest.approx(1.1)


def test_median_of_runs_rejects_different_runs():
    with pytest.raises(ValueError, match="world_size"):
        scaling.median_of_runs([report(1, [1.0]), report(2, [1.0, 1.0])])
    with pytest.raises(ValueError, match="n"):
        scaling.median_of_runs([report(1, [1.0]), report(1, [1.0], n=500)])
    a, b = report(1, [1.0]), report(1, [1.0])
    a["stages"], b["stages"] = [{"seconds": {}}], []
    with pytest.raises(ValueError, match="stages"):
        scaling.median_of_runs([a, b])
    with pytest.raises(ValueError, match="no reports"):
        scaling.median_of_runs([])


def test_mask_statement_over_repeated_runs():
    runs = [report(R, [1.0] * R) for R in (1, 2) for _ in range(3)]
    ok, msg = scaling.mask_statement(runs)
    assert ok and msg.startswith("all 6 runs of the 2 world sizes produced the same mask")
    runs[4]["mask_sha256"] = "cd" * 32  # one repeat of world size 2 differs
    ok, msg = scaling.mask_statement(runs)
    assert not ok and "[2]" in msg and "differ" in msg


def layerwise_report(R: int, total: list[float]) -> dict:
    """A layerwise run's report: curvature / solver / writeback per rank, the printed memory estimate."""
    rep = report(R, total)
    rep["objective"] = "layerwise"
    rep["phase_seconds"] = {"curvature": [4.0 / R + 0.2 * r for r in range(R)], "solver": [8.0 / R] * R,
                            "writeback": [0.01 * (r + 1) for r in range(R)], "save": [0.1] * R, "total": total}
    rep["memory_estimate_bytes"] = {"model": 50, "total": 120 + R}
    return rep


def test_layerwise_rows_phases_and_plots(tmp_path):
    rows = scaling.rows([layerwise_report(1, [20.0]), layerwise_report(2, [11.0, 12.0])], "strong", cores=2)
    r1, r2 = rows
    assert r1["objective"] == r2["objective"] == "layerwise"
    assert r2["time_curvature"] == pytest.approx(2.0 + 0.2) and r2["time_solver"] == pytest.approx(4.0)
    assert r2["time_writeback"] == pytest.approx(0.02) and r2["time_fisher"] == 0.0
    assert (r1["memory_estimate_per_rank"], r2["memory_estimate_per_rank"]) == (121, 122)
    assert r2["speedup"] == pytest.approx(20.0 / 12.0)
    assert scaling.phases_of(rows) == ("curvature", "solver", "writeback", "save")
    fisher = scaling.rows([report(1, [8.0])], "strong")
    assert fisher[0]["objective"] == "fisher" and fisher[0]["memory_estimate_per_rank"] is None
    assert scaling.phases_of(fisher) == ("fisher", "exchange", "solver", "backsolve", "writeback", "save")
    assert scaling.phases_of(rows + fisher) == scaling.TIME_PHASES[:-1]  # both objectives' phases, in order
    for p in scaling.plot(rows, tmp_path, title="t"):
        assert p.read_bytes()[:8] == PNG_MAGIC
