"""dist_chita/options.py: the options of dist_chita.prune are the run config's sections, so their defaults are what
users get; the library functions they feed must have the same defaults (one source of defaults)."""

import inspect

import pytest

from dist_chita.fisher import driver as fisher_driver
from dist_chita.fisher import groups, solver
from dist_chita.layerwise import allocation, row_solver
from dist_chita.layerwise import driver as layerwise_driver
from dist_chita.options import Fisher, LayerSparsity, Layerwise, Target, layerwise_methods, parse_nm, resolve_ridge
from dist_chita.prunable import prunable_modules


def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_layerwise_defaults_are_the_drivers_and_the_row_solvers():
    lw = Layerwise()
    assert defaults(layerwise_driver.prune_layerwise)["damp"] == lw.damp
    rows = defaults(row_solver.solve_rows)
    assert (rows["max_iter"], rows["tol"], rows["moves"]) == (lw.max_iter, lw.tol, lw.moves)


def test_fisher_defaults_are_the_solvers_and_the_drivers():
    f, solve, prune = Fisher(), defaults(solver.solve), defaults(fisher_driver.prune)
    for name in ("max_iter", "tol", "active_set_factor", "backsolve", "escape_trials"):
        assert solve[name] == getattr(f, name), name
    assert (prune["lam"], prune["first_order"], prune["stages"], prune["base_sparsity"], prune["schedule"],
            prune["exponent"]) == (f.lambda_, f.first_order_term, f.stages, f.base_sparsity, f.schedule, f.exponent)
    assert str(prune["storage_dtype"]) == f"torch.{f.storage_dtype}"
    assert defaults(groups.prune_in_blocks)["criterion"] == f.group_criterion


def test_target_defaults_are_the_selection_and_the_allocations():
    t = Target()
    assert defaults(prunable_modules)["exclude_head"] == t.exclude_head
    owl = defaults(allocation.owl_layer_targets)
    assert (owl["m"], owl["lam"]) == (t.owl_m, t.owl_lambda)


def test_problems_name_the_field():
    assert Target().problems() == [] and Layerwise().problems("chita") == [] and Fisher().problems("chita++",
                                                                                                   Target()) == []
    assert Target(sparsity=1.0).problems() == ["sparsity: must be in [0, 1), got 1.0"]
    assert Target(nm="3:2").problems() == ["nm: expected 'N:M' with 1 <= N < M, got '3:2'"]
    assert Layerwise(damp=0).problems("chita") == ["damp: must be > 0, got 0"]
    assert Layerwise().problems("chita++")[0].startswith("method: 'chita++' is not a layerwise method")
    assert Fisher().problems("wanda", Target())[0].startswith("method: 'wanda' is not a Fisher-objective method")
    assert Fisher(base_sparsity=0.6).problems("chita++", Target(sparsity=0.5))[0].startswith("base_sparsity")


@pytest.mark.parametrize(("fields", "problem"), [
    ({"granularity": "foo"}, "granularity: expected one of 'row', 'layer', 'global', got 'foo'"),
    ({"allocation": "foo"}, "allocation: expected one of 'uniform', 'owl', 'reconstruction', got 'foo'"),
    ({"exclude_head": "yes"}, "exclude_head: expected bool, got str"),
    ({"include": "fc1"}, "include: expected list of str, got str"),
    ({"include": ["fc1", 2]}, "include[1]: expected str, got int"),
    ({"exclude": "fc*"}, "exclude: expected list of str, got str"),
    ({"sparsity": "0.5"}, "sparsity: expected float, got str"),
    ({"sparsity": True}, "sparsity: expected float, got bool"),
    ({"nm": 24}, "nm: expected str, got int"),
    ({"owl_m": None}, "owl_m: expected float, got NoneType"),
    ({"layer_sparsity": "fc1"}, "layer_sparsity: expected list of mapping, got str"),
    ({"layer_sparsity": [{"pattern": "fc1", "sparsity": 0.3}]}, "layer_sparsity[0]: expected LayerSparsity, got dict"),
    ({"layer_sparsity": [LayerSparsity("fc1", "0.3")]}, "layer_sparsity[0].sparsity: expected float, got str"),
])
def test_a_target_field_of_the_wrong_type_is_a_problem_naming_it_and_what_it_takes(fields, problem):
    assert Target(**fields).problems() == [problem]


def test_a_target_takes_lists_for_tuples_and_ints_for_floats():
    target = Target(sparsity=0, include=["fc*"], exclude=["fc2"], layer_sparsity=[LayerSparsity("fc1", 1)],
                    owl_m=2)
    assert target.problems() == ["layer_sparsity[0].sparsity: must be in [0, 1), got 1"]


def test_options_take_what_python_callers_pass():
    """numpy's bool and scalars, a path for a directory, any collection for a list (a set, a range): what the
    library took before its types were checked is taken still; a bool is never a number."""
    import pathlib

    import numpy as np

    assert Target(exclude_head=np.bool_(False), sparsity=np.float32(0.5), exclude={"fc2"}).problems() == []
    assert Fisher(backsolve=np.True_, resume_dir=pathlib.Path("/tmp"), stage_candidates=range(2, 5),
                  max_iter=np.int64(3)).problems("chita++", Target()) == []
    assert Target(sparsity=np.bool_(True)).problems() == ["sparsity: expected float, got bool"]


@pytest.mark.parametrize(("options", "problem"), [
    (Layerwise(max_iter="3"), "max_iter: expected int, got str"),
    (Layerwise(damp=None), "damp: expected float, got NoneType"),
    (Fisher(loss="mse"), "loss: expected one of 'ce', 'sampled', 'gn_probe', 'causal_lm', got 'mse'"),
    (Fisher(ridge="diagonal"), "ridge: expected one of 'auto', 'fisher_diagonal', 'identity', got 'diagonal'"),
    (Fisher(lambda_="often"), "lambda: expected float or list of float or one of 'auto', got 'often'"),
    (Fisher(stages=2.5), "stages: expected int or one of 'auto', got 2.5"),
    (Fisher(backsolve="yes"), "backsolve: expected bool, got str"),
    (Fisher(lambda_path=1e-3), "lambda_path: expected list of float, got float"),
])
def test_an_objective_field_of_the_wrong_type_is_a_problem_naming_it_and_what_it_takes(options, problem):
    problems = options.problems("chita") if isinstance(options, Layerwise) else options.problems("chita", Target())
    assert problems == [problem]


def test_a_lambda_list_needs_one_lambda_per_stage():
    t = Target(sparsity=0.9)
    assert Fisher(lambda_=(1e-5, 1e-3, 10.0), stages=3).problems("chita++", t) == []
    assert Fisher(lambda_=(1e-3,)).problems("chita", t) == []
    assert Fisher(lambda_=(1e-5, 1e-3), stages=3).problems("chita++", t) == [
        "lambda: 2 lambdas for 3 stage(s); give one per stage"]
    assert Fisher(lambda_=(1e-5, 1e-3), stages=2).problems("chita", t) == [
        "lambda: 2 lambdas for 1 stage(s); give one per stage"]
    assert Fisher(lambda_=(1e-3,), stages="auto").problems("chita++", t)[0].startswith(
        "lambda: a list of one lambda per stage needs a stage count")
    assert Fisher(lambda_=(1e-3, -1.0), stages=2).problems("chita++", t)[0].startswith("lambda: must be >= 0, a list")
    assert Fisher(lambda_=(), stages=1).problems("chita++", t)[0].startswith("lambda: must be >= 0, a list")
    assert Fisher(lambda_=(1e-3, 1e-2), stages=2, group_size=100).problems("chita++", t) == [
        "group_size: layer groups take one lambda, not a list per stage"]


def test_a_lambda_list_given_as_a_python_list_is_the_tuple_the_config_makes():
    t = Target(sparsity=0.9)
    assert Fisher(lambda_=[1e-5, 1e-3], stages=2) == Fisher(lambda_=(1e-5, 1e-3), stages=2)
    assert Fisher(lambda_=[1e-5, 1e-3], stages=2).problems("chita++", t) == []
    assert Fisher(lambda_=[1e-5, 1e-3]).problems("chita", t) == ["lambda: 2 lambdas for 1 stage(s); give one per stage"]


def test_every_registered_method_is_a_layerwise_method():
    assert {"chita", "sparsegpt", "wanda", "magnitude", "obd"} <= set(layerwise_methods())


@pytest.mark.parametrize(("ridge", "n", "p", "expected"), [
    ("auto", 128, 10_764_288, "fisher_diagonal"),  # MiniLM: 1.2e-5 samples per weight
    ("auto", 1000, 32_360, "identity"),  # MLPNet: 0.03
    ("auto", 999, 1_000_000, "fisher_diagonal"),
    ("auto", 1000, 1_000_000, "identity"),
    ("identity", 128, 10_764_288, "identity"),
])
def test_auto_ridge_switches_at_one_sample_per_thousand_weights(ridge, n, p, expected):
    assert resolve_ridge(ridge, n, p) == expected


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and Target(nm="2:4").nm_pair == (2, 4) and Target().nm_pair is None
    for bad in ("4:2", "2:2", "two", "0:4"):
        with pytest.raises(ValueError, match="expected 'N:M'"):
            parse_nm(bad)
