"""GSM8K grade-school math word problems (docs/tasks.md, "GSM8K"), chat prompts only.

Data: ``question`` and ``answer`` (the worked answer ending in ``#### N``); the training ground
truth is the text after ``####``, stripped. Local files or ``openai/gsm8k`` (see hub_task.py).

Prompts: ``prompt`` = SYSTEM_PROMPT + "\\n\\n" + question (training family); ``eval_prompt`` =
GSM_SYSTEM_PROMPT + "\\n\\n" + question (evaluation family, answer in ``\\boxed{}``).

Training reward, ``variant: xml`` (five parts, maximum 4.0). e = the text after the last
``<answer>`` and before the next ``</answer>``, stripped (the whole text without tags).

  xmlcount       +0.125 for each of "<reasoning>\\n", "\\n</reasoning>\\n", "\\n<answer>\\n", "\\n</answer>"
                 occurring exactly once, less 0.001 per character after the last "\\n</answer>\\n" (third
                 term) and per character after the last "\\n</answer>" beyond the first (fourth term).
                 Same in both modes. At most 0.5; the penalty grows with the text, so on the capped text
                 (MAX_REWARD_CHARS) the value is at least 0.25 - 0.002 * MAX_REWARD_CHARS.
  soft_format    0.5 if the text starts with <reasoning>…</reasoning>, whitespace, <answer>…</answer>.
                 reference: "…" cannot contain a newline (d1's regex lacks DOTALL), so
                 multi-line reasoning never earns it; fixed: newlines allowed, leading whitespace ignored.
  strict_format  0.5 if the text is exactly "<reasoning>\\nR\\n</reasoning>\\n<answer>\\nA\\n</answer>\\n".
                 reference: R and A single lines, one optional extra trailing newline; fixed: R and A
                 non-blank, newlines allowed, any trailing whitespace.
  int            0.5 if e is an integer. reference: ``e.isdigit()`` (no minus sign); fixed:
                 the normalised e (see below) is an optional minus sign and ASCII digits.
  correctness    2.0 if e matches the ground truth. reference: string equality; fixed:
                 numeric equality after normalisation: the content of a \\boxed{} in e if any, "$" and
                 surrounding whitespace, a trailing period and thousands commas removed, then an exact
                 decimal.

``variant: boxed`` (GDSD's ``gsm8k``): boxed prompt for training too, and a single part
``correctness`` worth 1.0 when the answer read from the text equals the ground-truth string: the number
after the first "The answer is " (followed by one more character, as in GDSD's regex), else after the
first "#### ", else the last integer in the text.

Evaluation: ``acc`` = ``acc_reference``, d1's parser: the first ``\\boxed{…}`` (to
the first "}", on one line) whose content is neither empty nor only dots, read as a float or else its
first number; otherwise the first <answer>…</answer>, read as a float or else its last number; correct
iff equal to the float after "####" read by ``####\\s*\\$?([\\d,]+(?:\\.\\d+)?)`` (no minus sign: negative
answers always count as wrong). ``acc_fixed``: the same order with brace-matched boxes, the fixed
numeric normalisation and exact decimals, and a ground truth that may be negative. ``format_rate``: the
share of completions with a ``\\boxed{…}`` inside <answer>…</answer> (the format the eval prompt asks for).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.tasks.base import SYSTEM_PROMPT, register_task
from dllm_rl.tasks.hub_task import HubTask, HubTaskCfg, string_field, xml_answer
from dllm_rl.tasks.rewards import (
    MAX_REWARD_CHARS,
    RewardFn,
    boxed_contents,
    clip_text,
    first_tag_content,
    register_reward,
)

datasets = lazy_import("datasets")  # loads on first use (dllm_rl/lazy.py)

# task.variant: xml = the five-function d1 reward; boxed = GDSD's single exact-match reward
VARIANTS: tuple[str, ...] = ("xml", "boxed")

# The evaluation block; its first line ends with a space before the newline (as in the reference).
GSM_SYSTEM_PROMPT = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. "
    "Wrap the final answer in a \\boxed{}. \n"
    "Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
    "<answer>\n\\boxed{...}\n</answer>"
)

XMLCOUNT_LOW = 0.25 - 0.002 * MAX_REWARD_CHARS
EXAMPLE = {"ground_truth": "72"}

# Number patterns. The reference ones keep Python's Unicode \d (d1 parity); the fixed ones are ASCII.
_REFERENCE_GT = re.compile(r"####\s*\$?([\d,]+(?:\.\d+)?)")
_REFERENCE_NUMBER = re.compile(r"-?\d+\.?\d*")
_DOTS = re.compile(r"\.+")
_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)
_THOUSANDS = re.compile(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?", re.ASCII)
_FIXED_NUMBER = re.compile(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|-?[0-9]+(?:\.[0-9]+)?", re.ASCII)
_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)
# GDSD's extraction for variant boxed: "The answer is (-?[0-9.,]+)." with its trailing any-character.
_ANSWER_IS = re.compile(r"The answer is (-?[0-9.,]+).")
_HASHES = re.compile(r"#### (-?[0-9.,]+)")
# Calculator annotations such as <<48/2=24>> in GSM8K worked answers (dropped from warm-start targets).
_CALCULATOR = re.compile(r"<<[^<>]{0,200}>>")


# ------------------------------------------------------------------------------------------ parsing helpers


def hash_ground_truth(answer: str) -> str | None:
    """Text after the first "####" of a worked answer (up to a second one), stripped; None without "####"."""
    if "####" not in answer:
        return None
    return answer.split("####", 2)[1].strip()


def normalise_number_text(text: str) -> str:
    """The fixed normalisation of an answer string, before it is read as a number.

    The content of the last \\boxed{} if there is one; "$" and "\\$" removed; surrounding whitespace and
    one trailing period dropped; thousands separators removed when the commas group digits by three.
    """
    boxes = boxed_contents(text) if "\\boxed" in text else []
    s = boxes[-1] if boxes else text
    s = s.replace("\\$", "").replace("$", "").strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def exact_number(text: str) -> Decimal | None:
    """The exact decimal value of an answer string after the fixed normalisation, or None."""
    s = normalise_number_text(text)
    return Decimal(s) if _PLAIN_DECIMAL.fullmatch(s) else None


def _number_token(token: str) -> Decimal:
    """An ASCII number token (possibly with thousands commas) as an exact decimal."""
    return Decimal(token.replace(",", ""))


def reference_gt_value(answer: str) -> float | None:
    """d1's evaluation ground truth: the number after "####" as a float, no minus sign accepted."""
    match = _REFERENCE_GT.search(answer)
    if match is None:
        return None
    try:
        return float(match.group(1).replace(",", ""))
    except ValueError:  # "#### ," matches the character class but is no number
        return None


def fixed_gt_value(ground_truth: str) -> Decimal | None:
    """The fixed evaluation ground truth: the training ground-truth string as an exact (signed) decimal."""
    return exact_number(ground_truth)


def flat_boxes(text: str) -> list[str]:
    """What d1's ``re.findall(r"\\\\boxed{(.*?)}", text)`` finds: each box's text up to its first "}", on one line.

    Scanned with cached str.find positions (linear; the regex is quadratic on many unclosed boxes).
    """
    out: list[str] = []
    close = newline = -1
    at = text.find("\\boxed{")
    while at >= 0:
        start = at + len("\\boxed{")
        if close < start:
            close = text.find("}", start)
            if close < 0:
                break  # no "}" left: no later box can match either
        if newline < start:
            newline = text.find("\n", start)
            newline = len(text) if newline < 0 else newline
        if close < newline:
            out.append(text[start:close])
            at = text.find("\\boxed{", close + 1)
        else:  # a newline before the "}": no match here, the regex moves on
            at = text.find("\\boxed{", at + 1)
    return out


def _float_or_number(text: str, pick: int) -> float | None:
    """float(text), else the ``pick``-th (0 or -1) number matched by d1's ``-?\\d+\\.?\\d*``, else None."""
    try:
        return float(text)
    except ValueError:
        numbers = _REFERENCE_NUMBER.findall(text)
        return float(numbers[pick]) if numbers else None


def _box_then_tag(text: str, boxes: list[str], parse: Callable[[str, int], Any]) -> Any:
    """d1's order: the first box that is neither empty nor dots and parses (its first number),
    else the first <answer>…</answer> (its last number)."""
    for content in boxes:
        content = content.strip()
        if not content or _DOTS.fullmatch(content):
            continue
        value = parse(content, 0)
        if value is not None:
            return value
    tagged = first_tag_content(text, "answer")
    if tagged is not None and tagged.strip():
        return parse(tagged.strip(), -1)
    return None


def reference_prediction(text: str) -> float | None:
    """d1's GSM8K eval parser: first usable \\boxed{}, else the first <answer>…</answer>."""
    return _box_then_tag(text, flat_boxes(text), _float_or_number)


def _exact_or_number(text: str, pick: int) -> Decimal | None:
    value = exact_number(text)
    if value is not None:
        return value
    numbers = _FIXED_NUMBER.findall(text)
    return _number_token(numbers[pick]) if numbers else None


def fixed_prediction(text: str) -> Decimal | None:
    """acc_fixed's parser: as the reference, with brace-matched boxes and exact decimals."""
    return _box_then_tag(text, boxed_contents(text), _exact_or_number)


def has_boxed_answer(text: str) -> bool:
    """A non-empty \\boxed{…} inside <answer>…</answer> (the evaluation format)."""
    region = first_tag_content(text, "answer")
    return region is not None and any(c.strip() for c in boxed_contents(region))


# ------------------------------------------------------------------------------------------ format checks


def _tags_in_order(text: str, multiline: bool) -> bool:
    """re.match(r"<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>", text) with or without DOTALL.

    Found with str.find in linear time (the regex backtracks quadratically on repeated tags): the first
    "</reasoning>" followed by whitespace and "<answer>" decides, since any later one could only see
    fewer "</answer>"s after it. Without DOTALL both "…" stop at a newline.
    """
    head, close = "<reasoning>", "</reasoning>"
    if not text.startswith(head):
        return False
    first_newline = text.find("\n", len(head))
    limit = len(text) if multiline or first_newline < 0 else first_newline
    at = text.find(close, len(head))
    while 0 <= at < limit:
        k = at + len(close)
        while k < len(text) and text[k].isspace():
            k += 1
        if text.startswith("<answer>", k):
            start = k + len("<answer>")
            end = text.find("</answer>", start)
            return end >= 0 and (multiline or "\n" not in text[start:end])
        at = text.find(close, at + 1)
    return False


def soft_format_ok(text: str, fixed: bool) -> bool:
    """The soft format test: reference (one-line parts) or fixed (newlines allowed)."""
    return _tags_in_order(text.lstrip(), True) if fixed else _tags_in_order(text, False)


def strict_format_ok(text: str, fixed: bool) -> bool:
    """The strict format test: reference (one-line parts) or fixed (newlines allowed)."""
    if fixed:
        body = text.rstrip()
        head, middle, tail = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>"
        if not (body.startswith(head) and body.endswith(tail)) or len(body) < len(head) + len(tail):
            return False
        inner = body[len(head) : len(body) - len(tail)]
        # R must hold a non-space character before the separator and A one after it; the first
        # separator after R's first such character leaves A the most room.
        first = next((i for i, ch in enumerate(inner) if not ch.isspace()), len(inner))
        cut = inner.find(middle, first + 1)
        return cut > first and bool(inner[cut + len(middle) :].strip())
    # ^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$ without DOTALL: six fixed lines, and
    # "$" also matches before one final newline.
    body = text[:-1] if text.endswith("\n\n") else text
    if not body.endswith("\n"):
        return False
    lines = body[:-1].split("\n")
    return len(lines) == 6 and (lines[0], lines[2], lines[3], lines[5]) == (
        "<reasoning>",
        "</reasoning>",
        "<answer>",
        "</answer>",
    )


def xml_count_score(text: str) -> float:
    """The xmlcount value (both modes; see the module docstring)."""
    score = 0.0
    if text.count("<reasoning>\n") == 1:
        score += 0.125
    if text.count("\n</reasoning>\n") == 1:
        score += 0.125
    if text.count("\n<answer>\n") == 1:
        tail = text.rfind("\n</answer>\n")
        after = len(text) if tail < 0 else len(text) - tail - len("\n</answer>\n")
        score += 0.125 - 0.001 * after
    if text.count("\n</answer>") == 1:
        after = len(text) - text.rfind("\n</answer>") - len("\n</answer>")
        score += 0.125 - 0.001 * (after - 1)
    return score


def boxed_variant_answer(text: str) -> str:
    """GDSD's answer for variant boxed: "The answer is N", else "#### N" (first), else the last integer."""
    for pattern in (_ANSWER_IS, _HASHES):
        match = pattern.search(text)
        if match is not None:
            return match.group(1).strip()
    integers = _INTEGER.findall(text)
    return integers[-1] if integers else ""


# ------------------------------------------------------------------------------------------ rewards


@register_reward("gsm8k_xmlcount", XMLCOUNT_LOW, 0.5, EXAMPLE)
def xmlcount(completion: str, **_: Any) -> float:
    """Tag-count shaping reward (same in both modes)."""
    return xml_count_score(clip_text(completion))


@register_reward("gsm8k_soft_format", 0.0, 0.5, EXAMPLE)
def soft_format(completion: str, **_: Any) -> float:
    """0.5 for <reasoning>…</reasoning> <answer>…</answer> at the start, newlines allowed (fixed)."""
    return 0.5 if soft_format_ok(clip_text(completion), fixed=True) else 0.0


@register_reward("gsm8k_soft_format_reference", 0.0, 0.5, EXAMPLE)
def soft_format_reference(completion: str, **_: Any) -> float:
    """0.5 for the soft format with one-line reasoning and answer (d1, no DOTALL)."""
    return 0.5 if soft_format_ok(clip_text(completion), fixed=False) else 0.0


@register_reward("gsm8k_strict_format", 0.0, 0.5, EXAMPLE)
def strict_format(completion: str, **_: Any) -> float:
    """0.5 for exactly the four-tag layout with non-blank reasoning and answer (fixed)."""
    return 0.5 if strict_format_ok(clip_text(completion), fixed=True) else 0.0


@register_reward("gsm8k_strict_format_reference", 0.0, 0.5, EXAMPLE)
def strict_format_reference(completion: str, **_: Any) -> float:
    """0.5 for the four-tag layout with one-line reasoning and answer (d1, no DOTALL)."""
    return 0.5 if strict_format_ok(clip_text(completion), fixed=False) else 0.0


@register_reward("gsm8k_int", 0.0, 0.5, EXAMPLE)
def int_answer(completion: str, **_: Any) -> float:
    """0.5 if the normalised answer is an integer, negative ones included (fixed)."""
    return 0.5 if _INTEGER.fullmatch(normalise_number_text(xml_answer(clip_text(completion)))) else 0.0


@register_reward("gsm8k_int_reference", 0.0, 0.5, EXAMPLE)
def int_answer_reference(completion: str, **_: Any) -> float:
    """0.5 if the answer passes str.isdigit (d1: negative integers fail)."""
    return 0.5 if xml_answer(clip_text(completion)).isdigit() else 0.0


@register_reward("gsm8k_correctness", 0.0, 2.0, EXAMPLE)
def correctness(completion: str, *, ground_truth: str, **_: Any) -> float:
    """2.0 if the answer equals the ground truth as an exact number (fixed)."""
    if not isinstance(ground_truth, str):
        return 0.0
    answer, truth = exact_number(xml_answer(clip_text(completion))), exact_number(ground_truth)
    return 2.0 if answer is not None and truth is not None and answer == truth else 0.0


@register_reward("gsm8k_correctness_reference", 0.0, 2.0, EXAMPLE)
def correctness_reference(completion: str, *, ground_truth: str, **_: Any) -> float:
    """2.0 if the answer string equals the ground-truth string (d1)."""
    return 2.0 if xml_answer(clip_text(completion)) == ground_truth else 0.0


@register_reward("gsm8k_boxed_correctness", 0.0, 1.0, EXAMPLE)
def boxed_correctness(completion: str, *, ground_truth: str, **_: Any) -> float:
    """1.0 if GDSD's extracted answer equals the ground-truth string (variant boxed)."""
    return 1.0 if boxed_variant_answer(clip_text(completion)) == ground_truth else 0.0


# part name -> (fixed, reference) functions of variant xml
_XML_PARTS: dict[str, tuple[RewardFn, RewardFn]] = {
    "xmlcount": (xmlcount, xmlcount),
    "soft_format": (soft_format, soft_format_reference),
    "strict_format": (strict_format, strict_format_reference),
    "int": (int_answer, int_answer_reference),
    "correctness": (correctness, correctness_reference),
}


def gsm8k_metrics(completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """acc (= acc_reference), acc_fixed and format_rate over aligned completions and examples."""
    if len(completions) != len(examples):
        raise ValueError(f"got {len(completions)} completions for {len(examples)} examples")
    reference = fixed = formatted = 0
    for raw, example in zip(completions, examples, strict=True):
        text = clip_text(raw)
        truth = reference_gt_value(str(example.get("answer", "")))
        predicted = reference_prediction(text)
        reference += truth is not None and predicted is not None and predicted == truth
        exact_truth = fixed_gt_value(str(example.get("ground_truth", "")))
        exact_predicted = fixed_prediction(text)
        fixed += exact_truth is not None and exact_predicted is not None and exact_predicted == exact_truth
        formatted += has_boxed_answer(text)
    n = max(len(completions), 1)
    return {
        "acc": reference / n,
        "acc_reference": reference / n,
        "acc_fixed": fixed / n,
        "format_rate": formatted / n,
    }


# ------------------------------------------------------------------------------------------ task


def gsm8k_row_problem(row: Mapping[str, Any]) -> str | None:
    """What is wrong with a raw GSM8K row (question, answer ending in "#### N"), or None."""
    for key in ("question", "answer"):
        problem = string_field(row, key)
        if problem is not None:
            return problem
    truth = hash_ground_truth(row["answer"])
    if truth is None or exact_number(truth) is None:
        return f"answer must end with '#### N' (N a number); got ...{row['answer'][-60:]!r}"
    return None


@dataclasses.dataclass
class GSM8KTaskCfg(HubTaskCfg):
    """``task=gsm8k`` (a comment above each field; the rest are HubTaskCfg's)."""

    # registry name
    name: str = "gsm8k"
    # hub data set of the training split (used when train_file is null)
    train_hub_id: str | None = "openai/gsm8k"
    # its configuration
    train_hub_config: str | None = "main"
    # hub data set of the test split (used when test_file is null)
    test_hub_id: str | None = "openai/gsm8k"
    # its configuration
    test_hub_config: str | None = "main"
    # xml: the five-function d1 reward; boxed: GDSD's single exact-match reward (docs/tasks.md)
    variant: str = "xml"

    @classmethod
    def check(cls, t: Any, need: Callable[[bool, str], None]) -> None:
        super().check(t, need)
        variant = t.get("variant", cls.variant)
        need(variant in VARIANTS, f"task.variant={variant!r} must be one of: {', '.join(VARIANTS)}")


@register_task("gsm8k", config=GSM8KTaskCfg)
class GSM8KTask(HubTask):
    """GSM8K with d1's prompts, rewards (both modes) and evaluation parsers."""

    fields = {"train": ("question", "answer"), "test": ("question", "answer")}

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path) -> None:
        super().__init__(cfg, cache_dir)
        self.variant = str(self.options["variant"])

    def row_problem(self, row: Mapping[str, Any], kind: str) -> str | None:
        return gsm8k_row_problem(row)

    def make_columns(self, rows: datasets.Dataset, kind: str) -> dict[str, list[Any]]:
        questions, answers = rows["question"], rows["answer"]
        train_block = GSM_SYSTEM_PROMPT if self.variant == "boxed" else SYSTEM_PROMPT
        return {
            "prompt": [train_block + "\n\n" + q for q in questions],
            "eval_prompt": [GSM_SYSTEM_PROMPT + "\n\n" + q for q in questions],
            "question": list(questions),
            "answer": list(answers),
            "ground_truth": [hash_ground_truth(a) or "" for a in answers],
        }

    def default_rewards(self) -> list[tuple[str, RewardFn]]:
        if self.variant == "boxed":
            return [("correctness", boxed_correctness)]
        pick = 0 if self.reward_mode == "fixed" else 1
        return [(name, fns[pick]) for name, fns in _XML_PARTS.items()]

    def target(self, example: Mapping[str, Any]) -> str:
        """The worked answer (calculator annotations dropped) as reasoning, N as answer; earns the full reward."""
        worked = str(example.get("answer", ""))
        reasoning = _CALCULATOR.sub("", worked.split("####", 1)[0]).strip()
        truth = str(example.get("ground_truth", ""))
        answer = f"\\boxed{{{truth}}}" if self.variant == "boxed" else truth
        return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"

    def metrics(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return gsm8k_metrics(completions, examples)
