"""Per-layer pruning methods on the layerwise objective's passes: CHITA (:mod:`.chita`) and the baselines beside it
(:mod:`.magnitude`, :mod:`.wanda`, :mod:`.obd`, :mod:`.sparsegpt`), one module each, behind the interface of
:mod:`.base`. Every module of this package is imported here, so that a method registered in a new module
(:func:`.base.register`) is known by name."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
