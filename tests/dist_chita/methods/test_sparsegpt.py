"""SparseGPT on one layer against a direct sequential OBS written with explicit inverses (no Cholesky factor)."""

import pytest
import torch

from dist_chita.layerwise.row_solver import keep_mask, objectives
from dist_chita.methods.sparsegpt import sparsegpt_rows
from dist_chita.sparsity import kept_count


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
