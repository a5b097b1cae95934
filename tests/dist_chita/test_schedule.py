import pytest

from dist_chita.schedule import kept_count, stage_sparsities


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
