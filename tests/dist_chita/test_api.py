"""dist_chita.prune with settings chosen on validation samples: the held-out samples are the seeded share of the
calibration samples, left out of the factor, and the reported score is their plain mean loss; the same result on
any world size."""

import pytest
import torch

import dist_chita
from dist_chita.fisher import driver as fisher_driver
from dist_chita.fisher import losses
from dist_chita.io import models
from dist_chita.io.data import iter_microbatches
from dist_chita.options import Fisher, Target
from dist_chita.prunable import prunable_modules
from tests import multiproc
from tests.fixtures.layerwise_nets import mlp
from tests.fixtures.tiny_models import digits_samples, train_digits_mlp

N, HELD, SEED = 60, 15, 3
PATH = (1e-4, 1e-2, 1.0)
NEAR_PATH = (1e-4, 1.2e-4, 1.0)


def _prune(lam="auto", calibration=None, validation=0.25, rule="min", path=PATH):
    torch.set_num_threads(1)
    model = train_digits_mlp()
    rep = dist_chita.prune(
        model, calibration if calibration is not None else digits_samples().select(range(N)),
        target=Target(sparsity=0.8, granularity="global", exclude_head=False),
        objective=Fisher(loss="ce", ridge="identity", lambda_=lam, lambda_path=path, max_iter=40,
                         lambda_rule=rule), method="chita",
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


@pytest.mark.parametrize("world_size,rule", [(2, "min"), (2, "one_se")])
def test_the_same_choice_and_model_on_any_world_size(world_size, rule):
    ref, rep = _prune(rule=rule)
    for weights, other in multiproc.run(_prune, world_size, "auto", None, 0.25, rule):
        assert other.stages[0].lam == rep.stages[0].lam
        assert other.stages[0].validation_path == rep.stages[0].validation_path
        for name, w in ref.items():
            assert torch.equal(weights[name] != 0, w != 0), name
            assert torch.allclose(weights[name], w, rtol=1e-5, atol=1e-6 * w.abs().max()), name


def test_one_standard_error_rule_keeps_the_largest_lambda_the_validation_samples_cannot_tell_from_the_best():
    """The per-sample validation losses of each lambda's model (re-computed here from the fixed-lambda prune at its
    warm start, as the path judges it) give the paired standard error; the kept lambda is the largest within it."""
    weights, rep = _prune(rule="one_se", path=NEAR_PATH)
    _, plain = _prune(path=NEAR_PATH)
    stage = rep.stages[0]
    assert stage.validation_path == plain.stages[0].validation_path  # the rule changes what is kept, not judged
    held = sorted(torch.randperm(N, generator=torch.Generator().manual_seed(SEED))[:HELD].tolist())
    fit = [i for i in range(N) if i not in held]
    val = digits_samples().select(held)
    def forward(model, batch):
        return models.forward(model, "image-classification", batch)

    values = []
    for lam in NEAR_PATH:
        torch.set_num_threads(1)
        model = train_digits_mlp()
        fisher_driver.prune(model, prunable_modules(model, exclude_head=False), "chita", 0.8,
                            make_batches=lambda: iter_microbatches(digits_samples().select(fit), 0, len(fit), 8),
                            loss_fn=losses.cross_entropy(forward), n=len(fit), batch_size=8, lam=lam,
                            solver_options={"max_iter": 0, "ridge": "identity"})  # the warm start alone
        with torch.no_grad():
            logits = models.forward(model, "image-classification", val.fields)
        values.append(torch.nn.functional.cross_entropy(logits.double(), val.fields["labels"], reduction="none"))
    means = [float(v.mean()) for v in values]
    assert means == pytest.approx(stage.validation_path, rel=1e-6)
    best = min(range(len(NEAR_PATH)), key=means.__getitem__)
    se = [float((v - values[best]).std()) / HELD**0.5 for v in values]
    assert stage.lam == max(lam for lam, m, e in zip(NEAR_PATH, means, se, strict=True) if m <= means[best] + e)
    alone, _ = _prune(stage.lam, digits_samples().select(fit), validation=None)  # the kept lambda's full solve
    for name, w in weights.items():
        assert torch.equal(alone[name], w), name


def _prune_plus(lam):
    torch.set_num_threads(1)
    model = train_digits_mlp()
    rep = dist_chita.prune(
        model, digits_samples().select(range(N)), target=Target(sparsity=0.85, granularity="global",
                                                                exclude_head=False),
        objective=Fisher(loss="ce", ridge="identity", lambda_=lam, lambda_path=(1e-4, 1e-2, 1.0, 100.0), max_iter=40,
                         stages=3, base_sparsity=0.5, lambda_walk=True), method="chita++",
        task="image-classification", batch_size=8, validation=0.25, validation_seed=SEED, check_memory=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, rep


def test_the_lambdas_a_search_chose_given_as_a_list_prune_the_same_model_without_judging_any():
    """``fisher.lambda: [...]`` with the report's ``validation.lambda`` re-runs the chosen configuration: the same
    weights, each stage solved once with its lambda."""
    searched, rep = _prune_plus("auto")
    chosen = rep.validation["lambda"]
    assert len(chosen) == 3 and rep.validation["lambda_auto"] and sum(len(s.lambda_path) for s in rep.stages) > 3
    weights, again = _prune_plus(tuple(chosen))
    assert again.validation["lambda"] == chosen and not again.validation["lambda_auto"]
    assert all(s.lambda_path == [] for s in again.stages)
    for name, w in searched.items():
        assert torch.equal(weights[name], w), name
    with pytest.raises(ValueError, match="lambda: 2 lambdas for 3 stage"):
        _prune_plus(tuple(chosen[:2]))


@pytest.mark.parametrize(("target", "message"), [
    (Target(granularity="foo"), r"^granularity: expected one of 'row', 'layer', 'global', got 'foo'$"),
    (Target(allocation="foo"), r"^allocation: expected one of 'uniform', 'owl', 'reconstruction', got 'foo'$"),
    (Target(exclude_head="yes"), r"^exclude_head: expected bool, got str$"),
    (Target(include="0"), r"^include: expected list of str, got str$"),
    (Target(sparsity="0.5"), r"^sparsity: expected float, got str$"),
])
@pytest.mark.parametrize("objective", [None, dist_chita.Fisher(loss="gn_probe")])
def test_a_target_field_of_the_wrong_type_is_refused_before_any_work(target, message, objective):
    """With either objective: the Fisher one's checks compare the target's values, so the target's types go first."""
    model = mlp()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        dist_chita.prune(model, {"inputs": torch.randn(16, 12)}, target=target, objective=objective, batch_size=8,
                         check_memory=False)
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(("method", "objective"), [("magnitude", None), ("chita", Fisher(loss="ce")),
                                                   ("chita", None), ("wanda", None)])
def test_n_m_groups_never_straddle_rows(method, objective):
    """2:4 on a layer of 6 inputs is refused by every method and objective, naming the layer (the Fisher objective
    formed its groups over the flattened weight, 3 of every row's 6 kept); without that layer every row keeps
    2 of each 4."""
    torch.manual_seed(0)
    data = {"pixel_values": torch.randn(32, 6), "labels": torch.randint(0, 4, (32,))}

    def net():
        return torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.ReLU(),
                                   torch.nn.Linear(4, 4, bias=False)).eval()

    kw = dict(task="image-classification", method=method, objective=objective, batch_size=8, check_memory=False,
              log=lambda *a: None)
    model = net()
    before = model[0].weight.clone()
    with pytest.raises(ValueError, match=r"^nm: the rows of layer '0' hold 6 weights, not a multiple of M = 4;"):
        dist_chita.prune(model, data, target=Target(nm="2:4", exclude_head=False), **kw)
    assert torch.equal(model[0].weight, before)
    model = net()
    dist_chita.prune(model, data, target=Target(nm="2:4", exclude_head=False, exclude=["0"]), **kw)
    assert (model[2].weight != 0).sum(1).tolist() == [2, 2, 2, 2]


def test_n_m_on_the_fisher_objective_refuses_weights_stored_transposed():
    """GPT-2's Conv1D stores (inputs, outputs): the Fisher factor's groups would run along the outputs, so 2:4 is
    refused there, naming the layer, while the layerwise objective (which sees rows of inputs) prunes it."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
                                             bos_token_id=0, eos_token_id=0)).eval()
    data = {"input_ids": torch.randint(0, 50, (8, 8))}
    kw = dict(task="causal-lm", target=Target(nm="2:4"), batch_size=4, check_memory=False, log=lambda *a: None)
    with pytest.raises(ValueError, match=r"^nm: layer 'transformer.h.0.attn.c_attn' stores its weight transposed"):
        dist_chita.prune(model, data, method="magnitude", objective=Fisher(loss="causal_lm"), **kw)
    dist_chita.prune(model, data, method="chita", **kw)
    w = model.transformer.h[0].attn.c_attn.weight.T  # (outputs, inputs)
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(2) <= 2).all()


@pytest.mark.parametrize("method", ["chita", "sparsegpt", "wanda", "obd"])
def test_a_nan_in_the_calibration_data_is_one_line_naming_the_layer_and_the_model_is_untouched(method):
    """wanda and obd returned with the second layer pruned to nothing (every score NaN), sparsegpt failed in a
    Cholesky factorisation."""
    torch.manual_seed(0)
    x = torch.randn(64, 20)
    x[3, 5] = float("nan")
    data = {"pixel_values": x, "labels": torch.randint(0, 5, (64,))}
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^the (inputs|loss gradients) of layer '0' contain NaN or Inf"):
        dist_chita.prune(model, data, method=method, objective=dist_chita.Layerwise(), task="image-classification",
                         target=Target(sparsity=0.5, granularity="layer", exclude_head=False), check_memory=False,
                         log=lambda *a: None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _dropout_bn_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(32, 5))


@pytest.mark.parametrize(("method", "objective"), [("chita", None), ("obd", None), ("wanda", None),
                                                   ("chita", Fisher(loss="ce", lambda_="auto"))])
def test_a_model_in_training_mode_is_pruned_in_evaluation_mode_and_given_back_as_it_came(method, objective):
    """Every pass runs in evaluation mode (the same result whatever the dropout draws, BatchNorm on its running
    statistics), each module ends in its own mode (a training model with a frozen BatchNorm keeps both), and no
    method writes .grad."""
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    results = []
    for seed in (1, 2):
        model = _dropout_bn_mlp().train()
        model[1].eval()  # frozen statistics
        model[0].weight.grad = torch.ones_like(model[0].weight)
        torch.manual_seed(seed)
        dist_chita.prune(model, {"pixel_values": x, "labels": y}, method=method, objective=objective,
                         fisher=Fisher(loss="ce"), task="image-classification", check_memory=False,
                         target=Target(sparsity=0.5, granularity="layer", exclude_head=False), log=lambda *a: None)
        assert [m.training for m in model] == [True, False, True, True, True]
        assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[4].weight.grad is None
        results.append(model[4].weight.detach().clone())  # its inputs pass the dropout
    assert torch.equal(results[0], results[1])


def test_a_failing_evaluate_during_the_magnitude_comparison_leaves_the_dense_model():
    model = _dropout_bn_mlp().eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate(stage):
        if stage == "magnitude":
            raise RuntimeError("the user's metric failed")
        return {"m": 0.0}
    with pytest.raises(RuntimeError, match="the user's metric failed"):
        dist_chita.prune(model, {"pixel_values": torch.randn(32, 20), "labels": torch.randint(0, 5, (32,))},
                         method="chita", task="image-classification", evaluate=evaluate, compare_magnitude=True,
                         check_memory=False, log=lambda *a: None)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"objective": "fisher"},
     "objective: expected a dist_chita.Layerwise() or dist_chita.Fisher() or None, got 'fisher'"),
    ({"target": {"sparsity": 0.5}}, "target: expected a dist_chita.Target or None, got {'sparsity': 0.5}"),
    ({"fisher": dist_chita.Layerwise()}, "fisher: expected a dist_chita.Fisher() or None, got Layerwise("),
    ({"batch_size": 2.5}, "batch_size: expected an int >= 1, got 2.5"),
    ({"batch_size": True}, "batch_size: expected an int >= 1, got True"),
    ({"evaluate": lambda stage: 0.9}, "evaluate('before') must return a mapping of metric names to values, got float"),
])
def test_an_argument_of_the_wrong_kind_is_one_line_naming_it(kwargs, message):
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    before = model[0].weight.clone()
    with pytest.raises(ValueError) as e:
        dist_chita.prune(model, {"pixel_values": torch.randn(8, 6), "labels": torch.randint(0, 4, (8,))},
                         task="image-classification", check_memory=False, log=lambda *a: None,
                         **{"target": Target(exclude_head=False), **kwargs})
    assert str(e.value).startswith(message) and torch.equal(model[0].weight, before)


def test_the_report_names_the_metric_evaluate_returns_and_the_summary_prints_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    rep = dist_chita.prune(model, {"pixel_values": torch.randn(8, 6), "labels": torch.randint(0, 4, (8,))},
                           task="image-classification", check_memory=False, log=lambda *a: None,
                           target=Target(exclude_head=False),
                           evaluate=lambda stage: {"accuracy": 0.5, "loss": 1.0})
    assert rep.metric == {"name": "accuracy", "before": 0.5, "before_loss": 1.0, "after": 0.5, "after_loss": 1.0}
    assert "  accuracy: before 0.5000, before_loss 1.0000, after 0.5000, after_loss 1.0000" in rep.summary_lines()


def test_validation_given_as_a_bool_or_leaving_fewer_samples_than_ranks_is_named():
    """validation=True was reported as a problem of the calibration samples; a share leaving fewer calibration
    samples than ranks as "n = 1 calibration samples is smaller than the number of ranks" (on 2 ranks), without
    naming validation."""
    data = {"pixel_values": torch.randn(3, 6), "labels": torch.randint(0, 4, (3,))}
    kw = dict(task="image-classification", check_memory=False, log=lambda *a: None, target=Target(exclude_head=False))
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    with pytest.raises(ValueError, match=r"^validation: expected a share in \(0, 1\), a count >= 1 or samples"):
        dist_chita.prune(model, data, validation=True, **kw)
    out = multiproc.run(_prune_with_validation_2, 2)
    assert out == ["validation: holding out 2 of the n = 3 calibration samples leaves 1, fewer than the 2 ranks"] * 2


def _prune_with_validation_2():
    torch.manual_seed(0)
    data = {"pixel_values": torch.randn(3, 6), "labels": torch.randint(0, 4, (3,))}
    try:
        dist_chita.prune(torch.nn.Sequential(torch.nn.Linear(6, 4)).eval(), data, validation=2,
                         task="image-classification", check_memory=False, log=lambda *a: None,
                         target=Target(exclude_head=False))
    except ValueError as e:
        return str(e)
    return None
