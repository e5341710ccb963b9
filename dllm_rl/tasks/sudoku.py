"""4x4 Sudoku (docs/tasks.md, "Sudoku"), in the compact character-level format or the chat format.

compact: prompt = the 16-character puzzle (row-major, '0' = empty); completion = the 16 solution digits.
chat: the user message is the rules block and the question, zero-shot (d1, wd1, DMPO, GDSD) or
with three worked examples (SPG; ``task.few_shot``), and the answer is read from ``<answer>`` tags.
Our three examples are built from training-side grids (the SPG texts are not reproduced) and are
removed from every split.

Data comes from an in-memory generator or from local CSV / JSONL files. The generator
splits the 288 valid grids into disjoint train / test solution sets by default ("leak_free"), so a
model cannot pass the test set by memorising solutions; `split: d1` draws both sides from all 288
grids (the shared-solution setting of d1, not leak-free). The validation split is always made from
training grids, so model selection never looks at test grids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.tasks.base import (
    SPLITS,
    DataError,
    Task,
    TaskCfg,
    carve_validation,
    check_csv,
    check_split,
    check_values,
    read_json_rows,
    register_task,
)
from dllm_rl.tasks.rewards import RewardFn, clip_text, last_tag_content, register_reward

datasets = lazy_import("datasets")  # loads on first use (dllm_rl/lazy.py)
np = lazy_import("numpy")

GRID_CELLS = 16
GRID_DIGITS = "1234"
NUM_GRIDS = 288
# The compact format has no answer tags, so the reward scans raw text; capping the scan keeps the
# reward O(1) on degenerate multi-megabyte completions.
MAX_SCAN_CHARS = 4096
# Bump when generation changes so old on-disk caches are not reused for new semantics.
GENERATOR_VERSION = 2

_ASCII_DIGITS = frozenset("0123456789")
_PUZZLE_CHARS = frozenset("01234")
_COLUMNS = ("prompt", "eval_prompt", "puzzle", "solution")


def _features() -> datasets.Features:
    return datasets.Features({name: datasets.Value("string") for name in _COLUMNS})


# --------------------------------------------------------------------------------------------------
# Grid helpers (pure)


def _units() -> tuple[tuple[int, ...], ...]:
    """Rows, columns and 2x2 boxes as tuples of cell indices (row-major)."""
    rows = [tuple(4 * r + c for c in range(4)) for r in range(4)]
    cols = [tuple(4 * r + c for r in range(4)) for c in range(4)]
    boxes = [tuple(4 * (br + r) + bc + c for r in range(2) for c in range(2)) for br in (0, 2) for bc in (0, 2)]
    return tuple(rows + cols + boxes)


UNITS = _units()
# PEERS[i]: the other cells sharing a row, column or box with cell i.
PEERS: tuple[frozenset[int], ...] = tuple(
    frozenset(j for unit in UNITS if i in unit for j in unit if j != i) for i in range(GRID_CELLS)
)


@functools.cache
def _grids() -> tuple[str, ...]:
    """All valid 4x4 grids in lexicographic order, by backtracking over the 16 cells."""
    found: list[str] = []
    cells = [""] * GRID_CELLS

    def fill(i: int) -> None:
        if i == GRID_CELLS:
            found.append("".join(cells))
            return
        used = {cells[j] for j in PEERS[i] if j < i}
        for d in GRID_DIGITS:
            if d not in used:
                cells[i] = d
                fill(i + 1)
        cells[i] = ""

    fill(0)
    assert len(found) == NUM_GRIDS, f"expected {NUM_GRIDS} grids, enumerated {len(found)}"
    return tuple(found)


def all_grids() -> list[str]:
    """The 288 valid 4x4 Sudoku grids as 16-character strings (sorted; a fresh list each call)."""
    return list(_grids())


def is_valid_grid(s: str) -> bool:
    """True if s is 16 digits 1-4 with every row, column and box holding 1-4 exactly once."""
    if not isinstance(s, str) or len(s) != GRID_CELLS or any(ch not in GRID_DIGITS for ch in s):
        return False
    return all(len({s[i] for i in unit}) == 4 for unit in UNITS)


def consistent(puzzle: str, grid: str) -> bool:
    """True if every given (non-'0') cell of the puzzle has the same digit in the grid."""
    if len(puzzle) != GRID_CELLS or len(grid) != GRID_CELLS:
        return False
    return all(p == "0" or p == g for p, g in zip(puzzle, grid, strict=True))


@functools.cache
def _grid_masks() -> dict[tuple[int, str], int]:
    """(cell, digit) -> bitmask over the 288 grids that have `digit` at `cell`."""
    masks = {(i, d): 0 for i in range(GRID_CELLS) for d in GRID_DIGITS}
    for k, grid in enumerate(_grids()):
        for i, d in enumerate(grid):
            masks[(i, d)] |= 1 << k
    return masks


def count_completions(puzzle: str, limit: int | None = None) -> int:
    """Number of valid grids consistent with the puzzle's givens, capped at `limit` if given.

    Every completion is one of the 288 grids, so intersecting per-given bitmasks counts them
    exactly in a few integer operations (fast enough to filter whole training sets).
    """
    if not isinstance(puzzle, str) or len(puzzle) != GRID_CELLS or any(ch not in _PUZZLE_CHARS for ch in puzzle):
        return 0
    masks = _grid_masks()
    alive = (1 << NUM_GRIDS) - 1
    for i, ch in enumerate(puzzle):
        if ch != "0":
            alive &= masks[(i, ch)]
    count = alive.bit_count()
    return count if limit is None else min(count, limit)


def extract_digits(text: str) -> str:
    """The ASCII digits 0-9 of the first MAX_SCAN_CHARS characters of text, in order.

    Only ASCII digits count: str.isdigit() would accept e.g. Arabic-Indic digits, which are not
    Sudoku answers.
    """
    if not isinstance(text, str):
        return ""
    return "".join(ch for ch in text[:MAX_SCAN_CHARS] if ch in _ASCII_DIGITS)


def answer_grid(text: str) -> str:
    """The 16-character answer read from a completion: its digits, right-padded with '0' / truncated."""
    return extract_digits(text)[:GRID_CELLS].ljust(GRID_CELLS, "0")


def blank_cell_counts(answer: str, puzzle: str, solution: str) -> tuple[int, int]:
    """(empty cells filled with the stored solution digit, number of empty cells) of a puzzle."""
    blanks = [i for i, ch in enumerate(puzzle) if ch == "0"]
    correct = sum(1 for i in blanks if i < len(answer) and i < len(solution) and answer[i] == solution[i])
    return correct, len(blanks)


def is_valid_solve(answer: str, puzzle: str) -> bool:
    """The answer is a valid grid agreeing with the givens (not necessarily the stored solution)."""
    return is_valid_grid(answer) and consistent(puzzle, answer)


def sudoku_reward(
    completion: str, puzzle: str, solution: str, credit_alternative: bool = True, answer_tags: bool = False
) -> float:
    """Training reward in [0, 1]: fraction of empty cells matching the stored solution.

    With ``answer_tags`` (chat format) the digits come from the last ``<answer>…</answer>`` only, and
    a completion without one earns 0. With credit_alternative (the default; the reference has no such
    credit), any valid completion of the givens earns 1.0, because puzzles may have several solutions
    and the stored one is an arbitrary pick (docs/tasks.md, "Sudoku").
    """
    text = clip_text(completion)
    if answer_tags:
        content = last_tag_content(text, "answer")
        if content is None:
            return 0.0
        text = content
    answer = answer_grid(text)
    if credit_alternative and is_valid_solve(answer, puzzle):
        return 1.0
    correct, blanks = blank_cell_counts(answer, puzzle, solution)
    if blanks == 0:  # nothing to fill: only a literal match counts (avoids 0/0)
        return 1.0 if answer == solution else 0.0
    return correct / blanks


_EXAMPLE_ROW = {"puzzle": "1030400000010020", "solution": "1234432121433412"}


@register_reward("sudoku_cells", low=0.0, high=1.0, example=_EXAMPLE_ROW)
def sudoku_cells(completion: str, *, puzzle: str, solution: str, answer_tags: bool = False, **_: Any) -> float:
    """The cell reward with alternative solutions credited: the dllm_rl default."""
    return sudoku_reward(completion, puzzle, solution, credit_alternative=True, answer_tags=answer_tags)


@register_reward("sudoku_cells_reference", low=0.0, high=1.0, example=_EXAMPLE_ROW)
def sudoku_cells_reference(
    completion: str, *, puzzle: str, solution: str, answer_tags: bool = False, **_: Any
) -> float:
    """The reference's cell reward: only the stored solution earns credit."""
    return sudoku_reward(completion, puzzle, solution, credit_alternative=False, answer_tags=answer_tags)


_EOT_MARKERS = ("<|eot_id|>", "<|endoftext|>", "</answer>")


def chat_answer(text: str) -> str:
    """The answer string of a chat-format evaluation completion (the reference's ordered patterns).

    (1) a code block inside <answer>; (2) <answer> up to an end marker, if not empty; (3) the text after </answer>;
    (4) the 16 digits before </answer>; (5) any standalone run of 16 digits. Whitespace removed, then
    padded with '0' or truncated to 16. Written with plain searches: linear on any input.
    """
    text = clip_text(text)
    start = text.find("<answer>")
    if start >= 0:
        body = text[start + len("<answer>") :]
        fence = body.find("```")
        close = body.find("</answer>")
        if fence >= 0 and (close < 0 or fence < close):
            end = body.find("```", fence + 3)
            if end >= 0:
                return _grid_of(body[fence + 3 : end].removeprefix("text").removeprefix("plaintext"))
        ends = [i for i in (body.find(m) for m in _EOT_MARKERS) if i >= 0]
        content = body[: min(ends)] if ends else body
        if content.strip():  # empty tags fall through to the later patterns
            return _grid_of(content)
    close = text.find("</answer>")
    if close >= 0:
        after = text[close + len("</answer>") :]
        if after.strip():
            return _grid_of(after)
        digits = "".join(ch for ch in text[:close] if ch in _ASCII_DIGITS)
        if len(digits) >= GRID_CELLS:
            return digits[-GRID_CELLS:]
    run = _first_digit_run(text, GRID_CELLS)
    return run if run is not None else "0" * GRID_CELLS


def _grid_of(fragment: str) -> str:
    return "".join(fragment.split())[:GRID_CELLS].ljust(GRID_CELLS, "0")


def _first_digit_run(text: str, length: int) -> str | None:
    """The first maximal run of exactly ``length`` ASCII digits, or None."""
    run = 0
    for i, ch in enumerate(text):
        if ch in _ASCII_DIGITS:
            run += 1
            continue
        if run == length:
            return text[i - length : i]
        run = 0
    return text[len(text) - length :] if run == length else None


def sudoku_metrics(
    completions: Sequence[str], puzzles: Sequence[str], solutions: Sequence[str], chat: bool = False
) -> dict[str, float]:
    """cell_acc (micro average over empty cells, the papers' metric), exact_solve, valid_solve.

    ``chat``: answers are read with chat_answer's extraction patterns instead of the compact digits.
    """
    if not len(completions) == len(puzzles) == len(solutions):
        raise ValueError(f"got {len(completions)} completions for {len(puzzles)} examples")
    correct = blanks = exact = valid = 0
    for text, puzzle, solution in zip(completions, puzzles, solutions, strict=True):
        answer = chat_answer(text) if chat else answer_grid(text)
        c, b = blank_cell_counts(answer, puzzle, solution)
        correct, blanks = correct + c, blanks + b
        exact += answer == solution
        valid += is_valid_solve(answer, puzzle)
    n = len(completions)
    return {
        "cell_acc": correct / blanks if blanks else 0.0,
        "exact_solve": exact / n if n else 0.0,
        "valid_solve": valid / n if n else 0.0,
    }


def row_problem(puzzle: Any, solution: Any) -> str | None:
    """What is wrong with a (puzzle, solution) data row, or None if it is well-formed."""
    for label, value, allowed in (("puzzle", puzzle, "01234"), ("solution", solution, GRID_DIGITS)):
        if not isinstance(value, str):
            return f"{label} must be a string, got {type(value).__name__} {_preview(value)}"
        if len(value) != GRID_CELLS:
            return f"{label} must have {GRID_CELLS} characters, got {len(value)}: {_preview(value)}"
        for i, ch in enumerate(value):
            if ch not in allowed:
                return f"{label} has {ch!r} at position {i + 1}; allowed digits are {allowed}"
    if not is_valid_grid(solution):
        return f"solution {solution} is not a valid 4x4 Sudoku grid"
    if not consistent(puzzle, solution):
        cell = next(i for i, (p, s) in enumerate(zip(puzzle, solution, strict=True)) if p not in ("0", s))
        return f"puzzle given {puzzle[cell]!r} at position {cell + 1} disagrees with solution {solution[cell]!r}"
    return None


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------------
# Configuration


def _as_bool(value: Any) -> bool:
    """bool() would read the string "false" as True."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


# SudokuConfig fields that determine the generated data (and so name its cache directory).
_GENERATOR_FIELDS = (
    "seed",
    "split",
    "train_grids",
    "train_size",
    "validation_size",
    "test_size",
    "blanks_min",
    "blanks_max",
    "test_blanks",
    "require_unique",
)


@dataclasses.dataclass
class SudokuTaskCfg(TaskCfg):
    """``task=sudoku``: the generator's and the reward's options (a comment above each field)."""

    # registry name
    name: str = "sudoku"
    completion_length: int = 16
    block_length: int = 16
    diffusion_steps: int = 8
    # leak_free: train and test solution grids disjoint; d1: shared grids (not leak-free, parity only)
    split: str = "leak_free"
    # solution grids on the training side (of 288); the rest are test grids
    train_grids: int = 200
    # generated training puzzles
    train_size: int = 20000
    # test puzzles (exactly test_blanks blanks each)
    test_size: int = 256
    # fewest blanks in a training puzzle
    blanks_min: int = 6
    # most blanks in a training puzzle
    blanks_max: int = 10
    # blanks in every test puzzle (8, as in the d1 test set)
    test_blanks: int = 8
    # keep only puzzles with exactly one completion
    require_unique: bool = False
    # reward 1.0 for any valid grid consistent with the givens (not only the stored solution)
    credit_alternative_solutions: bool = True
    # chat style: worked examples before the question (3: SPG's 3-shot prompt; 0: zero-shot, d1)
    few_shot: int = 3
    # optional CSV (Puzzle,Solution) or JSONL (puzzle,solution) files replacing the generator
    train_file: str | None = None
    # optional validation file (default: carved from the training side)
    validation_file: str | None = None
    # optional test file
    test_file: str | None = None

    @classmethod
    def check(cls, t: Any, need: Callable[[bool, str], None]) -> None:
        super().check(t, need)
        split, grids = t.get("split", cls.split), t.get("train_grids", cls.train_grids)
        need(split in ("leak_free", "d1"), f"task.split={split!r} must be 'leak_free' or 'd1'")
        need(
            split != "leak_free" or 1 <= grids < NUM_GRIDS,
            f"task.train_grids={grids} must be in [1, {NUM_GRIDS - 1}]",
        )
        low, high = t.get("blanks_min", cls.blanks_min), t.get("blanks_max", cls.blanks_max)
        need(
            1 <= low <= high <= GRID_CELLS,
            f"task.blanks_min={low}, task.blanks_max={high}: need 1 <= blanks_min <= blanks_max <= 16",
        )
        test_blanks = t.get("test_blanks", cls.test_blanks)
        need(1 <= test_blanks <= GRID_CELLS, f"task.test_blanks={test_blanks} must be in [1, 16]")
        shots = t.get("few_shot", cls.few_shot)
        need(shots in (0, 3), f"task.few_shot={shots} must be 0 (zero-shot, d1) or 3 (SPG's 3-shot prompt)")


# The schema's defaults, the one place they are written.
_DEFAULT = SudokuTaskCfg()


@dataclasses.dataclass(frozen=True)
class SudokuConfig:
    """The task.* options the generator and rewards read, checked; see the module docstring and
    docs/tasks.md, "Sudoku". Defaults are the schema's (SudokuTaskCfg)."""

    seed: int = _DEFAULT.seed
    split: str = _DEFAULT.split  # "leak_free" (grids split train/test) | "d1" (shared grids, not leak-free)
    train_grids: int = _DEFAULT.train_grids  # leak_free only: training solution grids; the rest are test grids
    train_size: int = _DEFAULT.train_size
    validation_size: int = _DEFAULT.validation_size
    test_size: int = _DEFAULT.test_size
    blanks_min: int = _DEFAULT.blanks_min
    blanks_max: int = _DEFAULT.blanks_max
    test_blanks: int = _DEFAULT.test_blanks
    require_unique: bool = _DEFAULT.require_unique
    credit_alternative_solutions: bool = _DEFAULT.credit_alternative_solutions
    few_shot: int = _DEFAULT.few_shot
    train_file: str | None = _DEFAULT.train_file
    validation_file: str | None = _DEFAULT.validation_file
    test_file: str | None = _DEFAULT.test_file

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> SudokuConfig:
        """Read the known keys with their defaults (other keys, e.g. prompt settings, are ignored)."""
        kwargs = {f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(cls)}
        # Hydra / CLI values may arrive as strings; cast by the declared field type.
        casts = {"int": int, "bool": _as_bool}
        for f in dataclasses.fields(cls):
            if f.type in casts:
                kwargs[f.name] = casts[f.type](kwargs[f.name])
        for key in ("train_file", "validation_file", "test_file"):
            kwargs[key] = None if kwargs[key] in (None, "") else str(kwargs[key])
        config = cls(**kwargs)
        # The schema's rules (SudokuTaskCfg.check) on the cast values.
        check_values(SudokuTaskCfg, {**cfg, **dataclasses.asdict(config)})
        return config

    def generator_key(self) -> dict[str, Any]:
        """The fields that determine generated data (cache key); reward options and files excluded."""
        key = {name: getattr(self, name) for name in _GENERATOR_FIELDS}
        key["generator_version"] = GENERATOR_VERSION
        return key

    def generator_hash(self) -> str:
        blob = json.dumps(self.generator_key(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Generator

Pair = tuple[str, str]  # (puzzle, solution)

# Independent, stable random streams per generation stage, so that e.g. changing train_size does not
# change the test puzzles.
_STAGE_SEEDS = {"grids": 0, "test": 1, "validation": 2, "train": 3, "carve": 4, "few_shot": 5}


def _rng(seed: int, stage: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STAGE_SEEDS[stage]])


def split_grids(seed: int, split: str, train_grids: int) -> tuple[list[str], list[str]]:
    """(train grids, test grids): disjoint for "leak_free"; both all 288 grids for "d1"."""
    grids = all_grids()
    if split == "d1":
        return grids, list(grids)
    order = _rng(seed, "grids").permutation(len(grids))
    train = sorted(grids[i] for i in order[:train_grids])
    test = sorted(grids[i] for i in order[train_grids:])
    return train, test


def sample_puzzles(
    grids: Sequence[str],
    n: int,
    blanks: tuple[int, int],
    rng: np.random.Generator,
    exclude: Iterable[str] = (),
    require_unique: bool = False,
) -> list[Pair]:
    """n distinct puzzles: a uniform grid, a uniform blank count in [lo, hi], a uniform blank subset.

    Puzzles in `exclude`, repeats, and (with require_unique) puzzles with several completions are
    redrawn. Raises ValueError when the request cannot be met (e.g. more puzzles than exist).
    """
    lo, hi = blanks
    seen = set(exclude)
    out: list[Pair] = []
    max_draws, drawn = 50 * n + 10_000, 0
    while len(out) < n:
        if drawn >= max_draws:
            raise ValueError(
                f"only {len(out)} of {n} distinct puzzles found after {drawn} draws; "
                "lower the split size or widen the blank range"
            )
        batch = 2 * (n - len(out)) + 64
        drawn += batch
        grid_idx = rng.integers(len(grids), size=batch)
        n_blanks = rng.integers(lo, hi + 1, size=batch)
        # Row k is a random permutation of cell ranks; cells ranked below n_blanks[k] are blanked,
        # which picks a uniformly random subset of that size.
        ranks = rng.permuted(np.tile(np.arange(GRID_CELLS), (batch, 1)), axis=1)
        blank = ranks < n_blanks[:, None]
        for g, mask in zip(grid_idx, blank, strict=True):
            solution = grids[g]
            puzzle = "".join("0" if m else ch for ch, m in zip(solution, mask, strict=True))
            if puzzle in seen or (require_unique and count_completions(puzzle, limit=2) != 1):
                continue
            seen.add(puzzle)
            out.append((puzzle, solution))
            if len(out) == n:
                break
    return out


def generate_pairs(config: SudokuConfig) -> dict[str, list[Pair]]:
    """Generated splits: test from test grids; validation, then train, from training grids.

    Validation and train are disjoint from each other and from test as puzzle strings (a puzzle
    with several completions could otherwise come from a train grid and a test grid alike).
    """
    train_grids, test_grids = split_grids(config.seed, config.split, config.train_grids)
    unique = config.require_unique
    train_blanks = (config.blanks_min, config.blanks_max)
    test = sample_puzzles(
        test_grids,
        config.test_size,
        (config.test_blanks, config.test_blanks),
        _rng(config.seed, "test"),
        require_unique=unique,
    )
    taken = {p for p, _ in test}
    validation = sample_puzzles(
        train_grids,
        config.validation_size,
        train_blanks,
        _rng(config.seed, "validation"),
        exclude=taken,
        require_unique=unique,
    )
    taken |= {p for p, _ in validation}
    train = sample_puzzles(
        train_grids,
        config.train_size,
        train_blanks,
        _rng(config.seed, "train"),
        exclude=taken,
        require_unique=unique,
    )
    return {"train": train, "validation": validation, "test": test}


def pairs_to_dataset(pairs: Sequence[Pair], prompt_of: Any = None) -> datasets.Dataset:
    """Dataset with prompt and eval_prompt (``prompt_of(puzzle)``; the puzzle itself in the compact
    format), puzzle and solution string columns."""
    puzzles = [p for p, _ in pairs]
    prompts = puzzles if prompt_of is None else [prompt_of(p) for p in puzzles]
    return datasets.Dataset.from_dict(
        {"prompt": prompts, "eval_prompt": prompts, "puzzle": puzzles, "solution": [s for _, s in pairs]},
        features=_features(),
    )


def load_or_generate(config: SudokuConfig, cache_dir: str | Path) -> datasets.DatasetDict:
    """Generated splits, cached under cache_dir/data/sudoku-<hash of the generator config>.

    Writes go to a temporary sibling directory renamed into place, so a reader never sees a half
    written cache and concurrent ranks generating the same data cannot corrupt it.
    """
    target = Path(cache_dir) / "data" / f"sudoku-{config.generator_hash()}"
    if not target.is_dir():
        data = datasets.DatasetDict({name: pairs_to_dataset(p) for name, p in generate_pairs(config).items()})
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            data.save_to_disk(str(tmp))
            (tmp / "generator_config.json").write_text(json.dumps(config.generator_key(), indent=1, sort_keys=True))
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its copy first: theirs is identical, use it.
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))


# --------------------------------------------------------------------------------------------------
# Local files: CSV (Puzzle,Solution) or JSONL / JSON (puzzle, solution)


def _read_file(path: Path, field: str, hf_cache: Path) -> datasets.Dataset:
    """Raw rows with 'puzzle' and 'solution' columns (CSV: Puzzle,Solution in any case; JSON / JSONL).

    The text is checked line by line first (tasks/base.py): a broken line or an empty file is named.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        ds = read_json_rows(path, field)
    elif suffix == ".csv":
        header = check_csv(path, field)
        columns = [name for name in header if name.strip().lower() in ("puzzle", "solution")]
        if sorted(name.strip().lower() for name in columns) != ["puzzle", "solution"]:
            raise DataError(f"{path}: header must name one Puzzle and one Solution column, got {header}")
        # Read as strings: pandas would otherwise parse "0123..." as an int and drop the zero.
        features = datasets.Features({c: datasets.Value("string") for c in columns})
        try:
            ds = datasets.load_dataset(
                "csv",
                data_files=str(path),
                split="train",
                cache_dir=str(hf_cache),
                usecols=columns,
                features=features,
                keep_default_na=False,
            )
        except Exception as e:  # parser errors come as many types (pandas, pyarrow, datasets)
            raise DataError(f"{path}: cannot read file ({field}): {e}") from e
        ds = ds.rename_columns({c: c.strip().lower() for c in columns})
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} ({field}); use .csv (Puzzle,Solution) or .jsonl")
    missing = {"puzzle", "solution"} - set(ds.column_names)
    if missing:
        raise DataError(f"{path}: rows need 'puzzle' and 'solution' keys; missing {sorted(missing)}")
    return ds


def load_pairs_file(path: str | Path, key: str, hf_cache: str | Path) -> datasets.Dataset:
    """A validated CSV / JSONL data file as a prompt/puzzle/solution dataset (all rows, file order).

    Raises DataError naming the file and config key if it is missing, or the file and 1-based data
    row of the first malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (config key task.{key})")
    raw = _read_file(path, f"task.{key}", Path(hf_cache))
    puzzles, solutions = raw["puzzle"], raw["solution"]
    for n, (puzzle, solution) in enumerate(zip(puzzles, solutions, strict=True), start=1):
        problem = row_problem(puzzle, solution)
        if problem is not None:
            raise DataError(f"{path}: row {n}: {problem}")
    return pairs_to_dataset(list(zip(puzzles, solutions, strict=True)))


def drop_puzzles(ds: datasets.Dataset, puzzles: set[str]) -> datasets.Dataset:
    """ds without rows whose puzzle is in `puzzles` (returned unchanged when nothing matches)."""
    keep = [i for i, p in enumerate(ds["puzzle"]) if p not in puzzles]
    return ds if len(keep) == len(ds) else ds.select(keep, keep_in_memory=True)


# --------------------------------------------------------------------------------------------------
# Task


SUDOKU_SYSTEM_PROMPT = """
Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading \
left-to-right, top-to-bottom, where '0' represents empty cells.

Rules:
- Fill empty cells with digits 1-4
- Each row must contain digits 1-4 exactly once
- Each column must contain digits 1-4 exactly once
- Each 2x2 box must contain digits 1-4 exactly once

Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, representing \
your final solved grid.

Respond in this exact format:
<reasoning>
Your step-by-step solving process
</reasoning>
<answer>
[16-character solution string with no spaces or separators]
</answer>
"""
QUESTION = "Solve the following Sudoku puzzle: {puzzle}"


def worked_reasoning(puzzle: str, solution: str) -> str:
    """A row-by-row account of how the solution fills the puzzle (the reasoning of a few-shot example)."""
    lines = []
    for r in range(4):
        given = puzzle[4 * r : 4 * r + 4]
        row = solution[4 * r : 4 * r + 4]
        missing = [d for d in GRID_DIGITS if d not in given]
        shown = " ".join(ch if ch != "0" else "_" for ch in given)
        if missing:
            lines.append(
                f"Row {r + 1} is {shown}; it lacks {', '.join(missing)}, and the columns and boxes place them: {row}."
            )
        else:
            lines.append(f"Row {r + 1} is {shown}, already complete: {row}.")
    return "\n".join(lines)


def few_shot_examples(config: SudokuConfig, count: int) -> list[Pair]:
    """``count`` puzzles with 8 blanks from training grids: the worked examples of the 3-shot prompt."""
    train_grids, _ = split_grids(config.seed, config.split, config.train_grids)
    return sample_puzzles(train_grids, count, (8, 8), _rng(config.seed, "few_shot"))


def chat_prompt(puzzle: str, examples: Sequence[Pair]) -> str:
    """The chat user message: zero-shot, or the rules, the worked examples, then the question."""
    if not examples:
        return SUDOKU_SYSTEM_PROMPT + "\n\n" + QUESTION.format(puzzle=puzzle) + "\n"
    shots = [
        f"Question: {QUESTION.format(puzzle=p)}\nAnswer:\n<reasoning>\n{worked_reasoning(p, s)}\n</reasoning>\n"
        f"<answer>\n{s}\n</answer>"
        for p, s in examples
    ]
    question = f"Question: {QUESTION.format(puzzle=puzzle)}\nAnswer:\n"
    return SUDOKU_SYSTEM_PROMPT + "\n\n" + "\n\n".join([*shots, question])


@register_task("sudoku", config=SudokuTaskCfg)
class SudokuTask(Task):
    """4x4 Sudoku: compact (16-char puzzle in, 16 digits out) or chat (rules prompt, <answer> tags)."""

    alphabet = "01234"
    primary_metric = "cell_acc"

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path) -> None:
        super().__init__(cfg, cache_dir)
        self.config = SudokuConfig.from_cfg(self.cfg)
        # Fail at construction, not hours later, when a configured file is missing.
        for key in ("train_file", "validation_file", "test_file"):
            path = getattr(self.config, key)
            if path is not None and not Path(path).is_file():
                raise DataError(f"{path}: file not found (config key task.{key})")
        self.examples = few_shot_examples(self.config, self.config.few_shot) if self.chat else []
        self._splits: dict[str, datasets.Dataset] | None = None

    def dataset(self, split: str) -> datasets.Dataset:
        check_split(split)
        if self._splits is None:
            self._splits = self._build_splits()
        return self._splits[split]

    def _build_splits(self) -> dict[str, datasets.Dataset]:
        """Files where configured, generated data otherwise; train never holds an evaluation puzzle,
        and no split holds a few-shot example."""
        config = self.config
        hf_cache = self.cache_dir / "hf_datasets"
        files = {s: getattr(config, f"{s}_file") for s in SPLITS}
        splits = {s: load_pairs_file(p, f"{s}_file", hf_cache) for s, p in files.items() if p is not None}
        if "train" in splits and "validation" not in splits:
            # Held-out training rows (d1 convention), never test rows.
            splits["train"], splits["validation"] = carve_validation(
                splits["train"], config.validation_size, config.seed
            )
        if any(s not in splits for s in SPLITS):
            generated = load_or_generate(config, self.cache_dir)
            splits = {s: splits.get(s, generated[s]) for s in SPLITS}
        eval_puzzles = set(splits["validation"]["puzzle"]) | set(splits["test"]["puzzle"])
        splits["train"] = drop_puzzles(splits["train"], eval_puzzles)
        if self.chat:
            shots = {p for p, _ in self.examples}
            splits = {s: self._chat_split(drop_puzzles(ds, shots)) for s, ds in splits.items()}
        return splits

    def _chat_split(self, ds: datasets.Dataset) -> datasets.Dataset:
        prompts = [chat_prompt(p, self.examples) for p in ds["puzzle"]]
        return (
            ds.remove_columns(["prompt", "eval_prompt"])
            .add_column("prompt", prompts)
            .add_column("eval_prompt", prompts)
            .select_columns(list(_COLUMNS))
        )

    def default_rewards(self) -> list[tuple[str, RewardFn]]:
        fn = sudoku_cells if self.config.credit_alternative_solutions else sudoku_cells_reference
        return [("correct_cells", functools.partial(fn, answer_tags=self.chat))]

    def target(self, example: Mapping[str, Any]) -> str:
        if self.chat:
            puzzle, solution = str(example["puzzle"]), str(example["solution"])
            return f"<reasoning>\n{worked_reasoning(puzzle, solution)}\n</reasoning>\n<answer>\n{solution}\n</answer>"
        return str(example["solution"])

    def reward_blind_positions(self, example: Mapping[str, Any], completion_length: int) -> list[bool] | None:
        """Compact style: the positions where the completion copies a given (non-blank) cell of the puzzle.

        The cell reward counts correct blanks only; a given cell matters to it solely through the
        alternative-solution credit (a valid grid agreeing with the givens earns 1.0, so a copied given
        can decide it when the blanks hold another solution), and sudoku_cells_reference never reads
        one. Cells are located in the warm-start target text (its k-th digit is cell k), one character
        per token as in the compact style's character-level tokenizer. None for the chat style (the
        answer's place in a reasoning text is not fixed), for other reward functions, or for a target
        that does not hold 16 digits.
        """
        names = [str(spec) for spec in (self.cfg.get("rewards") or [])]
        if self.chat or any(n not in ("sudoku_cells", "sudoku_cells_reference") for n in names):
            return None
        digits = [i for i, ch in enumerate(self.target(example)) if ch in _ASCII_DIGITS]
        if len(digits) != GRID_CELLS:
            return None
        puzzle = str(example["puzzle"])
        blind = [False] * completion_length
        for cell, position in enumerate(digits):
            if position < completion_length and puzzle[cell] != "0":
                blind[position] = True
        return blind

    def metrics(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        # The papers' metric scores against the stored solution only, without alternative credit.
        puzzles, solutions = [ex["puzzle"] for ex in examples], [ex["solution"] for ex in examples]
        return sudoku_metrics(completions, puzzles, solutions, chat=self.chat)
