"""The model card (dist_chita/io/card.py): the Hub's front matter and what the card states, read back."""

import yaml

from dist_chita.io.card import CardInfo, hub_id, metric_rows, model_card
from dist_chita.report import LayerRow, Report, Totals


def report(**kw):
    rows = [LayerRow("encoder.0.dense", [8, 4], 32, 16, 0.5), LayerRow("encoder.1.dense", [8, 8], 64, 32, 0.5)]
    base = dict(method="chita", objective="layerwise", n=64, p=96, model_params=500, global_=Totals(96, 48, 0.5),
                layers=rows, metric={"name": "accuracy", "before": 0.91, "magnitude": 0.5, "after": 0.875})
    return Report(**{**base, **kw})


def split_card(text):
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_front_matter_and_facts():
    rep = report(output_format="sparse-24-bitmask", weights_bytes=600_000, dense_weights_bytes=1_000_000)
    meta, body = split_card(model_card(rep, CardInfo("org/model", "sequence-classification", target="2:4",
                                                     calibration="`data.parquet`", commands=["dist-chita prune"])))
    assert meta == {"library_name": "transformers", "base_model": "org/model", "pipeline_tag": "text-classification",
                    "tags": ["pruned", "dist-chita", "sparse", "chita", "compressed-tensors"]}
    assert "| pruned layers | 2 (dense), p = 96 weights of 500 parameters |" in body
    assert "| sparsity | 0.5000 over the pruned weights (48 kept); target 2:4 |" in body
    assert "| calibration | `data.parquet` (n = 64) |" in body
    assert "| weights | compressed-tensors, sparse-24-bitmask, 0.6 MB (60.0% of the dense 1.0 MB) |" in body
    assert "| accuracy | 0.9100 | 0.5000 | 0.8750 |" in body
    assert "```bash\ndist-chita prune\n```" in body


def test_base_model_only_when_it_is_a_hub_id(tmp_path, monkeypatch):
    assert hub_id("builtin:all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "m").mkdir(parents=True)
    assert hub_id("runs/m") is None and hub_id("org/m") == "org/m"
    for local in ("/ckpt/model", "./model", "runs/a/b", "builtin:other", "pkg.mod:factory (w.safetensors)"):
        assert hub_id(local) is None, local
    meta, body = split_card(model_card(report(), CardInfo("/ckpt/model", "embedding", hf=True)))
    assert "base_model" not in meta and meta["pipeline_tag"] == "feature-extraction"
    assert "compressed-tensors" not in meta["tags"] and "| weights | not saved |" in body
    meta, _ = split_card(model_card(report(output_format="dense"), CardInfo("m:f (w)", "image-classification",
                                                                              hf=False)))
    assert meta["library_name"] == "pytorch"


def test_metric_rows_with_companions_and_none():
    rows = metric_rows({"name": "embedding_fidelity", "magnitude": 0.7, "after": 0.95, "magnitude_nn_agreement": 0.5,
                        "after_nn_agreement": 0.8})
    assert rows == ["| embedding fidelity | - | 0.7000 | 0.9500 |", "| nn agreement | - | 0.5000 | 0.8000 |"]
    assert metric_rows({"name": "none"}) == [] and metric_rows({}) == []
    assert "Held-out metrics" not in model_card(report(metric={"name": "none"}), CardInfo("a/b", "embedding"))
