"""Sampler registry: `sampler.name` in the config picks the class."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dllm_rl.errors import ConfigError

SAMPLERS: dict[str, type] = {}


def register_sampler(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        SAMPLERS[name] = cls
        return cls

    return wrap


def get_sampler(cfg: Mapping[str, Any]) -> Any:
    """Build the sampler named by cfg['name'] from the rest of the sampler config."""
    name = cfg["name"]
    if name not in SAMPLERS:
        raise ConfigError(f"sampler.name={name!r} is unknown; available: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](**{k: v for k, v in cfg.items() if k != "name"})
