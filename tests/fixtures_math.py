"""Small GSM8K- and MATH-shaped data sets written by the tests themselves (no network), and shared inputs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import pytest


def gsm8k_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    """n distinct GSM8K-shaped rows; the answer of row i is i + 10 (row 3 of each ten is negative)."""
    rows = []
    for i in range(start, start + n):
        value = -(i + 10) if i % 10 == 3 else i + 10
        rows.append(
            {
                "question": f"Tom has {i} apples and buys some more. How many does he have? (case {i})",
                "answer": f"Tom has {i} apples.\nHe buys more: {i} + 10 = <<{i}+10={i + 10}>>{i + 10}.\n#### {value}",
            }
        )
    return rows


def math_train_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    """n MATH-training-shaped rows (problem, solution with a final \\boxed{})."""
    return [
        {
            "problem": f"Compute $\\frac{{{i}}}{{{i + 1}}} + 0$. (case {i})",
            "solution": f"First $\\boxed{{1}}$ as a warm-up, then the value $\\boxed{{\\frac{{{i}}}{{{i + 1}}}}}$.",
        }
        for i in range(start, start + n)
    ]


def math_test_rows(n: int) -> list[dict[str, str]]:
    """n MATH-500-shaped rows (problem, answer, and a solution as in HuggingFaceH4/MATH-500)."""
    return [
        {"problem": f"What is $2^{i}$?", "answer": str(2**i), "solution": f"It is $\\boxed{{{2**i}}}$."}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    datasets.Dataset.from_list(list(rows)).to_parquet(str(path))
    return path


def write_saved(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    datasets.Dataset.from_list(list(rows)).save_to_disk(str(path))
    return path


def go_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make hub loads fail fast, as on a compute node: offline flags and an empty HF cache.

    ``datasets`` and ``huggingface_hub`` read the variables at import, so their constants are set too.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_hf_cache")


# Completions every reward function and metric must survive (value in range, bounded time, no raise).
ADVERSARIAL: list[str] = [
    "",
    "9**9**9",
    "<answer>9**9**9</answer>",
    "\\boxed{10^{10^{10^{10}}}}",
    "<answer>\n\\boxed{10^{10^{10^{10}}}}\n</answer>",
    "7" * 1_000_000,
    "<answer>" * 50_000,
    "</reasoning>" * 50_000,
    "<reasoning>" + "</reasoning>" * 20_000 + "<answer>",
    "{" * 10_000 + "}" * 10_000,
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "(" * 10_000 + "1" + ")" * 10_000,
    "<answer>\n" + "\\boxed{" * 10_000,
    "__import__('os').system('echo pwned')",
    "<answer>__import__('os').system('echo pwned')</answer>",
    "<answer>\n\u0667\u0662\n</answer>",  # Arabic-Indic digits 72
    "\\boxed{\u0967\u0968}",  # Devanagari digits
    "<answer>\n72",  # unterminated answer tag
    "\\boxed{72",  # unterminated box
    "\\boxed ",
    "\x00" * 100 + "<answer>\x00</answer>\x00\\boxed{\x00}",
    "\ud800 lone surrogate <answer>\ud800</answer>",
    "The answer is " + "9" * 100_000,
    "#### " + "," * 100_000,
    "\\frac" * 5_000 + "\\sqrt" * 5_000,
    "1/" * 50_000,
    "\\text{ " * 20_000,
    " " * 100_000 + "<reasoning>\nx\n</reasoning>\n<answer>\n72\n</answer>\n",
    # inputs that make naive regexes rescan the rest of the text from every position
    "\\boxed{" * 10_000,
    "\\boxed{\n" * 10_000 + "}",
    "\\boxed " * 10_000,
    "<|" * 20_000,
    "The answer is " * 5_000,
    "#### " * 10_000,
    "1," * 30_000,
    "<reasoning>" + "</reasoning>\n" * 5_000,
    "<reasoning>\n" + "\n</reasoning>\n<answer>\n" * 2_000 + "\n</answer>",
]
