"""Per-sample gradient throughput of dist_chita.fisher.persample relative to a plain batched forward + backward.

For each model, samples/s of

* batched: forward + ``loss.sum().backward()`` with ordinary weight gradients (eval mode, every parameter,
  gradients zeroed in place: the strongest plain reference);
* per-sample: forward + :meth:`PerSampleGrads.backward`, producing the (b, numel) float32 per-sample
  gradients of every prunable layer (the callback drops them, as it would after sending them);

and the ratio per-sample / batched. Both are timed in alternating rounds and the fastest round of
each counts (robust to other processes sharing the cores). For the MLP also the machine's write rate: how fast
``torch.empty(b * p).fill_`` (and ``copy_``) writes b * p float32, expressed in samples/s (p =
prunable weights), and the ratio of the per-sample rate to it (the per-sample gradients of an
MLP are outer products, so writing them is the floor). Also, for the MLP, end-to-end ``fisher_block`` at
world size 1 (per-sample gradients written into the (p, n) block At, including its page faults) and its
ratio to the per-sample gradients alone of the same samples (alternating runs); for the ResNet the time to
write its b x p gradients once, as a fraction of a batched step (``write_s_per_batched_step``: the per-sample
step cannot be shorter than the batched forward + input-gradient backward plus this).

Models: MLP 784-512-512-10 (head excluded: p = 784*512 + 512*512), a small ResNet
(ResNetForImageClassification, basic blocks, depths [1,1,1,1], hidden sizes [32,64,128,256],
32x32 images, cross-entropy) and a 6-layer BERT-size encoder (BertModel, hidden 384, 12 heads,
seq 128, Gauss-Newton probe on mean-pooled embeddings). The same ResNet also on 224x224 images (batch 16, no
target; ``resnet_224``): at ImageNet resolution its last stage sees 7x7 maps, on 32x32 images 1x1 ones, where
the per-sample step does little but write b x p gradients (8/9 of them structurally zero: a 3x3 kernel on a
padded 1x1 map).

    python benchmarks/persample_throughput.py [--threads 1] [--seconds 6]

(``DIST_CHITA_NATIVE=0`` in the environment measures torch alone, without the streaming-store kernel of
dist_chita.fisher.ntstore.)

Prints a table and writes benchmarks/results/persample_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without the package installed, like the other benchmarks
    sys.path.insert(0, str(ROOT))

from dist_chita.distributed.layout import ColumnLayout  # noqa: E402
from dist_chita.fisher.factor import fisher_block  # noqa: E402
from dist_chita.fisher.losses import cross_entropy, gauss_newton_probe  # noqa: E402
from dist_chita.fisher.persample import PerSampleGrads  # noqa: E402
from dist_chita.prunable import named_shapes, prunable_modules  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "persample_throughput.json"


def step_time(step, reps: int) -> float:
    """Seconds per call of ``step`` over ``reps`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps


def timed(step, seconds: float, reps: int = 2) -> float:
    """Fastest seconds per call of ``step`` over rounds of ``reps`` calls for about ``seconds`` (after one
    warm-up call); the minimum is robust to other processes sharing the cores."""
    step()
    best, t0 = math.inf, time.perf_counter()
    while best == math.inf or time.perf_counter() - t0 < seconds:
        best = min(best, step_time(step, reps))
    return best


def measure(model: nn.Module, batch: dict, loss_fn, b: int, seconds: float, min_rounds: int = 3) -> dict:
    """Batched vs per-sample step time, measured in many short alternating rounds (one warm-up step, then one
    timed step of each kind per round) for about ``seconds``; the fastest step of each kind counts. Short
    rounds make both kinds see the same load from other processes sharing the cores."""
    model.eval()
    modules = prunable_modules(model)
    idx = torch.arange(b)
    params = list(model.parameters())

    def batched():  # gradients zeroed in place (faster than set_to_none here: no fresh allocations)
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        loss_fn(model, batch, idx).sum().backward()

    t_batched = t_per = math.inf
    rounds, t0 = 0, time.perf_counter()
    while rounds < min_rounds or time.perf_counter() - t0 < seconds:
        for p in params:
            p.requires_grad_(True)
        batched()
        t_batched = min(t_batched, step_time(batched, 1))
        for p in params:
            p.requires_grad_(False)
        with PerSampleGrads(modules, lambda g, grads: None) as psg:
            step = lambda: psg.backward(loss_fn(model, batch, idx))  # noqa: E731
            step()  # buffers are allocated in the first step of a PerSampleGrads
            t_per = min(t_per, step_time(step, 1))
        rounds += 1
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    p_total = sum(m.weight.numel() for _, m in modules)
    return {
        "batch": b,
        "prunable_layers": len(modules),
        "p": p_total,
        "batched_samples_per_s": b / t_batched,
        "persample_samples_per_s": b / t_per,
        "ratio_to_batched": t_batched / t_per,
        "rounds": rounds,
    }


def write_rate(n_floats: int, seconds: float) -> dict:
    buf = torch.empty(n_floats)
    src = torch.ones(n_floats)
    fill = timed(lambda: buf.fill_(1.0), seconds / 2, reps=1)
    copy = timed(lambda: buf.copy_(src), seconds / 2, reps=1)
    return {"fill_GBps": n_floats * 4 / fill / 1e9, "copy_GBps": n_floats * 4 / copy / 1e9, "fill_s": fill}


def mlp_case(seconds: float) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    b = 64
    batch = {"x": torch.randn(b, 784), "labels": torch.randint(0, 10, (b,))}
    out = measure(model, batch, cross_entropy(), b, seconds)
    rate = write_rate(b * out["p"], seconds)
    out["write"] = rate
    out["write_samples_per_s"] = b / rate["fill_s"]
    out["ratio_to_write"] = out["persample_samples_per_s"] / out["write_samples_per_s"]
    out["fisher_block"] = fisher_rate(model, b, n=4 * b)
    return out


def fisher_rate(model: nn.Module, b: int, n: int, rounds: int = 4) -> dict:
    """End to end at world size 1: fisher_block building the full At (p, n) float32 from n samples, against
    the per-sample gradients alone of the same n samples (PerSampleGrads over the same micro-batches,
    gradients dropped), in alternating rounds (fastest of each)."""
    modules = prunable_modules(model)
    layout = ColumnLayout.build(named_shapes(modules), 1)
    x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
    batches = [({"x": x[a : a + b], "labels": y[a : a + b]}, range(a, a + b)) for a in range(0, n, b)]
    loss = cross_entropy()
    best = alone = math.inf
    for _ in range(rounds):
        stats: dict = {}
        at = fisher_block(model, modules, layout, batches, 0, n, loss, stats=stats)
        best = min(best, stats["seconds"])
        del at
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        with PerSampleGrads(modules, lambda g, grads: None, scale=1 / math.sqrt(n)) as psg:
            for batch, idx in batches:
                psg.backward(loss(model, batch, torch.as_tensor(idx)))
        alone = min(alone, time.perf_counter() - t0)
        for p in model.parameters():
            p.requires_grad_(True)
    return {
        "n": n,
        "seconds": best,
        "samples_per_s": n / best,
        "persample_alone_samples_per_s": n / alone,
        "ratio_to_persample": alone / best,
    }


def resnet_case(seconds: float, image: int = 32, b: int = 32) -> dict:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(
        embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10
    )
    model = ResNetForImageClassification(cfg)
    batch = {"pixel_values": torch.randn(b, 3, image, image), "labels": torch.randint(0, 10, (b,))}
    out = measure(model, batch, cross_entropy(), b, seconds)
    out["image"] = image
    # the per-sample step must at least write the b x p gradients once: its share of a batched step
    out["write"] = write_rate(b * out["p"], seconds / 2)
    out["write_s_per_batched_step"] = out["write"]["fill_s"] * out["batched_samples_per_s"] / b
    return out


def encoder_case(seconds: float) -> dict:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    model = BertModel(cfg, add_pooling_layer=False)
    b, seq = 8, 128
    batch = {
        "input_ids": torch.randint(0, cfg.vocab_size, (b, seq)),
        "attention_mask": torch.ones(b, seq, dtype=torch.long),
    }
    return measure(model, batch, gauss_newton_probe(seed=0), b, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "mlp": mlp_case(args.seconds),
        "resnet": resnet_case(args.seconds),
        "resnet_224": resnet_case(args.seconds, image=224, b=16),
        "encoder": encoder_case(args.seconds),
    }
    targets = {
        "mlp": ("ratio_to_write", 0.5),
        "resnet": ("ratio_to_batched", 0.7),
        "encoder": ("ratio_to_batched", 0.7),
    }
    print(f"{'model':10} {'b':>4} {'p':>10} {'batched/s':>10} {'per-sample/s':>13} {'ratio':>6} {'target':>16}")
    for name in ("mlp", "resnet", "resnet_224", "encoder"):
        r = results[name]
        if name in targets:
            key, goal = targets[name]
            r["target"] = {"metric": key, "min": goal, "met": r[key] >= goal}
        print(
            f"{name:10} {r['batch']:>4} {r['p']:>10} {r['batched_samples_per_s']:>10.1f} "
            f"{r['persample_samples_per_s']:>13.1f} {r['ratio_to_batched']:>6.2f} "
            + (f"{key}={r[key]:.2f}>={goal}" if name in targets else "(no target: the same ResNet on 224 x 224)")
        )
    f = results["mlp"]["fisher_block"]
    print(
        f"MLP fisher_block (world size 1, float32, n = {f['n']}): {f['samples_per_s']:.1f} samples/s, "
        f"{f['ratio_to_persample']:.2f} of the per-sample gradients alone ({f['persample_alone_samples_per_s']:.1f}/s)"
    )
    w = results["mlp"]["write"]
    print(
        f"write rate: fill {w['fill_GBps']:.2f} GB/s, copy {w['copy_GBps']:.2f} GB/s "
        f"= {results['mlp']['write_samples_per_s']:.1f} MLP samples/s"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
