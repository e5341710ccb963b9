"""The sanity task: the smallest RL problem with a known, reachable optimum (the "CartPole" of dllm_rl).

compact format only (character-level models): prompt = k random digits 0..radix-1 (``length_min``
<= k <= ``length_max``; default 5 digits 0-3), completion = k digits, digit i a fixed function of
prompt digit i (``task.rule``, modulo ``radix``):

* ``succ`` (default): (d_i + 1) mod radix, e.g. radix 4: ``01323`` -> ``12030``, radix 10: ``4821`` -> ``5932``;
* ``add_index``: (d_i + i + 1) mod radix (i from 0), e.g. radix 10: ``4821`` -> ``5055``;
* ``mirror``: radix - 1 - d_i, e.g. radix 10: ``4821`` -> ``5178``;
* ``copy``: d_i; ``upper``: d_i + radix (radix <= 5: digits the prompts never hold).

The reward is dense: the fraction of the k positions holding the right digit, over max(k, length of
the completion) so that extra characters cost (``sanity_digits``, in [0, 1]). Metrics: ``acc``
(correct positions over the sum of those denominators: the mean reward when, as by default, every
answer has the same length) and ``exact`` (whole answers).

The warm-started base learns the format, not the rule: its supervised targets (``Task.target``, the
data's ``base_target`` column) follow ``warmstart_rule`` (default ``copy``), each digit replaced by a
uniform digit 0..radix-1 with probability ``warmstart_noise`` (default 0.6). The base writes k digits
and copies the prompt greedily (test reward about 0 under ``succ``), while the right digit keeps about
noise / radix probability for RL to find. ``warmstart_noise: 1`` gives a base that knows the format
only (random digits); ``warmstart_rule`` equal to ``rule`` a base that already solves the task.

Data comes from an in-memory generator: test, validation and train prompts are drawn from their own
seeded streams, pairwise distinct and disjoint between splits (no test prompt is ever trained on).
The splits are small and built in milliseconds, so they are not cached on disk. Measurements of
every objective on this task: docs/RESULTS.md, section "Sanity task".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from dllm_rl.lazy import lazy_import
from dllm_rl.tasks.base import SPLITS, Task, TaskCfg, check_split, check_values, register_task
from dllm_rl.tasks.rewards import RewardFn, clip_text, register_reward

datasets = lazy_import("datasets")  # loads on first use (dllm_rl/lazy.py)
np = lazy_import("numpy")

DIGITS = "0123456789"
# The largest prompt length: keeps the prompt universe (10^k strings) and rollouts small.
MAX_LENGTH = 12

# rule(digit, position, radix) -> the answer digit at that position
RULES: dict[str, Callable[[int, int, int], int]] = {
    "copy": lambda d, i, b: d,
    "succ": lambda d, i, b: (d + 1) % b,
    "add_index": lambda d, i, b: (d + i + 1) % b,
    "mirror": lambda d, i, b: b - 1 - d,
    # d + radix: the digit written from outside the prompt alphabet (radix <= 5); never an answer
    "upper": lambda d, i, b: d + b,
}

_COLUMNS = ("prompt", "eval_prompt", "digits", "answer", "base_target")
# Independent random streams per split, so that e.g. changing train_size keeps the test prompts.
_STAGE_SEEDS = {"test": 1, "validation": 2, "train": 3}


def apply_rule(digits: str, rule: str, radix: int = 10) -> str:
    """The answer to a prompt of digits under ``rule`` (a key of RULES), digits modulo ``radix``.

    ValueError for an unknown rule, a radix outside 2..10 or a prompt that is not digits below radix.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of: {', '.join(RULES)}")
    if not 2 <= radix <= (5 if rule == "upper" else 10):
        raise ValueError(f"radix {radix} must be in 2..10 (2..5 for the rule upper)")
    if not isinstance(digits, str) or not digits or any(ch not in DIGITS[:radix] for ch in digits):
        raise ValueError(f"a prompt is a non-empty string of the digits 0..{radix - 1}, got {digits!r}")
    fn = RULES[rule]
    return "".join(str(fn(int(ch), i, radix)) for i, ch in enumerate(digits))


def correct_positions(completion: str, answer: str) -> tuple[int, int]:
    """(positions i < len(answer) where the completion holds answer[i], max(len(answer), len(completion))).

    Only the first MAX_REWARD_CHARS characters are read (rewards.clip_text), so the count is bounded.
    """
    text = clip_text(completion)
    correct = sum(1 for a, c in zip(answer, text, strict=False) if a == c)
    return correct, max(len(answer), len(text))


_EXAMPLE_ROW = {"digits": "4821", "answer": "5932"}


@register_reward("sanity_digits", low=0.0, high=1.0, example=_EXAMPLE_ROW)
def sanity_digits(completion: str, *, answer: str, **_: Any) -> float:
    """Fraction of the answer's positions the completion gets right; extra characters count as wrong."""
    correct, total = correct_positions(completion, str(answer))
    return correct / total if total else 0.0


def sanity_metrics(completions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """acc: correct positions over all positions (the mean reward's micro average); exact: whole answers."""
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions for {len(answers)} examples")
    correct = total = exact = 0
    for text, answer in zip(completions, answers, strict=True):
        c, t = correct_positions(text, answer)
        correct, total, exact = correct + c, total + t, exact + (text == answer)
    n = len(completions)
    return {"acc": correct / total if total else 0.0, "exact": exact / n if n else 0.0}


# --------------------------------------------------------------------------------------------------
# Configuration and generator


@dataclasses.dataclass
class SanityTaskCfg(TaskCfg):
    """``task=sanity``: k digits in, k digits out by a fixed per-position rule (a comment above each field)."""

    prompt_styles: ClassVar[tuple[str, ...]] = ("compact",)

    # registry name
    name: str = "sanity"
    completion_length: int = 5
    block_length: int = 5
    diffusion_steps: int = 5
    # held-out prompts disjoint from train and test (checkpoint selection, never the test split)
    validation_size: int = 64
    # supervised masked-diffusion steps of the tiny model's base (warmstart.steps follows it): 300 make it copy the
    # prompt reliably (100 left it half-formed); a few seconds, cached
    warmstart_steps: int = 300
    # the rule RL must find: succ (d_i + 1) | add_index (d_i + i + 1) | mirror (radix - 1 - d_i) | copy (d_i), all
    # modulo radix; upper (d_i + radix, radix <= 5) writes outside the prompt digits
    rule: str = "succ"
    # prompt digits are 0..radix-1 (2..10). 4, not 10: with 10 digits SPG reached only 0.67 after 20 rounds (2 would be
    # 1 bit a digit: a constant answer scores 0.5 and RL collapsed onto it; docs/RESULTS.md)
    radix: int = 4
    # fewest digits in a prompt (k)
    length_min: int = 5
    # most digits in a prompt (4^5 = 1024 distinct prompts; at most half of them are drawn)
    length_max: int = 5
    # the rule the warm-started base learns instead of task.rule (any rule name; copy: the prompt itself)
    warmstart_rule: str = "copy"
    # share of the base's target digits replaced by uniform digits 0..radix-1: the base keeps 0.6 / radix = 0.15
    # probability on the right digit to explore, and copy stays its greedy choice (1.0: random digits, the format only)
    warmstart_noise: float = 0.6
    # generated training prompts (the warm-start's data and the RL prompt stream)
    train_size: int = 384
    # test prompts (disjoint from train and validation; generated first, from their own stream)
    test_size: int = 64

    @classmethod
    def check(cls, t: Any, need: Callable[[bool, str], None]) -> None:
        super().check(t, need)
        rule, base_rule = t.get("rule", cls.rule), t.get("warmstart_rule", cls.warmstart_rule)
        need(rule in RULES, f"task.rule={rule!r} must be one of {', '.join(RULES)}")
        need(base_rule in RULES, f"task.warmstart_rule={base_rule!r} must be one of {', '.join(RULES)}")
        noise = t.get("warmstart_noise", cls.warmstart_noise)
        need(0.0 <= noise <= 1.0, f"task.warmstart_noise={noise} must be in [0, 1]")
        radix = t.get("radix", cls.radix)
        need(2 <= radix <= 10, f"task.radix={radix} must be in 2..10 (prompt digits 0..radix-1)")
        need(
            "upper" not in (rule, base_rule) or radix <= 5,
            f"task.radix={radix}: the rule upper writes d + radix, so radix must be <= 5",
        )
        low, high = t.get("length_min", cls.length_min), t.get("length_max", cls.length_max)
        need(
            1 <= low <= high <= MAX_LENGTH,
            f"task.length_min={low}, task.length_max={high}: need 1 <= length_min <= length_max <= {MAX_LENGTH}",
        )
        sizes = [t.get(f"{s}_size", getattr(cls, f"{s}_size")) for s in SPLITS]
        need(
            t.get("seed", cls.seed) >= 0 and min(sizes) >= 1,
            "task.seed must be >= 0 and task.train_size, validation_size, test_size >= 1",
        )
        if 2 <= radix <= 10 and 1 <= low <= high <= MAX_LENGTH:
            universe = sum(radix**k for k in range(low, high + 1))
            need(
                sum(sizes) <= universe // 2,
                f"task.train_size+validation_size+test_size={sum(sizes)} distinct prompts: lengths "
                f"{low}..{high} have {universe}; ask for at most half of them or allow longer prompts "
                "(task.length_max)",
            )


# The schema's defaults, the one place they are written.
_DEFAULT = SanityTaskCfg()


@dataclasses.dataclass(frozen=True)
class SanityConfig:
    """The task.* options the generator reads, cast and checked; defaults are the schema's (SanityTaskCfg)."""

    seed: int = _DEFAULT.seed
    rule: str = _DEFAULT.rule
    radix: int = _DEFAULT.radix
    length_min: int = _DEFAULT.length_min
    length_max: int = _DEFAULT.length_max
    warmstart_rule: str = _DEFAULT.warmstart_rule
    warmstart_noise: float = _DEFAULT.warmstart_noise
    train_size: int = _DEFAULT.train_size
    validation_size: int = _DEFAULT.validation_size
    test_size: int = _DEFAULT.test_size

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> SanityConfig:
        """Read the known keys with their defaults (other keys, e.g. decoding lengths, are ignored)."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = cfg.get(f.name, f.default)
            kwargs[f.name] = {"int": int, "float": float}.get(str(f.type), str)(value)
        config = cls(**kwargs)
        # The schema's rules (SanityTaskCfg.check) on the cast values.
        check_values(SanityTaskCfg, {**cfg, **dataclasses.asdict(config)})
        return config


def sample_prompts(config: SanityConfig, n: int, rng: np.random.Generator, exclude: set[str]) -> list[str]:
    """n distinct digit strings, not in ``exclude``: a uniform length, then uniform digits."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        batch = 2 * (n - len(out)) + 16
        lengths = rng.integers(config.length_min, config.length_max + 1, size=batch)
        digits = rng.integers(config.radix, size=(batch, config.length_max))
        for k, row in zip(lengths, digits, strict=True):
            text = "".join(DIGITS[d] for d in row[:k])
            if text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    break
    return out


def generate_splits(config: SanityConfig) -> dict[str, datasets.Dataset]:
    """Test first, then validation without test prompts, then train without either (seeded streams)."""
    taken: set[str] = set()
    splits: dict[str, datasets.Dataset] = {}
    for split in ("test", "validation", "train"):
        rng = np.random.default_rng([config.seed, _STAGE_SEEDS[split]])
        size = getattr(config, f"{split}_size")
        prompts = sample_prompts(config, size, rng, taken)
        taken.update(prompts)
        answers = [apply_rule(p, config.rule, config.radix) for p in prompts]
        # The base's targets: warmstart_rule's digits, each replaced by a uniform digit with
        # probability warmstart_noise (drawn from the split's own stream).
        shape = (len(prompts), config.length_max)
        noisy, uniform = rng.random(shape) < config.warmstart_noise, rng.integers(config.radix, size=shape)
        base = []
        for p, ms, us in zip(prompts, noisy, uniform, strict=True):
            ruled = apply_rule(p, config.warmstart_rule, config.radix)
            base.append("".join(DIGITS[u] if m else ch for ch, m, u in zip(ruled, ms, us, strict=False)))
        splits[split] = datasets.Dataset.from_dict(
            {"prompt": prompts, "eval_prompt": prompts, "digits": prompts, "answer": answers, "base_target": base},
            features=datasets.Features({name: datasets.Value("string") for name in _COLUMNS}),
        )
    return splits


@register_task("sanity", config=SanityTaskCfg)
class SanityTask(Task):
    """k digits in, k digits out by a fixed per-position rule; a base that knows the format only."""

    alphabet = DIGITS
    primary_metric = "acc"

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path) -> None:
        super().__init__(cfg, cache_dir)
        self.config = SanityConfig.from_cfg(self.cfg)
        self._splits: dict[str, datasets.Dataset] | None = None

    def dataset(self, split: str) -> datasets.Dataset:
        check_split(split)
        if self._splits is None:
            self._splits = generate_splits(self.config)
            assert set(self._splits) == set(SPLITS)
        return self._splits[split]

    def default_rewards(self) -> list[tuple[str, RewardFn]]:
        return [("correct_digits", sanity_digits)]

    def target(self, example: Mapping[str, Any]) -> str:
        # What the warm-start learns: random digits of the right length (or the rule, see the module doc).
        return str(example["base_target"])

    def metrics(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return sanity_metrics(completions, [str(ex["answer"]) for ex in examples])
