"""Modules that load on first use.

Composing and validating a config imports every component, because each declares its config schema
beside its code (docs/ARCHITECTURE.md, "Adding an objective"). Components name torch through ``lazy_import``, so
that this costs nothing: torch (about 1.5-3 s to import on 2 cores) loads at the first attribute a
run touches, or at the first plain ``import torch`` anywhere, and ``--help`` and config errors answer
before that.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class _LazyModule(ModuleType):
    """Stands for a module until its first attribute is asked for, then imports it (a plain import, so
    ``sys.modules`` only ever holds the real module) and forwards every attribute to it."""

    def _load(self) -> ModuleType:
        module = self.__dict__.get("_lazy_module")
        if module is None:
            module = self.__dict__["_lazy_module"] = importlib.import_module(self.__name__)
        return module

    def __getattr__(self, attr: str) -> object:  # only for attributes the stand-in itself lacks
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())


_STAND_INS: dict[str, _LazyModule] = {}


def lazy_import(name: str) -> ModuleType:
    """The module ``name``: the loaded one if something imported it already, else a stand-in that imports
    it at the first attribute access. The stand-in is not put into ``sys.modules``, so tools that walk
    ``sys.modules`` (``inspect.getmodule``, which Hydra's error report calls) do not load it."""
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _STAND_INS.setdefault(name, _LazyModule(name))


def no_grad(fn: Callable[P, R]) -> Callable[P, R]:
    """``@torch.no_grad()`` for a module that names torch lazily: the decorator would load torch when the
    module is imported, this enters ``torch.no_grad()`` at each call."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with lazy_import("torch").no_grad():
            return fn(*args, **kwargs)

    return wrapper
