"""The interface of a per-layer method: the registry (a method defined here is found by name, the driver
untouched), what the driver shows a method, the budgets, the score methods."""

import dataclasses

import pytest
import torch
from torch import nn

from dist_chita.layerwise.driver import memory_bytes, prune_layerwise
from dist_chita.methods import base
from dist_chita.methods.base import LayerMethod, LayerProblem, LayerResult, register, resolve_method
from dist_chita.sparsity import kept_count
from tests import multiproc
from tests.fixtures.layerwise_nets import batches, mlp


class _FirstInputs(LayerMethod):
    """Keeps the first kept_count(d, s) inputs of every row of its runs (no update), and records what it was shown
    (W_bar copied: it may be the layer's weight, which the driver overwrites)."""

    name = "first_inputs"
    shown: list = []

    def prune(self, layer: LayerProblem) -> LayerResult:
        _FirstInputs.shown.append(dataclasses.replace(layer, W_bar=layer.W_bar.clone()))
        k = layer.row_budget()
        W = torch.zeros_like(layer.W_bar)
        for _, lo, hi in layer.runs:
            W[lo:hi, :k] = layer.W_bar[lo:hi, :k]
        return LayerResult(W=W, objective=1.0)


def _prune_with_a_new_method(row_chunk=64):
    """prune_layerwise(method="first_inputs") on the MLP after registering the method here."""
    register(_FirstInputs)
    try:
        _FirstInputs.shown = []
        model = mlp(2)
        x = torch.randn(30, 12, generator=torch.Generator().manual_seed(0))
        modules = [(str(i), model[i]) for i in (0, 2, 4)]
        dense = [m.weight.detach().clone() for _, m in modules]
        out = prune_layerwise(model, modules, 0.5, forward=model, make_batches=lambda: batches(x, 0, 30, 7),
                              method="first_inputs", damp=0.05, row_chunk=row_chunk)
        return dense, [m.weight.detach().clone() for _, m in modules], _FirstInputs.shown, out.stages[0], x
    finally:
        base.REGISTRY.pop("first_inputs")


def test_a_method_defined_here_is_found_by_name():
    """Registered in this test, the method runs through prune_layerwise by its name: each layer is shown its dense
    rows, H = X^T X / N of its inputs through the already pruned layers (recomputed here), the ridge
    damp * mean diag H, its budget and all rows (one rank); its rows are written back and its objectives summed."""
    dense, pruned, shown, stage, x = _prune_with_a_new_method()
    assert "first_inputs" not in base.REGISTRY
    assert [layer.W_bar.shape for layer in shown] == [(16, 12), (8, 16), (3, 8)]
    h = x.double()
    ref = mlp(2)
    for i, layer, W_bar, W in zip((0, 2, 4), shown, dense, pruned, strict=True):
        H = h.T @ h / h.shape[0]
        torch.testing.assert_close(layer.H[0], H, rtol=1e-5, atol=1e-7)
        assert layer.lams == pytest.approx((0.05 * float(H.diagonal().mean()),), rel=1e-6)
        assert torch.equal(layer.W_bar, W_bar) and layer.runs == ((0, 0, W_bar.shape[0]),)
        k = kept_count(W_bar.shape[1], 0.5)
        assert torch.equal(W[:, :k], W_bar[:, :k]) and not bool(W[:, k:].any())
        with torch.no_grad():
            ref[i].weight.copy_(W)
        h = ref[: i + 2](x).detach().double() if i < 4 else h
    assert stage.objective == 3.0 and stage.magnitude_objective is None and stage.objective_trace == [3.0]


def test_a_method_defined_here_shares_its_rows_among_ranks():
    """On 2 ranks, chunks of 4 rows: each rank is shown its chunks of every layer (16 rows: 8 each; 8 rows: 4 each;
    3 rows: one chunk, on rank 1), its W is zero elsewhere and the all-reduce fills it in: the weights of 1 rank."""
    (one,) = multiproc.run(_prune_with_a_new_method, 1, 4)
    two = multiproc.run(_prune_with_a_new_method, 2, 4)
    assert [layer.runs for layer in two[0][2]] == [((0, 0, 8),), ((0, 0, 4),), ()]
    assert [layer.runs for layer in two[1][2]] == [((0, 8, 16),), ((0, 4, 8),), ((0, 0, 3),)]
    for _, pruned, _, stage, _ in two:
        assert all(torch.equal(a, b) for a, b in zip(pruned, one[1], strict=True))
        assert stage.objective == 6.0  # 1.0 per layer from each rank's method, summed


def test_registry_and_resolution():
    assert {"chita", "magnitude", "obd", "sparsegpt", "wanda"} <= set(base.method_names())
    chita = base.REGISTRY["chita"]
    assert isinstance(resolve_method("chita"), chita)
    mine = _FirstInputs()
    assert resolve_method(mine) is mine
    with pytest.raises(ValueError, match=r"^unknown layerwise method 'nope' \(one of chita, "):
        resolve_method("nope")

    class Other(LayerMethod):
        name = "chita"

        def prune(self, layer):
            raise AssertionError

    with pytest.raises(ValueError, match="name 'chita' is taken"):
        register(Other)
    assert base.REGISTRY["chita"] is chita


def test_a_layer_problem_and_its_budgets():
    """Defaults: the weights already zero are not allowed, one part, all rows. Budgets: kept_count(d, s) per row;
    None with N:M; with per_layer each row's count among the layer's kept_count(r d, s) largest saliencies
    (torch.topk over the allowed weights)."""
    g = torch.Generator().manual_seed(2)
    W_bar = torch.randn(5, 9, generator=g)
    W_bar[2, :4] = 0.0
    layer = LayerProblem(W_bar=W_bar, sparsity=0.7)
    assert torch.equal(layer.allowed, W_bar != 0) and layer.parts == ((0, 5),) and layer.runs == ((0, 0, 5),)
    assert layer.row_budget() == kept_count(9, 0.7) and not layer.shares_budget
    assert LayerProblem(W_bar=W_bar, sparsity=0.0, nm=(2, 4), per_layer=True).row_budget() is None
    shared = LayerProblem(W_bar=W_bar, sparsity=0.7, per_layer=True)
    saliency = torch.rand(5, 9, generator=g)
    top = saliency.masked_fill(W_bar == 0, -1).flatten().topk(kept_count(45, 0.7)).indices
    expected = torch.zeros(45).scatter_(0, top, 1.0).view(5, 9).sum(1).long()
    assert shared.shares_budget and torch.equal(shared.row_budget(saliency), expected)
    with pytest.raises(ValueError, match="saliency"):
        shared.row_budget()


def test_memory_follows_the_method():
    """The block's H counts only for a method that needs it; SparseGPT's estimate adds the block's pruned rows."""
    modules = [(f"layer.{b}.{n}", nn.Linear(d_in, d_out)) for b in range(2) for n, d_in, d_out in
               (("up", 32, 64), ("down", 64, 32))]
    H = 2 * 8 * (32**2 + 64**2)  # the largest block's H, twice, float64
    for name in ("chita", "wanda", "obd", "magnitude", "sparsegpt"):
        method = resolve_method(name)
        expected = (H if method.needs_curvature else 0) + method.solve_bytes([(64, 32), (32, 64)] * 2,
                                                                            [[0, 1], [2, 3]])
        assert memory_bytes(modules, name) == expected
    assert memory_bytes(modules, "sparsegpt") == H + 32 * 64 * 64 + 24 * 32 * 64 + 4 * 2 * 64 * 32
