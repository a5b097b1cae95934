"""launch/scaling_study.py: launch commands (pure), and the whole study end to end with a stand-in prune script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import scaling_study as st  # noqa: E402

FAKE = str(ROOT / "tests" / "launch" / "fake_prune.py")
CONFIG = str(ROOT / "configs" / "mlpnet_mnist.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_accelerate_command():
    cmd = st.prune_command("accelerate", 4, "configs/mlpnet_mnist.yaml", "launch/prune.py", "/tmp/s/ws4", 1,
                           ["prune.sparsity=0.8"])
    assert cmd == ["accelerate", "launch", "--config_file", "launch/accelerate/cpu_4.yaml", "launch/prune.py",
                   "--config", "configs/mlpnet_mnist.yaml", "prune.sparsity=0.8", "output.dir=/tmp/s/ws4",
                   "output.overwrite=true", "world_size=4", "threads_per_rank=1"]


def test_torchrun_and_python_commands_weak_n():
    cmd = st.prune_command("torchrun", 2, "c.yaml", "p.py", "o", 3, n=st.study_n("weak", 1000, 2))
    assert cmd[:5] == ["torchrun", "--standalone", "--nproc_per_node", "2", "p.py"]
    assert cmd[-2:] == ["threads_per_rank=3", "calibration.n=2000"]
    # the study's weak-scaling n comes after (so wins over) a user's calibration.n
    cmd = st.prune_command("torchrun", 2, "c.yaml", "p.py", "o", 1, ["calibration.n=250"], n=500)
    assert cmd.index("calibration.n=250") < cmd.index("calibration.n=500") == len(cmd) - 1
    assert st.prune_command("python", 1, "c.yaml", "p.py", "o", 1, python="py")[:2] == ["py", "p.py"]
    assert st.study_n("strong", 1000, 4) is None and st.study_n("weak", 100, 4) == 400
    with pytest.raises(st.StudyError, match="launcher"):
        st.prune_command("mpirun", 2, "c", "p", "o", 1)
    with pytest.raises(st.StudyError, match="mode"):
        st.study_n("sideways", 1, 1)


def test_env_and_world_sizes():
    env = st.rank_env(2, {"PATH": "/bin", "OMP_NUM_THREADS": "8"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert st.parse_world_sizes("4,1,2") == [1, 2, 4]
    for bad in ("", "1,x", "0,1", "2,2"):
        with pytest.raises(st.StudyError, match="world-sizes"):
            st.parse_world_sizes(bad)


class Result:
    def __init__(self, returncode: int, captured):
        self.returncode, self.stdout, self.stderr = returncode, captured.out, captured.err


def run_study(tmp_path, capsys, *extra):
    """The study in this process (its runs are subprocesses of the stand-in script)."""
    out = tmp_path / "out"
    argv = ["--config", CONFIG, "--prune-script", FAKE, "--out", str(out), "--work-dir", str(tmp_path / "work"),
            *extra]
    code = st.main(argv)
    return Result(code, capsys.readouterr()), out


def test_study_end_to_end_with_stand_in(tmp_path, capsys):
    proc, out = run_study(tmp_path, capsys, "--world-sizes", "1,2,4", "--launcher", "python", "--threads-per-rank", "1")
    assert proc.returncode == 0, proc.stderr
    assert "all 3 world sizes produced the same mask" in proc.stdout
    assert "oversubscribe" in proc.stdout and "predicted" in proc.stdout
    rows = st.scaling.read_csv(out / "scaling.csv")
    assert [int(r["world_size"]) for r in rows] == [1, 2, 4]
    # fake totals by hand: load .5 + fisher 2e-3 n / R + exchange .01 (R-1) + solver 4 / R + .05
    #                      + backsolve .2 + writeback .01 + save .1 (rank 0)
    total = {R: 0.5 + 2.0 / R + 0.01 * (R - 1) + 4.0 / R + 0.05 * (R - 1) + 0.2 + 0.01 + 0.1 for R in (1, 2, 4)}
    for r in rows:
        R = int(r["world_size"])
        assert float(r["time_total"]) == pytest.approx(total[R])
        assert float(r["time_fisher"]) == pytest.approx(2.0 / R + 0.01 * (R - 1))
        assert float(r["speedup"]) == pytest.approx(total[1] / total[R])
        assert float(r["efficiency"]) == pytest.approx(total[1] / (R * total[R]))
        assert r["threads_per_rank"] == "1"  # OMP_NUM_THREADS reached the run
    assert [r["oversubscribed"] for r in rows] == ["False", "False", "True"] or st.machine_cores() != 2
    for name in ("time_per_phase", "speedup_efficiency", "peak_memory", "bytes_per_phase"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masks_equal"] is True and summary["world_sizes"] == [1, 2, 4]
    assert {row["phase"] for row in summary["comparison"]} >= {"fisher", "solver", "sum"}
    assert "output.dir=<work>/ws2" in summary["commands"]["ws2"]
    assert json.loads((out / "reports" / "ws4.json").read_text())["world_size"] == 4
    # the outputs rebuild from the recorded reports alone, with the same table
    again = tmp_path / "again"
    assert st.main(["--config", CONFIG, "--from-reports", str(out / "reports"), "--out", str(again)]) == 0
    assert st.scaling.read_csv(again / "scaling.csv") == rows
    assert "all 3 world sizes produced the same mask" in capsys.readouterr().out


def test_differing_masks_exit_1_and_weak_masks_not_compared(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_PRUNE_BAD_MASK_AT", "2")
    proc, out = run_study(tmp_path, capsys, "--world-sizes", "1,2", "--launcher", "python")
    assert proc.returncode == 1
    assert "masks differ: world size(s) [2]" in proc.stdout
    proc, out = run_study(tmp_path, capsys, "--world-sizes", "1,2", "--launcher", "python", "--mode", "weak")
    assert proc.returncode == 0
    assert "not compared: weak scaling" in proc.stdout
    rows = st.scaling.read_csv(out / "scaling.csv")
    assert [int(r["n"]) for r in rows] == [1000, 2000]  # weak: n R with the config's n = 1000
    assert rows[1]["mode"] == "weak"
    assert json.loads((out / "summary.json").read_text())["masks_equal"] is None


@pytest.mark.slow
def test_torchrun_launch(tmp_path, capsys):
    proc, out = run_study(tmp_path, capsys, "--world-sizes", "2", "--launcher", "torchrun")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((out / "reports" / "ws2.json").read_text())
    assert rep["world_size"] == 2  # from torchrun's WORLD_SIZE, not the override
    assert rep["threads_per_rank"] == 1


def test_bad_arguments_exit_2(tmp_path, capsys):
    proc, _ = run_study(tmp_path, capsys, "--world-sizes", "0,1", "--launcher", "python")
    assert proc.returncode == 2 and "world-sizes" in proc.stderr and proc.stderr.count("\n") == 1
    assert st.main(["--config", "nope.yaml"]) == 2
    assert "file not found: nope.yaml" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "scaling_study.py"), "--config", CONFIG,
                           "--world-sizes", "1,1"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("scaling_study.py: error: --world-sizes")


def test_failed_run_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad_prune.py"
    bad.write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    proc, _ = run_study(tmp_path, capsys, "--world-sizes", "1", "--launcher", "python", "--prune-script", str(bad))
    assert proc.returncode == 1 and "exited with status 3" in proc.stderr and "boom" in proc.stderr


def test_summary_is_strict_json():
    """A rate the fit cannot pin down is infinite; the summary writes it as null, never as the non-JSON Infinity."""
    assert st.strict_json({"a": [1.0, math.inf, {"b": math.nan}], "c": "x", "d": 2}) == {
        "a": [1.0, None, {"b": None}], "c": "x", "d": 2}


def test_repeated_runs_give_medians_and_every_run_is_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_PRUNE_JITTER", "1")  # run 2's solver 3x, run 3's 0.5x: median = run 1, mean is not
    proc, out = run_study(tmp_path, capsys, "--world-sizes", "1,2", "--launcher", "python", "--repeats", "3")
    assert proc.returncode == 0, proc.stderr
    assert "all 6 runs of the 2 world sizes produced the same mask" in proc.stdout
    assert "medians over 3 runs" in proc.stdout
    names = sorted(p.name for p in (out / "reports" / "runs").glob("*.json"))
    assert names == [f"ws{R}.run{j}.json" for R in (1, 2) for j in (1, 2, 3)]
    med = json.loads((out / "reports" / "ws2.json").read_text())
    raw = [json.loads((out / "reports" / "runs" / f"ws2.run{j}.json").read_text()) for j in (1, 2, 3)]
    for ph, vals in med["phase_seconds"].items():  # the median per rank of the three recorded runs
        for i, v in enumerate(vals):
            assert v == pytest.approx(sorted(r["phase_seconds"][ph][i] for r in raw)[1])
    assert med["phase_seconds"]["solver"] == pytest.approx([2.05, 2.06]) == raw[0]["phase_seconds"]["solver"]
    assert raw[1]["phase_seconds"]["solver"][0] == pytest.approx(3 * 2.05)  # the runs did differ
    assert float(st.scaling.read_csv(out / "scaling.csv")[1]["time_solver"]) == pytest.approx(2.06)
    assert med["repeats"] == 3 and json.loads((out / "summary.json").read_text())["repeats"] == 3
    # one repeat with a different mask is caught, also when rebuilding from the recorded runs
    bad = out / "reports" / "runs" / "ws2.run3.json"
    bad.write_text(json.dumps({**raw[2], "mask_sha256": "cd" * 32}))
    assert st.main(["--config", CONFIG, "--from-reports", str(out / "reports"), "--out", str(tmp_path / "r")]) == 1
    assert "masks differ: world size(s) [2]" in capsys.readouterr().out
    proc, _ = run_study(tmp_path, capsys, "--world-sizes", "1", "--launcher", "python", "--repeats", "0")
    assert proc.returncode == 2 and "--repeats must be >= 1" in proc.stderr


def test_layerwise_summary_fits_the_layerwise_formulas():
    """Reports whose phases follow the layerwise model with known coefficients: the summary gives the layerwise
    phases, recovers the coefficients and predicts each world size from the other exactly."""
    from dist_chita.planning import layerwise_fit as lf

    hw = st.costmodel.Hardware(name="t", memory_bytes=1e10, memory_bandwidth=1e10, flops=1e10,
                               link_bandwidth=1e9, link_latency=1e-4)
    coef = {"curvature": (1.5, 0.0), "solver": (20.0, 0.0), "writeback": (3.0,)}
    reports = []
    for R in (1, 2):
        rep = {"objective": "layerwise", "method": "chita", "name": "lw", "world_size": R, "threads_per_rank": 1,
               "n": 32, "p": 3 * 128 * 64, "config": {"calibration": {"batch_size": 4, "max_length": 16}},
               "layers": [{"name": f"enc.{b}.fc", "shape": [128, 64]} for b in range(3)],
               "peak_memory_bytes": [1 << 20] * R, "mask_sha256": "ab" * 32}
        feats = lf.phase_features(lf.work_from_report(rep), hw)
        secs = {ph: g + sum(c * v for c, v in zip(coef[ph], x, strict=True)) for ph, (g, x) in feats.items()}
        rep["phase_seconds"] = {**{ph: [v] * R for ph, v in secs.items()}, "total": [10.0 / R] * R}
        reports.append(rep)
    summary = st.summarize(reports, "strong", 2, hw)
    assert summary["objective"] == "layerwise" and summary["masks_equal"]
    assert summary["per_rank_seconds"]["2"]["solver"] == reports[1]["phase_seconds"]["solver"]
    assert set(summary["per_rank_seconds"]["1"]) == {"curvature", "solver", "writeback", "save"}
    assert {row["phase"] for row in summary["comparison"]} == {"curvature", "solver", "writeback", "sum"}
    assert summary["rates"]["solver_steps"] == pytest.approx(20.0)
    assert summary["rates"]["curvature_compute_scale"] == pytest.approx(1.5)
    assert summary["rates"]["writeback_allreduce_scale"] == pytest.approx(3.0)
    for row in summary["comparison_held_out"]:  # R = 1 predicted from R = 2 and back, the all-reduce aside
        if row["phase"] != "writeback" and row["phase"] != "sum":
            assert row["rel_error"] == pytest.approx(0.0, abs=1e-9)
    text = st.format_summary(summary)
    assert "objective layerwise" in text and "curvature" in text.splitlines()[1]
    with pytest.raises(st.StudyError, match="different objectives"):
        st.summarize([reports[0], {**reports[1], "objective": "fisher"}], "strong", 2, hw)
