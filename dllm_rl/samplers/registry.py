"""Sampler registry: `sampler.name` in the config picks the class."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from dllm_rl.errors import ConfigError
from dllm_rl.schema import SCHEMAS, register_schema, typed

SAMPLERS: dict[str, type] = {}


def register_sampler(name: str, config: type) -> Callable[[type], type]:
    """Class decorator: ``sampler.name=<name>`` builds this class, and ``config`` (its dataclass schema, declared
    beside it, with a ``check(s, need)`` classmethod) is the section's schema, stored for Hydra as
    ``base_<name>``."""

    def wrap(cls: type) -> type:
        SAMPLERS[name] = cls
        register_schema("sampler", name, config)
        return cls

    return wrap


def get_sampler(cfg: Any) -> Any:
    """Build the sampler named by the sampler section (typed, or a plain mapping) from the rest of it, read
    through its schema (absent keys take the schema's defaults, every value its declared type; a bad one is
    a ConfigError)."""
    name = cfg["name"] if isinstance(cfg, Mapping) else cfg.name
    if name not in SAMPLERS:
        raise ConfigError(f"sampler.name={name!r} is unknown; available: {', '.join(sorted(SAMPLERS))}")
    section = typed(SCHEMAS["sampler"][name], cfg, "sampler")
    return SAMPLERS[name](**{f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "name"})
