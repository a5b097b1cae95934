"""CHITA++'s schedule chosen on validation samples: ``stages``, ``base_sparsity`` and ``first_order_term`` set to
``auto`` (:class:`dist_chita.options.Fisher`).

Every combination of the candidates (:func:`schedule_candidates`) is a whole prune from the dense weights, judged
by the validation score of its result (:mod:`dist_chita.validation`); the weights of the lowest score are kept (the
first candidate on a tie). The ridge lambda is chosen per stage inside each run (``lambda: auto``, the driver's
lambda path), not here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dist_chita.fisher.driver import PruneOutcome
from dist_chita.io import params
from dist_chita.options import Fisher
from dist_chita.sparsity import Sparsity, mean_sparsity
from dist_chita.validation import SCHEDULE_RULES, SIGNIFICANT_SE, standard_errors_below, within_one_se


@dataclass(frozen=True)
class Schedule:
    """One CHITA++ schedule: ``stages`` steps from ``base_sparsity`` (the share of zeros the first stage starts
    from), with or without the first-order term."""

    stages: int
    base_sparsity: float
    first_order_term: bool


def schedule_candidates(f: Fisher, sparsity: Sparsity, sizes: Sequence[int]) -> list[Schedule]:
    """The schedules to try: every combination of ``f.stage_candidates`` (for ``stages: auto``, else
    ``f.stages``), ``f.base_candidates`` times the target sparsity (its mean over the layers of ``sizes`` weights
    with per-layer targets; for ``base_sparsity: auto``, else ``f.base_sparsity``) and both first-order settings
    (for ``first_order_term: auto``), in that order, without repeats."""
    target = sparsity if isinstance(sparsity, int | float) else mean_sparsity(sparsity, sizes)
    stages = f.stage_candidates if f.stages == "auto" else (f.stages,)
    bases = [share * target for share in f.base_candidates] if f.base_sparsity == "auto" else [f.base_sparsity]
    orders = (False, True) if f.first_order_term == "auto" else (f.first_order_term,)
    out: list[Schedule] = []
    for t in stages:
        for b in bases:
            for fo in orders:
                cand = Schedule(int(t), 0.0 if t == 1 else float(b), bool(fo))
                if cand not in out:
                    out.append(cand)
    return out


def choose_schedule(modules: Sequence[tuple[str, nn.Module]], candidates: Sequence[Schedule],
                    run: Callable[[Schedule], PruneOutcome], score: Callable[[], float],
                    log: Callable[[str], None] = lambda line: None, values: Callable[[], torch.Tensor] | None = None,
                    rule: str = "min") -> tuple[PruneOutcome, Schedule, list[dict]]:
    """Prune with each candidate schedule from the same dense weights (``run(candidate)`` prunes ``modules`` in
    place), score each result, and leave the weights of the kept one in the modules: ``min`` the lowest score (the
    first on a tie); ``one_se`` (needs ``values() -> (m,)``, the per-sample validation values whose mean is the
    score) the simplest candidate within one standard error of the lowest score
    (:func:`dist_chita.validation.within_one_se`): the fewest stages, then the highest base sparsity, then without
    the first-order term (a copy of every candidate's weights is kept until the choice); ``significant`` (needs
    ``values``) the simplest candidate unless the lowest score lies more than :data:`SIGNIFICANT_SE` paired standard
    errors below the simplest's, else as ``one_se`` (a schedule more complex than the simplest is taken only when
    the validation samples show it better, not merely not worse). Returns (its outcome, its schedule, one row per
    candidate: the schedule's fields, ``score``, the ``seconds`` of its prune and, with ``values``,
    ``se_below_simplest`` and ``se_above_best``, its distance in paired standard errors). Collective."""
    if rule not in SCHEDULE_RULES or (rule != "min" and values is None):
        raise ValueError(f"schedule rule must be min, or one_se or significant (with values), got {rule!r}")
    dense = [params.read(m.weight).clone() for _, m in modules]
    kept: list[tuple[float, PruneOutcome, list[torch.Tensor], torch.Tensor | None]] = []
    rows = []
    for cand in candidates:
        for (_, m), w in zip(modules, dense, strict=True):
            params.write(m.weight, w)
        start = time.perf_counter()
        outcome = run(cand)
        seconds = time.perf_counter() - start
        vals = values() if rule != "min" else None
        value = float(vals.sum()) / vals.numel() if vals is not None else score()
        rows.append({**asdict(cand), "score": value, "seconds": seconds})
        log(f"  schedule {cand.stages} stage(s) from {cand.base_sparsity:.4g}, first-order term "
            f"{'on' if cand.first_order_term else 'off'}: validation {value:.6g}")
        lowest = min((k[0] for k in kept), default=math.inf)
        if rule != "min" or value < lowest:
            if rule == "min":  # the min rule keeps only the best's weights
                kept = [(k[0], None, None, None) for k in kept]
            kept.append((value, outcome, [params.read(m.weight).clone() for _, m in modules], vals))
        else:
            kept.append((value, None, None, None))
    index = min(range(len(kept)), key=lambda i: kept[i][0]) if rule == "min" else _simplest_kept(
        candidates, [k[3] for k in kept], rule, rows)
    _, outcome, weights, _ = kept[index]
    for (_, m), w in zip(modules, weights, strict=True):
        params.write(m.weight, w)
    return outcome, candidates[index], rows


def _simplest_kept(candidates: Sequence[Schedule], values: list[torch.Tensor], rule: str, rows: list[dict]) -> int:
    """The index the ``one_se`` or ``significant`` rule keeps (:func:`choose_schedule`), from the candidates'
    per-sample validation values (m,) each; adds each candidate's distances in standard errors to its row."""
    def complexity(i: int) -> tuple:
        return candidates[i].stages, -candidates[i].base_sparsity, candidates[i].first_order_term

    simplest = min(range(len(candidates)), key=complexity)
    best = min(range(len(values)), key=lambda i: float(values[i].sum()) / values[i].numel())
    below, above = standard_errors_below(values, simplest), standard_errors_below(values, best)
    for row, b, a in zip(rows, below, above, strict=True):
        row.update(se_below_simplest=b, se_above_best=-a)
    if rule == "significant" and not below[best] > SIGNIFICANT_SE:
        return simplest
    return min(within_one_se(values), key=complexity)
