"""End-to-end pruning of a small trained model, in process and on real gloo process groups."""

import pytest
import torch

from dist_chita.distributed import comm
from dist_chita.distributed.partition import sample_ranges
from dist_chita.fisher import driver as fisher_driver
from dist_chita.fisher import losses
from dist_chita.io import models
from dist_chita.io.data import iter_microbatches
from dist_chita.prunable import prunable_modules
from dist_chita.sparsity import kept_count, stage_targets
from tests import multiproc
from tests.fixtures.solver_settings import THOROUGH
from tests.fixtures.tiny_models import digits_samples, train_digits_mlp

N = 48


def _forward(model, batch):
    return models.forward(model, "image-classification", batch)


def _prune(method, sparsity, per_layer=False, nm=None, stages=1, per_row=False, ridge="identity", base_sparsity=0.3):
    torch.set_num_threads(1)
    model = train_digits_mlp()
    calib = digits_samples().select(range(N))
    modules = prunable_modules(model, exclude_head=False)
    lo, hi = sample_ranges(N, comm.world_size())[comm.rank()]
    out = fisher_driver.prune(
        model, modules, method, sparsity,
        make_batches=lambda: iter_microbatches(calib, lo, hi, 16),
        loss_fn=losses.cross_entropy(_forward), n=N, lam=1e-3, per_layer=per_layer, nm=nm, stages=stages,
        per_row=per_row, base_sparsity=base_sparsity, solver_options={**THOROUGH, "max_iter": 40, "ridge": ridge},
    )
    return {name: m.weight.detach().clone() for name, m in modules}, out.stages


def test_magnitude_keeps_the_global_largest():
    dense = {n: m.weight.detach() for n, m in prunable_modules(train_digits_mlp(), exclude_head=False)}
    weights, _ = _prune("magnitude", 0.8)
    flat = torch.cat([w.reshape(-1) for w in dense.values()])
    k = round(0.2 * flat.numel())
    threshold = torch.topk(flat.abs(), k).values[-1]
    for name, w in weights.items():
        assert torch.equal(w != 0, dense[name].abs() >= threshold)
        assert torch.equal(w[w != 0], dense[name][w != 0])


def test_chita_beats_magnitude_on_its_objective_and_hits_the_budget():
    weights, stages = _prune("chita", 0.8)
    kept = sum(int((w != 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert kept == round(0.2 * total)
    st = stages[0]
    assert st.objective <= st.magnitude_objective
    assert all(b <= a * (1 + 1e-9) for a, b in zip(st.objective_trace, st.objective_trace[1:], strict=False))


@pytest.mark.parametrize("world_size", [2, 3])
def test_same_masks_and_weights_on_any_world_size(world_size):
    ref, _ = _prune("chita", 0.75)
    for result, _ in multiproc.run(_prune, world_size, "chita", 0.75):
        for name, w in ref.items():
            assert torch.equal(result[name] != 0, w != 0), name
            assert torch.allclose(result[name], w, rtol=1e-5, atol=1e-6 * w.abs().max()), name


def test_chita_plus_plus_supports_shrink_stage_by_stage():
    weights, stages = _prune("chita++", 0.85, stages=3)
    assert [round(s.sparsity, 6) for s in stages][-1] == 0.85
    kept = [s.kept for s in stages]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 3
    assert sum(int((w != 0).sum()) for w in weights.values()) == kept[-1]


def test_per_layer_and_n_m():
    weights, _ = _prune("chita", 0.5, per_layer=True)
    for w in weights.values():
        assert int((w != 0).sum()) == round(0.5 * w.numel())
    weights, _ = _prune("chita", 0.0, nm=(2, 4))
    for w in weights.values():
        assert bool(((w != 0).reshape(-1, 4).sum(1) <= 2).all())


def test_per_row_budget_with_the_fisher_diagonal_ridge_is_the_same_on_any_world_size():
    """Every row keeps round((1 - s) * row length) weights (magnitude: its largest); CHITA++ stages with the
    fisher_diagonal ridge give the same masks on 1, 2 and 3 ranks (rows never straddle ranks), the same stage
    objectives and the same weights up to float rounding (sums over another column split round differently: the
    back-solve's float64 solution can round to a neighbouring float32 in a few coordinates)."""
    weights, _ = _prune("magnitude", 0.7, per_row=True)
    dense = {n: m.weight.detach() for n, m in prunable_modules(train_digits_mlp(), exclude_head=False)}
    for name, w in weights.items():
        keep = round(0.3 * w.shape[1])
        top = torch.sort(dense[name].abs(), dim=1, descending=True, stable=True).indices[:, :keep]
        assert torch.equal(w != 0, torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True)), name
    ref, stages = _prune("chita++", 0.7, stages=2, per_row=True, ridge="fisher_diagonal")
    assert stages[-1].objective <= stages[-1].magnitude_objective
    for w in ref.values():
        assert bool(((w != 0).sum(1) == round(0.3 * w.shape[1])).all())
    for world_size in (2, 3):
        for result, result_stages in multiproc.run(_prune, world_size, "chita++", 0.7, False, None, 2, True,
                                                   "fisher_diagonal"):
            for st, ref_st in zip(result_stages, stages, strict=True):
                assert st.objective == pytest.approx(ref_st.objective, rel=1e-6), (world_size, st.sparsity)
            for name, w in ref.items():
                assert torch.equal(result[name] != 0, w != 0), (world_size, name)
                assert torch.allclose(result[name], w, rtol=1e-5, atol=1e-6 * w.abs().max()), (world_size, name)
    with pytest.raises(ValueError, match="at most one of"):
        _prune("chita", 0.5, per_layer=True, per_row=True)


TARGETS = [0.3, 0.8, 0.5]  # one sparsity per layer of the digits MLP (64 -> 32 -> 16 -> 10)


def test_per_layer_targets_set_every_layers_budget():
    """One target per layer: per layer, layer l keeps round((1 - s_l) size_l); per row, every row of layer l keeps
    round((1 - s_l) row length); the same target for every layer gives the float's bits; a global budget refuses."""
    weights, stages = _prune("chita", TARGETS, per_layer=True)
    sizes = [w.numel() for w in weights.values()]
    for w, s in zip(weights.values(), TARGETS, strict=True):
        assert int((w != 0).sum()) == kept_count(w.numel(), s)
    assert stages[0].kept == sum(kept_count(n, s) for n, s in zip(sizes, TARGETS, strict=True))
    assert stages[0].sparsity == pytest.approx(sum(n * s for n, s in zip(sizes, TARGETS, strict=True)) / sum(sizes))
    weights, _ = _prune("chita", TARGETS, per_row=True)
    for w, s in zip(weights.values(), TARGETS, strict=True):
        assert bool(((w != 0).sum(1) == kept_count(w.shape[1], s)).all())
    same, _ = _prune("chita", [0.6] * 3, per_row=True)
    ref, _ = _prune("chita", 0.6, per_row=True)
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="per-layer sparsities need per_layer or per_row"):
        _prune("chita", TARGETS)
    with pytest.raises(ValueError, match="got 2 per-layer sparsities for 3 layers"):
        _prune("chita", TARGETS[:2], per_row=True)


def test_per_layer_targets_with_chita_plus_plus_follow_each_layers_schedule_on_any_world_size():
    """CHITA++ (3 stages from base 0.4): stage t keeps, in layer l, the count of stage_targets' s_l(t) (layer 0's
    target 0.3 is below the base: it stays at 0.3 throughout); 1, 2 and 3 ranks give the same model."""
    ref, stages = _prune("chita++", TARGETS, stages=3, per_row=True, base_sparsity=0.4)
    plan = stage_targets(TARGETS, 3, 0.4)
    assert [row[0] for row in plan] == [0.3] * 3 and plan[-1] == TARGETS
    shapes = [w.shape for w in ref.values()]
    for st, targets in zip(stages, plan, strict=True):
        assert st.kept == sum(r * kept_count(d, s) for (r, d), s in zip(shapes, targets, strict=True))
    for w, s in zip(ref.values(), TARGETS, strict=True):
        assert bool(((w != 0).sum(1) == kept_count(w.shape[1], s)).all())
    for world_size in (2, 3):
        for result, _ in multiproc.run(_prune, world_size, "chita++", TARGETS, False, None, 3, True, "identity",
                                       0.4):
            for name, w in ref.items():
                assert torch.equal(result[name] != 0, w != 0), (world_size, name)
                assert torch.allclose(result[name], w, rtol=1e-5, atol=1e-6 * w.abs().max()), (world_size, name)


def test_saved_model_reloads_with_identical_outputs(tmp_path):
    weights, _ = _prune("chita", 0.7)
    model = train_digits_mlp()
    modules = dict(prunable_modules(model, exclude_head=False))
    with torch.no_grad():
        for name, w in weights.items():
            modules[name].weight.copy_(w)
    loaded = models.LoadedModel(model, "image-classification", "torch", "tests.fixtures.tiny_models:digits_mlp")
    models.save_model(loaded, tmp_path)
    again = models.load_saved(tmp_path)
    x = digits_samples().fields["pixel_values"][:100]
    assert torch.equal(model(x), again.model(x))


# ------------------------------------------------------------------------------------------------ device placement
def _conv_digits(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Unflatten(1, (1, 8, 8)), torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(36, 10)).eval()


def _prune_and_evaluate(conv, loss, method):
    """Prune and evaluate twice: plainly, and with torch's default device set to "meta", while the model, the
    samples and the data stay on the CPU."""
    import contextlib

    from dist_chita.evaluate import evaluate_accuracy

    torch.set_num_threads(1)
    calib = digits_samples().select(range(N))
    lo, hi = sample_ranges(N, comm.world_size())[comm.rank()]
    loss_fn = {"ce": losses.cross_entropy(_forward), "sampled": losses.sampled_fisher(3, _forward)}[loss]
    out = []
    for default in (None, "meta"):
        model = _conv_digits() if conv else train_digits_mlp()
        modules = prunable_modules(model, exclude_head=False)
        with torch.device(default) if default else contextlib.nullcontext():
            res = fisher_driver.prune(
                model, modules, method, 0.7,
                make_batches=lambda: iter_microbatches(calib, lo, hi, 16),
                loss_fn=loss_fn, n=N, lam=1e-3, stages=2 if method == "chita++" else 1, base_sparsity=0.3,
                per_layer=conv, solver_options={**THOROUGH, "max_iter": 30},
            )
            acc = evaluate_accuracy(model, "image-classification", calib, 16)
        weights = {name: m.weight.detach().clone() for name, m in modules}
        out.append((weights, [s.objective_trace for s in res.stages], acc, {k: v.device for k, v in res.masks.items()}))
    return out


@pytest.mark.parametrize(("conv", "loss", "method", "world_size"), [
    (False, "ce", "chita", 1), (True, "sampled", "chita++", 2), (False, "sampled", "magnitude", 2),
])
def test_prune_and_evaluate_put_every_tensor_on_the_models_device(conv, loss, method, world_size):
    """On GPUs the model, the factor and the solve live on the GPU while the samples are prepared on the CPU: the
    pipeline must move each micro-batch to the model's device and create every tensor of its own there (or
    deliberately on the host), never on torch's default device. With the default device set to "meta", a tensor
    made without naming its device would be a meta tensor and fail; the results must be the same."""
    for plain, meta in multiproc.run(_prune_and_evaluate, world_size, conv, loss, method):
        (w0, trace0, acc0, dev0), (w1, trace1, acc1, dev1) = plain, meta
        assert set(dev1.values()) == {torch.device("cpu")} and dev0 == dev1
        for name in w0:
            assert torch.equal(w0[name], w1[name]), name
        assert trace0 == trace1 and acc0 == acc1


LAMBDAS = (1e-5, 1e-2, 100.0)


def _lambda_run(lam, search="warm_start", solver_options=None):
    """Prune the digits MLP to 0.85 with ``lam`` (one lambda or a path), scored on the 48 digits after the
    calibration ones by their mean cross-entropy, a plain re-implementation of the validation loss."""
    torch.set_num_threads(1)
    model = train_digits_mlp()
    samples = digits_samples()
    calib, val = samples.select(range(N)), samples.select(range(N, 2 * N))
    modules = prunable_modules(model, exclude_head=False)
    lo, hi = sample_ranges(N, comm.world_size())[comm.rank()]

    def validate():
        with torch.no_grad():
            logits = _forward(model, val.fields)
        return float(torch.nn.functional.cross_entropy(logits.double(), val.fields["labels"]))

    out = fisher_driver.prune(
        model, modules, "chita", 0.85, make_batches=lambda: iter_microbatches(calib, lo, hi, 16),
        loss_fn=losses.cross_entropy(_forward), n=N, lam=lam, validate=validate, lambda_search=search,
        solver_options={**THOROUGH, "max_iter": 40, **(solver_options or {})})
    return {name: m.weight.detach().clone() for name, m in modules}, out.stages[0], validate()


def test_lambda_path_keeps_the_lambda_of_lowest_validation_loss():
    """Each lambda's score is the validation loss at its back-solved warm start (the same prune with that lambda
    alone and no IHT iteration); the kept lambda is their argmin and its full solve is the result."""
    truth = [_lambda_run(lam, solver_options={"max_iter": 0})[2] for lam in LAMBDAS]
    assert len(set(truth)) == len(truth)  # the lambdas do lead to different models here
    weights, stage, score = _lambda_run(list(LAMBDAS))
    assert stage.lambda_path == list(LAMBDAS)
    assert stage.validation_path == pytest.approx(truth, rel=1e-9)
    best = LAMBDAS[min(range(len(truth)), key=truth.__getitem__)]
    assert stage.lam == best
    # the stage reports what its backsolves ran: the path's warm starts share the magnitude support, so its
    # lambdas share one Gram matrix (or, below n kept columns, one gather), and each solves its own system
    work = stage.backsolve_work
    assert work["factorizations"] >= len(LAMBDAS) and work["pcg_runs"] >= len(LAMBDAS)
    assert work["grams"] + work["gram_updates"] <= stage.backsolves - len(LAMBDAS) + 1
    ref, ref_stage, ref_score = _lambda_run(best)
    assert ref_stage.backsolve_work["pcg_runs"] >= 1  # a fixed lambda's solve reports its work too
    for name, w in ref.items():
        assert torch.equal(weights[name], w), name
    assert score == ref_score


def test_lambda_path_solved_in_full_keeps_the_best_it_scored():
    _, stage, score = _lambda_run(list(LAMBDAS), search="solve")
    assert stage.lambda_path == list(LAMBDAS)
    assert stage.lam == LAMBDAS[min(range(len(LAMBDAS)), key=stage.validation_path.__getitem__)]
    assert score == pytest.approx(min(stage.validation_path), rel=1e-12)


def test_lambda_path_needs_a_validation_score():
    model = train_digits_mlp()
    with pytest.raises(ValueError, match="lambda path needs validation samples"):
        fisher_driver.prune(model, prunable_modules(model, exclude_head=False), "chita", 0.5,
                            make_batches=lambda: iter([]), loss_fn=None, n=N, lam=[1e-3, 1e-2])


def _judged(scores, start):
    order = []

    def judge(i):
        order.append(i)
        return scores[i]

    fisher_driver._walk([10.0 ** -e for e in range(len(scores))][::-1], start, judge)
    return order


def test_walk_judges_the_whole_path_without_a_start_and_ends_at_a_local_minimum_from_one():
    path = [10.0 ** e for e in range(-5, 1)]  # _judged's path: 1e-5 .. 1
    gen = torch.Generator().manual_seed(0)
    assert _judged([3.0, 1.0, 2.0, 0.5, 4.0, 5.0], None) == list(range(6))
    for _ in range(200):
        scores = torch.rand(6, generator=gen).tolist()
        i0 = int(torch.randint(6, (1,), generator=gen))
        order = _judged(scores, path[i0] * 1.3)  # off the path: its nearest lambda in log scale
        assert order[0] == i0 and len(order) == len(set(order)) >= 2
        assert sorted(order) == list(range(min(order), max(order) + 1))  # one contiguous run of the path
        best = min(order, key=scores.__getitem__)
        for j in (best - 1, best + 1):  # brute force: the chosen lambda's neighbours were judged and are not lower
            if 0 <= j < 6:
                assert j in order and scores[j] >= scores[best]
    unimodal = [5.0, 3.0, 2.0, 1.0, 4.0, 6.0]
    for i0 in range(6):
        order = _judged(unimodal, path[i0])
        assert min(order, key=unimodal.__getitem__) == 3 and len(order) < 6 or i0 in (0, 5)


def _plus_run(walk, stage_lambdas=None, weights=False):
    """CHITA++ in 3 stages to 0.9 on the digits MLP along the path of 5 lambdas, scored as in :func:`_lambda_run`
    (or with ``stage_lambdas``, one fixed lambda per stage); the stage reports, and with ``weights`` the pruned
    weights too."""
    torch.set_num_threads(1)
    model = train_digits_mlp()
    samples = digits_samples()
    calib, val = samples.select(range(N)), samples.select(range(N, 2 * N))
    modules = prunable_modules(model, exclude_head=False)

    def validate():
        with torch.no_grad():
            logits = _forward(model, val.fields)
        return float(torch.nn.functional.cross_entropy(logits.double(), val.fields["labels"]))

    out = fisher_driver.prune(
        model, modules, "chita++", 0.9, make_batches=lambda: iter_microbatches(calib, 0, N, 16),
        loss_fn=losses.cross_entropy(_forward), n=N, lam=[1e-5, 1e-3, 1e-1, 10.0, 1e3], validate=validate,
        stages=3, base_sparsity=0.5, lambda_walk=walk, solver_options={**THOROUGH, "max_iter": 40},
        stage_lambdas=stage_lambdas)
    if weights:
        return out.stages, {name: m.weight.detach().clone() for name, m in modules}
    return out.stages


def test_stage_lambdas_rerun_the_lambdas_a_walk_chose_without_judging_any():
    """The configuration a user re-runs: each stage solved with the lambda the walk chose for it (no validation
    samples needed) gives the same weights and objectives as the walk's run, which solved its chosen lambdas in
    full after judging them."""
    walked, searched = _plus_run(True, weights=True)
    chosen = [st.lam for st in walked]
    assert len(set(chosen)) > 1  # the stages chose different lambdas here: the list is not one lambda repeated
    fixed, weights = _plus_run(True, stage_lambdas=chosen, weights=True)
    assert [st.lam for st in fixed] == chosen and all(st.lambda_path == [] for st in fixed)
    assert [st.objective for st in fixed] == [st.objective for st in walked]
    for name, w in searched.items():
        assert torch.equal(weights[name], w), name
    with pytest.raises(ValueError, match="stage_lambdas: expected 3 lambdas"):
        _plus_run(False, stage_lambdas=chosen[:2])


def test_lambda_walk_judges_a_part_of_the_path_from_the_previous_choice_with_the_same_scores():
    full, walked = _plus_run(False), _plus_run(True)
    assert walked[0].lambda_path == full[0].lambda_path == [1e-5, 1e-3, 1e-1, 10.0, 1e3]
    assert walked[0].validation_path == full[0].validation_path and walked[0].lam == full[0].lam
    for prev, st in zip(walked, walked[1:], strict=False):
        assert st.lambda_path[0] == prev.lam and st.lam == st.lambda_path[
            min(range(len(st.lambda_path)), key=st.validation_path.__getitem__)]
    # stage 2 starts from the same state in both runs: the walk's scores are the full path's at those lambdas
    truth = dict(zip(full[1].lambda_path, full[1].validation_path, strict=True))
    assert walked[1].validation_path == pytest.approx([truth[lam] for lam in walked[1].lambda_path], rel=1e-9)
    assert sum(len(st.lambda_path) for st in walked) < sum(len(st.lambda_path) for st in full)


def test_pick_lambda_min_and_one_standard_error_rule_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    lams = [1e-4, 1e-3, 1e-2, 1e-1]
    for _ in range(100):
        base = torch.rand(50, generator=gen, dtype=torch.float64)
        values = [base + 0.05 * torch.randn(50, generator=gen, dtype=torch.float64) for _ in lams]
        scores = [float(v.mean()) for v in values]
        best = min(range(4), key=scores.__getitem__)
        assert fisher_driver.pick_lambda(lams, scores, values, "min") == best
        near = [i for i in range(4) if scores[i] - scores[best] <= float((values[i] - values[best]).std()) / 50**0.5]
        assert fisher_driver.pick_lambda(lams, scores, values, "one_se") == max(near)
    with pytest.raises(ValueError, match="unknown lambda rule"):
        fisher_driver.pick_lambda(lams, [0.0] * 4, [None] * 4, "median")
