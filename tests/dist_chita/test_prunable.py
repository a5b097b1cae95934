import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ResNetConfig,
    ResNetForImageClassification,
)
from transformers.pytorch_utils import Conv1D

from dist_chita.distributed.layout import ColumnLayout
from dist_chita.prunable import layer_targets, named_shapes, prunable_modules


def names(mods):
    return [n for n, _ in mods]


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.conv1 = nn.Conv1d(2, 2, 1)
        self.norm = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 4)
        self.gpt = Conv1D(4, 4)
        self.fc2 = nn.Linear(4, 3)


def test_plain_model_excludes_only_last_linear():
    m = Plain()
    assert names(prunable_modules(m)) == ["conv", "conv1", "fc1", "gpt"]
    assert names(prunable_modules(m, exclude_head=False)) == ["conv", "conv1", "fc1", "gpt", "fc2"]


def test_patterns_and_unmatched_pattern():
    m = Plain()
    assert names(prunable_modules(m, include=["fc*", "gpt"])) == ["fc1", "gpt"]
    assert names(prunable_modules(m, exclude=["conv*"])) == ["fc1", "gpt"]
    with pytest.raises(ValueError, match="'nothing.*'"):
        prunable_modules(m, include=["nothing.*"])
    with pytest.raises(ValueError, match="'fc2'"):  # the head is not a candidate
        prunable_modules(m, exclude=["fc2"])
    with pytest.raises(ValueError, match="no prunable layer selected"):
        prunable_modules(m, exclude=["*"])


def test_layer_targets_first_matching_pattern_wins():
    names = ["enc.0.attn.q", "enc.0.ffn.up", "enc.1.attn.q", "head"]
    rules = [("enc.0.*", 0.2), ("*.attn.*", 0.6)]
    assert layer_targets(names, 0.5, rules) == [0.2, 0.2, 0.6, 0.5]
    assert layer_targets(names, 0.5, []) == [0.5] * 4
    with pytest.raises(ValueError, match=r"pattern 'dec\.\*' matches no prunable layer \(of 4 layers\)"):
        layer_targets(names, 0.5, [("dec.*", 0.1)])


def test_tied_weights_listed_once_and_embedding_tie_excluded():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.dec = nn.Linear(4, 10)
            self.dec.weight = self.emb.weight
            self.last = nn.Linear(10, 2)

    mods = prunable_modules(Tied(), exclude_head=False)
    assert names(mods) == ["a", "last"]
    assert len({id(m.weight) for _, m in mods}) == len(mods)


def test_multihead_attention_out_proj_excluded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

    assert names(prunable_modules(M())) == ["fc"]


def test_gpt2_conv1d_and_tied_lm_head():
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cfg)
    mods = prunable_modules(m)
    assert names(mods) == [
        f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert all(isinstance(mod, Conv1D) for _, mod in mods)
    # lm_head is tied to the input embedding: excluded even when the head is kept
    assert "lm_head" not in names(prunable_modules(m, exclude_head=False))
    assert names(prunable_modules(m, include=["*.mlp.*"], exclude=["*.h.1.*"])) == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]


def test_bert_classifier_excluded_pooler_kept():
    cfg = BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    m = BertForSequenceClassification(cfg)
    got = names(prunable_modules(m))
    assert "classifier" not in got and "bert.pooler.dense" in got
    assert got[0] == "bert.encoder.layer.0.attention.self.query" and len(got) == 7
    assert "classifier" in names(prunable_modules(m, exclude_head=False))


def test_resnet_classifier_excluded_and_layout():
    cfg = ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, num_labels=3)
    m = ResNetForImageClassification(cfg)
    mods = prunable_modules(m)
    assert all(isinstance(mod, nn.Conv2d) for _, mod in mods)
    assert "classifier.1" not in names(mods) and len(mods) == 8
    shapes = named_shapes(mods)
    layout = ColumnLayout.build(shapes, 3)
    assert layout.p == sum(mod.weight.numel() for _, mod in mods)
    assert shapes[0] == (mods[0][0], tuple(mods[0][1].weight.shape))
    assert torch.is_tensor(mods[0][1].weight)
