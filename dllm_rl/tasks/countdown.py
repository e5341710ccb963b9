"""Countdown with three numbers (docs/tasks.md, "Countdown"): reach the target with + - * / using each number once.

* Solver: every ordering of the numbers × the two tree shapes ((a∘b)∘c, a∘(b∘c)) × 4²
  operator pairs, exact rationals, division by zero skipped. It returns the solving expressions,
  classifies an instance as additive / needs-× / needs-÷ and picks a canonical solution (the shortest
  expression, ties broken by the fixed enumeration order) that the warm-start learns.
* Generator: numbers uniform with replacement, one expression uniform, accepted if its value is
  an integer in the target range; rejection-sampled to ``class_mix`` (exact per-split quotas), deduplicated
  on (sorted numbers, target). Test, validation and train have their own seeded streams (so changing
  train_size does not change the test set), validation and train exclude every test instance and train
  every validation one. Cached under ``<cache_dir>/data/countdown-<hash>``.
* Files and hub: JSONL/parquet/... rows ``{"nums": [..], "target": T}`` or the public test file's
  ``{"input": "30,100,93", "output": "23"}``; ``train_hub_id`` (e.g. Jiayi-Pan/Countdown-Tasks-3to4) is
  filtered to three numbers. Validation is carved from such a training set (held-out rows, d1 convention).
* Prompts: ``compact`` — ``30,100,93:23`` in, the bare expression out (character-level
  models); ``chat`` — the training question after SYSTEM_PROMPT, and CTD_SYSTEM_PROMPT + the
  ``Numbers: [..]\\nTarget: T`` question for evaluation (answer asked in ``<answer>`` tags for training and
  in ``\\boxed{}`` for evaluation: the papers' protocol, kept).
* Rewards: ``countdown`` (fixed: our exact grammar of dllm_rl/tasks/arith.py) and
  ``countdown_reference`` (d1's lexical check and Python-eval semantics, reproduced without eval).
  Values 0 (no expression), 0.1 (an expression that is not a solution), 1.0 (a solution).
* Metrics: compact — ``acc`` (fixed checker on the whole completion) and ``parsable``; chat — ``acc`` =
  ``acc_reference`` (d1's parser, comparable with the papers) and ``acc_fixed`` (a corrected parser).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from dllm_rl.errors import ConfigError
from dllm_rl.lazy import lazy_import
from dllm_rl.tasks.arith import (
    MAX_LITERAL_DIGITS,
    digit_runs,
    evaluate_reference,
    normalise_operators,
    parse_expression,
)
from dllm_rl.tasks.base import (
    SPLITS,
    SYSTEM_PROMPT,
    DataError,
    Task,
    TaskCfg,
    carve_validation,
    check_rows,
    check_split,
    check_values,
    load_hub,
    read_local,
    register_task,
)
from dllm_rl.tasks.rewards import (
    RewardFn,
    boxed_contents,
    clip_text,
    first_tag_content,
    last_tag_content,
    register_reward,
)

datasets = lazy_import("datasets")  # loads on first use (dllm_rl/lazy.py)
np = lazy_import("numpy")
pa = lazy_import("pyarrow")

log = logging.getLogger(__name__)
DataT = TypeVar("DataT", "datasets.Dataset", "datasets.DatasetDict")

N_NUMBERS = 3
# Numbers and targets must be writable as literals the strict grammar accepts.
MAX_VALUE = 10**MAX_LITERAL_DIGITS - 1
# Bump when generation changes so old on-disk caches are not reused for new semantics.
GENERATOR_VERSION = 1

# ------------------------------------------------------------------------------------------------ prompts

# The evaluation block, one paragraph; no space between "\boxed{a + b * c}" and "Respond" (as in the reference).
CTD_SYSTEM_PROMPT = (
    "Using only the provided numbers, create an arithmetic expression that evaluates to exactly the provided "
    "target number. You may use the operations +, -, *, and / as needed, but each number must be used exactly "
    "once. Think step-by-step. After reasoning, provide only your final expression inside \\boxed{} tags "
    "without including an equals sign or the target number. For example: \\boxed{a + b * c}"
    "Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n\\boxed{...}\n"
    "</answer>"
)
TRAIN_QUESTION = (
    "Using only the numbers {nums}, create an arithmetic expression that evaluates to exactly {target}. "
    "You must use all numbers from the list, and each number must be used exactly once. You may use the "
    "operations +, -, *, and / as needed. After reasoning, provide only your final expression inside "
    "<answer></answer> tags without including an equals sign or the target number. For example, if the "
    "numbers are [2, 3, 4] and the target is 5, a valid answer is: <answer>\n2*4-3\n</answer>"
)
EVAL_QUESTION = "Numbers: {nums}\nTarget: {target}"


def nums_text(nums: Sequence[int]) -> str:
    """The numbers as Python prints a list of ints: ``[30, 100, 93]``."""
    return "[" + ", ".join(str(int(n)) for n in nums) + "]"


def compact_prompt(nums: Sequence[int], target: int) -> str:
    """``30,100,93:23`` — the model input of the compact style (training and evaluation alike)."""
    return ",".join(str(int(n)) for n in nums) + f":{int(target)}"


def chat_train_prompt(nums: Sequence[int], target: int) -> str:
    """Training user message: SYSTEM_PROMPT, a newline, the question."""
    return SYSTEM_PROMPT + "\n" + TRAIN_QUESTION.format(nums=nums_text(nums), target=int(target))


def chat_eval_prompt(nums: Sequence[int], target: int) -> str:
    """Evaluation user message: CTD_SYSTEM_PROMPT, a blank line, ``Numbers: [..]\\nTarget: T``."""
    return CTD_SYSTEM_PROMPT + "\n\n" + EVAL_QUESTION.format(nums=nums_text(nums), target=int(target))


# ------------------------------------------------------------------------------------------------- solver

OPS = "+-*/"
LEFT, RIGHT = 0, 1  # tree shapes: (x o1 y) o2 z  and  x o1 (y o2 z)
CATEGORIES = ("additive", "multiply", "divide")  # solvable with + and -; else without /; else only with /
UNSOLVABLE = "unsolvable"
PERMUTATIONS = tuple(itertools.permutations(range(N_NUMBERS)))

# A rational as (numerator, denominator), denominator > 0 and not necessarily reduced: plain int
# arithmetic is several times faster than Fraction, and the solver runs once per generated or loaded row.
Rational = tuple[int, int]


class Tree(NamedTuple):
    """One expression of the solver's space: numbers in order x, y, z, a shape and two operators."""

    x: int
    y: int
    z: int
    shape: int
    o1: str
    o2: str


def _apply(op: str, a: Rational, b: Rational) -> Rational | None:
    """a op b exactly; None for a division by zero."""
    (an, ad), (bn, bd) = a, b
    if op == "+":
        return an * bd + bn * ad, ad * bd
    if op == "-":
        return an * bd - bn * ad, ad * bd
    if op == "*":
        return an * bn, ad * bd
    if bn == 0:
        return None
    return (an * bd, ad * bn) if bn > 0 else (-an * bd, -ad * bn)


def _evaluate(x: int, y: int, z: int, shape: int, o1: str, o2: str) -> Rational | None:
    if shape == LEFT:
        inner = _apply(o1, (x, 1), (y, 1))
        return None if inner is None else _apply(o2, inner, (z, 1))
    inner = _apply(o2, (y, 1), (z, 1))
    return None if inner is None else _apply(o1, (x, 1), inner)


def tree_value(tree: Tree) -> Fraction | None:
    """Exact value of an expression tree; None if it divides by zero."""
    value = _evaluate(*tree)
    return None if value is None else Fraction(*value)


def tree_text(tree: Tree) -> str:
    """The expression with only the parentheses its value needs, no spaces: ``30-(100-93)``."""
    x, y, z, shape, o1, o2 = tree
    if shape == LEFT:
        left = f"{x}{o1}{y}"
        # (x+y)*z needs them; (x*y)+z, (x-y)-z, (x/y)*z do not (left to right).
        return (f"({left})" if o1 in "+-" and o2 in "*/" else left) + f"{o2}{z}"
    right = f"{y}{o2}{z}"
    # x-(y+z), x*(y-z), x/(y*z) need them; x+(y-z) and x*(y/z) are equal without (exact rationals).
    needs = (o2 in "+-" and o1 in "-*/") or (o2 in "*/" and o1 == "/")
    return f"{x}{o1}" + (f"({right})" if needs else right)


def _pair_values(x: int, y: int) -> list[tuple[str, int, int]]:
    """(operator, numerator, denominator > 0) of x op y for the four operators; x / y only when y != 0."""
    values = [("+", x + y, 1), ("-", x - y, 1), ("*", x * y, 1)]
    if y != 0:
        values.append(("/", x, y) if y > 0 else ("/", -x, -y))
    return values


def solving_trees(nums: Sequence[int], target: int) -> list[Tree]:
    """Every expression tree over the three numbers whose exact value is ``target`` (enumeration order).

    Orderings in itertools.permutations order (repeated numbers give repeated orderings once), then
    shape (x o1 y) o2 z for o1, o2 in "+-*/", then x o1 (y o2 z) for o2, o1. With the inner value a = n/d,
    the outer operation is inverted against the integer target (a + z == t  ⇔  n == (t - z)·d), so each
    tree costs one integer comparison.
    """
    t = int(target)
    found: list[Tree] = []
    for x, y, z in dict.fromkeys(itertools.permutations(int(n) for n in nums)):
        for o1, n, d in _pair_values(x, y):  # (x o1 y) o2 z
            if n == (t - z) * d:
                found.append(Tree(x, y, z, LEFT, o1, "+"))
            if n == (t + z) * d:
                found.append(Tree(x, y, z, LEFT, o1, "-"))
            if n * z == t * d:
                found.append(Tree(x, y, z, LEFT, o1, "*"))
            if z != 0 and n == t * z * d:
                found.append(Tree(x, y, z, LEFT, o1, "/"))
        for o2, n, d in _pair_values(y, z):  # x o1 (y o2 z)
            if n == (t - x) * d:
                found.append(Tree(x, y, z, RIGHT, "+", o2))
            if n == (x - t) * d:
                found.append(Tree(x, y, z, RIGHT, "-", o2))
            if x * n == t * d:
                found.append(Tree(x, y, z, RIGHT, "*", o2))
            if n != 0 and x * d == t * n:
                found.append(Tree(x, y, z, RIGHT, "/", o2))
    return found


def solve(nums: Sequence[int], target: int) -> list[str]:
    """The distinct solving expressions (as tree_text writes them), in enumeration order; [] if unsolvable."""
    return list(dict.fromkeys(tree_text(tree) for tree in solving_trees(nums, target)))


def _category(trees: Sequence[Tree]) -> str:
    if not trees:
        return UNSOLVABLE
    if any(t.o1 in "+-" and t.o2 in "+-" for t in trees):
        return "additive"
    if any("/" not in (t.o1, t.o2) for t in trees):
        return "multiply"
    return "divide"


def analyse(nums: Sequence[int], target: int) -> tuple[str, str]:
    """(category, canonical solution): additive / multiply / divide / unsolvable, and the shortest
    solving expression (first in enumeration order among equals; "" if unsolvable)."""
    trees = solving_trees(nums, target)
    texts = [tree_text(tree) for tree in trees]
    return _category(trees), min(texts, key=len) if texts else ""  # min keeps the first of equal lengths


def classify(nums: Sequence[int], target: int) -> str:
    """additive (some solution uses only + and -), multiply (else some without /), divide, or unsolvable."""
    return _category(solving_trees(nums, target))


# ---------------------------------------------------------------------------------------------- checkers


def _nums_counter(nums: Any) -> collections.Counter[int] | None:
    try:
        return collections.Counter(int(n) for n in nums)
    except (TypeError, ValueError):
        return None


def fixed_correct(expression: str, nums: Sequence[int], target: int) -> bool:
    """The fixed check: the strict grammar parses it, its literals are exactly the numbers, its value is the target."""
    parsed = parse_expression(expression)
    if parsed is None:
        return False
    return collections.Counter(parsed.literals) == _nums_counter(nums) and parsed.value == int(target)


def reference_correct(equation: str, nums: Sequence[int], target: int) -> bool:
    """d1's checker (of its training reward and its eval parser), without eval.

    The multiset of digit runs must equal the numbers (lexically, so ``2.5`` counts as 2 and 5), the
    text must be what eval accepts over digits, ``+-*/().`` and whitespace, and the value must be within
    1e-5 of the target. A non-ASCII digit or space fails either d1's multiset check or its eval, so
    testing ASCII only gives the same verdicts.
    """
    equation = equation.strip()
    expected = _nums_counter(nums)
    if expected is None or collections.Counter(digit_runs(equation)) != expected:
        return False
    value = evaluate_reference(equation)
    return value is not None and abs(value - int(target)) < Fraction(1, 10**5)


def equals_rescue(text: str) -> str | None:
    """The left-hand side of the first ``expr = number`` in text, as the regex
    ``([0-9+\\-*/() ]+)=[0-9. ]+`` finds it (d1's eval parser), stripped; None if there is none.

    A linear scan instead of the regex: on a long run of expression characters without "=", the regex
    retries from every start position (quadratic time).
    """
    run_chars = frozenset("0123456789+-*/() ")
    value_chars = frozenset("0123456789. ")
    i, n = 0, len(text)
    while i < n:
        if text[i] not in run_chars:
            i += 1
            continue
        j = i
        while j < n and text[j] in run_chars:
            j += 1
        # The greedy run ends at j; backtracking cannot help, since every shorter end is a run character.
        if j + 1 < n and text[j] == "=" and text[j + 1] in value_chars:
            return text[i:j].strip()
        i = j
    return None


def reference_answer(text: str) -> str | None:
    """The last match of ``<answer>(.*?)</answer>`` (DOTALL, left-to-right non-overlapping), stripped.

    d1's extract_solution. Unlike last_tag_content it keeps d1's quirk that in
    ``<answer>a<answer>b</answer>`` the match is ``a<answer>b``.
    """
    last, pos = None, 0
    while (opening := text.find("<answer>", pos)) >= 0:
        close = text.find("</answer>", opening + len("<answer>"))
        if close < 0:
            break
        last, pos = text[opening + len("<answer>") : close], close + len("</answer>")
    return None if last is None else last.strip()


def _reference_boxed(text: str) -> str | None:
    """d1's remove_boxed(last_boxed_only_string(text)), or None where that raises (an unmatched brace).

    ``\\boxed `` (with a space) anywhere: the text after the last one up to a ``$``; otherwise the last
    ``\\boxed`` (or ``\\fbox``) with its first brace group, braces removed for ``\\boxed{``; no box at all:
    the whole text.
    """
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return text
    depth = 0
    for k in range(start, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                box = text[start : k + 1]
                return box[len("\\boxed{") : -1] if box.startswith("\\boxed{") else box
    return None


def reference_eval_equation(text: str) -> str:
    """The expression d1's eval parser scores: the last box (or fallbacks), operators, the ``= target`` rescue."""
    equation = _reference_boxed(text)
    if equation is None:
        inside = first_tag_content(text, "answer")
        equation = inside.strip() if inside is not None else text
    equation = equation.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    rescued = equals_rescue(equation)
    return rescued if rescued is not None else equation


def fixed_eval_equation(text: str) -> str | None:
    """acc_fixed's expression: the last brace-matched ``\\boxed{}``, else the last ``<answer>`` content, else None;
    operators normalised, then the same ``= target`` rescue."""
    boxes = boxed_contents(text)
    equation = boxes[-1] if boxes else last_tag_content(text, "answer")
    if equation is None:
        return None
    equation = normalise_operators(equation)
    rescued = equals_rescue(equation)
    return rescued if rescued is not None else equation


# ------------------------------------------------------------------------------------------------ rewards

_EXAMPLE = {"nums": [30, 100, 93], "target": 23}


def _completion_expression(completion: Any, answer_tags: bool) -> str | None:
    """The expression a training reward scores: the last ``<answer>`` content (chat) or the whole
    completion (compact); None when there is none (no tags, or an empty compact completion)."""
    text = clip_text(completion)
    if answer_tags:
        return last_tag_content(text, "answer")
    return text if text.strip() else None


@register_reward("countdown", low=0.0, high=1.0, example=_EXAMPLE)
def countdown_reward(
    completion: str, *, nums: Sequence[int], target: int, answer_tags: bool = False, **_: Any
) -> float:
    """Fixed reward: 0 without an expression; 1.0 for an exact solution in the strict grammar; else 0.1."""
    expression = _completion_expression(completion, answer_tags)
    if expression is None:
        return 0.0
    return 1.0 if fixed_correct(expression, nums, target) else 0.1


@register_reward("countdown_reference", low=0.0, high=1.0, example=_EXAMPLE)
def countdown_reference_reward(
    completion: str, *, nums: Sequence[int], target: int, answer_tags: bool = False, **_: Any
) -> float:
    """d1's compute_score: 0 without an expression; 1.0 if within 1e-5 of the target; else 0.1."""
    if answer_tags:
        equation = reference_answer(clip_text(completion))
    else:
        equation = _completion_expression(completion, answer_tags=False)
    if equation is None:
        return 0.0
    return 1.0 if reference_correct(equation, nums, target) else 0.1


REWARD_MODES: dict[str, tuple[str, RewardFn]] = {
    "fixed": ("countdown", countdown_reward),
    "reference": ("countdown_reference", countdown_reference_reward),
}


def countdown_metrics(
    completions: Sequence[str], examples: Sequence[Mapping[str, Any]], chat: bool
) -> dict[str, float]:
    """compact: acc, parsable; chat: acc (= acc_reference, the papers' number), acc_reference, acc_fixed."""
    if len(completions) != len(examples):
        raise ValueError(f"got {len(completions)} completions for {len(examples)} examples")
    n = len(completions)
    if n == 0:
        return {"acc": 0.0, "acc_reference": 0.0, "acc_fixed": 0.0} if chat else {"acc": 0.0, "parsable": 0.0}
    if not chat:
        texts = [clip_text(c) for c in completions]
        correct = sum(fixed_correct(t, ex["nums"], ex["target"]) for t, ex in zip(texts, examples, strict=True))
        parsable = sum(parse_expression(t) is not None for t in texts)
        return {"acc": correct / n, "parsable": parsable / n}
    reference = fixed = 0
    for completion, ex in zip(completions, examples, strict=True):
        text = clip_text(completion)
        reference += reference_correct(reference_eval_equation(text), ex["nums"], ex["target"])
        equation = fixed_eval_equation(text)
        fixed += equation is not None and fixed_correct(equation, ex["nums"], ex["target"])
    return {"acc": reference / n, "acc_reference": reference / n, "acc_fixed": fixed / n}


# -------------------------------------------------------------------------------------------- configuration


# CountdownConfig fields that determine the generated data (with class_mix), so name its cache directory.
_GENERATOR_FIELDS = (
    "seed",
    "train_size",
    "validation_size",
    "test_size",
    "number_min",
    "number_max",
    "target_min",
    "target_max",
)


@dataclasses.dataclass
class CountdownTaskCfg(TaskCfg):
    """``task=countdown``: the generator's, the data sources' and the reward's options
    (a comment above each field)."""

    # registry name
    name: str = "countdown"
    # supervised masked-diffusion steps of the tiny model's base (warmstart.steps follows it): 100 left it at 0 % test
    # accuracy, 400 gives an imperfect base (about 16 %) that RL can improve
    warmstart_steps: int = 400
    completion_length: int = 16
    block_length: int = 16
    diffusion_steps: int = 8
    # held-out training-side instances (checkpoint selection, never the test split; d1 holds out 500)
    validation_size: int = 500
    # generated training instances
    train_size: int = 20000
    # generated test instances (the public test file has 256)
    test_size: int = 256
    # smallest number drawn
    number_min: int = 1
    # largest number drawn
    number_max: int = 100
    # smallest target accepted
    target_min: int = 1
    # largest target accepted
    target_max: int = 100
    # share of instances that are additive / need * / need / (docs/tasks.md, "Countdown")
    class_mix: list[float] = dataclasses.field(default_factory=lambda: [0.895, 0.039, 0.066])
    # fixed: exact arithmetic grammar; reference: d1's lexical number check and eval semantics
    reward_mode: str = "fixed"
    # hub data set for training instead of the generator, e.g. Jiayi-Pan/Countdown-Tasks-3to4 (3-number rows kept)
    train_hub_id: str | None = None
    # its config name
    train_hub_config: str | None = None
    # its split
    train_hub_split: str = "train"
    # optional training file: JSONL rows {"nums": [..], "target": T} (or the test file's shape)
    train_file: str | None = None
    # optional validation file (default: generated, or carved from train_file / the hub data)
    validation_file: str | None = None
    # optional test file, e.g. d1's countdown_cd3_test.jsonl ({"input": "30,100,93", "output": "23"})
    test_file: str | None = None

    @classmethod
    def check(cls, t: Any, need: Callable[[bool, str], None]) -> None:
        super().check(t, need)
        mode = t.get("reward_mode", cls.reward_mode)
        need(mode in REWARD_MODES, f"task.reward_mode={mode!r} must be one of: {', '.join(REWARD_MODES)}")
        low, high = t.get("number_min", cls.number_min), t.get("number_max", cls.number_max)
        need(
            0 <= low <= high <= MAX_VALUE,
            f"task.number_min={low}, task.number_max={high}: "
            f"need 0 <= number_min <= number_max <= {MAX_VALUE} (no unary minus, so no negative numbers)",
        )
        low, high = t.get("target_min", cls.target_min), t.get("target_max", cls.target_max)
        need(
            -MAX_VALUE <= low <= high <= MAX_VALUE,
            f"task.target_min={low}, task.target_max={high}: "
            f"need -{MAX_VALUE} <= target_min <= target_max <= {MAX_VALUE}",
        )
        mix = [float(w) for w in t.get("class_mix", cls().class_mix)]
        need(
            len(mix) == len(CATEGORIES) and all(math.isfinite(w) and w >= 0 for w in mix) and sum(mix) > 0,
            f"task.class_mix={mix} must be {len(CATEGORIES)} non-negative shares "
            "(additive, needs *, needs /) with a positive sum",
        )
        length = t.get("completion_length", cls.completion_length)
        if t.get("prompt_style", "compact") == "compact":
            longest = longest_expression(t.get("number_max", cls.number_max))
            need(
                longest <= length,
                f"task.number_max={t.get('number_max', cls.number_max)}: a solution can take {longest} characters, "
                f"more than task.completion_length={length}",
            )


# The schema's defaults, the one place they are written.
_DEFAULT = CountdownTaskCfg()


@dataclasses.dataclass(frozen=True)
class CountdownConfig:
    """The task.* options this task reads, checked (docs/tasks.md, "Countdown"); defaults are the
    schema's (CountdownTaskCfg)."""

    seed: int = _DEFAULT.seed
    train_size: int = _DEFAULT.train_size
    validation_size: int = _DEFAULT.validation_size
    test_size: int = _DEFAULT.test_size
    number_min: int = _DEFAULT.number_min
    number_max: int = _DEFAULT.number_max
    target_min: int = _DEFAULT.target_min
    target_max: int = _DEFAULT.target_max
    class_mix: tuple[float, float, float] = tuple(_DEFAULT.class_mix)  # type: ignore[assignment]
    reward_mode: str = _DEFAULT.reward_mode
    train_hub_id: str | None = _DEFAULT.train_hub_id
    train_hub_config: str | None = _DEFAULT.train_hub_config
    train_hub_split: str = _DEFAULT.train_hub_split
    train_file: str | None = _DEFAULT.train_file
    validation_file: str | None = _DEFAULT.validation_file
    test_file: str | None = _DEFAULT.test_file
    completion_length: int = _DEFAULT.completion_length

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> CountdownConfig:
        """The known keys with their defaults, cast (CLI values may be strings) and checked."""
        kwargs = {f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            try:
                if f.type == "int":
                    kwargs[f.name] = int(kwargs[f.name])
                elif f.name == "class_mix":
                    kwargs[f.name] = tuple(float(w) for w in kwargs[f.name])
            except (TypeError, ValueError):
                raise ConfigError(f"task.{f.name}={kwargs[f.name]!r}: expected {f.type}") from None
        for key in ("train_hub_id", "train_hub_config", "train_file", "validation_file", "test_file"):
            kwargs[key] = None if kwargs[key] in (None, "") else str(kwargs[key])
        kwargs["reward_mode"] = str(kwargs["reward_mode"])
        config = cls(**kwargs)
        # The schema's rules (CountdownTaskCfg.check) on the cast values; cfg's other keys (prompt_style) too.
        check_values(CountdownTaskCfg, {**cfg, **dataclasses.asdict(config)})
        return config

    def generator_key(self) -> dict[str, Any]:
        """The fields that determine generated data (its cache key)."""
        key: dict[str, Any] = {name: getattr(self, name) for name in _GENERATOR_FIELDS}
        return {**key, "class_mix": list(self.class_mix), "generator_version": GENERATOR_VERSION}


def longest_expression(number_max: int) -> int:
    """Characters of the longest solver expression over numbers up to number_max: three literals,
    two operators, one pair of parentheses."""
    return N_NUMBERS * len(str(number_max)) + 2 + 2


# ---------------------------------------------------------------------------------------------- generator


class Instance(NamedTuple):
    """One Countdown instance with its solver results (category in CATEGORIES or UNSOLVABLE)."""

    nums: tuple[int, ...]
    target: int
    solution: str
    category: str


def instance_key(nums: Sequence[int], target: int) -> tuple[tuple[int, ...], int]:
    """The identity used for de-duplication and for keeping evaluation instances out of training."""
    return tuple(sorted(int(n) for n in nums)), int(target)


# Independent, stable random streams per split: changing train_size does not change the test set.
_STAGE_SEEDS = {"test": 1, "validation": 2, "train": 3}


def class_quotas(n: int, mix: Sequence[float]) -> dict[str, int]:
    """Instances per category for a split of n: n × the normalised mix, rounded by largest remainder."""
    total = sum(mix)
    exact = [n * w / total for w in mix]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(mix)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return dict(zip(CATEGORIES, counts, strict=True))


def sample_instances(
    n: int, config: CountdownConfig, rng: np.random.Generator, exclude: set[tuple[tuple[int, ...], int]]
) -> list[Instance]:
    """n distinct solvable instances, category counts given by class_quotas.

    Each candidate is three uniform numbers and one uniform expression over them (ordering, shape,
    operators); its value is the target when it is an integer in range. Candidates whose key is in
    ``exclude`` or already drawn, or whose category quota is full, are redrawn.
    """
    quotas = class_quotas(n, config.class_mix)
    counts = dict.fromkeys(CATEGORIES, 0)
    seen = set(exclude)
    out: list[Instance] = []
    # At the default ranges about one candidate in eight is accepted and the categories come out near
    # the default mix, so this bound is only reached by a mix the ranges cannot produce.
    max_draws, drawn = 200 * n + 20_000, 0
    while len(out) < n:
        if drawn >= max_draws:
            raise ConfigError(
                f"only {len(out)} of {n} Countdown instances found after {drawn} draws (have {counts}, "
                f"want {quotas}); lower the split size, widen task.number_min/number_max/target_min/target_max "
                "or change task.class_mix"
            )
        batch = min(8 * (n - len(out)) + 256, 16_384)  # bounded: the tail of the last batch is drawn for nothing
        drawn += batch
        numbers = rng.integers(config.number_min, config.number_max + 1, size=(batch, N_NUMBERS))
        orders = rng.integers(len(PERMUTATIONS), size=batch).tolist()
        shapes = rng.integers(2, size=batch).tolist()
        ops = rng.integers(len(OPS), size=(batch, 2))
        # Flat columns of plain ints: a list per candidate would make the garbage collector a third of
        # the generation time.
        columns = [numbers[:, j].tolist() for j in range(N_NUMBERS)] + [ops[:, 0].tolist(), ops[:, 1].tolist()]
        for k in range(batch):
            row = (columns[0][k], columns[1][k], columns[2][k])
            p, q, r = PERMUTATIONS[orders[k]]
            value = _evaluate(row[p], row[q], row[r], shapes[k], OPS[columns[3][k]], OPS[columns[4][k]])
            if value is None or value[0] % value[1] != 0:
                continue
            target = value[0] // value[1]
            if not config.target_min <= target <= config.target_max:
                continue
            key = instance_key(row, target)
            if key in seen:
                continue
            category, solution = analyse(row, target)
            if counts[category] >= quotas[category]:
                continue
            seen.add(key)
            counts[category] += 1
            out.append(Instance(row, target, solution, category))
            if len(out) == n:
                break
    return out


def generate_instances(config: CountdownConfig) -> dict[str, list[Instance]]:
    """Test first, then validation (excluding test), then train (excluding both), each on its own stream."""
    out: dict[str, list[Instance]] = {}
    taken: set[tuple[tuple[int, ...], int]] = set()
    for split in ("test", "validation", "train"):
        rng = np.random.default_rng([config.seed, _STAGE_SEEDS[split]])
        out[split] = sample_instances(getattr(config, f"{split}_size"), config, rng, taken)
        taken |= {instance_key(i.nums, i.target) for i in out[split]}
    return out


# Arrow column types; the datasets are built from arrow arrays because datasets' per-row feature encoding
# takes seconds for the ~250k rows of TinyZero's 3-number set.
def _arrow_types() -> dict[str, pa.DataType]:
    return {
        "nums": pa.list_(pa.int64()),
        "target": pa.int64(),
        "solution": pa.string(),
        "category": pa.string(),
        "prompt": pa.string(),
        "eval_prompt": pa.string(),
        "answer_tags": pa.bool_(),
    }


def instances_to_dataset(instances: Sequence[Instance], **extra: list[Any]) -> datasets.Dataset:
    """Dataset with the instance columns nums, target, solution, category, then the ``extra`` columns."""
    columns = {
        "nums": [list(i.nums) for i in instances],
        "target": [i.target for i in instances],
        "solution": [i.solution for i in instances],
        "category": [i.category for i in instances],
        **extra,
    }
    types = _arrow_types()
    return datasets.Dataset.from_dict({k: pa.array(v, type=types[k]) for k, v in columns.items()})


def dataset_to_instances(ds: datasets.Dataset) -> list[Instance]:
    """The rows of an instance dataset (as instances_to_dataset writes it)."""
    columns = column_lists(ds, "nums", "target", "solution", "category")
    return [Instance(tuple(n), t, s, c) for n, t, s, c in zip(*columns, strict=True)]


def cached_on_disk(cache_dir: str | Path, name: str, key: Mapping[str, Any], build: Callable[[], DataT]) -> DataT:
    """``build()``'s data set, saved once under cache_dir/data/<name>-<hash of key> and loaded from there.

    Written to a temporary sibling directory renamed into place, so a reader never sees a half-written
    cache and ranks building the same data concurrently cannot corrupt it.
    """
    blob = json.dumps(key, sort_keys=True)
    target = Path(cache_dir) / "data" / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if not target.is_dir():
        data = build()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            data.save_to_disk(str(tmp))
            (tmp / "cache_key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process renamed its identical copy first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def load_or_generate(config: CountdownConfig, cache_dir: str | Path) -> datasets.DatasetDict:
    """Generated splits, cached under cache_dir/data/countdown-<hash of the generator config>."""

    def build() -> datasets.DatasetDict:
        generated = generate_instances(config)
        return datasets.DatasetDict({split: instances_to_dataset(rows) for split, rows in generated.items()})

    return cached_on_disk(cache_dir, "countdown", config.generator_key(), build)


# ------------------------------------------------------------------------------------------ files and hub


def _as_int(value: Any) -> int | None:
    """An int from a JSON/arrow value: ints, integral floats (a column mixing 3 and 3.0 reads as float)
    and digit strings; None otherwise (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.isascii() and text.isdigit() and len(text) <= MAX_LITERAL_DIGITS else None
    return None


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_row(row: Mapping[str, Any]) -> tuple[tuple[int, ...], int] | str:
    """(numbers, target) of a data row in either shape, or what is wrong with it."""
    if "nums" in row:
        raw_nums, raw_target = row["nums"], row.get("target")
        if not isinstance(raw_nums, (list, tuple)):
            return f"nums must be a list of {N_NUMBERS} integers, got {_preview(raw_nums)}"
        parts: Sequence[Any] = raw_nums
    else:
        raw_input, raw_target = row.get("input"), row.get("output")
        if not isinstance(raw_input, str):
            return f"input must be a string of {N_NUMBERS} comma-separated integers, got {_preview(raw_input)}"
        parts = raw_input.split(",")
    if len(parts) != N_NUMBERS:
        return f"expected {N_NUMBERS} numbers, got {len(parts)}: {_preview(parts)}"
    nums = tuple(_as_int(p) for p in parts)
    if any(n is None or not 0 <= n <= MAX_VALUE for n in nums):
        return f"numbers must be integers in [0, {MAX_VALUE}], got {_preview(parts)}"
    if raw_target is None:
        return "target missing"
    target = _as_int(raw_target)
    if target is None or not 0 <= target <= MAX_VALUE:
        return f"target must be an integer in [0, {MAX_VALUE}], got {_preview(raw_target)}"
    return nums, target


def _row_columns(ds: datasets.Dataset, where: str) -> tuple[str, str]:
    """The (numbers, target) column names: nums/target or the test file's input/output."""
    for columns in (("nums", "target"), ("input", "output")):
        if set(columns) <= set(ds.column_names):
            return columns
    raise DataError(
        f"{where}: rows need 'nums' and 'target' (or the test file's 'input' and 'output'); has {ds.column_names}"
    )


def instances_from_rows(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """Validated rows as an instance dataset; DataError naming ``where`` and the 1-based row of a bad row.

    Unsolvable rows are kept (their solution is "" and their category "unsolvable") and counted in a log
    line: a published file may hold a few, and dropping them would change the metric's denominator.
    """
    nums_col, target_col = _row_columns(ds, where)

    def problem(row: Mapping[str, Any]) -> str | None:
        result = read_row(row)
        return result if isinstance(result, str) else None

    check_rows(ds, where, problem, (nums_col, target_col))
    solved: dict[tuple[tuple[int, ...], int], tuple[str, str]] = {}
    instances: list[Instance] = []
    for raw_nums, raw_target in zip(*column_lists(ds, nums_col, target_col), strict=True):
        nums, target = read_row({nums_col: raw_nums, target_col: raw_target})
        key = (nums, target)
        if key not in solved:
            solved[key] = analyse(nums, target)
        category, solution = solved[key]
        instances.append(Instance(nums, target, solution, category))
    unsolvable = sum(i.category == UNSOLVABLE for i in instances)
    if unsolvable:
        log.warning(
            "%s: %d of %d rows have no solution with + - * / (kept, solution empty)", where, unsolvable, len(ds)
        )
    return instances_to_dataset(instances)


def source_identity(path: str | Path) -> list[Any]:
    """What identifies a data file's content for the cache: its resolved path and SHA-256 (a directory:
    each file's relative name, size and modification time)."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return [str(path), hashlib.sha256(path.read_bytes()).hexdigest()]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [str(path)] + [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def column_lists(ds: datasets.Dataset, *names: str) -> list[list[Any]]:
    """Whole columns as Python lists in one batch read (iterating ``ds[name]`` formats row by row)."""
    batch = ds.select_columns(list(names)).with_format(None)[:]
    return [batch[name] for name in names]


def drop_instances(instances: list[Instance], keys: set[tuple[tuple[int, ...], int]]) -> list[Instance]:
    """The instances whose instance_key is not in keys."""
    return [i for i in instances if instance_key(i.nums, i.target) not in keys]


def carve_instances(instances: list[Instance], size: int, seed: int) -> tuple[list[Instance], list[Instance]]:
    """(kept, held out) by the shared carve_validation convention, applied to row indices only."""
    index = datasets.Dataset.from_dict({"index": pa.array(range(len(instances)), type=pa.int64())})
    kept, held = (column_lists(part, "index")[0] for part in carve_validation(index, size, seed))
    return [instances[i] for i in kept], [instances[i] for i in held]


# --------------------------------------------------------------------------------------------------- task


@register_task("countdown", config=CountdownTaskCfg)
class CountdownTask(Task):
    """Countdown, three numbers: compact (``30,100,93:23`` → ``30-100+93``) or chat prompts (docs/tasks.md)."""

    alphabet = "0123456789+-*/(),:"
    primary_metric = "acc"

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path) -> None:
        super().__init__(cfg, cache_dir)
        self.config = CountdownConfig.from_cfg(self.cfg)
        # Fail at construction, not hours later, when a configured file is missing.
        for key in ("train_file", "validation_file", "test_file"):
            path = getattr(self.config, key)
            if path is not None and not Path(path).expanduser().exists():
                raise DataError(f"{path}: file not found (config key task.{key})")
        self._splits: dict[str, datasets.Dataset] | None = None

    def dataset(self, split: str) -> datasets.Dataset:
        check_split(split)
        if self._splits is None:
            self._splits = {s: self._with_prompts(rows) for s, rows in self._build_splits().items()}
        return self._splits[split]

    # Validating and solving a file or hub split costs ~80 µs a row (TinyZero's 3-number set: ~20 s), so
    # the result is cached, keyed by the source's content.

    def _load_file(self, split: str) -> list[Instance]:
        path, key = getattr(self.config, f"{split}_file"), f"task.{split}_file"

        def build() -> datasets.Dataset:
            return instances_from_rows(read_local(path, key, self.cache_dir / "hf_datasets"), f"{path} ({key})")

        source = {"file": source_identity(path), "version": GENERATOR_VERSION}
        return dataset_to_instances(cached_on_disk(self.cache_dir, "countdown-file", source, build))

    def _load_hub(self) -> list[Instance]:
        c = self.config
        raw = load_hub(c.train_hub_id, c.train_hub_config, c.train_hub_split, "task.train_file")
        where = f"hub data set {c.train_hub_id} split {c.train_hub_split} (task.train_hub_id)"

        def build() -> datasets.Dataset:
            three = raw
            if _row_columns(raw, where)[0] == "nums":  # TinyZero's set mixes 3 and 4 numbers
                (nums,) = column_lists(raw, "nums")
                three = raw.select([i for i, row in enumerate(nums) if isinstance(row, list) and len(row) == N_NUMBERS])
            return instances_from_rows(three, where + f", {N_NUMBERS}-number rows")

        # datasets' fingerprint of the loaded split identifies its cached download.
        source = {"hub": [c.train_hub_id, c.train_hub_config, c.train_hub_split, getattr(raw, "_fingerprint", None)]}
        cached = cached_on_disk(self.cache_dir, "countdown-hub", {**source, "version": GENERATOR_VERSION}, build)
        return dataset_to_instances(cached)

    def _build_splits(self) -> dict[str, list[Instance]]:
        """Files / hub where configured, generated data otherwise; no evaluation instance in train."""
        c = self.config
        splits = {s: self._load_file(s) for s in SPLITS if getattr(c, f"{s}_file") is not None}
        if "train" not in splits and c.train_hub_id is not None:
            splits["train"] = self._load_hub()
        if "train" in splits and "validation" not in splits:
            # Held-out training rows (d1 convention), never test rows.
            splits["train"], splits["validation"] = carve_instances(splits["train"], c.validation_size, c.seed)
        if any(s not in splits for s in SPLITS):
            generated = load_or_generate(c, self.cache_dir)
            splits = {s: splits[s] if s in splits else dataset_to_instances(generated[s]) for s in SPLITS}
        # Generated splits exclude each other already; files and the hub need it done here.
        test_keys = {instance_key(i.nums, i.target) for i in splits["test"]}
        splits["validation"] = drop_instances(splits["validation"], test_keys)
        validation_keys = {instance_key(i.nums, i.target) for i in splits["validation"]}
        splits["train"] = drop_instances(splits["train"], test_keys | validation_keys)
        return splits

    def _with_prompts(self, instances: Sequence[Instance]) -> datasets.Dataset:
        """The instance columns plus prompt, eval_prompt and answer_tags (the reward option as a column, so
        that a reward named in task.rewards reads the right region without binding it)."""
        if self.chat:
            prompts = [chat_train_prompt(i.nums, i.target) for i in instances]
            eval_prompts = [chat_eval_prompt(i.nums, i.target) for i in instances]
        else:
            prompts = eval_prompts = [compact_prompt(i.nums, i.target) for i in instances]
        answer_tags = [self.chat] * len(instances)
        return instances_to_dataset(instances, prompt=prompts, eval_prompt=eval_prompts, answer_tags=answer_tags)

    def default_rewards(self) -> list[tuple[str, RewardFn]]:
        name, fn = REWARD_MODES[self.config.reward_mode]
        return [(name, functools.partial(fn, answer_tags=self.chat))]

    def target(self, example: Mapping[str, Any]) -> str:
        solution = str(example["solution"])
        # Chat: the answer block the training prompt asks for.
        return f"<answer>\n{solution}\n</answer>" if self.chat else solution

    def metrics(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return countdown_metrics(completions, examples, self.chat)
