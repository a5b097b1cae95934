"""dist_chita.fisher.tuning: the candidate schedules, and the choice of the lowest validation score with its
weights left in the model."""

import pytest
import torch
from torch import nn

from dist_chita.fisher import tuning
from dist_chita.fisher.driver import PruneOutcome
from dist_chita.options import Fisher
from dist_chita.sparsity import mean_sparsity


def test_candidates_are_every_combination_once():
    f = Fisher(stages="auto", base_sparsity="auto", first_order_term="auto", stage_candidates=(1, 3),
               base_candidates=(0.0, 0.5))
    got = tuning.schedule_candidates(f, 0.8, [10])
    S = tuning.Schedule
    assert got == [S(1, 0.0, False), S(1, 0.0, True),  # one stage has no base sparsity: no repeats
                   S(3, 0.0, False), S(3, 0.0, True), S(3, 0.4, False), S(3, 0.4, True)]
    fixed = Fisher(stages=4, base_sparsity="auto", base_candidates=(0.5,))
    sizes = [30, 10]
    assert tuning.schedule_candidates(fixed, [0.9, 0.5], sizes) == [
        S(4, pytest.approx(0.5 * mean_sparsity([0.9, 0.5], sizes)), False)]


def test_the_lowest_score_wins_and_its_weights_stay():
    layer = nn.Linear(3, 2, bias=False)
    dense = layer.weight.detach().clone()
    modules = [("layer", layer)]
    starts = []

    def run(c: tuning.Schedule) -> PruneOutcome:
        starts.append(layer.weight.detach().clone())  # every candidate starts from the dense weights
        with torch.no_grad():
            layer.weight.mul_(c.stages)
        return PruneOutcome(None, [c.stages], {})

    def score() -> float:  # lowest for 3 stages
        return float((layer.weight.detach().sum() - 3 * dense.sum()).abs())

    candidates = [tuning.Schedule(t, 0.0, False) for t in (1, 3, 5)]
    outcome, chosen, rows = tuning.choose_schedule(modules, candidates, run, score)
    assert chosen == candidates[1] and outcome.stages == [3]
    assert torch.equal(layer.weight.detach(), 3 * dense)
    assert all(torch.equal(s, dense) for s in starts)
    assert [r["stages"] for r in rows] == [1, 3, 5] and rows[1]["score"] == min(r["score"] for r in rows)
    assert all(r["seconds"] >= 0.0 for r in rows)


def test_one_standard_error_rule_keeps_the_simplest_schedule_the_validation_samples_cannot_tell_apart():
    """Per-sample values: 1 stage is worse than 3 stages by far less than the paired standard error, 5 stages is
    the lowest; brute force: the fewest stages within one standard error of the lowest mean."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(40, generator=gen, dtype=torch.float64)
    noise = {1: 0.3, 3: 0.0, 5: 0.0}
    shift = {1: 0.01, 3: 0.5, 5: 0.0}
    z = torch.randn(40, generator=gen, dtype=torch.float64)
    per = {t: base + shift[t] + noise[t] * (z - z.mean()) for t in (1, 3, 5)}  # 1 stage: 0.01 worse on average
    layer, dense, run, values, candidates = _schedule_problem(per)
    means = {t: float(v.mean()) for t, v in per.items()}
    se = {t: float((per[t] - per[5]).std()) / 40**0.5 for t in per}
    truth = min(t for t in per if means[t] <= means[5] + se[t])
    assert truth == 1 and min(means, key=means.get) == 5  # the rule does change the choice here
    outcome, chosen, rows = tuning.choose_schedule([("layer", layer)], candidates, run, lambda: 0.0, values=values,
                                                   rule="one_se")
    assert chosen.stages == truth and outcome.stages == [truth]
    assert torch.equal(layer.weight.detach(), dense * truth)
    assert [r["score"] for r in rows] == pytest.approx([means[5], means[3], means[1]])
    _, plain, _ = tuning.choose_schedule([("layer", layer)], candidates, run,
                                         lambda: float(values().mean()))
    assert plain.stages == 5 and torch.equal(layer.weight.detach(), dense * 5)


def _schedule_problem(per: dict[int, torch.Tensor]):
    """A layer whose prune with t stages scales its weights by t, the per-sample validation values ``per[t]`` of
    the weights it holds, and the candidates 5, 3 and 1 stages: (layer, dense weights, run, values, candidates)."""
    layer = nn.Linear(3, 2, bias=False)
    dense = layer.weight.detach().clone()

    def run(c: tuning.Schedule) -> PruneOutcome:
        with torch.no_grad():
            layer.weight.copy_(dense * c.stages)
        return PruneOutcome(None, [c.stages], {})

    def values() -> torch.Tensor:
        return per[round(float(layer.weight.detach().sum() / dense.sum()))]

    return layer, dense, run, values, [tuning.Schedule(t, 0.0, False) for t in (5, 3, 1)]


def _rule_choice(per: dict[int, torch.Tensor], rule: str):
    """choose_schedule over 5, 3 and 1 stages whose per-sample validation values are ``per[stages]``."""
    layer, _, run, values, candidates = _schedule_problem(per)
    _, chosen, rows = tuning.choose_schedule([("layer", layer)], candidates, run, lambda: 0.0, values=values,
                                             rule=rule)
    return chosen.stages, rows


@pytest.mark.parametrize("gap_se", [1.5, 2.5])
def test_significance_rule_leaves_the_simplest_schedule_only_for_a_gap_of_two_standard_errors(gap_se):
    """5 stages lowest, 3 stages within one standard error of it, 1 stage ``gap_se`` paired standard errors above
    5 stages (by construction of the differences): the one-SE rule takes 3 stages either way; the significance
    rule keeps 1 stage below two standard errors and takes the one-SE choice above. Brute force on the z values."""
    gen = torch.Generator().manual_seed(2)
    m = 50
    base = torch.rand(m, generator=gen, dtype=torch.float64)
    e = torch.randn(m, generator=gen, dtype=torch.float64)
    e = (e - e.mean()) / e.std()  # mean 0, sd 1: the paired difference 1 stage - 5 stages has sd 0.1
    per = {5: base, 3: base + 0.001 + 0.1 * (e.roll(7) - e.roll(7).mean()),
           1: base + 0.1 * e + gap_se * 0.1 / m**0.5}
    d = per[1] - per[5]
    z = float(d.mean()) / (float(d.std()) / m**0.5)
    assert z == pytest.approx(gap_se, rel=1e-9)
    means = {t: float(v.mean()) for t, v in per.items()}
    assert min(means, key=means.get) == 5 and means[3] - means[5] <= float((per[3] - per[5]).std()) / m**0.5
    stages, rows = _rule_choice(per, "one_se")
    assert stages == 3
    stages, rows = _rule_choice(per, "significant")
    assert stages == (1 if gap_se < 2 else 3)
    assert [r["se_below_simplest"] for r in rows] == pytest.approx([z, (means[1] - means[3]) / (
        float((per[1] - per[3]).std()) / m**0.5), 0.0], rel=1e-9)
    assert rows[0]["se_above_best"] == 0.0 and rows[2]["se_above_best"] == pytest.approx(z, rel=1e-9)
    with pytest.raises(ValueError, match="schedule rule"):
        tuning.choose_schedule([], [], lambda c: None, lambda: 0.0, rule="significant")
