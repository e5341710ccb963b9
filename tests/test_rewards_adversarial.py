"""Model output is untrusted: every registered reward function, fed hostile completions, returns a
value in its declared range within bounded time, never raises and never executes anything."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

import dllm_rl.tasks  # noqa: F401  (registers every built-in reward)
from dllm_rl.tasks.rewards import REWARDS, boxed_contents, call_reward, last_tag_content

CANARY = Path("/tmp/dllm_rl_reward_canary")

ADVERSARIAL = {
    "power tower": "<answer>9**9**9</answer> 9**9**9",
    "huge power": "<reasoning>\nx\n</reasoning>\n<answer>\n10**100000\n</answer>\n\\boxed{10^{10^{10^{10}}}}",
    "huge literal": "<answer>" + "9" * 5000 + "*" + "9" * 5000 + "</answer>",
    "million chars": "<answer>" + "1+" * 500_000,
    "million boxed": "\\boxed{" * 200_000,
    "nested parens": "<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>",
    "nested braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "code injection": f"<answer>__import__('os').system('touch {CANARY}')</answer>",
    "eval injection": f"<answer>eval(\"__import__('os').system('touch {CANARY}')\")</answer>\\boxed{{exec('1')}}",
    "arabic digits": "<answer>\n٣+٤*٥\n</answer>\\boxed{٧٢} ١٢٣٤٣٤١٢٢١٤٣٤٣٢١",
    "fullwidth digits": "<answer>１２３４</answer>",
    "unterminated answer": "<reasoning>\nthinking<answer>\n12",
    "unterminated boxed": "<answer>\\boxed{\\frac{1}{2</answer>",
    "only closing tags": "</answer></reasoning></answer>",
    "empty": "",
    "whitespace": " \n\t ",
    "nul bytes": "<answer>\x001\x00+\x002</answer>\x00\\boxed{\x00}",
    "many answer tags": "<answer>" * 50_000 + "</answer>",
    "regex bait": "<reasoning>" + "\n" * 100_000 + "</reasoning>" + " " * 100_000,
    "latex bomb": "\\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "}",
    "special tokens": "<answer>1+2</answer><|eot_id|><|endoftext|>",
}


def reward_names() -> list[str]:
    return sorted(REWARDS)


def test_every_task_registers_rewards():
    names = " ".join(REWARDS)
    for task in ("sudoku", "countdown", "gsm8k", "math"):
        assert task in names, f"no registered reward for {task}: {sorted(REWARDS)}"


@pytest.mark.parametrize("name", reward_names())
def test_reward_survives_adversarial_completions(name):
    spec = REWARDS[name]
    CANARY.unlink(missing_ok=True)
    for label, text in ADVERSARIAL.items():
        start = time.perf_counter()
        parts = call_reward(name, spec.fn, text, dict(spec.example))
        elapsed = time.perf_counter() - start
        total = sum(parts.values())
        assert all(math.isfinite(v) for v in parts.values()), (name, label, parts)
        assert spec.low - 1e-9 <= total <= spec.high + 1e-9, (name, label, total, spec.low, spec.high)
        # math-verify paths may use their whole time limit; everything else is pure string work.
        limit = 12.0 if "verify" in name else 2.0
        assert elapsed < limit, (name, label, f"{elapsed:.2f} s")
    assert not CANARY.exists(), f"{name} executed model output"


@pytest.mark.parametrize("name", reward_names())
def test_an_empty_completion_never_earns_the_maximum(name):
    """The registered range is not vacuous, and a reward that pays in full for no answer is a bug."""
    spec = REWARDS[name]
    assert spec.low < spec.high
    total = sum(call_reward(name, spec.fn, "", dict(spec.example)).values())
    assert spec.low <= total < spec.high


def test_tag_and_box_helpers_are_linear_and_exact():
    assert last_tag_content("<answer>a</answer> <answer>b\nc</answer>", "answer") == "b\nc"
    assert last_tag_content("<answer>unterminated", "answer") is None
    assert boxed_contents("\\boxed{a{b}c} and \\boxed {d} \\boxed{e") == ["a{b}c", "d"]
    start = time.perf_counter()
    assert last_tag_content("<answer>" * 200_000, "answer") is None
    assert boxed_contents("\\boxed{" * 200_000) == []
    assert time.perf_counter() - start < 2.0
