import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_chita.layerwise.curvature import my_microbatches
from dist_chita.layerwise.driver import prune_layerwise
from dist_chita.layerwise.geometry import weight_rows
from dist_chita.layerwise.row_solver import keep_mask, objectives, solve_rows
from dist_chita.sparsity import kept_count
from tests import multiproc
from tests.fixtures.layerwise_nets import batches as _batches
from tests.fixtures.layerwise_nets import mlp as _mlp


@pytest.mark.parametrize("per_layer,targets", [(False, 0.5), (True, 0.5), (False, (0.3, 0.7, 0.5)),
                                               (True, (0.3, 0.7, 0.5))])
def test_sequential_prune_matches_an_independent_recomputation(per_layer, targets):
    """Every layer of a small MLP pruned to 50% (or to its own target: 30%, 70%, 50%) of each row, or of each layer
    with the budget shared among its rows by the OBS saliency, and the same result recomputed here: layer l's H
    from the inputs of the model with layers < l already pruned, the row budgets from an inverse and a top-k of
    the whole layer, solved with solve_rows."""
    torch.manual_seed(1)
    x = torch.randn(40, 12)
    model, ref = _mlp(), _mlp()
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    exact = dict(refit_iters=60)
    out = prune_layerwise(model, modules, targets, forward=model, make_batches=lambda: _batches(x, 0, 40),
                          per_layer=per_layer, solver_options=exact)
    sparsity = dict(zip((0, 2, 4), targets if isinstance(targets, tuple) else (targets,) * 3, strict=True))
    kept = 0
    h = x
    for i in (0, 2, 4):
        s = sparsity[i]
        W_bar = ref[i].weight.detach()
        r, d = W_bar.shape
        H = (h.double().T @ h.double()) / h.shape[0]
        lam = 0.01 * float(H.diagonal().mean())
        Q = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
        if per_layer:
            saliency = W_bar.double().pow(2) / torch.linalg.inv(Q).diagonal()
            top = saliency.flatten().topk(kept_count(r * d, s)).indices
            k = torch.zeros(r * d).scatter_(0, top, 1.0).view(r, d).sum(1).long()
            assert not torch.equal(k, torch.full_like(k, kept_count(d, s)))  # the rows do share the budget
            kept += int(k.sum())
        else:
            k = kept_count(d, s)
            kept += r * k
            assert (out.masks[str(i)].sum(1) == k).all()
        res = solve_rows(W_bar, H, lam, k=k, **exact)
        torch.testing.assert_close(model[i].weight.detach(), res.W, rtol=1e-4, atol=1e-5)
        assert torch.equal(out.masks[str(i)].sum(1), res.support.sum(1))
        top = keep_mask(W_bar.abs(), k, None, None)
        f_mag = float(objectives((W_bar * top - W_bar).double(), Q).sum())
        assert res.objective < f_mag  # better than plain magnitude pruning of the layer with the same budgets
        with torch.no_grad():
            ref[i].weight.copy_(res.W)
            h = ref[: i + 2](x) if i < 4 else h
    assert out.stages[0].kept == kept
    assert out.stages[0].objective <= out.stages[0].magnitude_objective


def test_an_unknown_layerwise_method_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="unknown layerwise method") as refused:
        prune_layerwise(model, [("0", model[0])], 0.5, forward=model, make_batches=lambda: [], method="obs")
    message = str(refused.value)
    assert "\n" not in message and all(name in message for name in ("chita", "magnitude", "obd", "sparsegpt", "wanda"))


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return torch.relu(self.a(x)) + self.b(x)


class _Pairs(nn.Module):
    """Two blocks of two layers each (blocks.0.a, blocks.0.b, blocks.1.a, blocks.1.b)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.blocks = nn.ModuleList([_Pair(), _Pair()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _solve_events(method):
    """prune_layerwise(method=...) ("sparsegpt" or "chita", rows in chunks of 4) on _Pairs, recording this rank's
    solver calls and layer writes."""
    from dist_chita.layerwise import driver as layerwise_driver
    from dist_chita.methods import chita, sparsegpt

    module, name = (sparsegpt, "sparsegpt_rows") if method == "sparsegpt" else (chita, "solve_rows")
    events, solve, write = [], getattr(module, name), layerwise_driver.from_rows
    setattr(module, name, lambda *a, **kw: (events.append("solve"), solve(*a, **kw))[1])
    layerwise_driver.from_rows = lambda *a, **kw: (events.append("write"), write(*a, **kw))[1]
    try:
        model = _Pairs().eval()
        modules = [(f"blocks.{b}.{n}", getattr(model.blocks[b], n)) for b in (0, 1) for n in "ab"]
        x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        prune_layerwise(model, modules, 0.5, forward=model, per_layer=True, method=method, row_chunk=4,
                        make_batches=lambda: my_microbatches(_batches(x, 0, 30, 5)))
    finally:
        setattr(module, name, solve)
        layerwise_driver.from_rows = write
    return events, [m.weight.detach().clone() for _, m in modules]


def test_sparsegpt_solves_a_blocks_layers_on_all_ranks_at_once():
    """SparseGPT's layers go whole to the ranks by turns; every rank solves its layers of a block before the block
    is written back (a layer at a time, the ranks would wait for each other): on 2 ranks, rank 1 solves
    blocks.0.b before blocks.0.a (rank 0's) is written. Same weights as on one rank."""
    (one, base), = multiproc.run(_solve_events, 1, "sparsegpt")
    assert one == ["solve", "solve", "write", "write"] * 2
    (e0, w0), (e1, w1) = multiproc.run(_solve_events, 2, "sparsegpt")
    assert e0 == e1 == ["solve", "write", "write"] * 2
    for w in (w0, w1):
        assert all(torch.equal(a, b) for a, b in zip(w, base, strict=True))


def test_chita_ranks_meet_once_per_block():
    """CHITA's rows go to the ranks in chunks (here 4 of a layer's 8 rows each); every rank solves its rows of all
    of a block's layers before the block is written back. Same weights as on one rank."""
    (one, base), = multiproc.run(_solve_events, 1, "chita")
    assert one == ["solve", "solve", "write", "write"] * 2
    (e0, w0), (e1, w1) = multiproc.run(_solve_events, 2, "chita")
    assert e0 == e1 == ["solve", "solve", "write", "write"] * 2
    for w in (w0, w1):
        assert all(torch.equal(a, b) for a, b in zip(w, base, strict=True))


def _grouped_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).eval()


def test_grouped_conv_prune_matches_an_independent_recomputation():
    """Grouped and depthwise Conv2d: each group of output rows is pruned on its own group's H (built here from
    F.unfold of the group's input channels), on the inputs of the already pruned earlier layers."""
    torch.manual_seed(4)
    x = torch.randn(30, 2, 6, 6)
    model, ref = _grouped_net(), _grouped_net()
    idx = (0, 2, 4, 7)
    modules = [(str(i), model[i]) for i in idx]
    exact = dict(refit_iters=60)  # back-solves run to convergence, so float noise of H stays in the noise
    out = prune_layerwise(model, modules, 0.5, forward=model, make_batches=lambda: _batches(x, 0, 30, 7),
                          solver_options=exact)
    dead = []
    for i in idx:
        layer = ref[i]
        with torch.no_grad():
            h = ref[:i](x)
        W_bar = weight_rows(layer, layer.weight.detach())
        g = layer.groups if isinstance(layer, nn.Conv2d) else 1
        if isinstance(layer, nn.Conv2d):
            cols = torch.nn.functional.unfold(h, layer.kernel_size, padding=layer.padding).transpose(1, 2)
            X = cols.reshape(-1, cols.shape[-1]).double()
        else:
            X = h.double()
        per_out = W_bar.shape[0] // g
        d = W_bar.shape[1]
        pruned = torch.empty_like(W_bar)
        for j in range(g):
            Xj = X[:, j * d:(j + 1) * d]
            H = Xj.T @ Xj / Xj.shape[0]
            rows = slice(j * per_out, (j + 1) * per_out)
            if float(H.diagonal().mean()) == 0:  # a dead group (its inputs are all zero): magnitude is optimal
                dead.append((i, j))
                pruned[rows] = W_bar[rows] * keep_mask(W_bar[rows].abs(), kept_count(d, 0.5), None, None)
                continue
            res = solve_rows(W_bar[rows], H, 0.01 * float(H.diagonal().mean()), k=kept_count(d, 0.5), **exact)
            pruned[rows] = res.W
        got = weight_rows(model[i], model[i].weight.detach())
        assert torch.equal(got != 0, pruned != 0), i
        torch.testing.assert_close(got, pruned, rtol=0, atol=1e-4 * float(pruned.abs().max()))
        with torch.no_grad():
            layer.weight.copy_(pruned.view_as(layer.weight))
    assert out.stages[0].objective <= out.stages[0].magnitude_objective
    assert (out.masks["4"].view(6, -1).sum(1) == kept_count(9, 0.5)).all()  # depthwise: 5 of 9 per channel
    assert dead == [(4, 2)]  # this seed has a depthwise channel whose input ReLU is always 0: that path is covered


def _prune_grouped(per_layer=False):
    torch.manual_seed(5)
    x = torch.randn(23, 2, 6, 6)
    model = _grouped_net(1)
    modules = [(str(i), model[i]) for i in (0, 2, 4, 7)]
    prune_layerwise(model, modules, 0.6, forward=model, row_chunk=2, per_layer=per_layer,
                    make_batches=lambda: my_microbatches(_batches(x, 0, 23, 4)))
    return [m.weight.detach().clone() for _, m in modules]


@pytest.mark.parametrize("per_layer", [False, True])
def test_grouped_conv_same_weights_on_any_world_size(per_layer):
    (base,) = multiproc.run(_prune_grouped, 1, per_layer)
    if per_layer:  # one budget per layer, across its groups
        for w in base:
            assert int((w != 0).sum()) == kept_count(w.numel(), 0.6)
    for world_size in (2, 3):
        for weights in multiproc.run(_prune_grouped, world_size, per_layer):
            assert all(torch.equal(w, b) for w, b in zip(weights, base, strict=True)), world_size


def _labels_loss(model, batch, indices):
    """Per-sample cross-entropy of the MLP's 3 outputs against the label (global index mod 3): OBD's loss."""
    return F.cross_entropy(model(batch), torch.as_tensor(indices) % 3, reduction="none")


def _prune_mlp(nm, per_layer=False, sparsity=0.6, method="chita"):
    torch.manual_seed(2)
    x = torch.randn(37, 12)
    model = _mlp(3)
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    out = prune_layerwise(model, modules, sparsity, forward=model, nm=nm, row_chunk=3,  # rows of a layer on every rank
                          per_layer=per_layer, make_batches=lambda: my_microbatches(_batches(x, 0, 37, 4)),
                          method=method, loss_fn=_labels_loss)
    return [m.weight.detach().clone() for _, m in modules], out.stages[0].objective


WORLD_CASES = [
    (None, False, 0.6, "chita"), ((2, 4), False, 0.6, "chita"), (None, True, 0.6, "chita"),
    (None, True, (0.3, 0.7, 0.5), "chita"), (None, False, 0.6, "wanda"), (None, True, (0.3, 0.7, 0.5), "wanda"),
    (None, True, 0.6, "sparsegpt"), (None, False, (0.3, 0.7, 0.5), "sparsegpt"), ((2, 4), False, 0.6, "sparsegpt"),
    (None, False, 0.6, "magnitude"), (None, True, (0.3, 0.7, 0.5), "magnitude"), ((2, 4), False, 0.6, "magnitude"),
    (None, False, 0.6, "obd"), (None, True, (0.3, 0.7, 0.5), "obd"), ((2, 4), False, 0.6, "obd")]


@pytest.mark.parametrize("nm,per_layer,sparsity,method", WORLD_CASES)
def test_same_masks_and_weights_on_any_world_size(nm, per_layer, sparsity, method):
    """Every registered method on 1, 2, 3 and 4 ranks: the same weights bit for bit (OBD's Fisher diagonal is
    summed in float64 in rank order; its masks agree unless two scores tie within that rounding, which these
    do not)."""
    (base, f1), = multiproc.run(_prune_mlp, 1, nm, per_layer, sparsity, method)
    for world_size in (2, 3, 4):
        results = multiproc.run(_prune_mlp, world_size, nm, per_layer, sparsity, method)
        for weights, f in results:
            if f1 is None:  # magnitude and OBD: no curvature, no objective
                assert f is None
            else:
                assert f == pytest.approx(f1, rel=1e-12)  # the objective's float64 sum over ranks is in another order
            for w, b in zip(weights, base, strict=True):
                assert torch.equal(w, b)  # the same micro-batches, H summed exactly, rows solved in the same chunks


def test_every_registered_method_is_checked_on_any_world_size():
    from dist_chita.methods.base import method_names

    assert {case[3] for case in WORLD_CASES} == set(method_names())


def test_rows_are_shared_in_whole_chunks():
    from dist_chita.layerwise.driver import _my_runs

    for parts in ([(0, 1)], [(0, 5)], [(0, 64)], [(0, 100)], [(0, 384)], [(0, 1536)],
                  [(0, 3), (3, 6), (6, 9)], [(j * 96, (j + 1) * 96) for j in range(8)], [(j, j + 1) for j in range(7)]):
        for world in (1, 2, 3, 4):
            runs = [_my_runs(parts, world, k, 64) for k in range(world)]
            flat = [run for rank_runs in runs for run in rank_runs]
            rows = [i for j, lo, hi in flat for i in range(lo, hi)]
            assert rows == list(range(parts[-1][1]))  # every row once, in order, ranks in order
            for j, lo, hi in flat:  # inside one part, starting at a chunk boundary of that part
                assert parts[j][0] <= lo < hi <= parts[j][1] and (lo - parts[j][0]) % 64 == 0
            chunks = [sum(-(-(hi - lo) // 64) for _, lo, hi in rank_runs) for rank_runs in runs]
            assert max(chunks) - min(chunks) <= 1  # balanced in chunks


def test_bad_input_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="sparsity"):
        prune_layerwise(model, [("0", model[0])], 1.0, forward=model, make_batches=list)
    with pytest.raises(ValueError, match="saw no calibration inputs"):
        prune_layerwise(model, [("0", model[0])], 0.5, forward=model, make_batches=list)
    conv = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"))
    never = pytest.fail  # refused before any forward pass
    with pytest.raises(ValueError, match=r"^1: objective layerwise supports Conv1d and Conv2d with zero padding only"):
        prune_layerwise(conv, [("0", conv[0]), ("1", conv[1])], 0.5, forward=never, make_batches=never)
    with pytest.raises(ValueError, match="'obd' needs the Fisher diagonal of the loss: give loss_fn"):
        prune_layerwise(model, [("0", model[0])], 0.5, forward=never, make_batches=never, method="obd")


def _labels_nll(model, batch, indices):
    """_labels_loss written with log_softmax (F.cross_entropy's decomposition makes a tensor on the default device
    under torch.device("meta"): torch's, not the pruner's)."""
    out = model(batch)
    labels = torch.as_tensor(indices, device=out.device) % 3
    return -torch.log_softmax(out, -1).gather(1, labels[:, None]).squeeze(1)


def _prune_mlp_plain_and_on_meta(nm, per_layer, sparsity, method):
    """The same prune twice: plainly, and with torch's default device set to "meta" while the model and the data
    stay on the CPU (built before)."""
    import contextlib

    out = []
    for default in (None, "meta"):
        torch.manual_seed(2)
        x = torch.randn(37, 12)
        model = _mlp(3)
        modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
        with torch.device(default) if default else contextlib.nullcontext():
            res = prune_layerwise(model, modules, sparsity, forward=model, nm=nm, row_chunk=3, per_layer=per_layer,
                                  make_batches=lambda x=x: my_microbatches(_batches(x, 0, 37, 4)),
                                  method=method, loss_fn=_labels_nll)
        out.append(([m.weight.detach().clone() for _, m in modules], res.stages[0].objective))
    return out


@pytest.mark.parametrize("method,nm", [("chita", None), ("chita", (2, 4)), ("sparsegpt", None),
                                       ("sparsegpt", (2, 4)), ("wanda", None), ("magnitude", None), ("obd", None)])
def test_every_tensor_is_made_on_the_models_device(method, nm):
    """GPU readiness, proved on the CPU (2 ranks: rows and layers shared): with the default device "meta", a tensor
    the layerwise driver or a method made without naming its device would be a meta tensor and fail; the weights
    must be the same bit for bit."""
    for (plain, f0), (meta, f1) in multiproc.run(_prune_mlp_plain_and_on_meta, 2, nm, False, 0.6, method):
        assert f0 == f1
        for w0, w1 in zip(plain, meta, strict=True):
            assert w1.device == torch.device("cpu") and torch.equal(w0, w1)
