"""CHITA++'s schedule chosen on validation samples: ``stages``, ``base_sparsity`` and ``first_order_term`` set to
``auto`` (:class:`dist_chita.options.Fisher`).

Every combination of the candidates (:func:`schedule_candidates`) is a whole prune from the dense weights, judged
by the validation score of its result (:mod:`dist_chita.validation`); the weights of the lowest score are kept (the
first candidate on a tie). The ridge lambda is chosen per stage inside each run (``lambda: auto``, the driver's
lambda path), not here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dist_chita.fisher.driver import PruneOutcome
from dist_chita.io import params
from dist_chita.options import Fisher
from dist_chita.sparsity import Sparsity, mean_sparsity


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
                    log: Callable[[str], None] = lambda line: None) -> tuple[PruneOutcome, Schedule, list[dict]]:
    """Prune with each candidate schedule from the same dense weights (``run(candidate)`` prunes ``modules`` in
    place), score each result, and leave the weights of the lowest score in the modules. Returns (its outcome, its
    schedule, one row per candidate: the schedule's fields, ``score`` and the ``seconds`` of its prune). Collective."""
    dense = [params.read(m.weight).clone() for _, m in modules]
    best: tuple[float, PruneOutcome, Schedule, list[torch.Tensor]] | None = None
    rows = []
    for cand in candidates:
        for (_, m), w in zip(modules, dense, strict=True):
            params.write(m.weight, w)
        start = time.perf_counter()
        outcome = run(cand)
        seconds = time.perf_counter() - start
        value = score()
        rows.append({**asdict(cand), "score": value, "seconds": seconds})
        log(f"  schedule {cand.stages} stage(s) from {cand.base_sparsity:.4g}, first-order term "
            f"{'on' if cand.first_order_term else 'off'}: validation {value:.6g}")
        if best is None or value < best[0]:
            best = (value, outcome, cand, [params.read(m.weight).clone() for _, m in modules])
    _, outcome, cand, weights = best
    for (_, m), w in zip(modules, weights, strict=True):
        params.write(m.weight, w)
    return outcome, cand, rows
