"""The pruned MiniLM on disk: dense against the compressed-tensors sparse format, at 50% and at 2:4.

all-MiniLM-L6-v2 pruned by the default job's settings (layerwise CHITA on 128 pydoc paragraphs, one process), once
with 50% of every row and once 2:4; each result saved dense (``output.format: dense``) and as compressed-tensors
(``sparse-bitmask`` / ``sparse-24-bitmask``, dist_chita/io/compressed.py). Both directories are read back through
transformers (:func:`dist_chita.io.models.load_hf_model`) and compared tensor by tensor. When a compressed-tensors
release with the sparse compressors (0.14 and earlier) is importable, its own ``ModelCompressor`` decompresses the
sparse directory as well, and its compressor writes the same model for comparison with ours; the releases that work
with transformers 5 have none, so the check runs only with such a copy on ``PYTHONPATH``
(``pip install --no-deps --target DIR compressed-tensors==0.14.0.1``) and the JSON says which version checked.

    [PYTHONPATH=DIR] python benchmarks/sparse_checkpoint.py [--threads 2]

Writes benchmarks/results/sparse_checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dist_chita  # noqa: E402
from dist_chita.io import compressed, data, models  # noqa: E402
from launch.config import calibration_kwargs, load_config, model_kwargs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sparse_checkpoint.json"
TARGETS = {"50%": ["prune.sparsity=0.5"], "2:4": ["prune.nm=2:4"]}


def library_check(sparse: Path, dense_state: dict, model, layers: list[str], nm) -> dict | None:
    """compressed-tensors' own sparse compressors (<= 0.14) on the same model: do they decompress our directory to
    the dense weights, and write the same tensors as we do? None when no such release is importable."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    except ImportError:
        return None
    from safetensors.torch import load_file

    cfg = json.loads((sparse / "config.json").read_text())["quantization_config"]
    decompressed = dict(ModelCompressor.from_compression_config(cfg).sparsity_compressor.decompress(str(sparse)))
    same_decompressed = decompressed.keys() == dense_state.keys() and all(
        torch.equal(decompressed[k], dense_state[k]) for k in dense_state)
    sc = cfg["sparsity_config"]
    config_class = Sparse24BitMaskConfig if nm == (2, 4) else BitmaskConfig
    theirs = ModelCompressor(sparsity_config=config_class(global_sparsity=sc["global_sparsity"],
                                                          targets=sc["targets"], ignore=sc["ignore"])).compress(model)
    ours = load_file(str(sparse / "model.safetensors"))
    same_written = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    return {"compressed_tensors": compressed_tensors.__version__, "decompresses_to_the_dense_weights":
            same_decompressed, "writes_the_same_tensors": same_written}


def one_target(name: str, overrides: list[str], work: Path) -> dict:
    cfg = load_config(None, overrides)
    loaded = models.load_model(**model_kwargs(cfg))
    calib = data.load_samples(**calibration_kwargs(cfg), tokenizer=loaded.tokenizer)
    t = time.perf_counter()
    rep = dist_chita.prune(loaded.model, calib, target=cfg.prune, objective=cfg.layerwise, method=cfg.prune.method,
                           task=loaded.task, batch_size=cfg.calibration.batch_size, check_memory=False)
    seconds = time.perf_counter() - t
    dense, sparse = work / f"{name}-dense", work / f"{name}-sparse"
    models.save_model(loaded, dense)
    models.save_model(loaded, sparse)
    layers = [r.name for r in rep.layers]
    done = compressed.compress_checkpoint(sparse, loaded.model, layers, cfg.prune.nm_pair, rep.global_.sparsity)
    a = models.load_hf_model(str(dense), loaded.task).model.state_dict()
    b = models.load_hf_model(str(sparse), loaded.task).model.state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    p = sum(r.size for r in rep.layers)
    return {"format": done.format, "sparsity": rep.global_.sparsity, "p": p, "kept": rep.global_.kept,
            "layers": len(layers), "compressed_layers": len(done.compressed), "prune_seconds": seconds,
            "dense_bytes": done.dense_bytes, "compressed_bytes": done.bytes,
            "ratio": done.bytes / done.dense_bytes, "pruned_weights_dense_bytes": 4 * p,
            "reloaded_weights_equal": same,
            "library_check": library_check(sparse, a, loaded.model, layers, cfg.prune.nm_pair)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs, load_before = {}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in TARGETS.items():
            runs[name] = one_target(name.replace(":", "of").replace("%", "pct"), overrides, Path(tmp))
            r = runs[name]
            print(f"{name}: {r['format']}: {r['compressed_bytes'] / 1e6:.1f} MB against dense "
                  f"{r['dense_bytes'] / 1e6:.1f} MB ({r['ratio']:.3f}); reloaded weights equal: "
                  f"{r['reloaded_weights_equal']}; library: {r['library_check']}", flush=True)
    out = {"model": "all-MiniLM-L6-v2", "method": "chita (layerwise, the default job's settings, one process)",
           "threads": args.threads, "torch": torch.__version__, "load_before": load_before,
           "load_after": os.getloadavg()[0], "runs": runs}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
