"""The component schema registry, and how a component reads its section through its schema.

Each objective, sampler and task declares its section's dataclass schema beside its code and
registers it with its group's decorator (``@register_objective`` / ``@register_sampler`` /
``@register_task`` with ``config=...``), which calls ``register_schema``: the schema goes into Hydra's
ConfigStore as ``base_<name>`` and into ``SCHEMAS``, the table ``config.validate`` checks each
section with. ``typed`` gives a section as its schema's dataclass and ``plain`` turns it back into
plain values, ``option`` one value with Enum members read as plain strings. Nothing here imports a
component, so every one of them can.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dllm_rl.errors import ConfigError

# Component schemas by config group and name, filled by the components' registry decorators
# (register_schema); config.validate checks each section with the schema its name selects.
SCHEMAS: dict[str, dict[str, type]] = {"objective": {}, "sampler": {}, "task": {}}


def register_schema(group: str, name: str, schema: type) -> None:
    """Store a component's schema in Hydra's ConfigStore as ``base_<name>`` (its YAML option names it first
    in its defaults list: ``- /base_<name>@_here_``) and under SCHEMAS[group][name] for validation."""
    ConfigStore.instance().store(name=f"base_{name}", node=schema)
    SCHEMAS[group][name] = schema


T = TypeVar("T")


def typed(schema: type[T], node: Any, where: str) -> T:
    """A component's section as its schema's dataclass: ``node`` (a plain mapping, as workers load it, a
    DictConfig, or already a ``schema`` instance) merged onto the schema, so that absent keys take the
    schema's defaults and every value has its declared type (enums as members, floats as floats).
    A key the schema lacks or a value it cannot take is a ConfigError naming ``where``."""
    if isinstance(node, schema):
        return node
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key, message = getattr(exc, "full_key", None), getattr(exc, "msg", None) or str(exc)
        raise ConfigError(f"{where}.{key}: {' '.join(message.split())}" if key else f"{where}: {message}") from None


def plain(section: Any) -> Any:
    """A typed section (or whole config) back as plain dicts, lists and strings (enums by value), as
    config.yaml holds it; a mapping is returned as a plain dict."""
    if dataclasses.is_dataclass(section) or isinstance(section, (DictConfig, dict)):
        return OmegaConf.to_container(OmegaConf.create(section), resolve=True, enum_to_str=True)
    return section


def option(node: Any, key: str) -> Any:
    """A config value with Enum members read as their plain string (typed configs and plain dicts alike)."""
    value = node[key]
    return getattr(value, "value", value)
