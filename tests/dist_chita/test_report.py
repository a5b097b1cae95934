"""dist_chita/report.py: the typed report, its JSON round trip, the per-rank figures, the summary and the
generated format document."""

from pathlib import Path

import torch

from dist_chita.fisher.driver import StageReport
from dist_chita.report import LayerRow, Report, Totals, format_markdown, layer_table, mask_digest
from tests import multiproc

ROOT = Path(__file__).resolve().parents[2]


def test_mask_digest_sees_every_bit_and_the_order():
    a = {"x": torch.tensor([True, False, True]), "y": torch.ones(2, 2, dtype=torch.bool)}
    d = mask_digest(a, ["x", "y"])
    assert d == mask_digest({k: v.clone() for k, v in a.items()}, ["x", "y"])
    b = {"x": torch.tensor([True, True, True]), "y": a["y"]}
    assert mask_digest(b, ["x", "y"]) != d
    assert mask_digest(a, ["y", "x"]) != d


def test_layer_table_counts():
    rows = layer_table({"w": torch.tensor([[True, False], [False, False]])}, ["w"])
    assert rows == [LayerRow(name="w", shape=[2, 2], size=4, kept=1, sparsity=0.75)]


def _example() -> Report:
    return Report(method="chita", world_size=2, n=10, p=100, global_=Totals(100, 10, 0.9),
                  layers=[LayerRow("fc", [10, 10], 100, 10, 0.9)],
                  stages=[StageReport(sparsity=0.9, kept=10, objective=1.5, magnitude_objective=2.0, iterations=3,
                                      ridge_floor=1.6, seconds={"solver": 0.5})],
                  metric={"name": "accuracy", "before": 0.9, "after": 0.8},
                  phase_seconds={"fisher": [1.0, 2.0]}, peak_memory_bytes=[2**30, 2**31])


def test_json_round_trip_keeps_every_field_and_spells_global():
    rep = _example()
    text = rep.to_json()
    assert '"global": {' in text and "global_" not in text
    back = Report.from_json(text)
    assert back == rep and isinstance(back.stages[0], StageReport) and isinstance(back.global_, Totals)


def _ranks(seconds):
    from dist_chita.distributed import comm

    rep = _example()
    rep.phase_seconds = {}
    with comm.phase("solver"):
        comm.all_reduce(torch.ones(4))  # 16 bytes sent by each rank in phase "solver" (4 float32)
    rep.solver_iterations = 2
    rep.add_rank_figures({"load": seconds[comm.rank()]}, torch.device("cpu"), 10 + comm.rank())
    rep.add_rank_figures({"load": 1.0, "save": 2.0}, torch.device("cpu"), 20 + comm.rank())
    return rep


def test_rank_figures_are_gathered_in_rank_order_and_phases_add_up():
    out = multiproc.run(_ranks, 2, [0.25, 0.5])
    assert out[0] == out[1]
    rep = out[0]
    assert rep.phase_seconds == {"load": [1.25, 1.5], "save": [2.0, 2.0]}
    assert rep.param_bytes == [20, 21] and len(rep.peak_memory_bytes) == 2 and min(rep.peak_memory_bytes) > 0
    assert rep.bytes_sent["solver"][0] > 0 and rep.bytes_per_solver_iteration == max(rep.bytes_sent["solver"]) / 2


def test_summary_mentions_the_essentials():
    text = "\n".join(_example().summary_lines())
    assert "sparsity 0.9000" in text and "after 0.8000" in text and "fisher 2.00" in text and "2.00 GiB" in text
    # the solver's gain over its warm start, and the most any support could gain: 1 - 1.6 / 2
    assert "objective 1.5 (magnitude+backsolve 2, 25.00% lower; ridge floor 1.6: at most 20.00% lower)" in text


def test_summary_names_a_target_the_budgets_could_not_meet_and_prints_no_negative_zero():
    """Per-row budgets keep at least one weight per row: the sparsity reached is below the target, and the summary
    says so; a float-noise gain of -1e-9 prints as 0.00%, not -0.00%."""
    rep = _example()
    assert "target" not in rep.summary_lines()[1]
    rep.global_, rep.stages[0].kept = Totals(100, 20, 0.8), 20  # the stage asked for 0.9
    assert rep.summary_lines()[1] == ("  kept 20 (20.00%), sparsity 0.8000 (target 0.9000: the budgets keep whole "
                                      "weights per row or layer, at least one each)")
    rep.stages[0].kept = 10  # a stage of some of the weights (a layer group): no target for the whole
    assert "target" not in rep.summary_lines()[1]
    rep.stages[0].objective = 2.0 * (1 + 1e-9)
    assert "0.00% lower" in "\n".join(rep.summary_lines()) and "-0.00%" not in "\n".join(rep.summary_lines())


def test_format_document_is_generated_from_the_report_class():
    text = (ROOT / "docs" / "report-format.md").read_text()
    assert text == format_markdown(), "regenerate: python3 -m dist_chita.report > docs/report-format.md"
    for key in Report().to_dict():
        assert f"| `{key}` |" in text, key
