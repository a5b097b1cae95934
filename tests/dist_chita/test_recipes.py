"""Defaults per model family: the family read from real model classes, given settings winning over the recipe,
dist_chita.prune without an objective running the recipe, and the recipes' choices checked against measurement: the
CNN and MLP recipes against per-row budgets and global magnitude pruning on held-out digits (models trained here),
the encoder's per-row budgets against the per-layer ones in the MiniLM baseline benchmark's JSON."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import dist_chita
from dist_chita import evaluate, recipes
from dist_chita.sparsity import kept_count
from dist_chita.zoo import mlpnet
from tests.fixtures.layerwise_nets import mlp
from tests.fixtures.tiny_models import digits_samples, train_digits_mlp

ROOT = Path(__file__).resolve().parents[2]


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32)).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).eval()


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                                     depths=[1, 1], num_labels=3)).eval()


@pytest.mark.parametrize("build,task,family", [
    (mlpnet, "image-classification", "mlp"),
    (_resnet, "image-classification", "cnn"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), "image-classification",
     "cnn"),
    (_bert, "embedding", "encoder"),
    (_bert, "sequence-classification", "encoder"),
    (_gpt2, "causal-lm", "causal-lm"),
    (lambda: nn.Sequential(nn.LSTM(4, 4)), "embedding", "other"),
])
def test_the_family_of_real_model_classes(build, task, family):
    assert recipes.model_family(build(), task) == family


def test_the_recipes_of_the_families():
    assert {f: (r.objective, r.method, r.granularity) for f, r in recipes.RECIPES.items()} == {
        "cnn": ("layerwise", "chita", "global"), "mlp": ("layerwise", "chita", "global"),
        "encoder": ("layerwise", "chita", "row"), "causal-lm": ("layerwise", "chita", "row"),
        "other": ("layerwise", "chita", "row")}
    assert set(recipes.RECIPES) == set(recipes.FAMILIES)


def test_given_settings_win_over_the_recipe():
    model = mlpnet()
    auto = recipes.resolve(model, "image-classification")
    assert (auto.objective, auto.method, auto.granularity) == ("layerwise", "chita", "global")
    assert auto.line.startswith("  objective auto: layerwise, method chita, granularity global (mlp: ")
    given = recipes.resolve(model, "image-classification", "fisher", None, None)  # an objective: no recipe
    assert (given.objective, given.method, given.granularity, given.line) == ("fisher", "chita", "row", None)
    plus = recipes.resolve(model, "image-classification", "auto", "chita++", None)  # a Fisher-only method
    assert (plus.objective, plus.method, plus.granularity) == ("fisher", "chita++", "row")
    wanda = recipes.resolve(model, "image-classification", None, "wanda", "layer")
    assert (wanda.objective, wanda.method, wanda.granularity) == ("layerwise", "wanda", "layer")


def test_the_recipe_line_says_which_settings_were_given():
    """A setting the config gave is marked as given, with the recipe's own where they differ: the recipe's reason
    (here: against per-row budgets) must not read as the reason for a setting it did not choose."""
    model = mlpnet()
    row = recipes.resolve(model, "image-classification", None, None, "row")
    assert row.line.startswith("  objective auto: layerwise, method chita, granularity row (given; the recipe's: "
                               "global) (mlp: ")
    same = recipes.resolve(model, "image-classification", None, "chita", "global")
    assert same.line.startswith("  objective auto: layerwise, method chita (given), granularity global (given) (mlp: ")
    plus = recipes.resolve(model, "image-classification", None, "chita++", None)
    assert plus.line.startswith("  objective auto: fisher (for method chita++; the recipe's: layerwise), method "
                                "chita++ (given; the recipe's: chita), granularity row (the fisher objective's "
                                "default; the recipe's: global) (mlp: ")


def test_prune_without_an_objective_runs_the_recipe_and_says_so():
    torch.manual_seed(0)
    x = torch.randn(64, 12)
    lines: list[str] = []
    rep = dist_chita.prune(mlp(), {"inputs": x}, target=dist_chita.Target(sparsity=0.8, exclude_head=False),
                           batch_size=16, log=lines.append, check_memory=False)
    assert rep.recipe == recipes.resolve(mlp(), "image-classification").line.strip()
    assert any(line.strip() == rep.recipe for line in lines)
    assert (rep.method, rep.objective) == ("chita", "layerwise")
    assert rep.global_.kept == kept_count(rep.global_.p, 0.8)  # one budget over all layers
    assert len({row.sparsity for row in rep.layers}) > 1
    explicit = dist_chita.prune(mlp(), {"inputs": x}, target=dist_chita.Target(sparsity=0.8),
                                objective=dist_chita.Layerwise(), batch_size=16, check_memory=False)
    # an objective given: per row, every row of the (16, 12) and (8, 16) layers keeps round(0.2 d) (head dense)
    assert explicit.recipe is None and [r.kept for r in explicit.layers] == [16 * 2, 8 * 3]


def _digits_cnn() -> nn.Module:
    """Three 3x3 convolutions with BatchNorm (8, 16, 32 channels, the last with stride 2) and a linear classifier on
    the 8x8 digits."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@functools.cache
def _digits_split():
    """scikit-learn's 1,797 digits in a seeded order: 800 to train the CNN on, 200 to calibrate, 797 held out."""
    s = digits_samples()
    order = torch.randperm(len(s), generator=torch.Generator().manual_seed(0)).tolist()
    return s.select(order[:800]), s.select(order[800:1000]), s.select(order[1000:])


@functools.cache
def _cnn_state() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, (train, _, _) = _digits_cnn(), _digits_split()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(80):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train.fields["pixel_values"]), train.fields["labels"]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trained(family: str) -> nn.Module:
    if family == "mlp":
        return train_digits_mlp()
    model = _digits_cnn()
    model.load_state_dict(_cnn_state())
    return model.eval()


@pytest.mark.parametrize("family,sparsity", [("cnn", 0.9), ("mlp", 0.9)])
def test_the_cnn_and_mlp_recipes_beat_per_row_budgets_and_global_magnitude(family, sparsity):
    """The recipe (no objective given) against what it replaces (layerwise CHITA with per-row budgets, the options'
    default) and against global magnitude pruning: higher held-out accuracy than either. The MLP is trained on all
    digits (its held-out accuracy is a training accuracy); the CNN on 800 digits disjoint from the 200 calibration and
    797 held-out ones."""
    _, calibration, held_out = _digits_split()
    assert recipes.model_family(_trained(family), "image-classification") == family
    accuracy = {}
    for name, kw in {"recipe": {}, "per row": {"objective": dist_chita.Layerwise(), "granularity": "row"},
                     "magnitude": {"objective": dist_chita.Fisher(), "method": "magnitude",
                                   "granularity": "global"}}.items():
        model = _trained(family)
        target = dist_chita.Target(sparsity=sparsity, **({"granularity": kw.pop("granularity")} if kw else {}))
        rep = dist_chita.prune(model, calibration, target=target, task="image-classification", batch_size=200,
                               check_memory=False, **kw)
        assert (rep.recipe is not None) == (name == "recipe")
        accuracy[name] = evaluate.evaluate_accuracy(model, "image-classification", held_out, 1000)
    assert accuracy["recipe"] > max(accuracy["per row"], accuracy["magnitude"]), accuracy


def test_the_encoder_recipe_is_the_measured_best_of_the_minilm_baselines():
    """Per-row budgets for encoders: in benchmarks/minilm_baselines.py's default run (MiniLM at 0.5, held-out
    sentences), layerwise CHITA per row keeps the embeddings closer to the dense ones than per layer."""
    runs = json.loads((ROOT / "benchmarks" / "results" / "minilm_baselines.json").read_text())["runs"]["default"]
    res = runs["results"]
    row = res["dist-chita layerwise: CHITA per row on H = X^T X (the default job)"]["cosine"]
    layer = res["dist-chita layerwise: CHITA per layer (OBS-saliency row budgets)"]["cosine"]
    assert recipes.RECIPES["encoder"].granularity == ("row" if row >= layer else "layer")
