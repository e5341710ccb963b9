"""Modules that load on first use.

Composing and validating a config imports every component, because each declares its config schema
beside its code (docs/ARCHITECTURE.md, "Configs"). Components name torch through ``lazy_import``, so
that this costs nothing: torch (about 1.5-3 s to import on 2 cores) loads at the first attribute a
run touches, or at the first plain ``import torch`` anywhere, and ``--help`` and config errors answer
before that.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """The module ``name``: the loaded one if it is in ``sys.modules``, else one that runs its code on the
    first attribute access (importlib's LazyLoader). Only for top-level modules: finding a submodule
    imports its parents."""
    if name in sys.modules:
        return sys.modules[name]
    if "." in name:
        raise ValueError(f"lazy_import({name!r}): only top-level modules load lazily")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
