"""launch/validate_costmodel.py: leave-one-out over pooled study reports (synthetic reports from known rates)."""

import dataclasses
import json

from dist_chita.planning import costmodel as cm
from launch import validate_costmodel as vc
from tests.dist_chita.planning.test_costmodel import CPU, synthetic_report

TRUTH = cm.Rates(grad_efficiency=0.25, memory_efficiency=0.4, linalg_efficiency=0.5, collective_latency=2e-4,
                 iteration_overhead=3e-3, exchange_efficiency=0.4, exchange_overhead=0.03,
                 fixed={"backsolve": 0.05, "writeback": 0.01, "save": 0.3})
BASE = cm.Workload(p=32_360, n=1000, model_params=32_360, iterations=40, kept=3236, largest_layer=31_360,
                   micro_batch=250, layers=3)


def _write_study(d, runs, repeats=None):
    """ws<R>.json per (R, n, m); with ``repeats`` (factors f_j), runs/ws<R>.run<j>.json with every time times f_j."""
    d.mkdir(parents=True)
    for R, n, m in runs:
        w = dataclasses.replace(BASE, n=n, backsolves=m)
        rep = synthetic_report(R, CPU, TRUTH, w)
        rep.update(name="mlp", stages=[{"backsolves": m}])
        (d / f"ws{R}.json").write_text(json.dumps(rep))
        for j, f in enumerate(repeats or []):
            (d / "runs").mkdir(exist_ok=True)
            run = {**rep, "phase_seconds": {ph: [f * v for v in vals] for ph, vals in rep["phase_seconds"].items()}}
            (d / "runs" / f"ws{R}.run{j + 1}.json").write_text(json.dumps(run))


def test_pooled_leave_one_out_recovers_truth(tmp_path):
    _write_study(tmp_path / "strong", [(1, 1000, 9), (2, 1000, 9), (4, 1000, 9)])
    _write_study(tmp_path / "weak", [(1, 250, 4), (2, 500, 6), (4, 1000, 11)])
    result = vc.validate(vc.load_reports([tmp_path / "strong", tmp_path / "weak"]), CPU, 0.0)
    (g,) = result["groups"]
    assert g["runs"] == g["conditions"] == 6 and len(g["rows"]) == 6 * (len(cm.PHASES) + 1)
    for ph in ("fisher", "solver", "backsolve"):
        assert result["worst"][ph] < 0.05, (ph, result["worst"])
    text = vc.format_result(result, 0.0, 0.3)
    assert "mlp (p = 32360, fisher): 6 runs in 6 conditions" in text and "backsolve" in text


def test_exit_status_and_errors(tmp_path, capsys):
    _write_study(tmp_path / "s", [(1, 1000, 9), (2, 1000, 9), (4, 1000, 9)])
    hw = tmp_path / "hw.yaml"
    hw.write_text("name: cpu\nmemory_bytes: 24e9\nmemory_bandwidth: 8e9\nflops: 5e10\nlink_bandwidth: 5e9\n"
                  "link_latency: 1e-4\nshared_cores: 2\n")
    out = tmp_path / "v.json"
    rc = vc.main([str(tmp_path / "s"), "--hardware", str(hw), "--out", str(out), "--min-seconds", "0.0",
                  "--target", "10"])
    assert rc == 0 and json.loads(out.read_text())["target"] == 10
    # a run made 3x slower in its backsolve cannot be predicted from the other two
    rep = json.loads((tmp_path / "s" / "ws2.json").read_text())
    rep["phase_seconds"]["backsolve"] = [3 * v for v in rep["phase_seconds"]["backsolve"]]
    (tmp_path / "s" / "ws2.json").write_text(json.dumps(rep))
    assert vc.main([str(tmp_path / "s"), "--hardware", str(hw), "--min-seconds", "0.0"]) == 1
    assert "NOT all within 30%" in capsys.readouterr().out
    assert vc.main([str(tmp_path / "missing"), "--hardware", str(hw)]) == 2
    assert "not a directory of reports" in capsys.readouterr().err
    (tmp_path / "two").mkdir()
    for R in (1, 2):
        (tmp_path / "two" / f"ws{R}.json").write_text((tmp_path / "s" / f"ws{R}.json").read_text())
    assert vc.main([str(tmp_path / "two"), "--hardware", str(hw)]) == 2
    assert "leave-one-out needs at least 3" in capsys.readouterr().err


def test_runs_of_one_condition_are_pooled_into_their_median(tmp_path):
    """R = 2, n = 1000 is in two studies: its 2 x 3 runs (times x 0.6, 1, 1.7 and x 0.7, 1, 1.5) are one condition
    whose times are their median (x 1): recovered as well as the others, and never held out against its own twin."""
    _write_study(tmp_path / "strong", [(1, 1000, 9), (2, 1000, 9), (4, 1000, 9)], repeats=[0.6, 1.0, 1.7])
    _write_study(tmp_path / "weak", [(1, 250, 4), (2, 500, 6), (4, 1000, 11)], repeats=[0.8, 1.0, 1.1])
    _write_study(tmp_path / "again", [(2, 1000, 9)], repeats=[0.7, 1.0, 1.5])
    dirs = [tmp_path / "strong", tmp_path / "weak", tmp_path / "again"]
    reports = vc.load_reports(dirs)
    assert len(reports) == 21  # the runs/, not the ws<R>.json
    pooled = vc.pool(reports)
    assert len(pooled) == 6 and sorted(int(r.get("repeats") or 1) for r in pooled) == [3, 3, 3, 3, 3, 6]
    truth = synthetic_report(2, CPU, TRUTH, dataclasses.replace(BASE, n=1000, backsolves=9))
    (two,) = [r for r in pooled if vc.condition(r)[:2] == (2, 1000)]
    assert two["phase_seconds"]["backsolve"] == truth["phase_seconds"]["backsolve"]
    result = vc.validate(reports, CPU, 0.0)
    (g,) = result["groups"]
    assert g["runs"] == 21 and g["conditions"] == 6
    for ph in ("fisher", "solver", "backsolve"):
        assert result["worst"][ph] < 0.05, (ph, result["worst"])
    assert "21 runs in 6 conditions (medians of 3/6/3/3/3/3 runs)" in vc.format_result(result, 0.0, 0.3)


def test_runs_with_different_budgets_are_different_conditions():
    """Per-row and global runs of one model at the same R and n are different measurements (a per-row solve makes no
    histogram all-reduces): never pooled into one median."""
    reps = [synthetic_report(2, CPU, TRUTH, dataclasses.replace(BASE, granularity=g)) for g in ("row", "global")]
    assert vc.condition(reps[0]) != vc.condition(reps[1])
    assert len(vc.pool(reps)) == 2


def _layerwise_study(d, runs, coef):
    """ws<R>.json of a layerwise study of model "mlp" (p 32360, like the Fisher one): phases = the layerwise
    model's own form with the coefficients ``coef``."""
    from dist_chita.planning import layerwise_fit as lf

    d.mkdir(parents=True)
    for R, n in runs:
        rep = {"objective": "layerwise", "method": "chita", "name": "mlp", "world_size": R, "threads_per_rank": 1,
               "n": n, "p": 32_360, "config": {"calibration": {"batch_size": 250}},
               "layers": [{"name": "fc1", "shape": [40, 784]}, {"name": "fc2", "shape": [20, 40]},
                          {"name": "fc3", "shape": [10, 20]}]}
        feats = lf.phase_features(lf.work_from_report(rep), CPU)
        rep["phase_seconds"] = {ph: [g + sum(c * v for c, v in zip(coef[ph], x, strict=True))] * R
                                for ph, (g, x) in feats.items()}
        (d / f"ws{R}.json").write_text(json.dumps(rep))


def test_objectives_are_separate_groups_and_layerwise_is_predicted_by_its_formulas(tmp_path):
    _write_study(tmp_path / "fisher", [(1, 1000, 9), (2, 1000, 9), (4, 1000, 9)])
    _layerwise_study(tmp_path / "lw", [(1, 1000), (2, 1000)], {"curvature": (2.0, 1e-3), "solver": (30.0, 0.0),
                                                                "writeback": (2.0,)})
    result = vc.validate(vc.load_reports([tmp_path / "fisher", tmp_path / "lw"]), CPU, 0.0)
    fisher, lw = result["groups"]
    assert (fisher["objective"], lw["objective"]) == ("fisher", "layerwise")
    assert lw["conditions"] == 2 and {r["phase"] for r in lw["rows"]} == {"curvature", "solver", "writeback", "sum"}
    for row in lw["rows"]:  # R = 1 from R = 2 and back: the curvature and solver forms scale with R exactly
        if row["phase"] in ("curvature", "solver"):
            assert abs(row["rel_error"]) < 1e-6, row
    assert "mlp (p = 32360, layerwise): 2 runs in 2 conditions" in vc.format_result(result, 0.0, 0.3)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "ws1.json").write_text((tmp_path / "lw" / "ws1.json").read_text())
    try:
        vc.validate(vc.load_reports([tmp_path / "one"]), CPU, 0.0)
    except ValueError as e:
        assert "leave-one-out needs at least 2" in str(e)
    else:
        raise AssertionError("one layerwise condition must be refused")
