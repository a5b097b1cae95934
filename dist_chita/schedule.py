"""Sparsity targets of CHITA++'s stages.

CHITA++ reaches the final sparsity s_T in T stages; stage t (1..T) prunes to
s_t and recomputes the Fisher factor at the pruned weights before the next
one. Like the official code it follows the polynomial (cubic) schedule of
Zhu & Gupta (2017) from a base sparsity s_0:

    s_t = s_T + (s_0 - s_T) * (1 - t / T) ** exponent,   t = 1..T,

so early stages take large steps and later ones small steps, and s_T is hit
exactly. A "linear" schedule (exponent 1) is also offered.
"""

from __future__ import annotations


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
