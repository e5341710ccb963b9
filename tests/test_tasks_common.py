"""What every task shares: reward plug-ins, prompt styles and chat templates, local data files,
the hub fallback message, prompt-length caps and the papers' evaluation subsets."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from dllm_rl.config import ModelCfg
from dllm_rl.errors import ConfigError
from dllm_rl.evaluation import fit_prompts, paper_subset
from dllm_rl.models.policy import build_tiny
from dllm_rl.tasks import DataError, get_task
from dllm_rl.tasks.base import CHAT_ALPHABET, EVAL_PREFILL, check_rows, load_hub, read_local
from dllm_rl.tasks.sudoku import SUDOKU_SYSTEM_PROMPT, chat_answer

SMALL = {"train_size": 300, "validation_size": 32, "test_size": 32}
SOLUTION = "1234341221434321"
PUZZLE = "0204300201030301"
TINY = ModelCfg(name="tiny", hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=64, dtype="float32")


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A user's reward module on sys.path: one float reward and one with two parts."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_bonus(completion, **_):
                return min(len(completion), 16) / 16

            def two_parts(completion, *, solution, **_):
                return {"first_cell": float(completion[:1] == solution[:1]), "has_four": float("4" in completion)}

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


# --- reward plug-ins -------------------------------------------------------------------------------


def test_rewards_from_registry_and_module_paths_sum_and_log_each_part(tmp_path, plugin_module):
    task = get_task(
        "sudoku",
        {**SMALL, "rewards": ["sudoku_cells", f"{plugin_module}:length_bonus", f"{plugin_module}:two_parts"]},
        tmp_path,
    )
    parts = task.reward(SOLUTION, {"puzzle": PUZZLE, "solution": SOLUTION, "prompt": PUZZLE})
    assert parts == {"sudoku_cells": 1.0, "length_bonus": 1.0, "first_cell": 1.0, "has_four": 1.0}
    parts = task.reward("2", {"puzzle": PUZZLE, "solution": SOLUTION})
    assert parts["length_bonus"] == pytest.approx(1 / 16) and parts["first_cell"] == 0.0


def test_default_reward_is_the_tasks_own(tmp_path):
    task = get_task("sudoku", SMALL, tmp_path)
    assert task.reward(SOLUTION, {"puzzle": PUZZLE, "solution": SOLUTION}) == {"correct_cells": 1.0}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_reward", "task.rewards[0]: unknown reward 'no_such_reward'"),
        ("not_a_module_xyz:fn", "cannot import module 'not_a_module_xyz'"),
        ("my_rewards:missing", "has no attribute 'missing'"),
        ("my_rewards:NOT_CALLABLE", "is not callable"),
    ],
)
def test_bad_reward_names_fail_at_construction_naming_the_field(tmp_path, plugin_module, spec, message):
    with pytest.raises(ConfigError, match="task.rewards") as info:
        get_task("sudoku", {**SMALL, "rewards": [spec]}, tmp_path)
    assert message in str(info.value)


def test_a_failing_plugin_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def boom(completion, **_):\n    raise KeyError('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("sudoku", {**SMALL, "rewards": ["broken_rewards:boom"]}, tmp_path)
    with pytest.raises(Exception, match="reward 'boom' failed"):
        task.reward("1", {"puzzle": PUZZLE, "solution": SOLUTION})


# --- prompt styles -------------------------------------------------------------------------------


def test_sudoku_chat_prompts_have_the_rules_the_examples_and_no_control_characters(tmp_path):
    task = get_task("sudoku", {**SMALL, "prompt_style": "chat"}, tmp_path)
    assert task.chat and task.eval_prefill == EVAL_PREFILL and set(CHAT_ALPHABET) <= set(task.alphabet)
    row = task.dataset("train")[0]
    prompt = row["prompt"]
    assert prompt.startswith(SUDOKU_SYSTEM_PROMPT) and prompt.endswith(
        f"Question: Solve the following Sudoku puzzle: {row['puzzle']}\nAnswer:\n"
    )
    assert prompt.count("Question:") == 4 and prompt.count("<answer>") == 4  # rules block + 3 shots
    assert row["eval_prompt"] == prompt
    assert not any(ord(ch) < 32 and ch != "\n" for ch in prompt)
    # The worked examples never appear as a training, validation or test puzzle.
    shots = {p for p, _ in task.examples}
    assert len(shots) == 3
    for split in ("train", "validation", "test"):
        assert not shots & set(task.dataset(split)["puzzle"])
    zero = get_task("sudoku", {**SMALL, "prompt_style": "chat", "few_shot": 0}, tmp_path)
    assert zero.dataset("test")[0]["prompt"] == (
        SUDOKU_SYSTEM_PROMPT + f"\n\nSolve the following Sudoku puzzle: {zero.dataset('test')[0]['puzzle']}\n"
    )


def test_sudoku_chat_reward_reads_answer_tags(tmp_path):
    task = get_task("sudoku", {**SMALL, "prompt_style": "chat"}, tmp_path)
    ex = {"puzzle": PUZZLE, "solution": SOLUTION}
    assert task.reward(f"<reasoning>\n1111\n</reasoning>\n<answer>\n{SOLUTION}\n</answer>", ex) == {
        "correct_cells": 1.0
    }
    assert task.reward(SOLUTION, ex) == {"correct_cells": 0.0}  # no tags: no answer


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"<answer>\n```\n{SOLUTION}\n```\n</answer>", SOLUTION),  # (1) code block inside the tags
        (f"<answer>\n{SOLUTION[:8]} {SOLUTION[8:]}<|eot_id|>", SOLUTION),  # (2) up to an end marker
        (f"<answer></answer>\n{SOLUTION}", SOLUTION),  # (2) empty tags, (3) after </answer> wins
        (f"digits {SOLUTION}</answer>", SOLUTION),  # (4) 16 digits before </answer>
        (f"the grid is {SOLUTION}.", SOLUTION),  # (5) a standalone run of 16 digits
        ("no answer here", "0" * 16),
    ],
)
def test_sudoku_chat_eval_extraction_patterns(text, expected):
    assert chat_answer(text) == expected


def test_chat_template_renders_user_message_generation_prompt_and_prefill():
    policy = build_tiny(TINY, CHAT_ALPHABET, seed=0)
    [text] = policy.render_prompts(["Solve it"], chat=True, prefill=EVAL_PREFILL)
    assert text == "<bos><|user|>\nSolve it\n<|assistant|>\n<reasoning>"
    ids, attention = policy.encode_prompts(["Solve it", "a"], chat=True)
    assert ids[0, 0].item() == policy.tokenizer.bos_token_id  # one BOS, from the template
    assert (ids[0] == policy.tokenizer.bos_token_id).sum() == 1
    assert attention[1].sum() < attention[0].sum() and attention[1, 0] == 0  # left padded
    assert policy.render_prompts(["abc"], chat=False, prefill="") == ["abc"]


def test_chat_style_without_a_template_is_one_clear_error():
    policy = build_tiny(TINY, CHAT_ALPHABET, seed=0)
    policy.tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="task.prompt_style=chat needs a tokenizer with a chat template"):
        policy.render_prompts(["x"], chat=True)


def test_unknown_prompt_style_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="task.prompt_style='fancy'"):
        get_task("sudoku", {**SMALL, "prompt_style": "fancy"}, tmp_path)


# --- prompt caps -----------------------------------------------------------------------------------


def test_prompt_cap_drops_errors_or_truncates(tmp_path):
    policy = build_tiny(TINY, CHAT_ALPHABET, seed=0)
    rows = [{"prompt": "a" * n} for n in (3, 10, 4)]
    task = get_task("sudoku", {**SMALL, "max_prompt_tokens": 6}, tmp_path)
    kept, dropped = fit_prompts(policy, task, rows, "prompt", "", "train")
    assert [len(r["prompt"]) for r in kept] == [3, 4] and dropped == 1  # BOS + text <= 6
    strict = get_task("sudoku", {**SMALL, "max_prompt_tokens": 6, "on_prompt_overflow": "error"}, tmp_path)
    with pytest.raises(ConfigError, match="row 2 has 11 tokens"):
        fit_prompts(policy, strict, rows, "prompt", "", "train")
    ids, attention = policy.encode_prompts(["abcdefghij"], max_tokens=4)
    assert policy.tokenizer.decode(ids[0]) == "ghij" and attention.sum() == 4


# --- data files ------------------------------------------------------------------------------------


def test_read_local_reads_every_format_and_names_bad_rows(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_jsonl = read_local(jsonl, "task.train_file", tmp_path / "hf")
    assert from_jsonl.to_list() == rows
    from_jsonl.to_parquet(str(tmp_path / "d.parquet"))
    assert read_local(tmp_path / "d.parquet", "task.train_file", tmp_path / "hf").to_list() == rows
    from_jsonl.save_to_disk(str(tmp_path / "saved"))
    assert read_local(tmp_path / "saved", "task.train_file", tmp_path / "hf").to_list() == rows
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part.jsonl").write_text(jsonl.read_text())
    assert len(read_local(folder, "task.train_file", tmp_path / "hf")) == 5

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: not valid JSON"):
        read_local(bad, "task.train_file", tmp_path / "hf")
    with pytest.raises(DataError, match=r"missing.jsonl: file not found \(config key task.test_file\)"):
        read_local(tmp_path / "missing.jsonl", "task.test_file", tmp_path / "hf")
    with pytest.raises(DataError, match=r"d.jsonl: row 4: answer must end"):
        check_rows(
            from_jsonl,
            str(jsonl),
            lambda r: None if r["answer"] != "#### 3" else "answer must end in a number",
            ["question", "answer"],
        )
    with pytest.raises(DataError, match=r"missing \['solution'\]"):
        check_rows(from_jsonl, str(jsonl), lambda r: None, ["question", "solution"])


def test_unreachable_hub_says_what_to_provide(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_hub("dllm-rl-tests/no-such-dataset", None, "train", "task.train_file")
    message = str(info.value)
    assert "dllm-rl-tests/no-such-dataset" in message and "set task.train_file=<path>" in message


# --- evaluation subsets ----------------------------------------------------------------------------


def test_paper_subset_is_d1s_seeded_choice():
    np.random.seed(42)
    expected = np.random.choice(500, 256, replace=False).tolist()
    assert paper_subset(500, 256, 42) == expected
    assert paper_subset(10, None, 42) == list(range(10))
    assert sorted(paper_subset(256, 256, 42)) == list(range(256))
