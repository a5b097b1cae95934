"""dist_chita.prune with settings chosen on validation samples: the held-out samples are the seeded share of the
calibration samples, left out of the factor, and the reported score is their plain mean loss; the same result on
any world size."""

import pytest
import torch

import dist_chita
from dist_chita.io import models
from dist_chita.options import Fisher, Target
from tests import multiproc
from tests.fixtures.tiny_models import digits_samples, train_digits_mlp

N, HELD, SEED = 60, 15, 3
PATH = (1e-4, 1e-2, 1.0)


def _prune(lam="auto", calibration=None, validation=0.25):
    torch.set_num_threads(1)
    model = train_digits_mlp()
    rep = dist_chita.prune(
        model, calibration if calibration is not None else digits_samples().select(range(N)),
        target=Target(sparsity=0.8, granularity="global", exclude_head=False),
        objective=Fisher(loss="ce", ridge="identity", lambda_=lam, lambda_path=PATH, max_iter=40), method="chita",
        task="image-classification", batch_size=8, validation=validation, validation_seed=SEED, check_memory=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, rep


def test_validation_samples_are_held_out_of_the_factor_and_scored_plainly():
    weights, rep = _prune()
    assert (rep.n, rep.validation["n"]) == (N - HELD, HELD)
    held = sorted(torch.randperm(N, generator=torch.Generator().manual_seed(SEED))[:HELD].tolist())
    fit = [i for i in range(N) if i not in held]
    stage = rep.stages[0]
    assert stage.lambda_path == list(PATH) and rep.validation["lambda"] == [stage.lam]
    assert stage.lam == PATH[min(range(len(PATH)), key=stage.validation_path.__getitem__)]
    model = train_digits_mlp()
    model.load_state_dict(weights)
    val = digits_samples().select(held)
    with torch.no_grad():
        logits = models.forward(model, "image-classification", val.fields)
    truth = float(torch.nn.functional.cross_entropy(logits.double(), val.fields["labels"]))
    assert rep.validation["after"] == pytest.approx(truth, rel=1e-6)
    # the chosen lambda on the other 45 samples alone, nothing held out: the same model
    alone, _ = _prune(stage.lam, digits_samples().select(fit), validation=None)
    for name, w in weights.items():
        assert torch.equal(alone[name], w), name


@pytest.mark.parametrize("world_size", [2])
def test_the_same_choice_and_model_on_any_world_size(world_size):
    ref, rep = _prune()
    for weights, other in multiproc.run(_prune, world_size):
        assert other.stages[0].validation_path == rep.stages[0].validation_path
        for name, w in ref.items():
            assert torch.equal(weights[name] != 0, w != 0), name
            assert torch.allclose(weights[name], w, rtol=1e-5, atol=1e-6 * w.abs().max()), name
