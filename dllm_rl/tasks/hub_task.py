"""Shared parts of the data-backed chat tasks (GSM8K, MATH500): data resolution, prompts, text helpers.

Data (docs/tasks.md, "Data splits"). Per split, a local file wins: ``task.train_file`` /
``task.test_file`` (JSONL, JSON, parquet, arrow, CSV, a directory of them or a ``save_to_disk``
folder, read by ``read_local``);
otherwise ``task.<split>_hub_id`` / ``_hub_config`` / ``_hub_split`` through ``load_hub`` (HF's own cache
serves it offline once fetched). When neither gives data, the DataError names the field to set and the
columns the rows need. The validation split is ``task.validation_file`` or the held-out tail of the
training rows (``carve_validation``), never test rows. Every row is checked (``check_rows``): a
malformed one is reported with its file or hub id and its 1-based row number. The splits are built on
the first ``dataset(split)`` call that needs them and kept.

Text helpers. Model output is untrusted: every helper here works on ``clip_text`` output, scans
linearly and never evaluates anything.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from dllm_rl.lazy import lazy_import
from dllm_rl.schema import SCHEMAS, option
from dllm_rl.tasks.base import (
    DataError,
    Task,
    TaskCfg,
    carve_validation,
    check_rows,
    check_split,
    check_values,
    load_hub,
    read_local,
)
from dllm_rl.tasks.rewards import braced

datasets = lazy_import("datasets")  # loads on first use (dllm_rl/lazy.py)

REWARD_MODES: tuple[str, ...] = ("fixed", "reference")


@dataclasses.dataclass
class HubTaskCfg(TaskCfg):
    """A task whose data comes from the hub or from local files (GSM8K, MATH500)."""

    prompt_styles: ClassVar[tuple[str, ...]] = ("chat",)

    # L: tokens per rollout completion
    completion_length: int = 256
    # B: tokens per decoding block
    block_length: int = 32
    # T: denoising steps per completion
    diffusion_steps: int = 128
    # user messages for the tokenizer's chat template (the only style GSM8K has)
    prompt_style: str = "chat"
    # fixed: corrected format, int and correctness parts; reference: d1's, bug for bug (comparable reward curves)
    reward_mode: str = "fixed"
    train_hub_id: str | None = None
    # its configuration
    train_hub_config: str | None = None
    # its split
    train_hub_split: str = "train"
    test_hub_id: str | None = None
    # its configuration
    test_hub_config: str | None = None
    # its split
    test_hub_split: str = "test"
    # local training rows with question and answer (JSONL, JSON, parquet, arrow, CSV or a save_to_disk folder)
    train_file: str | None = None
    # local validation rows (default: carved from the training rows)
    validation_file: str | None = None
    # local test rows with question and answer
    test_file: str | None = None

    @classmethod
    def check(cls, t: Any, need: Callable[[bool, str], None]) -> None:
        super().check(t, need)
        mode = t.get("reward_mode", cls.reward_mode)
        need(mode in REWARD_MODES, f"task.reward_mode={mode!r} must be one of: {', '.join(REWARD_MODES)}")


FILE_KEYS: tuple[str, ...] = ("train_file", "validation_file", "test_file")

# Chat special tokens such as <|eot_id|>, which the papers' evaluation decodes keep. Bounded and
# without nested quantifiers, so linear on any input.
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]{1,40}\|>")


# ------------------------------------------------------------------------------------------ text helpers


def strip_special_tokens(text: str) -> str:
    """text without ``<|…|>`` chat special tokens."""
    return _SPECIAL_TOKEN.sub("", text)


def xml_answer(text: str) -> str:
    """d1's extracted answer: after the last ``<answer>`` (or from the start), before the next ``</answer>``, stripped.

    With no tags at all it is the whole text.
    """
    start = text.rfind("<answer>")
    start = 0 if start < 0 else start + len("<answer>")
    end = text.find("</answer>", start)
    return (text[start:] if end < 0 else text[start:end]).strip()


def first_answer_region(text: str) -> str | None:
    """Text after the first ``<answer>`` up to the next ``</answer>`` (or the end); None without ``<answer>``.

    The region d1's MATH format reward and GDSD's ``math_xml`` correctness search.
    """
    start = text.find("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    return text[start:] if end < 0 else text[start:end]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed`` of text, or None (no box, or the last one is unterminated).

    ``\\boxed{x}`` (spaces allowed before the brace) gives the brace-matched x; the ``\\boxed x`` form (a
    space, then no brace) gives the text up to the next ``$`` or line end, stripped. Only the last
    ``\\boxed`` counts, as in the Hendrycks extraction d1 uses: an unterminated final box is not replaced
    by an earlier complete one. Linear time, no recursion.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    j = start + len("\\boxed")
    k = j
    while k < len(text) and text[k] == " ":
        k += 1
    if k < len(text) and text[k] == "{":
        found = braced(text, k)
        return None if found is None else found[0]
    if k == j:  # "\boxedx": not a box
        return None
    end = len(text)
    for stop in ("$", "\n"):
        at = text.find(stop, k)
        if 0 <= at < end:
            end = at
    return text[k:end].strip()


def preview(value: Any, limit: int = 60) -> str:
    """A short repr for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def string_field(row: Mapping[str, Any], key: str, allow_empty: bool = False) -> str | None:
    """What is wrong with row[key] as a text field (None if it is a string, non-blank unless allowed)."""
    value = row.get(key)
    if not isinstance(value, str):
        return f"{key} must be a string, got {type(value).__name__} {preview(value)}"
    if not allow_empty and not value.strip():
        return f"{key} is empty"
    return None


# ------------------------------------------------------------------------------------------ the task base


class HubTask(Task):
    """A chat task whose rows come from local files or the hub; subclasses turn raw rows into columns.

    Subclasses set ``fields`` (raw fields per kind of split, "train" or "test"; validation rows follow
    the train rules), and implement ``row_problem`` and ``make_columns``.
    """

    primary_metric = "acc"
    fields: Mapping[str, tuple[str, ...]] = {}

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path) -> None:
        super().__init__(cfg, cache_dir)
        # The defaults and rules of the task's schema (registered with it): a task built without a validated
        # config gets the same errors as a run.
        schema = SCHEMAS["task"][self.name]
        self.options = {**dataclasses.asdict(schema()), **{k: option(self.cfg, k) for k in self.cfg}}
        check_values(schema, self.options)
        self.reward_mode = str(self.options["reward_mode"])
        self.seed = int(self.options["seed"])
        self.validation_size = int(self.options["validation_size"])
        self.files: dict[str, Path | None] = {}
        # Fail at construction, not when the data is first needed, when a configured file is missing.
        for key in FILE_KEYS:
            value = self.cfg.get(key)
            path = None if value in (None, "") else Path(str(value)).expanduser()
            if path is not None and not path.exists():
                raise DataError(f"{path}: file not found (config key task.{key})")
            self.files[key] = path
        self._splits: dict[str, datasets.Dataset] = {}

    # -- options

    # -- subclass hooks

    def row_problem(self, row: Mapping[str, Any], kind: str) -> str | None:
        """What is wrong with a raw row of a ``kind`` ("train" or "test") split, or None."""
        raise NotImplementedError

    def make_columns(self, rows: datasets.Dataset, kind: str) -> dict[str, list[Any]]:
        """Output columns (prompt, eval_prompt, ground truth, ...) of checked raw rows."""
        raise NotImplementedError

    # -- splits

    def dataset(self, split: str) -> datasets.Dataset:
        check_split(split)
        if split not in self._splits:
            if split == "test":
                self._splits["test"] = self._load("test", "test")
            else:
                self._splits.update(self._train_and_validation())
        return self._splits[split]

    def _train_and_validation(self) -> dict[str, datasets.Dataset]:
        train = self._load("train", "train")
        if self.files["validation_file"] is not None:
            return {"train": train, "validation": self._load("validation", "train")}
        # Held-out training rows (d1 convention): checkpoint selection never looks at the test split.
        train, validation = carve_validation(train, self.validation_size, self.seed)
        return {"train": train, "validation": validation}

    def _load(self, split: str, kind: str) -> datasets.Dataset:
        raw, where = self._raw(split, kind)
        check_rows(raw, where, lambda row: self.row_problem(row, kind), self.fields[kind])
        columns = self.make_columns(raw, kind)
        features = datasets.Features({name: datasets.Value("string") for name in columns})
        return datasets.Dataset.from_dict(columns, features=features)

    def _raw(self, split: str, kind: str) -> tuple[datasets.Dataset, str]:
        """(raw rows, where they came from) of a split: its local file, else its hub data set."""
        key = f"{split}_file"
        expected = f"rows with the fields {list(self.fields[kind])}"
        path = self.files[key]
        if path is not None:
            return read_local(path, f"task.{key}", self.cache_dir / "hf_datasets"), str(path)
        hub_id = self.cfg.get(f"{split}_hub_id")
        if split == "validation" or not hub_id:
            raise DataError(
                f"task {self.name}: no {split} data; set task.{key}=<path> (a local JSONL, JSON, parquet, arrow "
                f"or CSV file, or a save_to_disk folder) with {expected}"
                + ("" if split == "validation" else f", or task.{split}_hub_id")
            )
        hub_split = str(self.cfg.get(f"{split}_hub_split") or split)
        try:
            rows = load_hub(str(hub_id), self.cfg.get(f"{split}_hub_config"), hub_split, f"task.{key}")
        except DataError as exc:
            raise DataError(f"{exc}, with {expected}") from None
        return rows, f"hub data set {hub_id!r} split {hub_split!r}"
