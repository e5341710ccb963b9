"""GSM8K task: data loading and checks, prompts, training rewards in both modes, eval parsers, adversarial text."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
from fixtures_math import ADVERSARIAL, go_offline, gsm8k_rows, write_jsonl, write_parquet, write_saved

from dllm_rl.errors import ConfigError
from dllm_rl.tasks import DataError, get_task
from dllm_rl.tasks.base import SYSTEM_PROMPT, total_reward
from dllm_rl.tasks.gsm8k import (
    GSM_SYSTEM_PROMPT,
    GSM8KTask,
    boxed_variant_answer,
    fixed_prediction,
    flat_boxes,
    gsm8k_metrics,
    reference_gt_value,
    reference_prediction,
    soft_format_ok,
    strict_format_ok,
)
from dllm_rl.tasks.rewards import REWARDS

GT = {"ground_truth": "72"}
MULTI_LINE = "<reasoning>\nHe has 62.\nThen 10 more.\n</reasoning>\n<answer>\n72\n</answer>\n"
ONE_LINE = "<reasoning>\nHe has 72.\n</reasoning>\n<answer>\n72\n</answer>\n"
INLINE = "<reasoning>x</reasoning> <answer>72</answer>"


def make_task(tmp_path: Path, n_train: int = 40, n_test: int = 12, **cfg) -> GSM8KTask:
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = {
        "train_file": str(write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(n_train))),
        "test_file": str(write_jsonl(tmp_path / "test.jsonl", gsm8k_rows(n_test, start=1000))),
    }
    task = get_task("gsm8k", {"validation_size": 8, **files, **cfg}, tmp_path / "cache")
    assert isinstance(task, GSM8KTask)
    return task


def parts(task: GSM8KTask, completion: str, **example) -> dict[str, float]:
    return task.reward(completion, {**GT, **example})


# --- data ------------------------------------------------------------------------------------------


def test_jsonl_columns_prompts_and_validation_carved_from_train(tmp_path):
    task = make_task(tmp_path)
    train, val, test = (task.dataset(s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (32, 8, 12)
    assert not set(train["question"]) & set(val["question"])
    assert set(train["question"]) | set(val["question"]) == {r["question"] for r in gsm8k_rows(40)}
    assert not set(val["question"]) & set(test["question"])
    row = test[0]
    assert row["prompt"] == SYSTEM_PROMPT + "\n\n" + row["question"]
    assert row["eval_prompt"] == GSM_SYSTEM_PROMPT + "\n\n" + row["question"]
    assert row["ground_truth"] == "1010"
    assert row["answer"].endswith("#### 1010")
    assert task.dataset("train") is train  # built once and kept


def test_prompt_texts_verbatim_and_free_of_control_characters(tmp_path):
    assert SYSTEM_PROMPT.startswith("\nRespond in the following format:\n<reasoning>\n") and SYSTEM_PROMPT.endswith(
        "</answer>\n"
    )
    assert "Wrap the final answer in a \\boxed{}. \nRespond" in GSM_SYSTEM_PROMPT
    task = make_task(tmp_path)
    for row in task.dataset("test"):
        for key in ("prompt", "eval_prompt"):
            assert not [ch for ch in row[key] if ord(ch) < 32 and ch != "\n"], key


def test_parquet_and_save_to_disk_files(tmp_path):
    train = write_parquet(tmp_path / "train.parquet", gsm8k_rows(20))
    test = write_saved(tmp_path / "test_saved", gsm8k_rows(5, start=500))
    task = get_task(
        "gsm8k", {"train_file": str(train), "test_file": str(test), "validation_size": 4}, tmp_path / "cache"
    )
    assert len(task.dataset("train")) == 16 and len(task.dataset("validation")) == 4
    assert task.dataset("test")["ground_truth"][0] == "510"


def test_validation_file_used_instead_of_carving(tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", gsm8k_rows(3, start=200))
    task = make_task(tmp_path, validation_file=str(val))
    assert len(task.dataset("train")) == 40 and len(task.dataset("validation")) == 3


def test_missing_file_fails_at_construction_naming_the_key(tmp_path):
    with pytest.raises(DataError, match=r"task\.train_file"):
        get_task("gsm8k", {"train_file": str(tmp_path / "nope.jsonl")}, tmp_path)


def test_unreachable_hub_names_the_field_and_columns(tmp_path, monkeypatch):
    go_offline(monkeypatch, tmp_path)
    task = get_task("gsm8k", {"train_hub_id": "openai/gsm8k", "train_hub_config": "main"}, tmp_path)
    with pytest.raises(DataError) as info:
        task.dataset("train")
    message = str(info.value)
    assert "openai/gsm8k" in message and "task.train_file" in message and "'question', 'answer'" in message


def test_no_source_at_all_names_the_field(tmp_path):
    task = get_task("gsm8k", {"test_hub_id": None}, tmp_path)
    with pytest.raises(DataError, match=r"task\.test_file=<path>.*'question', 'answer'"):
        task.dataset("test")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"question": "q", "answer": "no final line"}, "#### N"),
        ({"question": "q", "answer": "#### seventy"}, "#### N"),
        ({"question": "   ", "answer": "#### 1"}, "question is empty"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path, bad, reason):
    rows = gsm8k_rows(4)
    rows.insert(2, bad)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    task = get_task("gsm8k", {"train_file": str(path), "validation_size": 1}, tmp_path / "cache")
    with pytest.raises(DataError) as info:
        task.dataset("train")
    assert "bad.jsonl" in str(info.value) and "row 3" in str(info.value) and reason in str(info.value)


def test_non_string_field_is_reported(tmp_path):
    # A column of numbers (one mixed row would already fail in read_local, as rows of two schemas).
    rows = [{"question": 7, "answer": "#### 1"}, {"question": 8, "answer": "#### 2"}]
    path = write_parquet(tmp_path / "ints.parquet", rows)
    task = get_task("gsm8k", {"test_file": str(path)}, tmp_path / "cache")
    with pytest.raises(DataError, match=r"ints\.parquet: row 1: question must be a string, got int 7"):
        task.dataset("test")


def test_missing_column_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "solution": "#### 1"}] * 3)
    task = get_task("gsm8k", {"train_file": str(path), "validation_size": 1}, tmp_path / "cache")
    with pytest.raises(DataError, match=r"cols\.jsonl.*missing \['answer'\]"):
        task.dataset("train")


# --- configuration and reward selection -------------------------------------------------------------


def test_default_rewards_follow_mode_and_variant(tmp_path):
    names = ["xmlcount", "soft_format", "strict_format", "int", "correctness"]
    fixed = make_task(tmp_path / "a")
    assert [n for n, _ in fixed.reward_fns] == names
    reference = make_task(tmp_path / "b", reward_mode="reference")
    assert [fn.__name__ for _, fn in reference.reward_fns][1:] == [
        "soft_format_reference",
        "strict_format_reference",
        "int_answer_reference",
        "correctness_reference",
    ]
    boxed = make_task(tmp_path / "c", variant="boxed")
    assert [n for n, _ in boxed.reward_fns] == ["correctness"]
    assert boxed.dataset("test")[0]["prompt"].startswith(GSM_SYSTEM_PROMPT)


@pytest.mark.parametrize(("key", "value"), [("reward_mode", "buggy"), ("variant", "json"), ("prompt_style", "compact")])
def test_bad_option_names_the_field(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"task\.{key}"):
        get_task("gsm8k", {key: value}, tmp_path)


# --- training rewards -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "fixed", "reference"),
    [
        # multi-line reasoning (the normal case): soft/strict format only in fixed mode (d1's lack DOTALL)
        (MULTI_LINE, (0.5, 0.5, 0.5, 0.5, 2.0), (0.5, 0.0, 0.0, 0.5, 2.0)),
        # one-line reasoning: the reference strict regex matches; its soft regex cannot cross "<reasoning>\n"
        (ONE_LINE, (0.5, 0.5, 0.5, 0.5, 2.0), (0.5, 0.0, 0.5, 0.5, 2.0)),
        (INLINE, (0.0, 0.5, 0.0, 0.5, 2.0), (0.0, 0.5, 0.0, 0.5, 2.0)),
        ("  \n" + MULTI_LINE, (0.5, 0.5, 0.0, 0.5, 2.0), (0.5, 0.0, 0.0, 0.5, 2.0)),
        # empty reasoning, no final newline: xmlcount's third term pays for the whole 47-character text
        # (no "\n</answer>\n"), its fourth gains 0.001: 0.25 + (0.125 - 0.047) + 0.126
        (
            "<reasoning>\n\n</reasoning>\n<answer>\n72\n</answer>",
            (0.454, 0.5, 0.0, 0.5, 2.0),
            (0.454, 0.0, 0.0, 0.5, 2.0),
        ),
        ("72", (0.0, 0.0, 0.0, 0.5, 2.0), (0.0, 0.0, 0.0, 0.5, 2.0)),
        ("", (0.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, 0.0)),
    ],
)
def test_reward_parts_in_both_modes(tmp_path, completion, fixed, reference):
    names = ("xmlcount", "soft_format", "strict_format", "int", "correctness")
    for mode, expected in (("fixed", fixed), ("reference", reference)):
        task = make_task(tmp_path / mode, reward_mode=mode)
        got = parts(task, completion)
        assert list(got) == list(names)
        assert [round(got[n], 6) for n in names] == pytest.approx(expected), mode


def test_xmlcount_penalises_trailing_text():
    from dllm_rl.tasks.gsm8k import xmlcount

    assert xmlcount(MULTI_LINE) == pytest.approx(0.5)
    # 10 characters after "\n</answer>\n": -0.010 (third term) and -0.010 (fourth: 11 after "\n</answer>", minus 1)
    assert xmlcount(MULTI_LINE + "x" * 10) == pytest.approx(0.5 - 0.02)
    assert xmlcount(MULTI_LINE + MULTI_LINE) == 0.0  # every tag twice


@pytest.mark.parametrize(
    ("answer", "truth", "fixed", "reference"),
    [
        ("72", "72", 2.0, 2.0),
        ("72.0", "72", 2.0, 0.0),
        ("$72", "72", 2.0, 0.0),
        ("72.", "72", 2.0, 0.0),
        ("1,000", "1000", 2.0, 0.0),
        ("\\boxed{72}", "72", 2.0, 0.0),
        ("-5", "-5", 2.0, 2.0),
        ("1,00", "100", 0.0, 0.0),
        ("seventy-two", "72", 0.0, 0.0),
        ("73", "72", 0.0, 0.0),
        ("\u0667\u0662", "72", 0.0, 0.0),  # Arabic-Indic digits are not ASCII numbers
    ],
)
def test_correctness_numeric_in_fixed_mode_string_in_reference(answer, truth, fixed, reference):
    from dllm_rl.tasks.gsm8k import correctness, correctness_reference

    text = f"<answer>\n{answer}\n</answer>"
    assert correctness(text, ground_truth=truth) == fixed
    assert correctness_reference(text, ground_truth=truth) == reference


@pytest.mark.parametrize(
    ("answer", "fixed", "reference"),
    [("72", 0.5, 0.5), ("-5", 0.5, 0.0), ("$1,000", 0.5, 0.0), ("72.5", 0.0, 0.0), ("\u00b2", 0.0, 0.5), ("x", 0, 0)],
)
def test_int_reward(answer, fixed, reference):
    from dllm_rl.tasks.gsm8k import int_answer, int_answer_reference

    text = f"<reasoning>r</reasoning><answer>{answer}</answer>"
    assert int_answer(text) == fixed
    assert int_answer_reference(text) == reference  # str.isdigit accepts the superscript two


def test_answer_is_taken_after_the_last_answer_tag():
    from dllm_rl.tasks.gsm8k import correctness_reference

    assert correctness_reference("<answer>1</answer> <answer> 72 </answer> tail", ground_truth="72") == 2.0
    assert correctness_reference("<answer>1</answer> then <answer>\n72", ground_truth="72") == 2.0


def _random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    atoms = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", " ", "\t", "x", "7", "\xa0", "\x1c"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 10))) for _ in range(n)] + [
        "<reasoning>" + rng.choice(["", "a", "\n"]) + "</reasoning>" + "<answer>a</answer>" for _ in range(20)
    ]


def test_format_checks_agree_with_the_reference_regexes():
    soft = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>")
    soft_dotall = re.compile(soft.pattern, re.DOTALL)
    strict = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$")
    for text in _random_texts(0, 4000) + [ONE_LINE, MULTI_LINE, INLINE, ONE_LINE + "\n", ONE_LINE + "\n\n"]:
        assert soft_format_ok(text, fixed=False) == bool(soft.match(text)), repr(text)
        assert soft_format_ok(text, fixed=True) == bool(soft_dotall.match(text.lstrip())), repr(text)
        assert strict_format_ok(text, fixed=False) == bool(strict.match(text)), repr(text)


def _strict_fixed_oracle(text: str) -> bool:
    body = text.rstrip()
    head, middle, tail = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>"
    if not (body.startswith(head) and body.endswith(tail)) or len(body) < len(head) + len(tail):
        return False
    inner = body[len(head) : len(body) - len(tail)]
    cuts = [i for i in range(len(inner)) if inner.startswith(middle, i)]
    return any(inner[:i].strip() and inner[i + len(middle) :].strip() for i in cuts)


def test_fixed_strict_format_is_exact_layout_with_non_blank_parts():
    for text in _random_texts(1, 4000):
        assert strict_format_ok(text, fixed=True) == _strict_fixed_oracle(text), repr(text)
    assert strict_format_ok(MULTI_LINE + "  \n\n", fixed=True)
    assert not strict_format_ok("<reasoning>\n \n</reasoning>\n<answer>\n72\n</answer>", fixed=True)
    assert not strict_format_ok("x" + MULTI_LINE, fixed=True)


def test_boxed_variant_reward(tmp_path):
    task = make_task(tmp_path, variant="boxed")
    assert parts(task, "<answer>\n\\boxed{72}\n</answer>") == {"correctness": 1.0}
    assert boxed_variant_answer("so The answer is 72 apples") == "72"
    assert boxed_variant_answer("The answer is 72.") == "72"
    # GDSD's regex wants one more character after the greedy number: "72. Done" keeps the period and a
    # final "72" loses its last digit.
    assert boxed_variant_answer("The answer is 72. Done") == "72."
    assert boxed_variant_answer("The answer is 72") == "7"
    assert boxed_variant_answer("first #### 72 then 9") == "72"
    assert boxed_variant_answer("no marker, 3 then -72 apples") == "-72"
    assert boxed_variant_answer("nothing") == ""


def test_rewards_chosen_by_name(tmp_path):
    task = make_task(tmp_path, rewards=["gsm8k_correctness_reference", "gsm8k_int"])
    assert parts(task, "<answer>\n$72\n</answer>") == {"gsm8k_correctness_reference": 0.0, "gsm8k_int": 0.5}


def test_target_earns_the_full_reward(tmp_path):
    for variant, best in (("xml", 4.0), ("boxed", 1.0)):
        task = make_task(tmp_path / variant, variant=variant)
        row = task.dataset("train")[0]
        target = task.target(row)
        assert "<<" not in target and target.startswith("<reasoning>\n") and target.endswith("\n</answer>\n")
        assert total_reward(task.reward(target, row)) == pytest.approx(best)


# --- evaluation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reference", "fixed"),
    [
        ("\\boxed{} \\boxed{...} \\boxed{..} \\boxed{72}", 72.0, 72),  # first non-empty, non-dots box
        ("\\boxed{x = 72 apples} \\boxed{5}", 72.0, 72),  # first number inside the box
        ("\\boxed{1,000}", 1.0, 1000),  # float() fails, first number "1"; fixed reads thousands
        ("\\boxed{\\frac{1}{2}}", 1.0, 1),  # the reference stops at the first "}"; both take the first number
        ("\\boxed{7\n2}", None, 7),  # the reference's box content is one line
        ("<answer>The total is 5, then 72</answer><|eot_id|><|endoftext|>", 72.0, 72),  # last number
        ("<answer>\n-3.5\n</answer>", -3.5, -3.5),
        ("<answer>\n\u0667\u0662\n</answer>", 72.0, None),  # float() reads Arabic-Indic digits
        ("no answer", None, None),
        ("\\boxed{  }<answer>8</answer>", 8.0, 8),
    ],
)
def test_eval_parsers(text, reference, fixed):
    assert reference_prediction(text) == reference
    got = fixed_prediction(text)
    assert (got is None) if fixed is None else (got == fixed)


def test_flat_boxes_agree_with_the_reference_regex():
    rng = random.Random(2)
    atoms = ["\\boxed{", "\\boxed", "{", "}", "\n", "7", " "]
    pattern = re.compile(r"\\boxed{(.*?)}")
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        assert flat_boxes(text) == pattern.findall(text), repr(text)


def test_reference_ground_truth_rejects_negatives():
    assert reference_gt_value("so\n#### 1,234") == 1234.0
    assert reference_gt_value("#### $5.50") == 5.5
    assert reference_gt_value("#### -5") is None
    assert reference_gt_value("#### ,") is None


def test_metrics_acc_reference_and_fixed():
    examples = [
        {"answer": "x\n#### 72", "ground_truth": "72"},
        {"answer": "x\n#### -5", "ground_truth": "-5"},
        {"answer": "x\n#### 1000", "ground_truth": "1000"},
        {"answer": "x\n#### 3", "ground_truth": "3"},
    ]
    completions = [
        "r</reasoning>\n<answer>\n\\boxed{72}\n</answer><|eot_id|>",
        "<answer>\n\\boxed{-5}\n</answer>",  # negative GT: never right in the reference
        "<answer>\n\\boxed{1,000}\n</answer>",
        "<answer>\n4\n</answer>",
    ]
    metrics = gsm8k_metrics(completions, examples)
    assert metrics["acc"] == metrics["acc_reference"] == pytest.approx(0.25)
    assert metrics["acc_fixed"] == pytest.approx(0.75)
    assert metrics["format_rate"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        gsm8k_metrics(completions[:1], examples)


# --- adversarial completions ------------------------------------------------------------------------


GSM8K_REWARDS = sorted(name for name in REWARDS if name.startswith("gsm8k_"))


def test_every_reward_is_registered():
    assert len(GSM8K_REWARDS) == 10


@pytest.mark.parametrize("name", GSM8K_REWARDS)
def test_adversarial_completions_stay_in_range_and_fast(name):
    spec = REWARDS[name]
    for text in ADVERSARIAL:
        start = time.perf_counter()
        value = spec.fn(text, **spec.example)
        elapsed = time.perf_counter() - start
        assert spec.low <= value <= spec.high, (name, text[:40], value)
        assert elapsed < 1.0, (name, text[:40], elapsed)


def test_adversarial_completions_in_metrics():
    examples = [{"answer": "x\n#### 72", "ground_truth": "72"}] * len(ADVERSARIAL)
    start = time.perf_counter()
    metrics = gsm8k_metrics(ADVERSARIAL, examples)
    assert time.perf_counter() - start < 5.0
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert gsm8k_metrics([None], examples[:1])["acc"] == 0.0  # type: ignore[list-item]
