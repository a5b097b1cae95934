"""The model card: the ``README.md`` the Hugging Face Hub expects beside a model, describing a pruned model.

:func:`model_card` turns a :class:`dist_chita.report.Report` and what the caller knows about the run (the base
model, the task, the calibration data, the command that reproduces it) into Markdown with the Hub's YAML front
matter (``library_name``, ``base_model`` when it is a hub id, ``pipeline_tag``, ``tags``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_chita.io.compressed import SPARSE_FORMATS
from dist_chita.report import Report

PIPELINE_TAGS = {"causal-lm": "text-generation", "sequence-classification": "text-classification",
                 "image-classification": "image-classification", "embedding": "feature-extraction"}
# builtin model names -> the hub id of the same weights
KNOWN_BASE_MODELS = {"builtin:all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


@dataclass
class CardInfo:
    """What the card says besides the report.

    ``base_model``: the pruned model's source (hub id, local path, ``builtin:`` name or factory); ``task`` (one of
    :data:`dist_chita.io.models.TASKS`); ``hf``: a Hugging Face model (else plain torch); ``target``: the target
    as set (e.g. "0.5 per row", "2:4"); ``calibration``: where the samples came from; ``commands``: shell lines
    that reproduce the model; ``notes``: more Markdown lines. The weight format and sizes come from the report.
    """

    base_model: str
    task: str
    hf: bool = True
    target: str = ""
    calibration: str = ""
    commands: Sequence[str] = ()
    notes: list[str] = field(default_factory=list)


def hub_id(source: str) -> str | None:
    """``source`` as a hub id (``org/name``) when it is one or a known builtin; None for local paths (existing ones
    included)."""
    if source in KNOWN_BASE_MODELS:
        return KNOWN_BASE_MODELS[source]
    if source.startswith(("/", ".", "~", "builtin:")) or ":" in source or source.count("/") != 1:
        return None
    return None if Path(source).exists() else source


def front_matter(rep: Report, info: CardInfo) -> str:
    """The card's YAML front matter (between ``---`` lines)."""
    meta: dict = {"library_name": "transformers" if info.hf else "pytorch"}
    base = hub_id(info.base_model)
    if base is not None:
        meta["base_model"] = base
    if info.task in PIPELINE_TAGS:
        meta["pipeline_tag"] = PIPELINE_TAGS[info.task]
    sparse = rep.output_format in SPARSE_FORMATS
    meta["tags"] = ["pruned", "dist-chita", "sparse", rep.method] + (["compressed-tensors"] if sparse else [])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def metric_rows(metric: dict) -> list[str]:
    """Markdown table rows ``| metric | dense | magnitude | pruned |`` of a report's ``metric``."""
    name = metric.get("name")
    if name in (None, "none"):
        return []
    companions = sorted({k.split("_", 1)[1] for k in metric if "_" in k and k.split("_", 1)[0] in
                         ("before", "magnitude", "after")})
    rows = []
    for label, prefix in [(name, ""), *((c, f"_{c}") for c in companions)]:
        cells = [_fmt(metric.get(stage + prefix)) for stage in ("before", "magnitude", "after")]
        rows.append(f"| {label.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return rows


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def model_card(rep: Report, info: CardInfo) -> str:
    """The model card (Markdown with front matter) of a pruned model."""
    g = rep.global_
    kinds = sorted({".".join(r.name.split(".")[-1:]) for r in rep.layers})
    what = [f"| base model | `{info.base_model}` |", f"| task | {info.task} |",
            f"| pruned layers | {len(rep.layers)} ({', '.join(kinds[:8])}{', ...' if len(kinds) > 8 else ''}), "
            f"p = {g.p:,} weights of {rep.model_params:,} parameters |",
            f"| method | {rep.method} (objective: {rep.objective or 'none'}) |",
            f"| sparsity | {g.sparsity:.4f} over the pruned weights ({g.kept:,} kept)"
            + (f"; target {info.target}" if info.target else "") + " |"]
    if info.calibration:
        what.append(f"| calibration | {info.calibration} (n = {rep.n}) |")
    files = {None: "not saved", "dense": "dense (zeros stored)"}.get(rep.output_format,
                                                                   f"compressed-tensors, {rep.output_format}")
    what.append(f"| weights | {files}" + _sizes(rep) + " |")
    lines = [front_matter(rep, info), f"# {info.base_model}, pruned to sparsity {g.sparsity:.2f} with dist-chita", "",
             f"`{info.base_model}` with {g.sparsity:.1%} of the weights of its {len(rep.layers)} prunable layers "
             f"set to zero by one-shot pruning ({rep.method}, CHITA: Benbaki et al., ICML 2023) and the rest "
             "re-fitted on the calibration data; the other parameters are unchanged.", "",
             "| | |", "|---|---|", *what, ""]
    rows = metric_rows(rep.metric)
    if rows:
        lines += ["## Held-out metrics", "", "| metric | dense | magnitude pruning (same sparsity) | this model |",
                  "|---|---|---|---|", *rows, ""]
    lines += info.notes
    if info.commands:
        lines += ["## Reproduce", "", "The resolved configuration is `dist_chita_config.yaml` in this directory; the "
                  "result (mask and weights) does not depend on the number of processes.", "", "```bash",
                  *info.commands, "```", ""]
    lines += ["`prune_report.json` holds the per-layer sparsity, the objective, times and memory of the run."]
    return "\n".join(lines) + "\n"


def _sizes(rep: Report) -> str:
    if rep.weights_bytes is None:
        return ""
    out = f", {rep.weights_bytes / 1e6:.1f} MB"
    if rep.dense_weights_bytes and rep.dense_weights_bytes != rep.weights_bytes:
        dense = rep.dense_weights_bytes
        out += f" ({rep.weights_bytes / dense:.1%} of the dense {dense / 1e6:.1f} MB)"
    return out
