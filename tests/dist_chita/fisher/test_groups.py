"""Layer groups (block mode): groups, budget allocation against a brute-force top-k, the diagonal Fisher against the
factor, equality with the global run when one block holds everything, exact budgets, and 1 vs 2 ranks."""

import pytest
import torch

from dist_chita.distributed import comm
from dist_chita.distributed.layout import ColumnLayout
from dist_chita.distributed.partition import sample_ranges
from dist_chita.fisher import driver as fisher_driver
from dist_chita.fisher import groups, losses
from dist_chita.fisher.factor import fisher_block
from dist_chita.io import models
from dist_chita.io.data import iter_microbatches
from dist_chita.prunable import named_shapes, prunable_modules
from dist_chita.sparsity import kept_count
from tests import multiproc
from tests.fixtures.solver_settings import THOROUGH
from tests.fixtures.tiny_models import digits_samples, train_digits_mlp

N = 32


def _forward(model, batch):
    return models.forward(model, "image-classification", batch)


def _setup():
    torch.set_num_threads(1)
    model = train_digits_mlp()
    calib = digits_samples().select(range(N))
    modules = prunable_modules(model, exclude_head=False)
    lo, hi = sample_ranges(N, comm.world_size())[comm.rank()]
    return model, modules, (lambda: iter_microbatches(calib, lo, hi, 16))


def _blocks(block_size, criterion="magnitude", sparsity=0.8, method="chita"):
    model, modules, batches = _setup()
    out = groups.prune_in_blocks(model, modules, method, sparsity, block_size=block_size, criterion=criterion,
                                 make_batches=batches, loss_fn=losses.cross_entropy(_forward), n=N, lam=1e-3,
                                 solver_options={**THOROUGH, "max_iter": 10})
    return {name: m.weight.detach().clone() for name, m in modules}, out


def test_layer_groups():
    assert groups.layer_groups([5, 3, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
    assert groups.layer_groups([5, 3, 4], 100) == [[0, 1, 2]]
    assert groups.layer_groups([5, 3, 4], 1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="block_size"):
        groups.layer_groups([1], 0)


def test_allocation_counts_the_global_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=g, dtype=torch.float64)
    sizes = [100, 250, 50, 600]
    k = 333
    alloc = groups.allocate(scores, sizes, k)
    threshold = torch.topk(scores, k).values[-1]
    expected = [int((part >= threshold).sum()) for part in torch.split(scores, sizes)]
    assert alloc == expected and sum(alloc) == k


def test_diagonal_fisher_is_the_column_sums_of_the_factor():
    model, modules, batches = _setup()
    loss = losses.cross_entropy(_forward)
    diag = torch.cat(groups.diagonal_fisher(model, modules, batches(), N, loss))
    layout = ColumnLayout.build(named_shapes(modules), 1)
    At = fisher_block(model, modules, layout, batches(), 0, N, loss)
    assert torch.allclose(diag, At.double().pow(2).sum(1), rtol=1e-5, atol=1e-12)


def test_one_block_with_everything_is_the_global_run():
    weights, _ = _blocks(block_size=10**9)
    model, modules, batches = _setup()
    fisher_driver.prune(model, modules, "chita", 0.8, make_batches=batches, loss_fn=losses.cross_entropy(_forward), n=N,
                   lam=1e-3, solver_options={**THOROUGH, "max_iter": 10})
    for name, m in modules:
        assert torch.equal(weights[name], m.weight.detach()), name


@pytest.mark.parametrize("criterion", ["magnitude", "obs"])
def test_layer_blocks_keep_exactly_the_allocated_budget(criterion):
    model, modules, _ = _setup()
    sizes = [m.weight.numel() for _, m in modules]
    weights, out = _blocks(block_size=1, criterion=criterion)  # one layer per block
    p = sum(sizes)
    kept = [int((weights[name] != 0).sum()) for name, _ in modules]
    assert sum(kept) == kept_count(p, 0.8)
    assert kept == [st.kept for st in out.stages]
    if criterion == "magnitude":
        w = torch.cat([m.weight.detach().reshape(-1).double() for _, m in modules])
        assert kept == groups.allocate(w.abs(), sizes, kept_count(p, 0.8))
    assert set(out.masks) == {name for name, _ in modules} and out.layout.p == p


def test_same_result_on_two_ranks():
    ref, _ = _blocks(block_size=3000)
    (r0, _), (r1, _) = multiproc.run(_blocks, 2, 3000)
    for name, w in ref.items():
        assert torch.equal(r0[name] != 0, w != 0) and torch.equal(r1[name] != 0, w != 0), name
        assert torch.allclose(r0[name], w, rtol=1e-5, atol=1e-6 * float(w.abs().max())), name
