"""dist_chita/evaluate.py: metrics against hand-computed values, stride windows, 1 vs 2 ranks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_chita import evaluate
from dist_chita.io.data import Samples
from tests.multiproc import run


def test_accuracy_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [0.0, 1.0, 0.5]])
    assert evaluate.accuracy(logits, torch.tensor([0, 1, 1, 2])) == 0.5
    assert evaluate.accuracy(logits, torch.tensor([0, 1, 2, 1])) == 1.0
    with pytest.raises(ValueError, match="labels"):
        evaluate.accuracy(logits, torch.tensor([0]))


def test_embedding_fidelity_by_hand():
    dense = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    # pruned: rows 0, 1 unchanged (cos 1); row 2 rotated to [1, 1]/sqrt2 (cos = 1/sqrt2); row 3 scaled (cos 1)
    pruned = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 1.0], [0.2, 1.8]])
    out = evaluate.embedding_fidelity(dense, pruned)
    assert out["cosine"] == pytest.approx((3 + 1 / math.sqrt(2)) / 4, abs=1e-6)
    # dense neighbours: 0<->1, 2<->3; pruned neighbours by brute force over all pairs
    z = torch.nn.functional.normalize(pruned, dim=1)
    sim = z @ z.T - 10 * torch.eye(4)
    nn_pruned = sim.argmax(1)
    expected = float((nn_pruned == torch.tensor([1, 0, 3, 2])).float().mean())
    assert out["nn_agreement"] == expected
    same = evaluate.embedding_fidelity(dense, 3 * dense)
    assert same == {"cosine": pytest.approx(1.0), "nn_agreement": 1.0}
    with pytest.raises(ValueError, match="N >= 2"):
        evaluate.embedding_fidelity(dense[:1], dense[:1])


def test_nn_agreement_counts_changed_neighbours():
    dense = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])
    # dense: cos(0,1)=0.8, cos(2,3)=0.8, cos(1,3)=0.36, others 0 -> neighbours 1, 0, 3, 2
    pruned = dense.clone()
    pruned[2] = torch.tensor([1.0, 0.0, 0.01])  # row 2 moves next to row 0: neighbours become 2, 0, 0, 1
    assert evaluate.nearest_neighbours(dense).tolist() == [1, 0, 3, 2]
    assert evaluate.nearest_neighbours(pruned).tolist() == [2, 0, 0, 1]
    assert evaluate.embedding_fidelity(dense, pruned)["nn_agreement"] == 0.25


@pytest.mark.parametrize(
    ("T", "L", "S"), [(10, 4, 2), (10, 4, 3), (11, 5, 3), (3, 8, 7), (20, 6, 1), (2, 2, 1), (7, 3, 2)]
)
def test_stride_windows_score_every_token_once(T, L, S):
    windows = evaluate.stride_windows(T, L, S)
    scored = [t for _, e, f in windows for t in range(f, e)]
    assert scored == list(range(1, T))
    for b, e, f in windows:
        assert 0 <= b < f < e <= T and e - b <= L
        assert f - b >= min(L - S, f)  # context before each scored run
        assert e - f <= S
    with pytest.raises(ValueError):
        evaluate.stride_windows(T, L, L)


class Bigram(nn.Module):
    """A 'causal LM' whose logits at position j are log P[token_j -> .]: context beyond one token is unused."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = logp

    def forward(self, input_ids):
        return self.logp[input_ids]


def _bigram():
    torch.manual_seed(0)
    return torch.log_softmax(torch.randn(5, 5), dim=1)


def test_perplexity_by_hand():
    logp = _bigram()
    tokens = torch.tensor([0, 3, 1, 1, 4, 2, 0, 0, 3, 2, 4])
    nll = -sum(float(logp[a, b]) for a, b in zip(tokens[:-1].tolist(), tokens[1:].tolist(), strict=True)) / 10
    for L, S in [(4, 2), (11, 10), (3, 1), (5, 4), (2, 1)]:
        out = evaluate.perplexity(Bigram(logp), tokens, L, S)
        assert out["tokens"] == 10
        assert out["nll"] == pytest.approx(nll, rel=1e-6)
        assert out["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)
    uniform = Bigram(torch.zeros(5, 5))
    assert evaluate.perplexity(uniform, tokens, 4)["perplexity"] == pytest.approx(5.0)


class Linear2(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(12.0).reshape(4, 3).sin())

    def forward(self, x):
        return self.fc(x)


def _samples(n=11):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    return Samples({"pixel_values": x, "labels": torch.randint(0, 4, (n,), generator=g)}, torch.arange(n))


def _distributed_metrics():
    torch.set_num_threads(1)
    model, s = Linear2(), _samples()
    logp = _bigram()
    tokens = torch.tensor([0, 3, 1, 1, 4, 2, 0, 0, 3, 2, 4, 1, 1, 0])
    out = evaluate.collect_outputs(model, "image-classification", s, batch_size=2)
    return (out, evaluate.evaluate_accuracy(model, "image-classification", s, batch_size=3),
            evaluate.perplexity(Bigram(logp), tokens, 4, 2),
            evaluate.evaluate(model, "embedding", "embedding_fidelity", samples=s, reference=out, batch_size=4))


def test_model_runners_match_by_hand_and_across_ranks():
    model, s = Linear2(), _samples()
    with torch.no_grad():
        logits = model(s.fields["pixel_values"])
    single = _distributed_metrics()
    torch.testing.assert_close(single[0], logits)
    assert single[1] == evaluate.accuracy(logits, s.fields["labels"])
    # torch models' "embedding" output is L2-normalised: same direction as the logits -> cosine 1
    assert single[3] == {"cosine": pytest.approx(1.0), "nn_agreement": 1.0}
    for rank_result in run(_distributed_metrics, 2):
        torch.testing.assert_close(rank_result[0], single[0])
        assert rank_result[1] == single[1]
        assert rank_result[2] == pytest.approx(single[2])
        assert rank_result[3] == pytest.approx(single[3])


class _BagOfTokens(torch.nn.Module):
    """Sum of token embeddings; padding (id 0) embeds to zero, so a sample's output does not depend on its batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 4, padding_idx=0)

    def forward(self, input_ids):
        return self.emb(input_ids).sum(1)


def _text_samples():
    lengths = [3, 9, 1, 5, 9, 2, 7, 4, 6, 2, 8]
    ids = torch.zeros(len(lengths), 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) * (i + 1) % 49 + 1
    return Samples({"input_ids": ids, "attention_mask": (ids != 0).long()}, torch.arange(len(lengths)),
                   trim_padding=True)


def _text_outputs():
    torch.set_num_threads(1)
    return evaluate.collect_outputs(_BagOfTokens(), "image-classification", _text_samples(), batch_size=3)


def test_outputs_come_back_in_sample_order_from_length_sorted_batches():
    """Evaluation batches hold samples of about one length (longest first), and the outputs still come back in
    sample order, on 1 and 2 ranks."""
    s = _text_samples()
    with torch.no_grad():
        expected = _BagOfTokens()(s.fields["input_ids"])
    torch.testing.assert_close(_text_outputs(), expected)
    for out in run(_text_outputs, 2):
        torch.testing.assert_close(out, expected)


def test_evaluate_dispatch_errors():
    model, s = Linear2(), _samples()
    assert evaluate.evaluate(model, "image-classification", "none") == {}
    assert set(evaluate.evaluate(model, "image-classification", "accuracy", samples=s)) == {"accuracy"}
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        evaluate.evaluate(model, "image-classification", "f1", samples=s)
    with pytest.raises(ValueError, match="reference"):
        evaluate.evaluate(model, "embedding", "embedding_fidelity", samples=s)
    unlabelled = Samples({"pixel_values": s.fields["pixel_values"]}, s.rows)
    with pytest.raises(ValueError, match="labelled"):
        evaluate.evaluate_accuracy(model, "image-classification", unlabelled, 4)
