import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from dist_chita.fisher.losses import (
    causal_lm,
    cross_entropy,
    gauss_newton_probe,
    lm_labels,
    mean_pooled,
    sample_generator,
    sampled_fisher,
)
from dist_chita.fisher.persample import PerSampleGrads


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).eval()


class TokenLM(nn.Module):
    """Position-wise toy LM: logits[b, t] depends on input_ids[b, t] only (so padding cannot leak)."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.tanh(self.emb(input_ids)))


def test_cross_entropy_matches_per_sample_reference():
    model = tiny_classifier()
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    got = cross_entropy()(model, {"x": x, "labels": y}, torch.arange(6))
    want = torch.stack([F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="per-sample losses"):
        cross_entropy()(model, {"x": x, "labels": y}, torch.arange(5))


def test_causal_lm_ignores_masked_tokens_and_shifts():
    torch.manual_seed(1)
    model = TokenLM()
    ids = torch.randint(0, 7, (3, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    labels = ids.clone()
    labels[0, 2] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    got = causal_lm()(model, batch, torch.arange(3))
    logits = model(ids)
    for i in range(3):
        terms = [
            F.cross_entropy(logits[i, t], labels[i, t + 1])
            for t in range(5)
            if mask[i, t + 1] and labels[i, t + 1] != -100
        ]
        torch.testing.assert_close(got[i], torch.stack(terms).mean())
    # changing padded tokens changes nothing
    ids2 = ids.masked_fill(mask == 0, 3)
    again = causal_lm()(
        model, {"input_ids": ids2, "attention_mask": mask, "labels": labels.masked_fill(mask == 0, 5)}, torch.arange(3)
    )
    torch.testing.assert_close(again, got)
    # without labels: input_ids with attention_mask
    no_labels = causal_lm()(model, {"input_ids": ids, "attention_mask": mask}, torch.arange(3))
    assert torch.equal(lm_labels({"input_ids": ids, "attention_mask": mask})[1, 3:], torch.full((3,), -100))
    torch.testing.assert_close(no_labels[1:], got[1:])
    assert not torch.allclose(no_labels[0], got[0])  # labels[0, 2] = -100 was honoured above


def test_sampled_fisher_deterministic_across_batchings():
    model = tiny_classifier()
    x = torch.randn(7, 3)
    loss = sampled_fisher(seed=11)
    whole = loss(model, {"x": x}, torch.arange(7))
    parts = torch.cat([loss(model, {"x": x[a:b]}, torch.arange(a, b)) for a, b in [(0, 2), (2, 3), (3, 7)]])
    torch.testing.assert_close(parts, whole)
    other_seed = sampled_fisher(seed=12)(model, {"x": x}, torch.arange(7))
    assert not torch.equal(other_seed, whole)


def test_sampled_fisher_labels_follow_model_distribution():
    model = tiny_classifier()
    n = 6000
    x = torch.randn(1, 3).expand(n, 3)
    logits = model(x[:1])
    logp = logits.log_softmax(-1)[0]
    losses = sampled_fisher(seed=3)(model, {"x": x}, torch.arange(n))
    # loss = -log p(y) identifies the drawn class
    drawn = (losses[:, None] + logp[None, :]).abs().argmin(1)
    freq = torch.bincount(drawn, minlength=4).float() / n
    torch.testing.assert_close(freq, logp.exp().detach(), atol=0.025, rtol=0)


def test_sampled_fisher_causal_padding_invariant():
    torch.manual_seed(2)
    model = TokenLM()
    ids = torch.randint(0, 7, (2, 5))
    loss = sampled_fisher(seed=5, causal=True)
    a = loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.tensor([4, 9]))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 3, dtype=torch.long)], 1)
    b = loss(model, {"input_ids": padded, "attention_mask": mask}, torch.tensor([4, 9]))
    torch.testing.assert_close(a, b)


def test_probe_gradients_are_jacobian_transpose_times_v_and_covariance_is_gauss_newton():
    model = tiny_classifier(4)
    x0 = torch.randn(3)
    n, seed = 20000, 7

    def f(params):
        return functional_call(model, params, (x0[None],))[0]

    weights = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    jac = jacrev(lambda p: f({**dict(model.named_parameters()), **p}))({k: v.detach() for k, v in weights.items()})
    J = torch.cat([jac[k].reshape(4, -1) for k in weights], 1)  # (d_out, p)

    modules = [("0", model[0]), ("2", model[2])]
    rows = {}
    with PerSampleGrads(modules, lambda i, g: rows.__setitem__(i, g.clone())) as psg:
        psg.backward(
            gauss_newton_probe(seed, forward=lambda m, b: m(b["x"]))(model, {"x": x0.expand(n, 3)}, torch.arange(n))
        )
    G = torch.cat([rows[0], rows[1]], 1)  # (n, p)
    V = torch.stack([torch.randn(4, generator=sample_generator(seed, i)) for i in range(5)])
    torch.testing.assert_close(G[:5], V @ J, rtol=1e-5, atol=1e-6)
    C, GN = G.T @ G / n, J.T @ J
    assert ((C - GN).norm() / GN.norm()).item() < 0.05
    # not trivially true: the Fisher of a different sample is far
    assert ((C - 0.5 * GN).norm() / GN.norm()).item() > 0.3


def test_probe_determinism_and_mean_pooling():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=16, vocab_size=30)
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    ids = torch.randint(1, 30, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    loss = gauss_newton_probe(seed=1)
    whole = loss(model, {"input_ids": ids, "attention_mask": mask}, torch.tensor([10, 11, 12]))
    single = torch.cat(
        [
            loss(
                model,
                {"input_ids": ids[i : i + 1, : mask[i].sum()], "attention_mask": mask[i : i + 1, : mask[i].sum()]},
                torch.tensor([10 + i]),
            )
            for i in range(3)
        ]
    )
    torch.testing.assert_close(single, whole, rtol=1e-4, atol=1e-5)
    emb = mean_pooled(model, {"input_ids": ids, "attention_mask": mask})
    assert emb.shape == (3, 8)


def test_cross_entropy_refuses_missing_labels_and_labels_the_model_cannot_output():
    """A label beyond the model's outputs was an IndexError traceback from inside the loss, and samples without
    labels a KeyError."""
    from torch import nn

    from dist_chita.fisher.losses import cross_entropy

    model, loss = nn.Linear(3, 4), cross_entropy()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 4\) for a model of 4 outputs; the calibration "
                                         r"labels run 1\.\.14$"):
        loss(model, {"x": x, "labels": torch.tensor([1, 14])}, torch.arange(2))
    with pytest.raises(ValueError, match="^labels must lie in"):
        loss(model, {"x": x, "labels": torch.tensor([-1, 0])}, torch.arange(2))
    with pytest.raises(ValueError, match="^the loss ce needs labels"):
        loss(model, {"x": x}, torch.arange(2))
    ok = loss(model, {"x": x, "labels": torch.tensor([0, 3])}, torch.arange(2))
    torch.testing.assert_close(ok, nn.functional.cross_entropy(model(x), torch.tensor([0, 3]), reduction="none"))
