"""What a run did: the typed :class:`Report` behind ``prune_report.json``, and a short human summary.

:func:`dist_chita.prune` returns a :class:`Report`; the launcher adds its own phases and the resolved config and
writes it with :meth:`Report.to_json`; :meth:`Report.from_json` reads it back (the cost model and the scaling
studies do). ``docs/report-format.md`` is :func:`format_markdown`'s output, checked by a test. Per-rank figures
(phase times, bytes sent, peak memory) are lists indexed by rank, collected with one ``all_gather_object``
(:meth:`Report.add_rank_figures`); everything else is identical on all ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dist_chita.distributed import comm
from dist_chita.fisher.driver import StageReport

VERSION = 1


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class LayerRow:
    """One prunable layer."""

    name: str = _doc("module name")
    shape: list[int] = _doc("weight shape", factory=list)
    size: int = _doc("weights in the layer", 0)
    kept: int = _doc("weights kept (non-zero)", 0)
    sparsity: float = _doc("share of zeros, 1 - kept / size", 0.0)


@dataclass
class Totals:
    """Over all prunable weights."""

    p: int = _doc("prunable weights", 0)
    kept: int = _doc("weights kept", 0)
    sparsity: float = _doc("share of zeros over all prunable weights", 0.0)


@dataclass
class Report:
    """``prune_report.json``. Times in seconds, sizes in bytes; lists under per-rank keys are indexed by rank."""

    version: int = _doc("format version", VERSION)
    name: str | None = _doc("the run's name (run config ``name``; null from the Python API)", None)
    config: dict | None = _doc("the resolved run config, as saved in dist_chita_config.yaml (null from the API)",
                               None)
    world_size: int = _doc("ranks that ran", 1)
    threads_per_rank: int = _doc("torch threads per rank", 1)
    device: str = _doc("device type the ranks ran on (cpu, cuda)", "cpu")
    backend: str = _doc("collective backend (gloo on CPU, nccl on GPU)", "gloo")
    streaming_stores: bool = _doc("whether the per-sample gradients and the factor's columns were written with the "
                                  "compiled streaming-store kernel (dist_chita/fisher/ntstore.py: x86 CPUs with a "
                                  "C compiler, unless DIST_CHITA_NATIVE=0); torch computes the same values without "
                                  "it", False)
    method: str = _doc("pruning method (chita, chita++, sparsegpt, wanda, magnitude, obd)", "chita")
    objective: str | None = _doc("layerwise or fisher (null for magnitude pruning)", None)
    ridge: str | None = _doc("the Fisher objective's ridge metric with auto resolved (identity or fisher_diagonal); "
                             "null for magnitude pruning and the layerwise objective", None)
    n: int = _doc("calibration samples", 0)
    p: int = _doc("prunable weights", 0)
    model_params: int = _doc("all parameters of the model", 0)
    zero_stage: int | None = _doc("3 when DeepSpeed ZeRO-3 partitioned the parameters, else null", None)
    param_bytes_full: int = _doc("bytes of all parameters (tied ones once)", 0)
    storage_dtype: str = _doc("storage dtype of the Fisher factor", "float32")
    global_: Totals = _doc("kept weights and sparsity over all prunable weights (JSON key ``global``)",
                           factory=Totals)
    layers: list[LayerRow] = _doc("per prunable layer, in layout order", factory=list)
    stages: list[StageReport] = _doc(
        "one per CHITA++ stage (one for other methods): ``sparsity`` the stage's target share of zeros (1 - N/M "
        "for N:M; with per-layer targets their mean over the prunable weights), ``kept``, ``objective`` the "
        "objective at the stage's result, ``magnitude_objective`` that of the solver's warm start followed by a "
        "back-solve (Fisher: magnitude pruning with the identity ridge, the OBD saliency |w_j| sqrt(D_jj) with "
        "the Fisher-diagonal one; layerwise CHITA: the magnitude support of every row re-fitted; null for the "
        "baselines), ``plain_magnitude_objective`` (Fisher) that of the same support without the back-solve, "
        "``ridge_floor`` (Fisher) lambda/2 ||w_bar - H(w_bar)||^2, a lower bound of the stage's objective, "
        "``objective_trace``, ``iterations`` (IHT; layerwise: the most any layer took), "
        "``backsolves``, ``backsolve_work`` (Fisher: what they ran, the Gram matrices formed and updated, the rows "
        "the updates multiplied, the Cholesky factorisations, the PCG solves and steps), ``seconds`` and "
        "``bytes_sent`` by phase, ``lam`` the ridge lambda solved with, "
        "``validation`` the validation score after the stage (with validation samples), and with lambda auto "
        "``lambda_path`` the lambdas tried and ``validation_path`` the score of each. Layerwise: one stage whose "
        "objective is the sum "
        "over layers and rows of 1/2 (w - w_bar)^T (H + lambda I) (w - w_bar), H = X^T X / N over the layer's "
        "inputs through the already pruned earlier blocks", factory=list)
    validation: dict[str, Any] | None = _doc(
        "with validation samples (held out of the calibration data, never the evaluation data; not in ``n``): "
        "``n`` of them, ``score`` what is measured on them (``loss``: the mean loss on their labels; ``output``: "
        "the outputs' squared distance to the dense model's over their energy), its value ``dense`` and ``after`` "
        "pruning, ``lambda`` the lambda of every stage, and with a schedule chosen on them ``schedules`` (every "
        "candidate's stages, base_sparsity, first_order_term, score and seconds) and ``schedule`` (the one kept); null "
        "without", None)
    metric: dict[str, Any] = _doc("``name`` (accuracy, perplexity, embedding_fidelity, none) and the values "
                                  "``before`` (dense), ``magnitude`` (magnitude pruning at the same targets), "
                                  "``after``, and e.g. ``after_nn_agreement``; with BatchNorm re-estimation also "
                                  "``after_stale_bn`` and ``magnitude_stale_bn`` (the pruned model before its "
                                  "BatchNorm statistics were re-estimated)", factory=dict)
    recipe: str | None = _doc("with no objective given (``prune.objective: auto``): the objective, method and "
                              "granularity the model family's recipe chose, and why (dist_chita/recipes.py); "
                              "else null", None)
    batchnorm_reestimated: int = _doc("BatchNorm layers whose running statistics were recomputed on the "
                                      "calibration data after pruning (0: none, or re-estimation off)", 0)
    phase_seconds: dict[str, list[float]] = _doc(
        "per phase, per rank: load, allocation (OWL's pass), eval_before, magnitude_baseline, curvature "
        "(layerwise passes), fisher (per-sample gradients with the exchange), exchange, solver, backsolve, "
        "writeback, batchnorm (re-estimation), eval_after, save, total", factory=dict)
    bytes_sent: dict[str, list[int]] = _doc("payload bytes each rank sent in collectives, per phase",
                                            factory=dict)
    solver_iterations: int = _doc("IHT iterations over all stages", 0)
    bytes_per_solver_iteration: float = _doc("the most bytes a rank sent in phase solver, per iteration", 0.0)
    peak_memory_bytes: list[int] = _doc("peak memory per rank (device allocations on GPU, resident set on CPU)",
                                        factory=list)
    param_bytes: list[int] = _doc("bytes of parameter values each rank holds at the end (its ZeRO-3 partition, "
                                  "else the whole model)", factory=list)
    memory_estimate_bytes: dict[str, int] = _doc(
        "the estimate printed before the run, by part (dist_chita/planning/memory.py): factor, model, "
        "gradient_buffer, solver, backsolve, baseline (the process's resident memory besides the model at the "
        "start: interpreter, libraries, data; 0 on GPU), activations (the most one forward pass added, measured "
        "before the run), total", factory=dict)
    mask_sha256: str = _doc("sha256 of the kept-weight masks, layer by layer in layout order, as packed bits", "")
    output_format: str | None = _doc(
        "how the model's weights were saved: ``dense`` (zeros stored), or the compressed-tensors sparse format "
        "``sparse-bitmask`` (unstructured, N:M other than 2:4) or ``sparse-24-bitmask`` (2:4) (output.format: "
        "compressed-tensors; dist_chita/io/compressed.py); null when no model was saved (and from the API)", None)
    weights_bytes: int | None = _doc("bytes of the saved model's weight files (safetensors); null when none was "
                                     "saved", None)
    dense_weights_bytes: int | None = _doc("bytes the same weights take in the dense format (equal to "
                                           "``weights_bytes`` for dense output); null when no model was saved", None)
    weights_dtype: str | None = _doc("the floating-point dtype of the saved weights (output.dtype; ``auto``: the "
                                     "checkpoint's, whatever dtype the prune computed in); null when no model was "
                                     "saved (and from the API)", None)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        kw = {f.name: data[f.name.rstrip("_")] for f in dataclasses.fields(cls) if f.name.rstrip("_") in data}
        kw["global_"] = Totals(**kw.get("global_", {}))
        kw["layers"] = [LayerRow(**row) for row in kw.get("layers", [])]
        kw["stages"] = [StageReport(**st) for st in kw.get("stages", [])]
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    def add_rank_figures(self, seconds: Mapping[str, float], device: torch.device, param_bytes: int) -> None:
        """Merge this rank's ``seconds`` by phase into ``phase_seconds`` (added to what is there) and set the
        per-rank bytes sent, peak memory and parameter bytes. Collective: every rank calls it."""
        from dist_chita.planning import memory

        everyone = comm.all_gather_object({"t": dict(seconds), "b": comm.bytes_by_phase(),
                                           "peak": memory.peak_bytes(device), "params": param_bytes})
        for key in sorted({k for d in everyone for k in d["t"]}):
            old = self.phase_seconds.get(key, [0.0] * len(everyone))
            self.phase_seconds[key] = [o + d["t"].get(key, 0.0) for o, d in zip(old, everyone, strict=True)]
        self.bytes_sent = {k: [d["b"].get(k, 0) for d in everyone] for k in sorted({k for d in everyone
                                                                                    for k in d["b"]})}
        self.peak_memory_bytes = [d["peak"] for d in everyone]
        self.param_bytes = [d["params"] for d in everyone]
        self.bytes_per_solver_iteration = max(self.bytes_sent.get("solver", [0])) / max(1, self.solver_iterations)

    def summary_lines(self) -> list[str]:
        """A few lines a person reads at the end of a run."""
        g = self.global_
        lines = [f"dist-chita: {self.method} on {self.world_size} rank(s), n = {self.n}, p = {g.p:,} prunable weights",
                 f"  kept {g.kept:,} ({1 - g.sparsity:.2%}), sparsity {g.sparsity:.4f}" + _target_note(self)]
        if self.metric.get("name") not in (None, "none"):
            parts = [f"{k} {v:.4f}" for k, v in self.metric.items() if k != "name" and isinstance(v, float)]
            lines.append(f"  {self.metric['name']}: " + ", ".join(parts))
        lines += _validation_lines(self.validation)
        warm = "OBD saliency" if self.ridge == "fisher_diagonal" else "magnitude"  # the solver's warm start
        for i, st in enumerate(self.stages):
            if st.objective is not None:
                lines.append(f"  stage {i + 1}: " + _stage_line(st, warm))
        ph = self.phase_seconds
        lines.append("  time (s, max over ranks): " + ", ".join(f"{k} {max(v):.2f}" for k, v in sorted(ph.items())))
        peak = max(self.peak_memory_bytes or [0]) / 2**30
        est = self.memory_estimate_bytes.get("total")
        lines.append(f"  peak memory per rank {peak:.2f} GiB" + (f" (estimate {est / 2**30:.2f} GiB)" if est else ""))
        return lines


def _target_note(report: Report) -> str:
    """" (target T: ...)" when the sparsity reached differs from the last stage's target at four decimals (budgets
    keep a whole number of weights per row, group or layer, and at least one per row or layer); only when that
    stage holds every kept weight (not so for the layer groups of ``fisher.group_size``, a stage each)."""
    last = report.stages[-1] if report.stages else None
    target = last.sparsity if last is not None and last.kept == report.global_.kept else None
    if target is None or f"{report.global_.sparsity:.4f}" == f"{target:.4f}":
        return ""
    return f" (target {target:.4f}: the budgets keep whole weights per row or layer, at least one each)"


def _validation_lines(v: Mapping[str, Any] | None) -> list[str]:
    """What was chosen on the validation samples, and their score before and after."""
    if not v:
        return []
    lines = [f"  validation ({v['n']} samples held out of the calibration data, {v['score']}): dense "
             f"{v['dense']:.4g}, pruned {v['after']:.4g}"]
    if v.get("schedule"):
        c = v["schedule"]
        lines.append(f"  schedule chosen on validation: {c['stages']} stage(s) from {c['base_sparsity']:.4g}, "
                     f"first-order term {'on' if c['first_order_term'] else 'off'} (of {len(v['schedules'])} tried)")
    if v.get("lambda_auto"):
        lines.append("  lambda chosen on validation per stage: " + ", ".join(f"{x:g}" for x in v["lambda"]))
    return lines


def _stage_line(st: StageReport, warm: str) -> str:
    gain = ""
    mag = st.magnitude_objective
    if mag is not None:  # the warm start's objective, and how much lower the solver ended
        lower = f", {_share((mag - st.objective) / mag)} lower" if mag > 0 else ""
        floor = st.ridge_floor
        room = (f"; ridge floor {floor:.4g}: at most {_share((mag - floor) / mag)} lower"
                if floor is not None and mag > 0 else "")
        gain = f" ({warm}+backsolve {mag:.4g}{lower}{room})"
    its = f", {st.iterations} IHT iterations" if st.iterations else ""  # none: a baseline
    return f"sparsity {st.sparsity:.4f}, objective {st.objective:.4g}{gain}{its}"


def _share(x: float) -> str:
    """x as a percentage with two decimals; a float-noise negative that rounds to zero prints as 0.00%."""
    return f"{0.0 if abs(x) < 5e-5 else x:.2%}"


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name.rstrip("_"): _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def mask_digest(masks: Mapping[str, torch.Tensor], order: Sequence[str]) -> str:
    """sha256 of the kept-weight masks, layer by layer in ``order``, as packed bits."""
    h = hashlib.sha256()
    for name in order:
        m = masks[name].detach().reshape(-1).cpu().numpy().astype(bool)
        h.update(name.encode())
        h.update(np.packbits(m).tobytes())
    return h.hexdigest()


def layer_table(masks: Mapping[str, torch.Tensor], order: Sequence[str]) -> list[LayerRow]:
    """Per-layer size, kept count and sparsity."""
    rows = []
    for name in order:
        m = masks[name]
        size, kept = m.numel(), int(m.sum())
        rows.append(LayerRow(name, list(m.shape), size, kept, 1 - kept / size))
    return rows


def format_markdown() -> str:
    """``docs/report-format.md``: every key of ``prune_report.json`` with its type and meaning."""
    out = ["# `prune_report.json`", "",
           "Written into the output directory by `launch/prune.py` (main process only); `dist_chita.prune` returns "
           "the same object (`dist_chita.report.Report`). Generated from `dist_chita/report.py` "
           "(`python3 -m dist_chita.report > docs/report-format.md`).", ""]
    for cls in (Report, Totals, LayerRow):
        out += [f"## {cls.__name__}", "", (cls.__doc__ or "").strip(), "", "| key | type | meaning |",
                "|---|---|---|"]
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            doc = " ".join(f.metadata.get("doc", "").split()).replace("``", "`").replace("|", "\\|")
            kind = str(hints[f.name]).replace(" | ", " or ")
            out.append(f"| `{f.name.rstrip('_')}` | `{kind}` | {doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(format_markdown(), end="")
