"""SparseGPT on one layer against a direct sequential OBS written with explicit inverses (no Cholesky factor)."""

import pytest
import torch
from torch import nn

from dist_chita.layerwise.driver import _part_shapes, prune_layerwise
from dist_chita.layerwise.row_solver import keep_mask, objectives
from dist_chita.methods.base import LayerProblem
from dist_chita.methods.sparsegpt import SparseGPT, sparsegpt_owners, sparsegpt_rows
from dist_chita.sparsity import kept_count
from tests.fixtures.layerwise_nets import batches as _batches
from tests.fixtures.layerwise_nets import mlp as _mlp


def _layer(seed, r=6, d=10, N=40):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    X[:, 3] = 0.0  # an input that is never active
    return torch.randn(r, d, generator=g, dtype=torch.float64), X.T @ X / N


def direct_obs(W, H, sparsity, block, damp=0.01, nm=None, per_row=False):
    """Columns left to right; column j's pruning error is spread over columns j.. through row 0 of
    (H_{j:, j:})^-1, the inverse of the damped curvature of the columns not yet processed, divided by its [0, 0]
    (OBS); the mask of each block is chosen at its start from w^2 / [(H_{j:, j:})^-1]_00 (over all rows; per row:
    each row prunes round(P e / d) - round(P a / d) of block [a, e), P = d - kept_count(d, sparsity)), or for N:M
    at every M-th column from the current weights."""
    W, H = W.clone(), H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    d = W.shape[1]
    inv0 = [torch.linalg.inv(H[j:, j:]) for j in range(d)]  # the j-th: columns j.. not yet processed
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for j in range(d):
        if nm is None and j % block == 0:
            b = min(j + block, d)
            score = torch.stack([W[:, c].pow(2) / inv0[c][0, 0] for c in range(j, b)], 1)
            if per_row:
                P = d - kept_count(d, sparsity)
                cut = round(P * b / d + 1e-9) - round(P * j / d + 1e-9)
                for row in range(W.shape[0]):
                    pruned[row, j + torch.argsort(score[row], stable=True)[:cut]] = True
            else:
                cut = int(score.numel() * sparsity)
                flat = torch.zeros(score.numel(), dtype=torch.bool)
                flat[torch.argsort(score.reshape(-1), stable=True)[:cut]] = True
                pruned[:, j:b] = flat.view(score.shape)
        if nm is not None and j % nm[1] == 0:
            score = torch.stack([W[:, c].pow(2) / inv0[c][0, 0] for c in range(j, j + nm[1])], 1)
            drop = torch.argsort(score, dim=1, stable=True)[:, : nm[1] - nm[0]]
            pruned[:, j:j + nm[1]].scatter_(1, drop, True)
        Hinv = inv0[j]
        q = torch.where(pruned[:, j], torch.zeros_like(W[:, j]), W[:, j])
        W[:, j:] -= ((W[:, j] - q) / Hinv[0, 0])[:, None] * Hinv[0][None, :]
        W[:, j] = q
    return W


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity,block,nm", [(0.5, 4, None), (0.7, 10, None), (0.3, 3, None), (0.0, 4, (2, 5))])
def test_matches_the_direct_obs_sequence(seed, sparsity, block, nm):
    W, H = _layer(seed)
    got = sparsegpt_rows(W, H, sparsity, block=block, nm=nm)
    want = direct_obs(W, H, sparsity, block, nm=nm)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    if nm is None:
        for a in range(0, W.shape[1], block):  # every block loses its share, over all rows (the dead input more)
            part = got[:, a:a + block]
            zeros, share = int((part == 0).sum()), int(part.numel() * sparsity)
            assert zeros == max(share, W.shape[0]) if a <= 3 < a + block else zeros == share
    else:
        assert bool(((got.view(-1, 5) != 0).sum(1) <= 2).all())
    assert bool((got[:, 3] == 0).all())  # the dead input is pruned


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sparsity,block,d", [(0.5, 4, 10), (0.3, 4, 10), (0.7, 3, 11), (0.45, 32, 10)])
def test_per_row_masks_match_the_direct_obs_and_keep_each_rows_count(seed, sparsity, block, d):
    W, H = _layer(seed, d=d)
    got = sparsegpt_rows(W, H, sparsity, block=block, per_row=True)
    torch.testing.assert_close(got, direct_obs(W, H, sparsity, block, per_row=True), rtol=1e-9, atol=1e-10)
    # every row keeps kept_count(d, sparsity), the dead input among its pruned ones when the first blocks allow
    kept = (got != 0).sum(1)
    assert bool((kept <= kept_count(d, sparsity)).all()) and int(kept.max()) == kept_count(d, sparsity)


def test_the_update_lowers_the_reconstruction_error_of_its_mask():
    W, H = _layer(7, r=20, d=64, N=200)
    got = sparsegpt_rows(W, H, 0.5)
    mask = got != 0
    Q = H + 0.01 * H.diagonal().mean() * torch.eye(64, dtype=H.dtype)
    f = float(objectives(got - W, Q).sum())
    assert f < float(objectives(W * mask - W, Q).sum())  # the OBS updates re-fit the kept weights
    assert f < float(objectives(W * keep_mask(W.abs(), 32, None, None) - W, Q).sum())  # and beat magnitude


def test_fixed_zeros_stay_zero_and_bad_input_is_refused():
    W, H = _layer(3)
    allowed = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    for nm in (None, (2, 5)):
        got = sparsegpt_rows(W * allowed, H, 0.5, allowed=allowed, block=5, nm=nm)
        assert bool((got[~allowed] == 0).all())
    assert sparsegpt_rows(W.float(), H, 0.5).dtype == torch.float32
    # a transposed view (transformers' Conv1D stores its rows as columns): the same result
    Wt = W.T.contiguous().T
    assert not Wt.is_contiguous() and torch.equal(sparsegpt_rows(Wt, H, 0.5), sparsegpt_rows(W, H, 0.5))
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt_rows(W, H, 1.0)
    with pytest.raises(ValueError, match="damp"):
        sparsegpt_rows(W, H, 0.5, damp=0.0)


@pytest.mark.parametrize("per_layer,nm", [(True, None), (False, None), (False, (2, 4))])
def test_through_the_driver_matches_an_independent_recomputation(per_layer, nm):
    """SparseGPT through prune_layerwise, and the same recomputed here: layer l's inputs X from the model with
    layers < l already pruned; sparsegpt_rows on X^T X (tested against the direct OBS above). The report's objective
    is the reconstruction objective of the result."""
    torch.manual_seed(1)
    x = torch.randn(40, 12)
    model, ref = _mlp(), _mlp()
    modules = [("0", model[0]), ("2", model[2]), ("4", model[4])]
    out = prune_layerwise(model, modules, 0.5, forward=model, make_batches=lambda: _batches(x, 0, 40),
                          per_layer=per_layer, nm=nm, method="sparsegpt")
    h, f = x, 0.0
    for i in (0, 2, 4):
        W_bar = ref[i].weight.detach()
        r, d = W_bar.shape
        H = (h.double().T @ h.double()) / h.shape[0]
        W = sparsegpt_rows(W_bar, H, 0.5, nm=nm, per_row=not per_layer)
        torch.testing.assert_close(model[i].weight.detach(), W, rtol=1e-5, atol=1e-6)
        Q = H + 0.01 * float(H.diagonal().mean()) * torch.eye(d, dtype=H.dtype)
        f += float(objectives((model[i].weight.detach() - W_bar).double(), Q).sum())
        with torch.no_grad():
            ref[i].weight.copy_(model[i].weight)
            h = ref[: i + 2](x) if i < 4 else h
    st = out.stages[0]
    assert st.objective == pytest.approx(f, rel=1e-5) and st.magnitude_objective is None
    assert st.iterations == 0 and st.objective_trace == [st.objective]


def test_the_method_prunes_the_parts_it_is_given():
    """SparseGPT.prune on a layer of two parts (a grouped conv's groups, each on its own H) given only part 1:
    sparsegpt_rows of that part on its H, zeros elsewhere; its objective is that part's f."""
    W0, H0 = _layer(1, r=4)
    W1, H1 = _layer(2, r=4)
    W_bar = torch.cat([W0, W1]).float()
    H = torch.stack([H0, H1])
    lams = tuple(0.01 * float(h.diagonal().mean()) for h in H)
    layer = LayerProblem(W_bar=W_bar, sparsity=0.5, per_layer=True, parts=((0, 4), (4, 8)), runs=((1, 4, 8),), H=H,
                         lams=lams)
    got = SparseGPT().prune(layer)
    expected = sparsegpt_rows(W_bar[4:], H1, 0.5)
    assert torch.equal(got.W[:4], torch.zeros(4, 10)) and torch.equal(got.W[4:], expected)
    Q = H1 + lams[1] * torch.eye(10, dtype=H1.dtype)
    assert got.objective == pytest.approx(float(objectives((expected - W_bar[4:]).double(), Q).sum()), rel=1e-6)


def test_sparsegpt_owners_balance_the_block_by_cost():
    """A transformer block's six layers (d (r + d): four 384 x 384, one 1536 x 384, one 384 x 1536) on 2 ranks: the
    largest alone on one rank, the rest on the other; 3 ranks; a grouped conv's parts spread; the same owners
    whatever the order of the calls (a pure function). The shapes are those the driver gives the method."""
    mods = [(n, nn.Linear(a, b, bias=False)) for n, a, b in [("q", 384, 384), ("k", 384, 384), ("v", 384, 384),
                                                             ("o", 384, 384), ("up", 384, 1536), ("down", 1536, 384)]]
    block = _part_shapes(mods, range(6))  # (layer, part) -> (rows, inputs)
    assert sparsegpt_owners(block, 2) == {(5, 0): 0, (4, 0): 1, (0, 0): 1, (1, 0): 1, (2, 0): 1, (3, 0): 1}
    three = sparsegpt_owners(block, 3)
    assert three[(5, 0)] == 0 and three[(4, 0)] == 1 and sorted(three.values()) == [0, 1, 1, 2, 2, 2]
    assert set(sparsegpt_owners(block, 1).values()) == {0}
    conv = [("c", nn.Conv2d(8, 8, 3, groups=4, bias=False))]  # 4 parts of 2 rows, equal cost
    assert sparsegpt_owners(_part_shapes(conv, [0]), 2) == {(0, 0): 0, (0, 1): 1, (0, 2): 0, (0, 3): 1}
    assert SparseGPT().owners(block, 3) == three and block[(4, 0)] == (1536, 384)


def test_a_layer_budget_over_the_groups_of_a_depthwise_convolution_is_kept_exactly():
    """Each group of a depthwise conv (9 weights) rounded its own half down: 40 of 72 kept at 0.5 instead of 36.
    The layer's count is now shared out among its groups, as chita keeps it."""
    import dist_chita
    from dist_chita.options import Target
    from dist_chita.sparsity import kept_count

    for sparsity in (0.5, 0.7):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 6 * 6, 3)).eval()
        dist_chita.prune(model, {"pixel_values": torch.randn(16, 8, 6, 6), "labels": torch.randint(0, 3, (16,))},
                         method="sparsegpt", objective=dist_chita.Layerwise(), task="image-classification",
                         target=Target(sparsity=sparsity, granularity="layer"), check_memory=False,
                         log=lambda *a: None)
        kept = (model[0].weight != 0).view(8, 9).sum(1)
        assert int(kept.sum()) == kept_count(72, sparsity) and int(kept.max() - kept.min()) <= 1, kept.tolist()
