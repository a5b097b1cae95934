import pytest

from dist_chita.sparsity import kept_count, layer_sparsities, mean_sparsity, stage_sparsities, stage_targets


def test_polynomial_schedule_is_increasing_and_ends_at_target():
    s = stage_sparsities(0.9, 5, base=0.5)
    assert s[-1] == pytest.approx(0.9) and all(a < b for a, b in zip(s, s[1:], strict=False))
    assert s[0] == pytest.approx(0.9 + (0.5 - 0.9) * 0.8**3)
    # cubic: the first step is the largest
    steps = [b - a for a, b in zip([0.5, *s], s, strict=False)]
    assert steps == sorted(steps, reverse=True)


def test_linear_and_single_stage():
    assert stage_sparsities(0.8, 4, kind="linear") == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert stage_sparsities(0.7, 1) == [0.7]


@pytest.mark.parametrize(
    "kwargs", [dict(final=1.0, stages=2), dict(final=0.5, stages=0), dict(final=0.5, stages=2, base=0.6)]
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        stage_sparsities(**kwargs)


def test_kept_count():
    assert kept_count(1000, 0.9) == 100
    assert kept_count(10, 0.999) == 1


def test_layer_sparsities_and_their_schedules():
    assert layer_sparsities(0.5, 3) == [0.5, 0.5, 0.5]
    assert layer_sparsities((0.2, 0.9), 2) == [0.2, 0.9]
    with pytest.raises(ValueError, match="got 2 per-layer sparsities for 3 layers"):
        layer_sparsities([0.2, 0.3], 3)
    with pytest.raises(ValueError, match=r"sparsity of layer 1 must be in \[0, 1\), got 1.0"):
        layer_sparsities([0.2, 1.0], 2)
    with pytest.raises(ValueError, match=r"^sparsity must be in \[0, 1\), got -0.1$"):
        layer_sparsities(-0.1, 2)
    plan = stage_targets([0.9, 0.2, 0.6], 4, base=0.5)
    assert len(plan) == 4 and plan[-1] == [0.9, 0.2, 0.6]
    for layer, s in enumerate([0.9, 0.2, 0.6]):  # each layer along its own schedule, from min(base, s_l)
        assert [row[layer] for row in plan] == stage_sparsities(s, 4, min(0.5, s))
    assert mean_sparsity([0.5, 0.8], [300, 100]) == pytest.approx((150 + 80) / 400)
    assert mean_sparsity(0.25, [7, 9]) == pytest.approx(0.25)
