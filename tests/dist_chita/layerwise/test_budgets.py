"""Cross-layer budgets: error curves against a closed form, the allocation against brute force, the same budgets on
any number of ranks, and the layerwise objective's global budget end to end."""

from __future__ import annotations

import itertools

import pytest
import torch

import dist_chita
from dist_chita import prunable
from dist_chita.layerwise import budgets
from dist_chita.sparsity import kept_count
from tests import multiproc
from tests.fixtures.layerwise_nets import batches, mlp


def test_error_curve_with_identity_curvature_is_the_pruned_share_of_each_rows_energy():
    # H = I: SparseGPT's mask is the layer's smallest |w| and its update moves nothing (H^-1 is diagonal), so
    # e(s) = mean over rows of (sum of the row's pruned w^2) / ||w_row||^2
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 40, generator=g, dtype=torch.float64)
    grid = (0.0, 0.25, 0.5, 0.9)
    got = budgets.error_curve(W, torch.eye(40, dtype=torch.float64)[None], grid)
    for s, e in zip(grid, got.tolist(), strict=True):
        cut = int(W.numel() * s)
        pruned = torch.zeros(W.numel(), dtype=torch.bool)
        pruned[torch.argsort(W.abs().reshape(-1), stable=True)[:cut]] = True
        share = (W.pow(2) * pruned.view_as(W)).sum(1) / W.pow(2).sum(1)
        assert e == pytest.approx(float(share.mean()), rel=1e-9, abs=1e-12)


def test_error_curve_ignores_dead_rows_and_groups():
    W = torch.tensor([[1.0, 2.0, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    H = torch.eye(4, dtype=torch.float64)[None]
    # 6 of 8 pruned: the dead row's 4 zeros first, then 0.1 and 0.5; the dead row does not count in the mean
    assert budgets.error_curve(W, H, (0.75,)).item() == pytest.approx(0.26 / 5.26, rel=1e-9)
    assert budgets.error_curve(W[:1], H, (0.5,)).item() == pytest.approx(0.26 / 5.26, rel=1e-9)
    # two groups of one row each (a grouped Conv2d): the second sees no input and does not count
    two = torch.stack([torch.eye(4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)])
    assert budgets.error_curve(W, two, (0.0, 0.5)).tolist() == pytest.approx([0.0, 0.26 / 5.26], rel=1e-9)


def _lower_envelope(xs, ys, x) -> float:
    """The lower convex envelope of the points at x: the least chord between two points around x."""
    best = min(y for xi, y in zip(xs, ys, strict=True) if xi == x) if x in xs else float("inf")
    for (x0, y0), (x1, y1) in itertools.combinations(zip(xs, ys, strict=True), 2):
        if x0 < x < x1:
            best = min(best, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_minimises_the_convexified_costs_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    grid = (0.0, 0.2, 0.5, 0.7, 0.9)
    sizes = [10, 20, 7]
    curves = torch.cat([torch.zeros(3, 1), torch.rand(3, 4, generator=g).cumsum(1)], 1).double()  # increasing
    kept = int(torch.randint(6, sum(sizes) - 3, (1,), generator=g))
    got = budgets.allocate(curves, sizes, kept, grid)
    assert sum(got) == kept and all(0 < k <= n for k, n in zip(got, sizes, strict=True))
    xs = [[min(round(n * s), n - 1) for s in grid] for n in sizes]
    cost = lambda removed: sum(_lower_envelope(x, c, r) for x, c, r in  # noqa: E731
                               zip(xs, curves.tolist(), removed, strict=True))
    best = min(cost(r) for r in itertools.product(*(range(x[-1] + 1) for x in xs))
               if sum(r) == sum(sizes) - kept)
    assert cost([n - k for n, k in zip(sizes, got, strict=True)]) == pytest.approx(best, abs=1e-12)


def test_allocation_refuses_a_budget_the_grid_cannot_reach():
    with pytest.raises(ValueError, match="cannot keep 1 of 200 weights"):
        budgets.allocate(torch.zeros(2, 2, dtype=torch.float64), [100, 100], 1, (0.0, 0.9))


def _targets(sparsity: float):
    from dist_chita.distributed import comm

    torch.manual_seed(3)
    net = mlp()
    x = torch.randn(40, 12)
    modules = prunable.prunable_modules(net, exclude_head=False)
    mine = lambda: [b for j, b in enumerate(batches(x, 0, 40)) if j % comm.world_size() == comm.rank()]  # noqa: E731
    return budgets.global_targets(net, modules, lambda b: net(b), mine, sparsity), [m.weight.numel()
                                                                                    for _, m in modules]


def test_global_targets_keep_the_global_count_and_are_the_same_on_any_number_of_ranks():
    targets, sizes = _targets(0.8)
    kept = [kept_count(n, s) for n, s in zip(sizes, targets, strict=True)]
    assert sum(kept) == kept_count(sum(sizes), 0.8)
    assert len(set(targets)) > 1  # not uniform
    for world_size in (2, 3):
        for got, _ in multiproc.run(_targets, world_size, 0.8):
            assert got == targets


def test_layerwise_global_budget_prunes_to_the_global_count_with_layer_shares():
    torch.manual_seed(1)
    net = mlp()
    x = torch.randn(60, 12)
    rep = dist_chita.prune(net, {"inputs": x}, target=dist_chita.Target(sparsity=0.7, granularity="global",
                                                                        exclude_head=False),
                           objective=dist_chita.Layerwise(), method="chita", batch_size=10, check_memory=False)
    p = sum(row.size for row in rep.layers)
    assert rep.global_.kept == kept_count(p, 0.7)
    assert len({round(row.sparsity, 6) for row in rep.layers}) > 1
    assert rep.phase_seconds["allocation"][0] > 0


def _curves():
    """error_curves of the test MLP on a coarse grid, each rank reading its share of the micro-batches."""
    from dist_chita.distributed import comm

    torch.manual_seed(3)
    net = mlp()
    x = torch.randn(40, 12)
    modules = prunable.prunable_modules(net, exclude_head=False)
    mine = lambda: [b for j, b in enumerate(batches(x, 0, 40)) if j % comm.world_size() == comm.rank()]  # noqa: E731
    return budgets.error_curves(net, modules, lambda b: net(b), mine, (0.0, 0.5, 0.9))


def test_error_curves_are_each_layers_curve_once_on_any_number_of_ranks():
    """error_curves on 1 and 2 ranks against error_curve of every layer on H = X^T X / N computed here from the
    dense MLP's own activations (the input, then each ReLU's output): each rank measures its share of the layers,
    the all-reduce adds each curve exactly once."""
    torch.manual_seed(3)
    net = mlp()
    x = torch.randn(40, 12)
    with torch.no_grad():
        inputs = [x, torch.relu(net[0](x)), torch.relu(net[2](torch.relu(net[0](x))))]
    want = torch.stack([
        budgets.error_curve(net[2 * i].weight.detach(), (X.double().T @ X.double() / 40)[None], (0.0, 0.5, 0.9))
        for i, X in enumerate(inputs)])
    assert bool((want[:, 1:] > 0).all())
    for world in (1, 2):
        for got in multiproc.run(_curves, world):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_allocation_leaves_every_layer_a_weight():
    """However cheap a tiny layer is to prune, the grid's largest sparsity rounds to at most n - 1 of its n
    weights: at the largest total the grid allows each layer keeps exactly one weight (1 of 2, 1 of 10 by hand)."""
    curves = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)  # layer 0 costs nothing
    got = budgets.allocate(curves, [2, 10], 2, (0.0, 0.5, 0.99))
    assert got == [1, 1]
    assert budgets.allocate(curves, [2, 10], 5, (0.0, 0.5, 0.99)) == [1, 4]  # the free layer first, to its floor
    with pytest.raises(ValueError, match="cannot keep 1 of 12 weights"):
        budgets.allocate(curves, [2, 10], 1, (0.0, 0.5, 0.99))


def test_allocation_gives_ties_to_the_earlier_layer_and_accepts_the_grids_limit():
    """Two layers of equal curves and sizes cost the same per removed weight: a removal that does not fill both
    is taken from the earlier layer (the documented tie rule); keeping exactly what the grid's largest sparsity
    leaves (half of each, by hand) is accepted, one weight fewer is refused."""
    curves = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert budgets.allocate(curves, [10, 10], 17, (0.0, 0.5)) == [7, 10]
    assert budgets.allocate(curves, [10, 10], 12, (0.0, 0.5)) == [5, 7]
    assert budgets.allocate(curves, [10, 10], 10, (0.0, 0.5)) == [5, 5]
    with pytest.raises(ValueError, match="cannot keep 9 of 20 weights"):
        budgets.allocate(curves, [10, 10], 9, (0.0, 0.5))
