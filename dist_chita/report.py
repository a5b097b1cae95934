"""What a run did, as ``prune_report.json`` (docs/report-format.md) and a short human summary.

Per-rank figures (phase times, bytes sent, peak memory) are collected from
every rank with one ``all_gather_object`` at the end; everything else is
identical on all ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from dist_chita.distributed import comm


def mask_digest(masks: Mapping[str, torch.Tensor], order: Sequence[str]) -> str:
    """sha256 of the kept-weight masks, layer by layer in ``order``, as packed bits."""
    h = hashlib.sha256()
    for name in order:
        m = masks[name].detach().reshape(-1).cpu().numpy().astype(bool)
        h.update(name.encode())
        h.update(np.packbits(m).tobytes())
    return h.hexdigest()


def layer_table(masks: Mapping[str, torch.Tensor], order: Sequence[str]) -> list[dict]:
    """Per-layer size, kept count and sparsity."""
    rows = []
    for name in order:
        m = masks[name]
        size, kept = m.numel(), int(m.sum())
        rows.append({"name": name, "shape": list(m.shape), "size": size, "kept": kept, "sparsity": 1 - kept / size})
    return rows


def gather_per_rank(local: Mapping[str, float | int]) -> dict[str, list]:
    """{key: value on this rank} -> {key: [value on rank 0, rank 1, ...]} on every rank (collective)."""
    everyone = comm.all_gather_object(dict(local))
    keys = sorted({k for d in everyone for k in d})
    return {k: [d.get(k, 0) for d in everyone] for k in keys}


def summary_lines(report: Mapping) -> list[str]:
    """A few lines a person reads at the end of a run."""
    g = report["global"]
    lines = [
        f"dist-chita: {report['method']} on {report['world_size']} rank(s), n = {report['n']}, "
        f"p = {g['p']:,} prunable weights",
        f"  kept {g['kept']:,} ({1 - g['sparsity']:.2%}), sparsity {g['sparsity']:.4f}",
    ]
    metric = report.get("metric") or {}
    if metric.get("name") not in (None, "none"):
        parts = [f"{k} {v:.4f}" for k, v in metric.items() if k != "name" and isinstance(v, float)]
        lines.append(f"  {metric['name']}: " + ", ".join(parts))
    warm = "OBD saliency" if report.get("ridge") == "fisher_diagonal" else "magnitude"  # the solver's warm start
    for i, st in enumerate(report["stages"]):
        if st.get("objective") is not None:
            mag = st.get("magnitude_objective")
            gain = ""
            if mag is not None:  # the warm start's objective, and how much lower the solver ended
                lower = f", {(mag - st['objective']) / mag:.2%} lower" if mag > 0 else ""
                gain = f" ({warm}+backsolve {mag:.4g}{lower})"
            its = f", {st['iterations']} IHT iterations" if st.get("iterations") else ""  # none: a baseline
            lines.append(f"  stage {i + 1}: sparsity {st['sparsity']:.4f}, objective {st['objective']:.4g}{gain}{its}")
    ph = report["phase_seconds"]
    lines.append("  time (s, max over ranks): " + ", ".join(f"{k} {max(v):.2f}" for k, v in ph.items()))
    peak = max(report["peak_memory_bytes"]) / 2**30
    est = report.get("memory_estimate_bytes", {}).get("total")
    lines.append(f"  peak memory per rank {peak:.2f} GiB" + (f" (estimate {est / 2**30:.2f} GiB)" if est else ""))
    return lines
