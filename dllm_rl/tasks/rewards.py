"""Reward functions: a registry of built-in ones, plug-ins by ``module:function`` path, safe text helpers.

A reward function is called as ``fn(completion, **fields)``: the decoded completion text and every
column of the data row (ground truth, numbers and target, puzzle and solution, ...) as keyword
arguments, so it declares the fields it reads and takes the rest with ``**_``. It returns a float, or
a mapping of named parts for a reward made of several parts; the task reward is the unweighted sum
of all parts of all its functions, and every part is logged on its own (docs/tasks.md, "Rewards").

A value that is not a finite number (NaN, inf, a string, None) is a bad reward: with
``task.on_bad_reward=error`` (the default) the run stops with one line naming the function, the sample
and the value; with ``zero`` it counts as 0 and a warning says how often. A plug-in that raises stops
the run with one line naming it; its traceback goes to the run's log files (README, "Tasks").

Model output is untrusted input. Built-in reward functions never evaluate it as code, never raise,
and run in time bounded by ``MAX_REWARD_CHARS``: they only ever look at that many leading characters.
Every built-in is checked against adversarial completions in tests/test_rewards_adversarial.py,
with the value range it declares here (``RewardSpec.low``/``high``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from dllm_rl.errors import ConfigError

# A completion longer than this is scored on its first MAX_REWARD_CHARS characters. Generations are
# at most a few thousand characters (512 tokens); the cap keeps every scan and regex bounded.
MAX_REWARD_CHARS = 32_768

RewardFn = Callable[..., float | Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A registered reward function, its value range and an example row for the adversarial tests."""

    name: str
    fn: RewardFn
    low: float
    high: float
    example: Mapping[str, Any]


REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, low: float, high: float, example: Mapping[str, Any]) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; [low, high] bounds every value (or part sum) it returns.

    ``example`` is a representative data row (the fields ``fn`` reads), used by the tests that feed
    adversarial completions to every registered reward.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        existing = REWARDS.get(name)
        if existing is not None and existing.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"reward {name!r} already registered by {existing.fn.__qualname__}")
        REWARDS[name] = RewardSpec(name, fn, float(low), float(high), dict(example))
        return fn

    return decorator


def resolve_reward(spec: str, field: str = "task.rewards") -> tuple[str, RewardFn]:
    """(part name, function) for a registered name or a ``package.module:function`` path."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{field}: a reward is a registered name or 'module:function', got {spec!r}")
    spec = spec.strip()
    if spec in REWARDS:
        return spec, REWARDS[spec].fn
    if ":" not in spec:
        available = ", ".join(sorted(REWARDS)) or "(none)"
        raise ConfigError(f"{field}: unknown reward {spec!r}; registered: {available}; or give 'module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field}: reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"{field}: reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{field}: reward {spec!r} is not callable")
    return attr.rsplit(".", 1)[-1], fn


def reward_parts(name: str, value: Any) -> dict[str, Any]:
    """A reward function's value as named parts, unchecked (a bare value becomes {name: value})."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return {name: value}


def as_reward(value: Any) -> float | None:
    """``value`` as a finite float; None when it is not finite or not a number (a str, None, a list,
    a tensor of several values)."""
    if isinstance(value, str | bytes) or not hasattr(type(value), "__float__"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def call_reward(name: str, fn: RewardFn, completion: str, example: Mapping[str, Any]) -> dict[str, float]:
    """Named parts of one reward function's value on one completion (a float becomes {name: value}).

    Raises ValueError naming the part for a value that is not a finite number (Task.reward applies
    task.on_bad_reward instead).
    """
    parts: dict[str, float] = {}
    for part, raw in reward_parts(name, fn(completion, **example)).items():
        number = as_reward(raw)
        if number is None:
            raise ValueError(f"reward {name!r} part {part!r}: {raw!r} is not a finite number")
        parts[part] = number
    return parts


def describe(name: str, fn: RewardFn) -> str:
    """How a message names a reward function: 'name', plus (module:function) for a plug-in."""
    spec = REWARDS.get(name)
    if spec is not None and spec.fn is fn:
        return repr(name)
    return f"{name!r} ({getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', name)})"


def clip_text(text: Any) -> str:
    """The completion as a str of at most MAX_REWARD_CHARS characters ('' for anything not a str)."""
    return text[:MAX_REWARD_CHARS] if isinstance(text, str) else ""


def last_tag_content(text: str, tag: str) -> str | None:
    """Content of the last ``<tag>…</tag>`` pair (newlines included), or None when there is none.

    Found with two reverse searches instead of a ``<tag>(.*?)</tag>`` regex: linear time on any input,
    where the regex rescans the rest of the text from every unterminated opening tag.
    """
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    opening = text.rfind(f"<{tag}>", 0, close)
    if opening < 0:
        return None
    return text[opening + len(tag) + 2 : close]


def first_tag_content(text: str, tag: str) -> str | None:
    """Content of the first ``<tag>…</tag>`` pair (newlines included), or None when there is none."""
    opening = text.find(f"<{tag}>")
    if opening < 0:
        return None
    start = opening + len(tag) + 2
    close = text.find(f"</{tag}>", start)
    return None if close < 0 else text[start:close]


def braced(text: str, open_at: int) -> tuple[str, int] | None:
    """(content, index of the closing brace) of the brace group opening at ``text[open_at]`` ('{'),
    or None when it never closes. A counter, not recursion: 10,000 nested braces are no problem."""
    depth = 0
    for k in range(open_at, len(text)):
        ch = text[k]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : k], k
    return None


def boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{…}`` with matched braces (nested braces kept), in order.

    An unterminated ``\\boxed{`` ends the scan (every later box sits inside it). Linear in the text
    length: each box is scanned once, from its opening to its closing brace.
    """
    out: list[str] = []
    key = "\\boxed"
    i = text.find(key)
    while i >= 0:
        j = i + len(key)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            found = braced(text, j)
            if found is None:
                break
            out.append(found[0])
            i = text.find(key, found[1] + 1)
        else:
            i = text.find(key, j)
    return out
