"""MATH500 task: data loading and checks, prompts, is_equiv, rewards in both modes, eval parsers, math-verify limits."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_math import (
    ADVERSARIAL,
    go_offline,
    math_test_rows,
    math_train_rows,
    write_jsonl,
    write_parquet,
    write_saved,
)

from dllm_rl.errors import ConfigError
from dllm_rl.tasks import DataError, get_task
from dllm_rl.tasks.base import SYSTEM_PROMPT, total_reward
from dllm_rl.tasks.hub_task import last_boxed
from dllm_rl.tasks.math500 import (
    MATH500_SYSTEM_PROMPT,
    Math500Task,
    MathVerifyClient,
    correctness,
    fixed_prediction,
    format_reward,
    format_reward_reference,
    is_equiv,
    math500_metrics,
    math_verify_equal,
    reference_prediction,
    strip_string,
)
from dllm_rl.tasks.rewards import REWARDS

HALF = "\\frac{1}{2}"
TAGGED_BOX = "<reasoning>\nso\n</reasoning>\n<answer>\n\\boxed{\\frac{1}{2}}\n</answer>"
# math-verify comparisons below get this limit; the client adds a grace period before it kills the worker.
LIMIT = 0.5
MARGIN = 2.0


def make_task(tmp_path: Path, **cfg) -> Math500Task:
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = {
        "train_file": str(write_jsonl(tmp_path / "train.jsonl", math_train_rows(30))),
        "test_file": str(write_jsonl(tmp_path / "test.jsonl", math_test_rows(6))),
    }
    task = get_task("math500", {"validation_size": 5, **files, **cfg}, tmp_path / "cache")
    assert isinstance(task, Math500Task)
    return task


# --- data ------------------------------------------------------------------------------------------


def test_jsonl_columns_ground_truth_and_prompts(tmp_path):
    task = make_task(tmp_path)
    train, val, test = (task.dataset(s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (25, 5, 6)
    assert not set(train["problem"]) & set(val["problem"])
    assert set(train["problem"]) | set(val["problem"]) == {r["problem"] for r in math_train_rows(30)}
    row = next(r for r in train if r["problem"].endswith("(case 3)"))
    assert row["ground_truth"] == "\\frac{3}{4}"  # the solution's last box, not its first
    assert test[5]["ground_truth"] == "32"
    assert row["prompt"] == (
        SYSTEM_PROMPT + "\n\nYou are a math expert. You will be given a question to solve. Solve it step by step. "
        "Wrap the final answer in a \\boxed{}. \n\n" + row["problem"]
    )
    assert row["eval_prompt"] == MATH500_SYSTEM_PROMPT + "\n\n" + row["problem"]
    assert MATH500_SYSTEM_PROMPT.startswith("You are a math expert.") and "\\boxed{}.\nRespond" in MATH500_SYSTEM_PROMPT
    assert MATH500_SYSTEM_PROMPT.endswith('</answer>" \n')
    for split in (train, test):
        for r in split:
            for key in ("prompt", "eval_prompt"):
                assert not [ch for ch in r[key] if ord(ch) < 32 and ch != "\n"], key


def test_parquet_and_save_to_disk_files(tmp_path):
    train = write_saved(tmp_path / "train_saved", math_train_rows(12))
    test = write_parquet(tmp_path / "test.parquet", [{"problem": "p", "answer": " 7 "}])
    task = get_task(
        "math500", {"train_file": str(train), "test_file": str(test), "validation_size": 2}, tmp_path / "cache"
    )
    assert len(task.dataset("train")) == 10 and len(task.dataset("validation")) == 2
    assert task.dataset("test")[0]["ground_truth"] == "7" and task.dataset("test")[0]["solution"] == ""


def test_missing_file_fails_at_construction(tmp_path):
    with pytest.raises(DataError, match=r"task\.test_file"):
        get_task("math500", {"test_file": str(tmp_path / "missing.jsonl")}, tmp_path)


def test_unreachable_hub_names_the_field_and_columns(tmp_path, monkeypatch):
    go_offline(monkeypatch, tmp_path)
    task = get_task("math500", {"test_hub_id": "HuggingFaceH4/MATH-500"}, tmp_path)
    with pytest.raises(DataError) as info:
        task.dataset("test")
    message = str(info.value)
    assert "HuggingFaceH4/MATH-500" in message and "task.test_file" in message and "'problem', 'answer'" in message


@pytest.mark.parametrize(
    ("split", "rows", "reason"),
    [
        ("test", math_test_rows(3)[:2] + [{"problem": "p", "answer": "", "solution": "s"}], "answer is empty"),
        ("train", math_train_rows(2) + [{"problem": "p", "solution": "no box here"}], "no complete"),
        ("train", math_train_rows(2) + [{"problem": "p", "solution": "open \\boxed{1"}], "no complete"),
        ("train", math_train_rows(2) + [{"problem": "", "solution": "\\boxed{1}"}], "problem is empty"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path, split, rows, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    task = get_task("math500", {f"{split}_file": str(path), "validation_size": 1}, tmp_path / "cache")
    with pytest.raises(DataError) as info:
        task.dataset(split)
    assert "bad.jsonl: row 3" in str(info.value) and reason in str(info.value)


def test_test_rows_without_answer_column(tmp_path):
    path = write_jsonl(tmp_path / "noanswer.jsonl", [{"problem": "p", "solution": "\\boxed{1}"}])
    task = get_task("math500", {"test_file": str(path)}, tmp_path / "cache")
    with pytest.raises(DataError, match=r"noanswer\.jsonl.*missing \['answer'\]"):
        task.dataset("test")


# --- normalisation and extraction ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\\frac12", HALF),
        ("0.5", HALF),
        (".5", HALF),
        ("1/2", HALF),
        ("\\dfrac{1}{2}", HALF),
        ("\\tfrac12", HALF),
        ("\\frac1{2}", HALF),
        ("x = 5", "5"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$5", "5"),
        ("50\\%", "50"),
        ("10\\text{ cm}", "10"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("\\!1,\\!000", "1,000"),
        ("a\nb", "ab"),
    ],
)
def test_is_equiv_normalises(a, b):
    assert is_equiv(a, b) and is_equiv(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("2", "3"),
        ("0.50", HALF),
        ("2/4", HALF),
        ("01/2", HALF),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("x+y=5", "5"),
        (None, "1"),
    ],
)
def test_is_equiv_is_not_symbolic(a, b):
    assert not is_equiv(a, b)


def test_is_equiv_falls_back_to_raw_strings_where_normalisation_fails():
    several_units = "1\\text{ m}\\text{ s}"
    assert is_equiv(several_units, several_units)
    assert not is_equiv(several_units, "1")
    assert is_equiv("\\frac", "\\frac") and not is_equiv("\\frac", "frac")
    assert strip_string("") == "" and is_equiv(None, None)


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("so \\boxed{\\frac{1}{2}} done", HALF),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed {5}", "5"),
        ("$\\boxed 5$ more", "5"),
        ("\\boxed 7\n</answer>", "7"),
        ("\\boxed{1} then \\boxed{2", None),  # only the last \boxed counts, and it is unterminated
        ("\\boxedx", None),
        ("nothing", None),
    ],
)
def test_last_boxed(text, content):
    assert last_boxed(text) == content


# --- training rewards -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fixed", "reference"),
    [
        (TAGGED_BOX, 1.0, 0.75),
        ("<answer>\n1/2\n</answer>", 0.75, 0.75),
        ("so \\boxed{1}", 0.5, 0.25),
        ("plain text", 0.25, 0.25),
        ("\\boxed{1} <answer>1</answer>", 0.75, 0.75),  # box outside the answer region
        ("<answer>\n\\boxed{1", 1.0, 0.75),  # unterminated tags: region runs to the end
        # the reference really tests for a backspace character followed by "oxed"
        ("<answer>\x08oxed</answer>", 0.75, 1.0),
    ],
)
def test_format_reward_fixed_and_reference(text, fixed, reference):
    assert format_reward(text) == fixed
    assert format_reward_reference(text) == reference


@pytest.mark.parametrize(
    ("text", "truth", "anywhere", "answer_tags"),
    [
        (TAGGED_BOX, HALF, 2.0, 2.0),
        ("\\boxed{\\frac12}", HALF, 2.0, 2.0),
        ("\\boxed{0.5}", HALF, 2.0, 2.0),
        ("\\boxed 5$", "5", 2.0, 2.0),
        ("5", "5", 2.0, 2.0),  # no box: the whole text is the prediction
        ("<answer>\\boxed{3}</answer> on reflection \\boxed{4}", "3", 0.0, 2.0),
        ("<answer>\\boxed{3}</answer> on reflection \\boxed{4}", "4", 2.0, 0.0),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 0.0, 0.0),
    ],
)
def test_correctness_by_region(text, truth, anywhere, answer_tags):
    assert correctness(text, ground_truth=truth) == anywhere
    assert correctness(text, ground_truth=truth, pred_region="answer_tags") == answer_tags


def test_default_rewards_follow_mode_and_verifier(tmp_path):
    fixed = make_task(tmp_path / "a")
    reference = make_task(tmp_path / "b", reward_mode="reference", math_pred_region="answer_tags")
    verified = make_task(tmp_path / "c", verifier="math_verify", verify_timeout=LIMIT)
    assert [n for n, _ in fixed.reward_fns] == ["correctness", "format"]
    assert fixed.reward(TAGGED_BOX, {"ground_truth": HALF}) == {"correctness": 2.0, "format": 1.0}
    assert reference.reward(TAGGED_BOX, {"ground_truth": HALF}) == {"correctness": 2.0, "format": 0.75}
    late = "<answer>\\boxed{3}</answer> \\boxed{4}"
    assert reference.reward(late, {"ground_truth": "3"})["correctness"] == 2.0
    assert fixed.reward(late, {"ground_truth": "3"})["correctness"] == 0.0
    assert verified.reward("so \\boxed{0.5}", {"ground_truth": HALF}) == {"correctness": 2.0}


@pytest.mark.parametrize(
    ("key", "value"),
    [("reward_mode", "buggy"), ("verifier", "sympy"), ("math_pred_region", "first"), ("verify_timeout", 0)],
)
def test_bad_option_names_the_field(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"task\.{key}"):
        get_task("math500", {key: value}, tmp_path)


def test_target_earns_the_full_reward(tmp_path):
    task = make_task(tmp_path)
    row = task.dataset("train")[0]
    assert total_reward(task.reward(task.target(row), row)) == 3.0


# --- evaluation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reference", "fixed"),
    [
        (TAGGED_BOX + "<|eot_id|><|endoftext|>", HALF, HALF),
        ("\\boxed{} <answer> 7 </answer>", "7", "7"),  # empty box: fall back to the answer tags
        # an unterminated final box: the reference falls back to the answer tags, the fixed parser to the
        # last complete box
        ("\\boxed{7} then \\boxed{8 <answer>8</answer>", "8", "7"),
        ("no answer", None, None),
        ("<answer>1</answer><answer>2</answer>", "1", "2"),  # first pair (reference) vs last pair (fixed)
    ],
)
def test_eval_parsers(text, reference, fixed):
    assert reference_prediction(text) == reference
    assert fixed_prediction(text) == fixed


def test_metrics(tmp_path):
    examples = [{"ground_truth": HALF}, {"ground_truth": "7"}, {"ground_truth": "3"}, {"ground_truth": "2\\sqrt{2}"}]
    completions = [
        TAGGED_BOX + "<|eot_id|>",
        "\\boxed{7} and finally \\boxed{",  # unterminated final box hides the earlier one from the reference
        "<answer>\n4\n</answer>",
        "<answer>\n\\boxed{\\sqrt{8}}\n</answer>",
    ]
    metrics = math500_metrics(completions, examples)
    assert metrics == {"acc": 0.25, "acc_reference": 0.25, "acc_fixed": 0.5, "format_rate": 0.5}
    task = make_task(tmp_path, verifier="math_verify", verify_timeout=LIMIT)
    verified = task.metrics(completions, examples)
    assert verified["acc_math_verify"] == 0.75  # \sqrt{8} = 2\sqrt{2} symbolically
    assert verified["acc"] == metrics["acc"]


# --- math-verify under a time limit -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("gold", "pred", "equal"),
    [
        (HALF, "0.5", True),
        (HALF, "so the answer is \\boxed{\\frac12}", True),
        ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", True),
        ("3", "\\boxed{4}", False),
    ],
)
def test_math_verify_equivalence(gold, pred, equal):
    assert math_verify_equal(gold, pred, 5.0) is equal


@pytest.mark.parametrize("pred", ["\\boxed{10^{10^{10^{10}}}}", "9**9**9"])
def test_pathological_input_returns_within_the_limit(pred):
    math_verify_equal("1", "1", 5.0)  # worker started
    start = time.perf_counter()
    assert math_verify_equal("3", pred, LIMIT) is False
    assert time.perf_counter() - start < LIMIT + MARGIN


def test_math_verify_from_another_thread():
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(math_verify_equal(HALF, "0.5", 5.0))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [True, True, True]


def test_a_worker_that_hangs_is_killed_and_replaced():
    hang = "import sys, time; print('{\"ready\": true}', flush=True); sys.stdin.readline(); time.sleep(600)"
    client = MathVerifyClient([sys.executable, "-c", hang], grace_s=0.2)
    try:
        start = time.perf_counter()
        assert client.equal("\\boxed{1}", "1", 0.2) is False
        assert time.perf_counter() - start < 0.4 + MARGIN
        assert client.timeouts == 1 and client.restarts == 2  # killed, and a fresh worker already started
    finally:
        client.close()


def test_a_worker_that_never_starts_counts_as_not_equivalent():
    client = MathVerifyClient([sys.executable, "-c", "import sys; sys.exit(3)"], startup_s=5.0)
    assert client.equal("\\boxed{1}", "1", 1.0) is False
    silent = MathVerifyClient([sys.executable, "-c", "import time; time.sleep(600)"], startup_s=0.3)
    start = time.perf_counter()
    assert silent.equal("\\boxed{1}", "1", 1.0) is False
    assert time.perf_counter() - start < 0.3 + MARGIN


# --- adversarial completions ------------------------------------------------------------------------


MATH_REWARDS = sorted(name for name in REWARDS if name.startswith("math500_"))


def test_every_reward_is_registered():
    assert MATH_REWARDS == [
        "math500_correctness",
        "math500_correctness_math_verify",
        "math500_format",
        "math500_format_reference",
    ]


@pytest.mark.parametrize("name", MATH_REWARDS)
def test_adversarial_completions_stay_in_range_and_fast(name):
    spec = REWARDS[name]
    verified = "math_verify" in name
    options = {"verify_timeout": LIMIT} if verified else {}
    if verified:
        math_verify_equal("1", "1", 5.0)  # start the worker outside the timed calls
    for text in ADVERSARIAL:
        start = time.perf_counter()
        value = spec.fn(text, **spec.example, **options)
        elapsed = time.perf_counter() - start
        assert spec.low <= value <= spec.high, (name, text[:40], value)
        assert elapsed < (LIMIT + MARGIN if verified else 1.0), (name, text[:40], elapsed)


def test_adversarial_completions_in_metrics():
    examples = [{"ground_truth": HALF}] * len(ADVERSARIAL)
    start = time.perf_counter()
    metrics = math500_metrics(ADVERSARIAL, examples)
    assert time.perf_counter() - start < 5.0
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert math500_metrics([None], examples[:1])["acc"] == 0.0  # type: ignore[list-item]
