"""Sparsity targets of CHITA++'s stages.

CHITA++ reaches the final sparsity s_T in T stages; stage t (1..T) prunes to
s_t and recomputes the Fisher factor at the pruned weights before the next
one. Like the official code it follows the polynomial (cubic) schedule of
Zhu & Gupta (2017) from a base sparsity s_0:

    s_t = s_T + (s_0 - s_T) * (1 - t / T) ** exponent,   t = 1..T,

so early stages take large steps and later ones small steps, and s_T is hit
exactly. A "linear" schedule (exponent 1) is also offered.

A target is one sparsity for every layer or one per layer (:func:`layer_sparsities`); with one per layer, layer l
follows its own schedule from min(s_0, s_l) to s_l (:func:`stage_targets`).
"""

from __future__ import annotations

from collections.abc import Sequence

Sparsity = float | Sequence[float]  # one target for every layer, or one per layer


def stage_sparsities(
    final: float, stages: int, base: float = 0.0, kind: str = "polynomial", exponent: float = 3.0
) -> list[float]:
    """Sparsity after each of ``stages`` stages, ending exactly at ``final``."""
    if not 0.0 <= final < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {final}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if not 0.0 <= base <= final:
        raise ValueError(f"base sparsity {base} must be in [0, final sparsity {final}]")
    if kind not in ("polynomial", "linear"):
        raise ValueError(f"unknown schedule {kind!r} (polynomial or linear)")
    e = exponent if kind == "polynomial" else 1.0
    return [final + (base - final) * (1.0 - t / stages) ** e for t in range(1, stages + 1)]


def kept_count(total: int, sparsity: float) -> int:
    """Number of weights kept out of ``total`` at ``sparsity`` (rounded to nearest, at least 1)."""
    return max(1, min(total, round(total * (1.0 - sparsity))))


def layer_sparsities(sparsity: Sparsity, layers: int) -> list[float]:
    """``sparsity`` as one target per layer: a float for all ``layers``, or a sequence of exactly that many; each
    in [0, 1)."""
    if isinstance(sparsity, int | float):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        return [float(sparsity)] * layers
    targets = [float(s) for s in sparsity]
    if len(targets) != layers:
        raise ValueError(f"got {len(targets)} per-layer sparsities for {layers} layers")
    for i, s in enumerate(targets):
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity of layer {i} must be in [0, 1), got {s}")
    return targets


def stage_targets(sparsity: Sequence[float], stages: int, base: float = 0.0, kind: str = "polynomial",
                  exponent: float = 3.0) -> list[list[float]]:
    """Per-layer targets ``sparsity`` (L,) -> every stage's per-layer sparsities (stages lists of L): layer l
    follows :func:`stage_sparsities` from min(base, s_l) to s_l."""
    per = [stage_sparsities(s, stages, min(base, s), kind, exponent) for s in sparsity]
    return [[p[t] for p in per] for t in range(stages)]


def mean_sparsity(sparsity: Sparsity, sizes: Sequence[int]) -> float:
    """The share of zeros over layers of ``sizes`` weights when each is pruned to its target."""
    targets = layer_sparsities(sparsity, len(sizes))
    return sum(s * n for s, n in zip(targets, sizes, strict=True)) / max(1, sum(sizes))
