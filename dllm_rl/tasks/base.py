"""Task interface and registry.

A task owns its data (train / validation / test splits as HF datasets), its training reward and its
evaluation metrics. Rewards return named parts so that each part can be logged on its own; the task
reward is their unweighted sum (tasks.md §0.5).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from dllm_rl.errors import ConfigError, DllmRlError

SPLITS: tuple[str, ...] = ("train", "validation", "test")


class DataError(DllmRlError, ValueError):
    """A data file or row is malformed; message names the file and the 1-based row."""


class Task(abc.ABC):
    """One RL task: data splits, a reward made of named parts, and evaluation metrics."""

    name: str = ""
    alphabet: str = ""  # every character a prompt or completion can contain (for char-level tokenizers)
    completion_length: int = 0  # natural completion length in characters for the compact format
    primary_metric: str = ""  # key of metrics() used as "the" metric

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path) -> None:
        # Copy so later mutation of the caller's config cannot change this task's behaviour.
        self.cfg: dict[str, Any] = dict(cfg or {})
        self.cache_dir = Path(cache_dir)

    @abc.abstractmethod
    def dataset(self, split: str) -> datasets.Dataset:
        """The split ("train", "validation" or "test"): a "prompt" str column plus metadata columns."""

    @abc.abstractmethod
    def reward(self, completion: str, example: Mapping[str, Any]) -> dict[str, float]:
        """Named reward parts for one completion; the task reward is their sum (see total_reward)."""

    @abc.abstractmethod
    def target(self, example: Mapping[str, Any]) -> str:
        """The reference completion text of a training example (what the warm-start learns)."""

    @abc.abstractmethod
    def metrics(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Aggregate evaluation metrics over aligned completions and examples."""


def check_split(split: str) -> None:
    """Raise ValueError for a split name outside SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")


def total_reward(parts: Mapping[str, float]) -> float:
    """The task reward: unweighted sum of the named parts."""
    return float(sum(parts.values()))


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a Task subclass to TASKS under `name` (and setting its `name`)."""

    def decorator(cls: type[Task]) -> type[Task]:
        existing = TASKS.get(name)
        # Re-registering the same class (e.g. a module reload) is harmless; two classes under one
        # name would make get_task ambiguous.
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"task {name!r} already registered by {existing.__qualname__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorator


def get_task(name: str, cfg: Mapping[str, Any], cache_dir: str | Path) -> Task:
    """Instantiate the registered task `name`; ConfigError listing the available names if unknown."""
    cls = TASKS.get(name)
    if cls is None:
        available = ", ".join(sorted(TASKS)) or "(none)"
        raise ConfigError(f"unknown task {name!r}; available: {available}")
    return cls(cfg, cache_dir)
