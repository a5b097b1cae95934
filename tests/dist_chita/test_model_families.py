"""Hugging Face model families end to end: load through the Auto class from a saved checkpoint, prune with
CHITA (the loss that fits the task), save with ``save_pretrained``, reload in plain ``transformers`` in a
subprocess that never imports dist_chita, and compare outputs and sparsity. Also: padded samples have the
per-sample gradient of their unpadded selves, and tied embedding / LM-head weights are never pruned.

Tiny configs built from ``transformers`` configs (no downloads): BERT (embedding, Gauss-Newton probe), GPT-2
(Conv1D, tied LM head, causal LM), OPT, Llama, ViT and ResNet (image classification, cross-entropy); and each of
them and ConvNeXt (depthwise convs) with the layerwise objective."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dist_chita.distributed.layout import ColumnLayout
from dist_chita.fisher import driver as fisher_driver
from dist_chita.fisher import losses
from dist_chita.fisher.factor import fisher_block
from dist_chita.io import models
from dist_chita.prunable import named_shapes, prunable_modules
from dist_chita.sparsity import kept_count
from tests.fixtures.solver_settings import THOROUGH

N, SPARSITY, VOCAB, SEQ = 8, 0.5, 96, 10


def _configs():
    import transformers as tf

    small = dict(vocab_size=VOCAB, max_position_embeddings=32)
    return {
        "bert": ("embedding", tf.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=24, **small)),
        "gpt2": ("causal-lm", tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2)),
        "opt": ("causal-lm", tf.OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=24,
                                          word_embed_proj_dim=16, **small)),
        "llama": ("causal-lm", tf.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                              num_key_value_heads=1, intermediate_size=24, **small)),
        "vit": ("image-classification", tf.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=24, num_labels=3)),
        "resnet": ("image-classification", tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                           depths=[1, 1], layer_type="basic", num_labels=3)),
        "convnext": ("image-classification", tf.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16],
                                                               depths=[1, 1], num_labels=3)),  # depthwise 7 x 7
    }


FAMILIES = ("bert", "gpt2", "opt", "llama", "vit", "resnet")
AUTO = models.AUTO_CLASSES


def _inputs(task: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """n samples: right-padded token ids with varied lengths (text), or random images with labels."""
    g = torch.Generator().manual_seed(seed)
    if task == "image-classification":
        return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 3, (n,), generator=g)}
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
    lengths[0] = SEQ
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}


def _loss(task: str):
    fwd = lambda model, batch: models.forward(model, task, batch)  # noqa: E731
    if task == "embedding":
        return losses.gauss_newton_probe(0, fwd)
    if task == "causal-lm":
        return losses.causal_lm(fwd)
    return losses.cross_entropy(fwd)


def _batches(inputs: dict[str, torch.Tensor], size: int = 4):
    n = len(next(iter(inputs.values())))
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        yield {k: v[lo:hi] for k, v in inputs.items()}, range(lo, hi)


def _checkpoint(family: str, root: Path) -> tuple[str, Path]:
    """A dense checkpoint directory written with save_pretrained, as users bring it."""
    import transformers

    task, config = _configs()[family]
    torch.manual_seed(0)
    model = getattr(transformers, AUTO[task]).from_config(config)
    path = root / f"{family}-dense"
    model.save_pretrained(str(path))
    return task, path


RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    assert not any(m.startswith("dist_chita") for m in sys.modules)
    result = {}
    for item in json.loads(sys.argv[1]):
        model = getattr(transformers, item["auto"]).from_pretrained(item["dir"]).eval()
        inputs = {k: v for k, v in torch.load(item["inputs"]).items() if k != "labels"}
        with torch.no_grad():
            out = model(**inputs)
        torch.save(out.logits if hasattr(out, "logits") else out.last_hidden_state, item["outputs"])
        result[item["dir"]] = {n: int((p != 0).sum()) for n, p in model.named_parameters()}
    assert not any(m.startswith("dist_chita") for m in sys.modules)
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Every family pruned and saved; then one plain-transformers subprocess reloads them all."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("families")
    runs, jobs = {}, []
    for family in FAMILIES:
        task, dense_dir = _checkpoint(family, root)
        loaded = models.load_hf_model(str(dense_dir), task)
        model = loaded.model
        modules = prunable_modules(model)
        calib = _inputs(task, N, seed=1)
        outcome = fisher_driver.prune(model, modules, "chita", SPARSITY, make_batches=lambda c=calib: _batches(c),
                                 loss_fn=_loss(task), n=N, lam=1e-3, solver_options={**THOROUGH, "max_iter": 20})
        out_dir = root / f"{family}-pruned"
        models.save_model(loaded, out_dir)
        test_inputs = _inputs(task, 3, seed=2)
        torch.save(test_inputs, root / f"{family}-inputs.pt")
        with torch.no_grad():
            out = model(**{k: v for k, v in test_inputs.items() if k != "labels"})
        expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
        runs[family] = dict(task=task, model=model, modules=modules, outcome=outcome, expected=expected,
                            dir=str(out_dir), outputs=str(root / f"{family}-outputs.pt"), dense_dir=dense_dir)
        jobs.append({"auto": AUTO[task], "dir": str(out_dir), "inputs": str(root / f"{family}-inputs.pt"),
                     "outputs": runs[family]["outputs"]})
    res = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr
    nonzeros = json.loads(res.stdout.strip().splitlines()[-1])
    for run in runs.values():
        run["reloaded_nonzeros"] = nonzeros[run["dir"]]
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_reloads_in_plain_transformers(pruned, family):
    run = pruned[family]
    got = torch.load(run["outputs"])
    assert got.shape == run["expected"].shape
    assert torch.allclose(got, run["expected"], rtol=1e-5, atol=1e-6)
    # exactly the reported sparsity, counted in the reloaded checkpoint
    p = sum(m.weight.numel() for _, m in run["modules"])
    reported = run["outcome"].stages[-1].kept
    assert reported == kept_count(p, SPARSITY)
    nz = run["reloaded_nonzeros"]
    assert sum(nz[f"{name}.weight"] for name, _ in run["modules"]) == reported
    # everything else stays dense (the heads, embeddings, norms and biases of a random init have no zeros)
    names = {f"{name}.weight" for name, _ in run["modules"]}
    import transformers

    dense = getattr(transformers, AUTO[run["task"]]).from_pretrained(run["dense_dir"])
    for name, param in dense.named_parameters():
        if name not in names:
            assert nz[name] == int((param != 0).sum()), name


def test_layer_selection_per_family(pruned):
    names = {f: [n for n, _ in pruned[f]["modules"]] for f in FAMILIES}
    assert any(n.endswith("attn.c_attn") for n in names["gpt2"])  # Conv1D layers
    assert any("patch_embeddings.projection" in n for n in names["vit"])  # the patch Conv2d
    assert any(n.endswith("convolution") for n in names["resnet"])
    for f in FAMILIES:
        assert not any(n.split(".")[0] in ("classifier", "lm_head", "score") for n in names[f]), f
    for f in ("bert", "gpt2", "opt", "llama"):
        emb = pruned[f]["model"].get_input_embeddings().weight
        assert all(m.weight is not emb and not isinstance(m, torch.nn.Embedding) for _, m in pruned[f]["modules"])


def test_tied_lm_head_is_never_pruned_nor_counted_twice(pruned):
    model = pruned["gpt2"]["model"]
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    assert bool((model.lm_head.weight != 0).all())
    # even when the head is asked for, the tied matrix stays out (it is the input embedding)
    with_head = prunable_modules(model, exclude_head=False)
    ids = [id(m.weight) for _, m in with_head]
    assert id(model.lm_head.weight) not in ids and len(ids) == len(set(ids))


def _gradient_rows(model, modules, task, inputs):
    layout = ColumnLayout.build(named_shapes(modules), 1)
    n = len(next(iter(inputs.values())))
    at = fisher_block(model, modules, layout, _batches(inputs, size=n), 0, n, _loss(task))
    return at.t() * math.sqrt(n)  # (n, p): row i = grad l_i


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt", "llama"])
def test_padded_sample_has_the_gradient_of_the_unpadded_one(tmp_path, family):
    task, path = _checkpoint(family, tmp_path)
    model = models.load_hf_model(str(path), task).model
    modules = prunable_modules(model)
    batch = _inputs(task, 4, seed=3)
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.min()) < SEQ  # some samples are padded
    padded = _gradient_rows(model, modules, task, batch)
    for i in range(4):
        length = int(lengths[i])
        alone = {k: v[i : i + 1, :length] for k, v in batch.items()}
        # the same global index i keeps the probe vector of the Gauss-Newton loss the same
        layout = ColumnLayout.build(named_shapes(modules), 1)
        at = fisher_block(model, modules, layout, [(alone, [0])], 0, 1,
                          lambda m, b, idx, i=i: _loss(task)(m, b, idx + i))
        assert torch.allclose(padded[i], at[:, 0], rtol=1e-4, atol=1e-6), (family, i)


@pytest.mark.parametrize("family", [*FAMILIES, "convnext"])
def test_layerwise_objective_prunes_every_family(tmp_path, family):
    """The default objective on each family: every output row of every prunable layer keeps its share (Conv1D's
    rows are its columns; a depthwise conv's row is one channel's kernel), the reconstruction objective beats the
    magnitude supports re-fitted, and the pruned model still gives finite outputs. The blocks whose inputs follow
    from the previous block's output (the transformer layers; the ResNet and ConvNeXt stages) run on cached
    inputs, with the weights of the model's own forwards bit for bit."""
    from dist_chita.layerwise import curvature, geometry
    from dist_chita.layerwise import driver as layerwise_driver

    torch.set_num_threads(1)
    task, path = _checkpoint(family, tmp_path)
    calib = _inputs(task, N, seed=1)
    weights = []
    for cache in (False, True):
        model = models.load_hf_model(str(path), task).model
        modules = prunable_modules(model)
        forward = lambda b, model=model: models.forward(model, task, b)  # noqa: E731
        if cache:
            blocks = [model.get_submodule(name) for name in curvature.block_names(modules)]
            chained = curvature.chained_blocks(blocks, forward, next(_batches(calib))[0])
            assert chained == {"vit": (0, 0), "resnet": (1, 3), "convnext": (1, 3)}.get(family, (0, 2)), family
        out = layerwise_driver.prune_layerwise(model, modules, SPARSITY, forward=forward,
                                         make_batches=lambda: _batches(calib), cache_inputs=cache)
        weights.append([m.weight.detach().clone() for _, m in modules])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True)), family
    grouped = 0
    for name, m in modules:
        rows = geometry.weight_rows(m, m.weight.detach())
        assert bool(((rows != 0).sum(1) == kept_count(rows.shape[1], SPARSITY)).all()), (family, name)
        grouped += geometry.groups(m) > 1
    assert grouped > 0 if family == "convnext" else grouped == 0
    stage = out.stages[0]
    assert 0 < stage.objective < stage.magnitude_objective
    with torch.no_grad():
        result = model(**{k: v for k, v in _inputs(task, 3, seed=2).items() if k != "labels"})
    logits = result.logits if hasattr(result, "logits") else result.last_hidden_state
    assert bool(torch.isfinite(logits).all())
