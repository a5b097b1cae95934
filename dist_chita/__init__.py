"""dist-chita: distributed one-shot pruning with CHITA.

    import dist_chita
    report = dist_chita.prune(model, calibration, target=dist_chita.Target(sparsity=0.5))

:func:`prune` (:mod:`dist_chita.api`) prunes a model in memory on one process or many; :class:`Target`,
:class:`Layerwise` and :class:`Fisher` (:mod:`dist_chita.options`) say what to prune and with which objective.
"""

from __future__ import annotations

_EXPORTS = {"prune": "dist_chita.api", "Target": "dist_chita.options", "LayerSparsity": "dist_chita.options",
            "Layerwise": "dist_chita.options", "Fisher": "dist_chita.options", "Report": "dist_chita.report"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # imported on first use: ``import dist_chita.distributed.comm`` stays light
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_chita' has no attribute {name!r}")
