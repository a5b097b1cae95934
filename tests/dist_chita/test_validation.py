"""dist_chita.validation: the validation score is the plain mean loss (or output distance) re-implemented here,
and the same number on 1, 2 and 3 ranks."""

import pytest
import torch

from dist_chita.fisher import losses
from dist_chita.io import models
from dist_chita.validation import Validation
from tests import multiproc
from tests.fixtures.tiny_models import digits_samples, train_digits_mlp

M = 37  # not a multiple of the micro-batch (8) nor of 2 x 8 or 3 x 8


def _forward(model, batch):
    return models.forward(model, "image-classification", batch)


def _perturbed(model):
    """The model with every 3rd weight of its first layer zeroed (a 'pruned' model)."""
    with torch.no_grad():
        model[0].weight.view(-1)[::3] = 0.0
    return model


def _scores():
    torch.set_num_threads(1)
    model, val = train_digits_mlp(), digits_samples().select(range(100, 100 + M))
    loss = Validation(val, losses.cross_entropy(_forward), batch_size=8)
    output = Validation.output_distance(val, _forward, model, batch_size=8)
    dense_output = output.score(model)
    _perturbed(model)
    return loss.score(model), dense_output, output.score(model)


def test_scores_are_the_mean_loss_and_the_relative_output_distance():
    loss, dense_output, output = _scores()
    model, val = train_digits_mlp(), digits_samples().select(range(100, 100 + M))
    with torch.no_grad():
        dense = _forward(model, val.fields).double()
        pruned = _forward(_perturbed(model), val.fields).double()
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(pruned, val.fields["labels"])), rel=1e-6)
    assert dense_output == 0.0
    truth = float((pruned - dense).pow(2).sum(1).mean() / dense.pow(2).sum(1).mean())
    assert output == pytest.approx(truth, rel=1e-5) and output > 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_same_number_on_any_world_size(world_size):
    ref = _scores()
    for scores in multiproc.run(_scores, world_size):
        assert scores == ref


def test_empty_or_unknown_is_refused():
    val = digits_samples().select(range(3))
    with pytest.raises(ValueError, match="unknown validation score 'x'"):
        Validation(val, losses.cross_entropy(_forward), 8, kind="x")
    with pytest.raises(ValueError, match="the validation split is empty"):
        Validation(val.select([]), losses.cross_entropy(_forward), 8)
