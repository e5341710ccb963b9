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

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from dllm_rl.errors import ConfigError
from dllm_rl.tasks.base import (
    DataError,
    Task,
    carve_validation,
    check_rows,
    check_split,
    load_hub,
    read_local,
)
from dllm_rl.tasks.rewards import braced

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

    prompt_styles = ("chat",)
    primary_metric = "acc"
    fields: Mapping[str, tuple[str, ...]] = {}

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path) -> None:
        super().__init__(cfg, cache_dir)
        self.reward_mode = self.choice("reward_mode", ("fixed", "reference"), "fixed")
        self.seed = int(self.cfg.get("seed", 42))
        self.validation_size = int(self.cfg.get("validation_size", 256))
        if self.validation_size < 0:
            raise ConfigError(f"task.validation_size={self.validation_size} must be >= 0")
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

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        """cfg[key] as one of ``allowed``; ConfigError naming task.<key> otherwise."""
        value = self.cfg.get(key, default)
        value = getattr(value, "value", value)  # an Enum from a structured config
        if value not in allowed:
            raise ConfigError(f"task.{key}={value!r} must be one of: {', '.join(allowed)}")
        return str(value)

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
