"""Sudoku task: grid enumeration, leak-free generator, caching, file loading, reward and metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dllm_rl.errors import ConfigError
from dllm_rl.tasks import TASKS, DataError, get_task
from dllm_rl.tasks.base import total_reward
from dllm_rl.tasks.sudoku import (
    SudokuTask,
    all_grids,
    consistent,
    count_completions,
    extract_digits,
    is_valid_grid,
    split_grids,
)

# Small sizes keep every generation well under a second.
SMALL = {"train_size": 600, "validation_size": 64, "test_size": 64}

SOLUTION = "1234341221434321"
# 8 blanks at cells 0, 2, 5, 6, 8, 10, 12, 14.
PUZZLE = "0204300201030301"
EXAMPLE = {"puzzle": PUZZLE, "solution": SOLUTION}


def make_task(tmp_path: Path, **cfg) -> SudokuTask:
    task = get_task("sudoku", {**SMALL, **cfg}, tmp_path)
    assert isinstance(task, SudokuTask)
    return task


def rows(task: SudokuTask, split: str) -> list[tuple[str, str]]:
    ds = task.dataset(split)
    return list(zip(ds["puzzle"], ds["solution"], strict=True))


# --- grids -----------------------------------------------------------------------------------------


def test_288_distinct_valid_grids():
    grids = all_grids()
    assert len(grids) == 288
    assert len(set(grids)) == 288
    assert all(is_valid_grid(g) for g in grids)


def test_is_valid_grid_rejects_broken_grids():
    assert is_valid_grid(SOLUTION)
    assert not is_valid_grid("1234123412341234")  # columns repeat
    assert not is_valid_grid("1234341221434320")  # a zero
    assert not is_valid_grid(SOLUTION[:15])
    assert not is_valid_grid("1234214334124321")  # rows/cols fine but 2x2 boxes repeat


def test_count_completions():
    assert count_completions(SOLUTION) == 1
    assert count_completions("0" * 16) == 288
    assert count_completions("0" * 16, limit=2) == 2
    assert count_completions("1100000000000000") == 0  # contradictory givens
    assert count_completions(PUZZLE) >= 1


# --- generator -------------------------------------------------------------------------------------


def test_leak_free_split_disjoint_grids_and_validation_from_train_grids(tmp_path):
    train_grids, test_grids = split_grids(42, "leak_free", 200)
    assert len(train_grids) == 200 and len(test_grids) == 88
    assert not set(train_grids) & set(test_grids)

    task = make_task(tmp_path)
    train, val, test = (rows(task, s) for s in ("train", "validation", "test"))
    assert len(train) > 0 and len(val) == 64 and len(test) == 64
    assert {s for _, s in train} <= set(train_grids)
    assert {s for _, s in val} <= set(train_grids)
    assert {s for _, s in test} <= set(test_grids)


def test_puzzle_properties_and_no_eval_puzzle_in_train(tmp_path):
    task = make_task(tmp_path)
    train, val, test = (rows(task, s) for s in ("train", "validation", "test"))
    for puzzle, solution in test:
        assert puzzle.count("0") == 8
        assert is_valid_grid(solution) and consistent(puzzle, solution)
    for puzzle, solution in train + val:
        assert 6 <= puzzle.count("0") <= 10
        assert consistent(puzzle, solution)
    train_puzzles = [p for p, _ in train]
    assert len(set(train_puzzles)) == len(train_puzzles)
    assert not set(train_puzzles) & {p for p, _ in val + test}
    assert not {p for p, _ in val} & {p for p, _ in test}
    assert task.dataset("test")["prompt"] == task.dataset("test")["puzzle"]


def test_d1_split_shares_grids(tmp_path):
    train_grids, test_grids = split_grids(42, "d1", 200)
    assert sorted(train_grids) == sorted(test_grids) == sorted(all_grids())
    task = make_task(tmp_path, split="d1", train_size=2000)
    assert {s for _, s in rows(task, "train")} & {s for _, s in rows(task, "test")}


def test_require_unique_filters(tmp_path):
    task = make_task(tmp_path, require_unique=True)
    for split in ("train", "validation", "test"):
        assert all(count_completions(p) == 1 for p, _ in rows(task, split))


def test_same_seed_same_data_different_seed_different(tmp_path):
    a = make_task(tmp_path / "a", seed=7)
    b = make_task(tmp_path / "b", seed=7)
    c = make_task(tmp_path / "c", seed=8)
    for split in ("train", "validation", "test"):
        assert rows(a, split) == rows(b, split)
    assert rows(a, "test") != rows(c, "test")
    assert rows(a, "train") != rows(c, "train")


def test_cache_directory_reused(tmp_path):
    first = make_task(tmp_path)
    first.dataset("train")
    cached = list((tmp_path / "data").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("sudoku-")
    marker = cached[0] / "marker"
    marker.write_text("kept")
    mtime = cached[0].stat().st_mtime_ns

    second = make_task(tmp_path)
    assert rows(second, "train") == rows(first, "train")
    assert list((tmp_path / "data").iterdir()) == cached
    assert marker.read_text() == "kept" and cached[0].stat().st_mtime_ns == mtime

    # Reward-only options do not change the data, so they share the cache; data options do not.
    make_task(tmp_path, credit_alternative_solutions=False).dataset("test")
    assert len(list((tmp_path / "data").iterdir())) == 1
    make_task(tmp_path, test_blanks=7).dataset("test")
    assert len(list((tmp_path / "data").iterdir())) == 2


def test_bad_config_rejected(tmp_path):
    with pytest.raises(ConfigError, match="task.split"):
        make_task(tmp_path, split="random")
    with pytest.raises(ConfigError, match="task.blanks"):
        make_task(tmp_path, blanks_min=9, blanks_max=3)


# --- reward ----------------------------------------------------------------------------------------


def alternative_completion(puzzle: str, solution: str) -> str:
    """A valid completion of the puzzle that differs from the stored solution."""
    return next(g for g in all_grids() if consistent(puzzle, g) and g != solution)


def test_reward_hand_made_cases(tmp_path):
    task = make_task(tmp_path)
    assert task.reward(SOLUTION, EXAMPLE) == {"correct_cells": 1.0}
    # Givens copied, every blank wrong.
    wrong = "".join(p if p != "0" else ("1" if s != "1" else "2") for p, s in zip(PUZZLE, SOLUTION, strict=True))
    assert task.reward(wrong, EXAMPLE)["correct_cells"] == 0.0
    # Copying the puzzle (zeros in blanks) earns nothing either.
    assert task.reward(PUZZLE, EXAMPLE)["correct_cells"] == 0.0
    # Half of the 8 blanks right (cells 0, 2, 5, 6), the other half wrong.
    blanks = [i for i, p in enumerate(PUZZLE) if p == "0"]
    half = list(wrong)
    for i in blanks[:4]:
        half[i] = SOLUTION[i]
    assert task.reward("".join(half), EXAMPLE)["correct_cells"] == pytest.approx(0.5)
    # Non-digit characters are ignored and short answers are padded with '0'.
    assert task.reward(" ".join(SOLUTION) + "\n", EXAMPLE)["correct_cells"] == 1.0
    assert task.reward(SOLUTION[:8], EXAMPLE)["correct_cells"] == pytest.approx(4 / 8)  # blanks 0, 2, 5, 6
    assert total_reward(task.reward(SOLUTION, EXAMPLE)) == 1.0


def test_reward_credits_alternative_solutions_only_when_enabled(tmp_path):
    puzzle = "0" * 8 + SOLUTION[8:]  # top half blank: several completions
    example = {"puzzle": puzzle, "solution": SOLUTION}
    alt = alternative_completion(puzzle, SOLUTION)
    assert count_completions(puzzle) >= 2
    credited = make_task(tmp_path / "a")
    strict = make_task(tmp_path / "b", credit_alternative_solutions=False)
    assert credited.reward(alt, example)["correct_cells"] == 1.0
    assert strict.reward(alt, example)["correct_cells"] < 1.0
    # An invalid grid is never credited as an alternative.
    assert credited.reward("1" * 16, example)["correct_cells"] < 1.0


@pytest.mark.parametrize(
    "text",
    ["", "\x00" * 100, "9" * 10**6, "١٢٣٤", "__import__('os').system('echo hi')", "\ud800", "1234" * 10**5],
)
def test_reward_adversarial_inputs(tmp_path, text):
    task = make_task(tmp_path)
    start = time.perf_counter()
    value = task.reward(text, EXAMPLE)["correct_cells"]
    assert time.perf_counter() - start < 0.05
    assert isinstance(value, float) and 0.0 <= value <= 1.0


def test_extract_digits_ascii_only_and_capped():
    assert extract_digits("a1b2\n3٤") == "123"
    assert extract_digits("x" * 5000 + "1234") == ""


# --- metrics ---------------------------------------------------------------------------------------


def test_metrics_hand_made():
    task = SudokuTask(SMALL, "/nonexistent-unused")
    puzzle2 = "0" * 8 + SOLUTION[8:]
    alt = alternative_completion(puzzle2, SOLUTION)
    examples = [EXAMPLE, {"puzzle": puzzle2, "solution": SOLUTION}, EXAMPLE]
    completions = [SOLUTION, alt, ""]
    alt_correct = sum(1 for i in range(8) if alt[i] == SOLUTION[i])
    m = task.metrics(completions, examples)
    assert m["cell_acc"] == pytest.approx((8 + alt_correct + 0) / 24)  # no alternative credit
    assert m["exact_solve"] == pytest.approx(1 / 3)
    assert m["valid_solve"] == pytest.approx(2 / 3)
    assert task.primary_metric in m
    assert task.metrics([], []) == {"cell_acc": 0.0, "exact_solve": 0.0, "valid_solve": 0.0}


# --- files -----------------------------------------------------------------------------------------


def valid_pairs(n: int) -> list[tuple[str, str]]:
    """Puzzles with the diagonal blanked: distinct for distinct grids, some start with '0'."""
    return [("".join("0" if i % 5 == 0 else ch for i, ch in enumerate(g)), g) for g in all_grids()[:n]]


def write_csv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("Puzzle,Solution\n" + "".join(f"{p},{s}\n" for p, s in pairs))
    return path


def test_valid_csv_and_jsonl_load(tmp_path):
    train = write_csv(tmp_path / "train.csv", valid_pairs(40))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"puzzle": p, "solution": s}) + "\n" for p, s in valid_pairs(50)[40:]))
    task = make_task(tmp_path, train_file=str(train), test_file=str(test), validation_size=10)
    # Leading zeros survive (strings, not ints), and validation is carved from train, not test.
    assert rows(task, "test") == valid_pairs(50)[40:]
    train_rows, val_rows = rows(task, "train"), rows(task, "validation")
    assert len(train_rows) == 30 and len(val_rows) == 10
    assert sorted(train_rows + val_rows) == sorted(valid_pairs(40))


def test_malformed_csv_row_raises_data_error(tmp_path):
    pairs = valid_pairs(5)
    pairs[2] = (pairs[2][0], "1234123412341234")  # 3rd data row: invalid solution grid
    path = write_csv(tmp_path / "bad.csv", pairs)
    with pytest.raises(DataError) as err:
        make_task(tmp_path, train_file=str(path)).dataset("train")
    assert str(path) in str(err.value) and "row 3" in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [("020430020103030", SOLUTION), ("0204300201030305", SOLUTION), ("3204300201030301", SOLUTION)],
)
def test_other_malformed_rows(tmp_path, bad):
    path = write_csv(tmp_path / "bad.csv", [*valid_pairs(1), bad])
    with pytest.raises(DataError, match="row 2"):
        make_task(tmp_path, test_file=str(path)).dataset("test")


def test_missing_file_names_file_and_key(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="test_file") as err:
        make_task(tmp_path, test_file=str(missing))
    assert str(missing) in str(err.value)


def test_registry():
    assert TASKS["sudoku"] is SudokuTask and SudokuTask.name == "sudoku"
    with pytest.raises(ConfigError, match="unknown task 'nope'; available: .*sudoku"):
        get_task("nope", {}, "/tmp")
