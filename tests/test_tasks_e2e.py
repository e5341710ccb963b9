"""Every task through the real training entry point, shrunk to seconds: Countdown (compact), Sudoku in
the chat style (chat template, <answer> tags, validation selection) and GSM8K / MATH500 from local
files the test writes (the hub is unreachable here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_e2e import run_cli

TINY_RUN = [
    "objective.inner_iterations=1",
    "train.steps=2",
    "rollout.prompts_per_step=2",
    "rollout.samples_per_prompt=2",
    "rollout.micro_batch=4",
    "train.micro_batch_per_gpu=4",
    "eval.num_examples=4",
    "eval.every_n_steps=1",
    "eval.batch_size=4",
    "warmstart.steps=2",
    "logging=none",
]
# Chat prompts are hundreds of characters for a character-level model: keep completions short.
CHAT_LENGTHS = ["task.completion_length=32", "task.block_length=32", "task.diffusion_steps=8"]


def gsm8k_files(tmp: Path) -> list[str]:
    rows = [
        {"question": f"Tom has {a} apples and buys {b} more. How many now?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (9, 9)]
    ]
    for name, part in (("train", rows[:6]), ("test", rows[6:])):
        (tmp / f"gsm8k_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return [f"task.train_file={tmp / 'gsm8k_train.jsonl'}", f"task.test_file={tmp / 'gsm8k_test.jsonl'}"]


def math_files(tmp: Path) -> list[str]:
    train = [
        {"problem": f"What is {a}+{b}?", "solution": f"We add: $\\boxed{{{a + b}}}$."}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]
    ]
    test = [{"problem": "What is 1/2 of 1?", "answer": "\\frac{1}{2}"}, {"problem": "2*3?", "answer": "6"}]
    (tmp / "math_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp / "math_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return [f"task.train_file={tmp / 'math_train.jsonl'}", f"task.test_file={tmp / 'math_test.jsonl'}"]


CASES = {
    "countdown": lambda tmp: ["task=countdown", "task.train_size=300", "task.validation_size=16", "task.test_size=16"],
    "sudoku_chat": lambda tmp: [
        "task.prompt_style=chat",
        "task.few_shot=0",  # the 3-shot prompt is 2,000 characters; tests/test_tasks_common.py checks it
        "task.train_size=200",
        "task.validation_size=8",
        "task.test_size=8",
        *CHAT_LENGTHS,
    ],
    "gsm8k": lambda tmp: [
        "task=gsm8k",
        "task.validation_size=2",
        "task.max_prompt_tokens=null",
        *CHAT_LENGTHS,
        *gsm8k_files(tmp),
    ],
    "math500": lambda tmp: [
        "task=math500",
        "task.validation_size=2",
        "task.max_prompt_tokens=null",
        *CHAT_LENGTHS,
        *math_files(tmp),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_task_trains_end_to_end(case, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY_RUN, *CASES[case](tmp_path), f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_metric"])
    assert [(e["step"], e["split"]) for e in summary["evals"]] == [
        (s, split) for s in (0, 1, 2) for split in ("validation", "test")
    ]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    # Every part of the task's reward is logged on its own, and they add up to the reward.
    parts = [k for k in steps[0] if k.startswith("reward/")]
    assert parts
    assert sum(steps[0][k] for k in parts) == pytest.approx(steps[0]["reward_mean"], abs=1e-5)
    evaluated = [json.loads(line) for line in (run_dir / "eval" / "step_2.jsonl").read_text().splitlines()]
    assert evaluated and all(isinstance(r["completion"], str) for r in evaluated)
