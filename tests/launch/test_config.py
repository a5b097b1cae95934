"""launch/config.py: typed parsing, overrides, validation, round trip, and every config in configs/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dist_chita.options import Target
from launch.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    calibration_kwargs,
    config_yaml,
    eval_kwargs,
    from_dict,
    load_config,
    model_kwargs,
    parse_config,
    parse_nm,
    save_config,
    yaml_load,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

MLP = {
    "model": {"source": "torch", "factory": "dist_chita.zoo:mlpnet", "weights": "w.safetensors",
              "task": "image-classification"},
    "calibration": {"source": "builtin:mnist", "image_column": "image", "text_column": None, "label_column": "label"},
}


def test_defaults_equal_default_yaml():
    assert load_config(ROOT / "configs" / "default.yaml") == parse_config({}) == load_config(None)


def test_layer_sparsity_rules():
    cfg = parse_config({"prune": {"layer_sparsity": [{"pattern": "*.attention.*", "sparsity": 0.3},
                                                     {"pattern": "encoder.layer.0.*", "sparsity": 0}]}})
    assert [(r.pattern, r.sparsity) for r in cfg.prune.layer_sparsity] == [("*.attention.*", 0.3),
                                                                          ("encoder.layer.0.*", 0.0)]
    assert parse_config(cfg.to_dict()) == cfg
    over = parse_config({}, ['prune.layer_sparsity=[{pattern: "fc*", sparsity: 0.7}]'])
    assert over.prune.layer_sparsity[0].pattern == "fc*"
    bad = [
        ({"layer_sparsity": [{"pattern": "a*", "sparsity": 1.0}]},
         r"^prune\.layer_sparsity\[0\]\.sparsity: must be in \[0, 1\), got 1\.0$"),
        ({"layer_sparsity": [{"pattern": "", "sparsity": 0.1}]}, r"prune\.layer_sparsity\[0\]\.pattern: must not"),
        ({"layer_sparsity": [{"patern": "a*", "sparsity": 0.1}]},
         r"unknown key 'prune\.layer_sparsity\[0\]\.patern' \(did you mean 'prune\.layer_sparsity\[0\]\.pattern'"),
        ({"layer_sparsity": [{"pattern": "a*", "sparsity": 0.1}], "granularity": "global", "objective": "fisher"},
         "needs granularity row or layer"),
        ({"layer_sparsity": [{"pattern": "a*", "sparsity": 0.1}], "nm": "2:4"}, "N:M"),
    ]
    owl = {"allocation": "owl"}
    bad += [
        ({**owl, "layer_sparsity": [{"pattern": "a*", "sparsity": 0.1}]}, "drop layer_sparsity"),
        ({**owl, "granularity": "global", "objective": "fisher"}, "owl needs granularity row or layer"),
        ({**owl, "nm": "2:4"}, "owl needs"),
        ({**owl, "owl_m": 0.0}, r"prune\.owl_m: must be > 0"),
        ({**owl, "owl_lambda": -0.1}, r"prune\.owl_lambda: must be >= 0"),
        ({"allocation": "owl2"}, r"prune\.allocation: expected one of 'uniform', 'owl'"),
    ]
    for prune, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config({"prune": prune})
    with pytest.raises(ConfigError, match="fisher.group_size: layer groups share one global budget"):
        parse_config({"prune": {"objective": "fisher", "layer_sparsity": [{"pattern": "a*", "sparsity": 0.1}]},
                      "fisher": {"group_size": 1000}})


@pytest.mark.parametrize(("rule", "message"), [
    ({"pattern": "fc1"}, r"^prune\.layer_sparsity\[0\]: missing key 'sparsity'$"),
    ({"sparsity": 0.3}, r"^prune\.layer_sparsity\[0\]: missing key 'pattern'$"),
    ({}, r"^prune\.layer_sparsity\[0\]: missing keys 'pattern', 'sparsity'$"),
])
def test_a_layer_sparsity_rule_without_a_required_key_names_it(rule, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"prune": {"layer_sparsity": [rule]}})


@dataclass(frozen=True)
class Inner:
    a: int
    b: str = "b"
    c: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Outer:
    inner: tuple[Inner, ...] = ()


def test_every_dataclass_field_without_a_default_is_a_required_key():
    assert from_dict(Outer, {"inner": [{"a": 1}]}) == Outer((Inner(1),))
    with pytest.raises(ConfigError, match=r"^x\.inner\[1\]: missing key 'a'$"):
        from_dict(Outer, {"inner": [{"a": 1}, {"b": "c"}]}, "x")


def test_unknown_key_names_full_path_and_the_nearest_key():
    with pytest.raises(ConfigError, match=r"^unknown key 'fisher\.max_iterz' \(did you mean 'fisher\.max_iter'\?\)$"):
        parse_config({"fisher": {"max_iterz": 3}})
    with pytest.raises(ConfigError, match=r"^unknown key 'colour'$"):  # nothing close: no suggestion
        parse_config({"colour": 1})
    with pytest.raises(ConfigError, match=r"unknown key 'prune\.sparsityy' \(did you mean 'prune\.sparsity'\?\)"):
        parse_config({}, ["prune.sparsityy=0.5"])
    with pytest.raises(ConfigError, match=r"^unknown key 'calibraton' \(did you mean 'calibration'\?\)$"):
        parse_config({"calibraton": {"n": 4}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"fisher": {"max_iter": "ten"}}, r"^fisher\.max_iter: expected int, got str$"),
        ({"layerwise": {"max_iter": 2.5}}, r"layerwise\.max_iter: expected int, got float"),
        ({"fisher": {"max_iter": True}}, r"fisher\.max_iter: expected int, got bool"),
        ({"fisher": {"backsolve": "yes"}}, r"fisher\.backsolve: expected bool, got str"),
        ({"prune": {"sparsity": "half"}}, r"prune\.sparsity: expected float, got str"),
        ({"prune": {"include": "fc1*"}}, r"prune\.include: expected list of str, got str"),
        ({"prune": {"include": ["a", 3]}}, r"prune\.include\[1\]: expected str, got int"),
        ({"prune": 0.5}, r"^prune: expected a mapping, got float$"),
        ({"model": {"dtype": "int8"}}, r"model\.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'int8'"),
        ({"fisher": {"tol": None}}, r"fisher\.tol: expected float, got NoneType"),
    ],
)
def test_wrong_type_names_key_and_expected_type(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


@pytest.mark.parametrize(("key", "value"), [("granularity", "foo"), ("allocation", "foo"), ("exclude_head", "yes"),
                                           ("include", "fc1"), ("include", ["fc1", 2]), ("sparsity", "0.5"),
                                           ("nm", 24), ("owl_m", None), ("layer_sparsity", "fc1")])
def test_a_wrong_type_reads_as_the_library_target_says_it(key, value):
    """The config's message for a prune key is the one dist_chita.prune gives for the Target field, under prune."""
    with pytest.raises(ConfigError) as e:
        parse_config({"prune": {key: value}})
    assert [str(e.value)] == [f"prune.{msg}" for msg in Target(**{key: value}).problems()]


def test_int_is_accepted_for_float_and_converted():
    cfg = parse_config({"fisher": {"lambda": 1}})
    assert cfg.fisher.lambda_ == 1.0 and isinstance(cfg.fisher.lambda_, float)


def test_auto_settings_and_the_validation_split_parse():
    cfg = parse_config({"calibration": {"validation": 0.2}, "prune": {"objective": "fisher", "method": "chita++"},
                        "fisher": {"lambda": "auto", "stages": "auto", "base_sparsity": 0.1}})
    assert cfg.calibration.validation == 0.2 and cfg.fisher.tuned == ("lambda", "stages")
    assert parse_config({"calibration": {"validation": 100}}).calibration.validation == 100


def test_lambda_takes_one_number_a_list_per_stage_or_auto():
    cfg = parse_config({"prune": {"objective": "fisher", "method": "chita++"},
                        "fisher": {"lambda": [1.0e-5, 1, 10.0], "stages": 3}})
    assert cfg.fisher.lambda_ == (1e-5, 1.0, 10.0) and all(isinstance(x, float) for x in cfg.fisher.lambda_)
    assert parse_config({}, ["fisher.lambda=auto"]).fisher.lambda_ == "auto"
    assert parse_config({}, ["fisher.lambda=0.01"]).fisher.lambda_ == 0.01
    with pytest.raises(ConfigError, match="fisher.lambda: 2 lambdas for 3 stage"):
        parse_config({"prune": {"objective": "fisher", "method": "chita++"},
                      "fisher": {"lambda": [1.0e-5, 1.0], "stages": 3}})


def test_one_number_where_numbers_are_expected_is_a_list_of_one():
    cfg = parse_config({}, ["calibration.mean=0.286", "calibration.std=1"])
    assert cfg.calibration.mean == (0.286,) and cfg.calibration.std == (1.0,)
    assert isinstance(cfg.calibration.std[0], float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prune.sparsity=1.0"], r"prune\.sparsity: must be in \[0, 1\)"),
        (["prune.sparsity=-0.1"], r"prune\.sparsity: must be in \[0, 1\)"),
        (["calibration.n=0"], r"calibration\.n: must be >= 1"),
        (["prune.method=obs"], r"prune\.method: 'obs' is neither a layerwise nor a Fisher-objective method \(one of "),
        (["prune.objective=layerwise", "prune.method=obs"],
         r"prune\.method: 'obs' is not a layerwise method \(one of "),
        (["prune.method=wanda", "prune.objective=fisher"],
         r"prune\.method: 'wanda' is not a Fisher-objective method \(one of chita, chita\+\+, magnitude\)"),
        (["fisher.loss=mse"], r"fisher\.loss: expected one of"),
        (["eval.metric=f1"], r"eval\.metric: expected one of"),
        (["prune.nm=4:2"], r"prune\.nm: expected 'N:M' with 1 <= N < M, got '4:2'"),
        (["prune.nm=2:2"], r"prune\.nm: expected 'N:M'"),
        (["prune.nm=two"], r"prune\.nm: expected 'N:M'"),
        (["prune.objective=fisher", "fisher.active_set_factor=0.5"], r"fisher\.active_set_factor: must be >= 1"),
        (["layerwise.max_iter=0"], r"layerwise\.max_iter: must be >= 1"),
        (["prune.objective=fisher", "fisher.max_iter=0"], r"fisher\.max_iter: must be >= 1"),
        (["prune.objective=fisher", "fisher.lambda=-1"], r"fisher\.lambda: must be >= 0"),
        (["prune.objective=fisher", "fisher.base_sparsity=0.8"], r"fisher\.base_sparsity"),
        (["prune.objective=fisher", "fisher.group_size=0"], r"fisher\.group_size: must be >= 1"),
        (["prune.objective=fisher", "fisher.lambda=often"], r"fisher\.lambda: expected"),
        (["prune.objective=fisher", "fisher.stages=auto"], r"fisher\.stages: auto needs method chita\+\+"),
        (["prune.objective=fisher", "fisher.pair_swaps=-1"], r"fisher\.pair_swaps: must be >= 0"),
        (["calibration.validation=1.5"], r"calibration\.validation: a share must be in \(0, 1\)"),
        (["calibration.validation=2000"], r"calibration\.validation: .* leaves none"),
        (["world_size=0"], r"world_size: must be >= 1"),
        (["eval.stride=128"], r"eval\.stride: must be in \[1, max_length = 128\)"),
        (["model.source=torch"], r"model\.factory: expected 'module:function'"),
        (["model.source=torch", "model.factory=m:f", "model.weights=w", "model.init=random"],
         r"model\.init: random needs a Hugging Face config \(model\.source: hf\)"),
        (["model.init=fresh"], r"model\.init: expected one of 'pretrained', 'random'"),
        (["calibration.image_size=0"], r"calibration\.image_size: must be >= 1, got 0"),
        (["calibration.std=[0.5, 0]"], r"calibration\.std: must be > 0"),
        (["calibration.mean=[0.5, x]"], r"calibration\.mean\[1\]: expected float, got str"),
        (["calibration.std=true"], r"calibration\.std: expected list of float, got bool"),
        (["model.task=image-classification", "calibration.windows=true", "eval.split=test"],
         r"calibration\.windows: needs text"),
        (["model.source=torch", "model.factory=m:f", "model.weights=w", "output.format=compressed-tensors"],
         r"output\.format: compressed-tensors needs a Hugging Face model"),
        (["prune.granularity=per_row"], r"prune\.granularity: expected one of 'row', 'layer', 'global'"),
        (["fisher.ridge=diagonal"], r"fisher\.ridge: expected one of 'auto', 'fisher_diagonal', 'identity'"),
        (["prune.objective=hessian"], r"prune\.objective: expected one of 'auto', 'layerwise', 'fisher'"),
        (["layerwise.damp=0"], r"layerwise\.damp: must be > 0"),
        (["prune.objective=layerwise", "prune.method=chita++"],
         r"prune\.method: 'chita\+\+' is not a layerwise method"),
        (["prune.allocation=reconstruction", "prune.granularity=global"],
         r"prune\.allocation: reconstruction needs granularity row or layer"),
        (["prune.allocation=reconstruction", "prune.nm=2:4"],
         r"prune\.allocation: reconstruction needs granularity row or layer \(no N:M\)"),
        (["calibration.windows=true"], r"calibration\.windows: the held-out data must come from another"),
        (["calibration.windows=true", "calibration.label_column=label", "eval.split=test"],
         r"calibration\.windows: needs text"),
    ],
)
def test_invalid_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({}, overrides)


def test_baselines_parse_where_they_apply():
    for overrides in (["prune.method=wanda"], ["prune.method=wanda", "prune.granularity=layer"],
                      ["prune.method=sparsegpt"], ["prune.method=sparsegpt", "prune.granularity=layer"],
                      ["prune.method=sparsegpt", "prune.nm=2:4"], ["prune.method=wanda", "prune.allocation=owl"]):
        assert parse_config({}, overrides).prune.method == overrides[0].split("=")[1]


def test_overrides_flat_nested_and_yaml_scalars():
    cfg = parse_config(MLP, ["prune.sparsity=0.75", "fisher.max_iter=7", "prune.nm=2:4", "world_size=4",
                             "eval.n=null", "prune.include=[fc1*, fc2*]", "name=x", "fisher.lambda=1e-2"])
    assert cfg.prune.sparsity == 0.75 and cfg.fisher.max_iter == 7 and cfg.world_size == 4
    assert cfg.prune.nm == "2:4" and parse_nm(cfg.prune.nm) == (2, 4)
    assert cfg.prune.include == ("fc1*", "fc2*") and cfg.fisher.lambda_ == 0.01 and cfg.name == "x"
    assert cfg.eval.n is None
    # untouched values survive, and the input dict is not modified
    assert cfg.model.factory == "dist_chita.zoo:mlpnet" and "prune" not in MLP
    # an override creates a missing section; a later override wins
    assert parse_config({}, ["output.dir=a", "output.dir=b"]).output.dir == "b"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_config({}, ["prune.sparsity"])
    with pytest.raises(ConfigError, match=r"'prune\.sparsity' is not a mapping"):
        parse_config({"prune": {"sparsity": 0.5}}, ["prune.sparsity.x=1"])
    with pytest.raises(ConfigError, match=r"^prune\.sparsity: expected float, got dict$"):
        parse_config({}, ["prune.sparsity.x=1"])


def test_nm_stays_a_string_in_yaml():
    # plain YAML 1.1 would read 2:4 as the sexagesimal integer 124
    assert yaml.safe_load("nm: 2:4") == {"nm": 124}
    assert yaml_load("nm: 2:4\nlam: 1e-3\nk: 12") == {"nm": "2:4", "lam": 1e-3, "k": 12}


def test_round_trip(tmp_path):
    cfg = parse_config(MLP, ["prune.nm=2:4", "prune.method=chita++", "prune.objective=fisher", "fisher.stages=3",
                             "eval.n=100", "threads_per_rank=1", "prune.include=[a*]"])
    d = cfg.to_dict()
    assert d["fisher"]["lambda"] == cfg.fisher.lambda_ and "lambda_" not in d["fisher"]
    assert list(d["prune"])[:2] == ["objective", "method"]
    assert isinstance(d["prune"]["include"], list)
    assert parse_config(d) == cfg
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_frozen():
    cfg = parse_config({})
    with pytest.raises(AttributeError):
        cfg.prune.sparsity = 0.1  # type: ignore[misc]
    assert isinstance(cfg, RunConfig) and isinstance(cfg.model, ModelConfig)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level"):
        load_config(top)


def test_a_key_given_twice_in_one_mapping_is_refused_naming_it_and_the_file(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("prune:\n  sparsity: 0.5\n  granularity: row\n  sparsity: 0.7\n")
    with pytest.raises(ConfigError) as e:
        load_config(twice)
    assert str(e.value) == f"config file {twice} is not valid YAML: duplicate key 'prune.sparsity' on lines 2 and 4"
    twice.write_text("prune:\n  layer_sparsity:\n    - {pattern: a, sparsity: 0.1, pattern: b}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'prune\.layer_sparsity\[0\]\.pattern' on line 3$"):
        load_config(twice)
    with pytest.raises(ConfigError, match=r"^override 'prune\.layer_sparsity=\[\{pattern: a, pattern: b\}\]': value is "
                                          r"not valid YAML \(duplicate key 'prune\.layer_sparsity\[0\]\.pattern' on "
                                          r"line 1\)$"):
        parse_config({}, ["prune.layer_sparsity=[{pattern: a, pattern: b}]"])
    # a key that overrides one merged in (<<) is not a duplicate; neither is an alias of a mapping used twice
    assert yaml_load("a: &x {n: 1, m: 2}\nb:\n  <<: *x\n  n: 3\nc: *x\n") == {
        "a": {"n": 1, "m": 2}, "b": {"n": 3, "m": 2}, "c": {"n": 1, "m": 2}}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path):
    cfg = load_config(path)
    assert parse_config(cfg.to_dict()) == cfg


def test_configs_present():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "mlpnet_mnist.yaml"} <= names
    mlp = load_config(ROOT / "configs" / "mlpnet_mnist.yaml")
    assert (mlp.model.factory, mlp.calibration.source, mlp.calibration.n, mlp.prune.sparsity) == (
        "dist_chita.zoo:mlpnet", "builtin:mnist", 1000, 0.9)
    from dist_chita.io.models import resolve_weights

    assert resolve_weights(mlp.model.weights).is_file()  # shipped with the package: a fresh clone runs it


def test_the_mlpnet_config_runs_the_schedule_its_benchmark_chose():
    import json

    cfg = load_config(ROOT / "configs" / "mlpnet_mnist.yaml")
    rows = json.loads((ROOT / "benchmarks" / "results" / "mlpnet_mnist.json").read_text())["rows"]
    chosen = next(r for r in rows if r["sparsity"] == cfg.prune.sparsity)["chita++"]["schedule"]
    assert (cfg.fisher.stages, cfg.fisher.base_sparsity) == pytest.approx(
        (chosen["stages"], chosen["base_sparsity"])), "re-run the benchmark's choice into configs/mlpnet_mnist.yaml"


def test_library_kwargs_match_signatures():
    import inspect

    from dist_chita.io import data, models

    cfg = load_config(ROOT / "configs" / "mlpnet_mnist.yaml")
    for fn, kwargs in [(models.load_model, model_kwargs(cfg)), (data.load_samples, calibration_kwargs(cfg)),
                       (data.load_samples, eval_kwargs(cfg))]:
        params = inspect.signature(fn).parameters
        assert set(kwargs) <= set(params), set(kwargs) - set(params)
    assert model_kwargs(cfg)["kind"] == "torch" and model_kwargs(cfg)["factory"] == "dist_chita.zoo:mlpnet"


def test_eval_kwargs_disjoint_from_calibration():
    cfg = load_config(ROOT / "configs" / "mlpnet_mnist.yaml")
    cal, ev = calibration_kwargs(cfg), eval_kwargs(cfg)
    assert (cal["offset"], cal["n"]) == (0, 1000)
    assert (ev["source"], ev["offset"], ev["n"], ev["seed"], ev["label_column"]) == ("builtin:mnist", 1000, None, 0,
                                                                                    "label")
    other_split = eval_kwargs(parse_config(cfg.to_dict(), ["eval.split=test", "eval.n=500"]))
    assert (other_split["split"], other_split["offset"], other_split["n"]) == ("test", 0, 500)
    other_source = eval_kwargs(parse_config({}, ["eval.source=held.parquet", "eval.text_column=body"]))
    assert (other_source["source"], other_source["offset"], other_source["text_column"]) == ("held.parquet", 0, "body")
    assert eval_kwargs(parse_config({}))["offset"] == 128  # default: the pydoc paragraphs after the calibration ones


def test_held_out_rows_of_one_source_spelled_differently_stay_disjoint(tmp_path, monkeypatch):
    """The same file named another way (./, an explicit format, a trailing slash) is the same rows: the held-out
    samples start after the calibration ones, and windows refuse it as held-out data."""
    import pandas as pd

    pd.DataFrame({"text": [f"row {i}" for i in range(10)]}).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "state.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for cal, held in [("d.parquet", "./d.parquet"), ("d.parquet", str(tmp_path / "d.parquet")),
                      (str(tmp_path / "disk"), str(tmp_path / "disk") + "/")]:
        cfg = parse_config({}, [f"calibration.source={cal}", "calibration.n=4", f"eval.source={held}"])
        assert eval_kwargs(cfg)["offset"] == 4, (cal, held)
    cfg = parse_config({}, ["calibration.source=d.parquet", "calibration.n=4", "eval.format=parquet"])
    assert eval_kwargs(cfg)["offset"] == 4
    with pytest.raises(ConfigError, match="held-out data must come from another eval.source"):
        parse_config({}, ["calibration.source=d.parquet", "calibration.windows=true", "eval.source=./d.parquet"])


def test_a_split_of_a_one_split_source_is_refused_not_read_as_its_train_rows(tmp_path):
    """Local files and builtin sources hold one split: asking for another ("test") read the calibration rows
    themselves as the held-out data."""
    from dist_chita.io import data

    with pytest.raises(ValueError, match="^split 'test': builtin data builtin:digits has one split, 'train'"):
        data.load_rows("builtin:digits", split="test")
    import pandas as pd

    pd.DataFrame({"text": ["a", "b"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="^split 'validation': parquet data"):
        data.load_rows(str(tmp_path / "d.parquet"), split="validation")
    assert len(data.load_rows(str(tmp_path / "d.parquet"))) == 2


def test_keys_of_the_earlier_flat_layout_name_their_new_home():
    from launch.config import MOVED

    for old, new in MOVED.items():
        with pytest.raises(ConfigError, match=f"^'{old}' moved to '{new.split()[0]}"):
            parse_config({}, [f"{old}=1"])
        for key in new.replace(" or ", " ").split(" (")[0].split():  # the new key exists
            section, name = key.split(".")
            assert name in parse_config({}).to_dict()[section], key
    with pytest.raises(ConfigError, match="'solver' section was split into 'fisher' and 'layerwise'"):
        parse_config({"solver": {}})


def test_printed_config_holds_the_sections_the_run_reads():
    default = yaml.safe_load(config_yaml(parse_config({}), applicable=True))
    assert {"fisher", "layerwise"} <= set(default)  # objective auto: the recipe may choose either
    layerwise = yaml.safe_load(config_yaml(parse_config({}, ["prune.objective=layerwise"]), applicable=True))
    assert "layerwise" in layerwise and "fisher" not in layerwise
    fisher = yaml.safe_load(config_yaml(parse_config({}, ["prune.objective=fisher"]), applicable=True))
    assert "fisher" in fisher and "layerwise" not in fisher
    obd = yaml.safe_load(config_yaml(parse_config({}, ["prune.method=obd"]), applicable=True))
    assert {"fisher", "layerwise"} <= set(obd)  # OBD's saliency is the Fisher diagonal of fisher.loss
    full = yaml.safe_load(config_yaml(parse_config({})))
    assert {"fisher", "layerwise"} <= set(full) and parse_config(full) == parse_config({})


def test_default_yaml_sets_only_what_its_run_reads():
    text = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert set(text) <= set(parse_config({}).sections())
