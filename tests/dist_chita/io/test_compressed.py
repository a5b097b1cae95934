"""Sparse checkpoints (dist_chita/io/compressed.py): the bits against a plain encoder written here, and pruned models
saved in the compressed-tensors format reloaded through transformers with exactly the dense output's weights."""

import json
import os

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import dist_chita
from dist_chita.io import compressed
from dist_chita.io.models import LoadedModel, load_hf_model, save_model


def plain_bitmask(w: torch.Tensor) -> dict:
    """The sparse-bitmask parts of a 2-D weight, spelled out with loops (bit j of byte b is column 8 b + j)."""
    rows, cols = w.shape
    values, offsets, packed = [], [], []
    for i in range(rows):
        offsets.append(len(values))
        row_bytes = [0] * ((cols + 7) // 8)
        for j in range(cols):
            if w[i, j] != 0:
                values.append(float(w[i, j]))
                row_bytes[j // 8] |= 1 << (j % 8)
        packed.append(row_bytes)
    return {"shape": [rows, cols], "compressed": values, "bitmask": packed, "row_offsets": offsets}


def sparse_weight(rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return w * (torch.rand(rows, cols, generator=g) < density)


@pytest.mark.parametrize("shape", [(5, 13), (3, 8), (1, 1), (4, 17)])
def test_bitmask_parts_match_a_plain_encoder(shape):
    w = sparse_weight(*shape, 0.4, seed=sum(shape))
    parts = compressed.compress_weight(w, compressed.BITMASK)
    want = plain_bitmask(w)
    assert parts["shape"].tolist() == want["shape"] and parts["shape"].dtype == torch.int64
    assert parts["compressed"].tolist() == want["compressed"] and parts["compressed"].dtype == w.dtype
    assert parts["bitmask"].tolist() == want["bitmask"] and parts["bitmask"].dtype == torch.uint8
    assert parts["row_offsets"].tolist() == want["row_offsets"] and parts["row_offsets"].dtype == torch.int64
    assert torch.equal(compressed.decompress_weight(parts), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_24_parts_keep_two_of_every_four_in_column_order(dtype):
    """Groups with 2, 1 and 0 non-zeros: two positions each (non-zeros first, then the lowest zeros), the values in
    column order, shape stored as a (2, 1) column."""
    w = torch.tensor([[1.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 3.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 5.0, 0.0]], dtype=dtype)
    parts = compressed.compress_weight(w, compressed.SPARSE24)
    assert parts["shape"].tolist() == [[2], [8]]
    assert parts["compressed"].tolist() == [[1.0, -2.0, 0.0, 3.0], [0.0, 0.0, 4.0, 5.0]]
    kept = [[0, 2, 4, 7], [0, 1, 5, 6]]  # column positions of the stored values
    assert parts["bitmask"].tolist() == [[sum(1 << j for j in row)] for row in kept]
    assert torch.equal(compressed.decompress_weight(parts), w)
    with pytest.raises(ValueError, match="not 2:4"):
        compressed.compress_weight(torch.ones(2, 8), compressed.SPARSE24)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def prune_and_save(model, task, tmp_path, target, calibration, method="chita"):
    """Prune ``model`` with dist_chita.prune, save it dense and as compressed-tensors; (report, dense, sparse)."""
    rep = dist_chita.prune(model, calibration, target=target, method=method, task=task, check_memory=False)
    loaded = LoadedModel(model, task, "hf", "test")
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    save_model(loaded, dense)
    save_model(loaded, sparse)
    done = compressed.compress_checkpoint(sparse, model, [r.name for r in rep.layers], target.nm_pair,
                                          rep.global_.sparsity)
    return rep, done, dense, sparse


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_pruned_llama_reloads_through_transformers_with_the_dense_weights(tmp_path, nm):
    model = tiny_llama()
    ids = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(1))
    target = dist_chita.Target(sparsity=0.5, nm=nm)
    rep, done, dense, sparse = prune_and_save(model, "causal-lm", tmp_path, target, {"input_ids": ids})
    assert done.format == ("sparse-24-bitmask" if nm else "sparse-bitmask")
    assert sorted(done.compressed) == sorted(r.name for r in rep.layers) and len(done.compressed) == 14
    cfg = json.loads((sparse / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    sc = cfg["sparsity_config"]
    assert (sc["format"], sc["sparsity_structure"], sc["targets"], sc["ignore"]) == (
        done.format, "2:4" if nm else "unstructured", ["Linear"], ["lm_head"])
    assert sc["global_sparsity"] == pytest.approx(0.5)
    files = load_file(str(sparse / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight" not in files and "model.layers.0.mlp.up_proj.bitmask" in files
    a = load_hf_model(str(dense), "causal-lm").model
    b = load_hf_model(str(sparse), "causal-lm").model  # recognised and decompressed
    assert_same_weights(a, b)
    assert_same_weights(a, model)
    assert_sizes(rep, done, dense, sparse, nm)


def assert_sizes(rep, done, dense, sparse, nm):
    """Payload: each pruned float32 weight (R, C) becomes its kept values (4 bytes each; 2:4 stores C/2 per row), a
    bitmask of R ceil(C/8) bytes, its shape (two int64) and, unstructured, R int64 row offsets."""
    def payload(path):
        return sum(t.numel() * t.element_size() for t in load_file(str(path / "model.safetensors")).values())

    change = sum(4 * (r.size // 2 if nm else r.kept) + r.shape[0] * -(-r.shape[1] // 8) + 16
                 + (0 if nm else 8 * r.shape[0]) - 4 * r.size for r in rep.layers)
    assert payload(sparse) == payload(dense) + change
    assert done.dense_bytes == compressed.weights_bytes(dense) and done.bytes == compressed.weights_bytes(sparse)
    assert done.bytes < done.dense_bytes


@pytest.mark.skipif(not os.environ.get("DIST_CHITA_SLOW"), reason="about 40 s; set DIST_CHITA_SLOW=1 to run")
def test_minilm_50_and_24_reload_with_the_dense_weights(tmp_path):
    """The shipped MiniLM encoder (magnitude pruning, which is quick: the format does not depend on the method; the
    benchmark benchmarks/sparse_checkpoint.py saves CHITA's 50% and 2:4 MiniLM both ways)."""
    from dist_chita.io.models import load_model

    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    for nm in (None, "2:4"):
        loaded = load_model("hf", task="embedding", path="builtin:all-MiniLM-L6-v2")
        rep, done, dense, sparse = prune_and_save(loaded.model, "embedding", tmp_path / str(nm),
                                                  dist_chita.Target(sparsity=0.5, nm=nm), {"input_ids": ids},
                                                  method="magnitude")
        assert sorted(done.compressed) == sorted(r.name for r in rep.layers) and len(done.compressed) == 37
        assert_sizes(rep, done, dense, sparse, nm)
        assert_same_weights(load_hf_model(str(dense), "embedding").model, load_hf_model(str(sparse), "embedding").model)


def tiny_gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()


def test_gpt2_conv1d_stays_dense_in_24(tmp_path):
    """transformers' Conv1D stores its weight (in, out): 2:4 along the input is not 2:4 along the stored rows, so
    those layers stay dense (listed by no target) and the checkpoint still reloads exactly."""
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    rep, done, dense, sparse = prune_and_save(model, "causal-lm", tmp_path, dist_chita.Target(nm="2:4"),
                                              {"input_ids": ids})  # layerwise: 2:4 along each output's inputs
    nz = model.transformer.h[0].attn.c_attn.weight != 0  # (in, out)
    assert bool((nz.T.reshape(96, -1, 4).sum(-1) <= 2).all()) and not compressed.follows_24(nz.float())
    assert len(rep.layers) == 4 and done.compressed == [] and done.bytes == done.dense_bytes
    assert compressed.sparsity_config(sparse)["targets"] == []
    assert_same_weights(load_hf_model(str(sparse), "causal-lm").model, load_hf_model(str(dense), "causal-lm").model)


def test_sharded_checkpoint_keeps_its_index_consistent(tmp_path):
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    rep = dist_chita.prune(model, {"input_ids": ids}, target=dist_chita.Target(sparsity=0.5), method="magnitude",
                           task="causal-lm", check_memory=False)
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    model.save_pretrained(dense)
    model.save_pretrained(sparse, max_shard_size="20KB")
    assert len(compressed.weight_files(sparse)) > 1
    done = compressed.compress_checkpoint(sparse, model, [r.name for r in rep.layers], None, 0.5)
    assert sorted(done.compressed) == sorted(r.name for r in rep.layers)
    index = json.loads((sparse / compressed.INDEX).read_text())
    where = {k: f.name for f in compressed.weight_files(sparse) for k in load_file(str(f))}
    assert index["weight_map"] == where and index["metadata"]["total_size"] == compressed.weights_bytes(sparse)
    assert_same_weights(compressed.load_pretrained(sparse, "AutoModelForCausalLM"),
                        tf.GPT2LMHeadModel.from_pretrained(dense))


def test_decompress_checkpoint_writes_what_plain_transformers_loads(tmp_path):
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(4))
    _, _, dense, sparse = prune_and_save(model, "causal-lm", tmp_path, dist_chita.Target(sparsity=0.6),
                                         {"input_ids": ids}, method="magnitude")
    compressed.decompress_checkpoint(sparse, tmp_path / "back")
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    assert_same_weights(tf.LlamaForCausalLM.from_pretrained(tmp_path / "back"),
                        tf.LlamaForCausalLM.from_pretrained(dense))
    with pytest.raises(ValueError, match="not a sparse"):
        compressed.decompress_checkpoint(dense, tmp_path / "again")
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'missing'} does not exist$"):
        compressed.decompress_checkpoint(tmp_path / "missing", tmp_path / "again")
    with pytest.raises(FileExistsError, match=r"\(pass overwrite=True to replace it\)$"):
        compressed.decompress_checkpoint(sparse, tmp_path / "back")


def test_decompress_checkpoint_leaves_its_source_alone(tmp_path):
    """The target may not be the source, lie inside it or contain it (with overwrite too); an existing target is
    replaced with overwrite."""
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(4))
    _, _, dense, sparse = prune_and_save(model, "causal-lm", tmp_path, dist_chita.Target(sparsity=0.6),
                                         {"input_ids": ids}, method="magnitude")
    files = {p.name: p.read_bytes() for p in sparse.iterdir()}
    for target in (sparse, sparse / "sub", sparse / "a" / "b", tmp_path):
        with pytest.raises(ValueError, match=f"^output directory {target} overlaps the input {sparse}; choose "
                                             "another target$"):
            compressed.decompress_checkpoint(sparse, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in sparse.iterdir()} == files
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "old.txt").write_text("old")
    compressed.decompress_checkpoint(sparse, tmp_path / "back", overwrite=True)
    assert not (tmp_path / "back" / "old.txt").exists()
    assert_same_weights(tf.LlamaForCausalLM.from_pretrained(tmp_path / "back"),
                        tf.LlamaForCausalLM.from_pretrained(dense))


def test_targets_and_ignore_reduce_as_llm_compressor_does():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4),
                                torch.nn.Conv2d(1, 1, 3), torch.nn.Embedding(3, 4))
    assert compressed.targets_and_ignore(model, ["0", "1"]) == (["Linear"], ["2"])
    assert compressed.targets_and_ignore(model, ["0"]) == (["0"], [])
    assert compressed.targets_and_ignore(model, []) == ([], [])
