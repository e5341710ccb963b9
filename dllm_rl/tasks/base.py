"""Task interface, the base of every task's schema (TaskCfg), the registry and the data-loading helpers every
task shares.

A task owns its data (train / validation / test splits as HF datasets), its training reward and its
evaluation metrics. Every split has two prompt columns, because the papers train and evaluate with
different prompts (docs/tasks.md, "Common rules"): ``prompt`` (the training family, used for rollouts) and
``eval_prompt`` (the evaluation family). In the ``compact`` style (character-level models) a prompt
is the literal model input; in the ``chat`` style it is the user message, which the policy wraps in
its tokenizer's chat template (and, at evaluation, follows with ``eval_prefill``).

The training reward is a list of reward functions (dllm_rl/tasks/rewards.py): the task's own by
default, or ``task.rewards`` (registered names or ``module:function`` paths). Each returns a float
or named parts; the task reward is the unweighted sum of all parts, each part logged.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import functools
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING

from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.lazy import lazy_import
from dllm_rl.schema import plain, register_schema
from dllm_rl.tasks.rewards import RewardFn, as_reward, describe, resolve_reward, reward_parts

# Loaded on first use (dllm_rl/lazy.py): composing a config imports every task for its schema.
datasets = lazy_import("datasets")
np = lazy_import("numpy")

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Appended after the chat template's generation prompt at evaluation (the papers' evaluation prefill).
EVAL_PREFILL = "<reasoning>"
# The training family's format block shared by GSM8K, MATH500 and Countdown (docs/tasks.md, "Common
# rules"): a newline, the format instructions, a trailing newline.
SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
# Characters of chat-style prompts a character-level tokenizer must know: printable ASCII and newline.
CHAT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"


PROMPT_OVERFLOW = ("drop", "error", "left_truncate")
ON_BAD_REWARD = ("error", "zero")


@dataclass
class TaskCfg:
    """What every task takes (the ``task`` section); each task declares its own schema, a subclass of this
    one, beside its code and registers it with ``@register_task(name, config=...)`` (dllm_rl/tasks/base.py)."""

    # the prompt styles the task can write (compact: literal model input; chat: a user message)
    prompt_styles: ClassVar[tuple[str, ...]] = ("compact", "chat")

    name: str = MISSING
    # rollout decoding: L tokens, B per block, T denoising steps (the sampler group reads these)
    completion_length: int = MISSING
    block_length: int = MISSING
    diffusion_steps: int = MISSING
    # seed of the task's data: the generator's splits, or the held-out validation rows of a file or hub set
    seed: int = 42
    # compact: the prompt is the literal model input (character-level models); chat: a user message for the tokenizer's
    # chat template, the answer read from <answer> tags (docs/tasks.md, "Common rules")
    prompt_style: str = "compact"
    # reward functions (registered names or module:function); null = the task's own
    rewards: list[str] | None = None
    # a reward value that is not a finite number: error (stop, naming function and sample) | zero
    on_bad_reward: str = "error"
    # held-out training-side rows for checkpoint selection (never the test split)
    validation_size: int = 256
    # evaluation protocol (python -m dllm_rl.evaluate): lengths, subset of the test split
    eval_gen_lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    # test examples python -m dllm_rl.evaluate scores (null = all; d1 evaluates 256 of its 500 Sudoku puzzles)
    eval_subset_size: int | None = None
    # seed of that subset (d1: np.random.seed(42), then choice)
    eval_subset_seed: int = 42
    # prompts longer than this many tokens: drop (count them) | error | left_truncate; null = no cap
    max_prompt_tokens: int | None = None
    # what happens to them: drop (and count), error, or left_truncate (the reference's behaviour)
    on_prompt_overflow: str = "drop"
    # supervised steps the embedded tiny model gets on this task (warmstart.steps follows it)
    warmstart_steps: int = 100

    @classmethod
    def check(cls, t: Any, need: Callable[[bool, str], None]) -> None:
        """The section's rules: ``need(ok, message)`` for each; ``t`` is the ``task`` node (a DictConfig or a
        plain dict, keys absent from it taking the schema's defaults). A schema that adds rules also calls
        ``super().check``."""
        need(
            t.get("on_prompt_overflow", "drop") in PROMPT_OVERFLOW,
            f"task.on_prompt_overflow={t.get('on_prompt_overflow')!r} must be drop, error or left_truncate",
        )
        need(
            t.get("on_bad_reward", "error") in ON_BAD_REWARD,
            f"task.on_bad_reward={t.get('on_bad_reward')!r} must be error or zero",
        )
        cap = t.get("max_prompt_tokens")
        need(cap is None or cap >= 1, f"task.max_prompt_tokens={cap} must be >= 1 (or null: no cap)")
        style = t.get("prompt_style", cls.prompt_style)
        need(
            style in cls.prompt_styles,
            f"task.prompt_style={style!r}: task {t.get('name', cls.name)} has {', '.join(cls.prompt_styles)}",
        )
        subset = t.get("eval_subset_size")
        need(subset is None or subset >= 1, f"task.eval_subset_size={subset} must be >= 1 (or null: all)")
        for split in ("train", "validation", "test"):
            size = t.get(f"{split}_size")
            if size is not None and t.get(f"{split}_file") is None:
                need(size >= 1, f"task.{split}_size={size} must be >= 1 (the {split} split would be empty)")
        sizes = [t.get(f"{split}_size") for split in ("train", "validation", "test")]
        need(
            t.get("seed", cls.seed) >= 0 and all(size >= 0 for size in sizes if size is not None),
            "task.seed and task.*_size must be non-negative",
        )


class DataError(DllmRlError, ValueError):
    """A data file or row is malformed; message names the file and the 1-based row."""


class Task(abc.ABC):
    """One RL task: data splits, a reward made of named parts, and evaluation metrics."""

    name: str = ""
    alphabet: str = ""  # every character a prompt or completion can contain (for char-level tokenizers)
    primary_metric: str = ""  # key of metrics() used as "the" metric
    prompt_styles: tuple[str, ...] = TaskCfg.prompt_styles  # the styles it can write: its schema's (register_task)

    def __init__(self, cfg: Mapping[str, Any] | TaskCfg, cache_dir: str | Path) -> None:
        # The task section as plain values (from its schema's dataclass, as a run passes it, or a mapping),
        # copied so that later mutation of the caller's config cannot change this task's behaviour.
        self.cfg: dict[str, Any] = plain(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
        self.cache_dir = Path(cache_dir)
        self.prompt_style = str(self.cfg.get("prompt_style", self.prompt_styles[0]))
        if self.prompt_style not in self.prompt_styles:
            raise ConfigError(
                f"task.prompt_style={self.prompt_style!r}: task {self.name} has {', '.join(self.prompt_styles)}"
            )
        if self.chat:
            self.alphabet = CHAT_ALPHABET
        self.on_bad_reward = str(self.cfg.get("on_bad_reward", "error"))
        if self.on_bad_reward not in ON_BAD_REWARD:
            raise ConfigError(f"task.on_bad_reward={self.on_bad_reward!r} must be one of {', '.join(ON_BAD_REWARD)}")

    @functools.cached_property
    def reward_fns(self) -> list[tuple[str, RewardFn]]:
        """task.rewards resolved, or the task's own functions (get_task resolves it on construction)."""
        specs = self.cfg.get("rewards")
        if specs:
            return [resolve_reward(spec, f"task.rewards[{i}]") for i, spec in enumerate(specs)]
        return self.default_rewards()

    @property
    def chat(self) -> bool:
        """Prompts are user messages for the tokenizer's chat template (not literal model inputs)."""
        return self.prompt_style == "chat"

    @property
    def eval_prefill(self) -> str:
        """Text that follows the generation prompt at evaluation: "<reasoning>" in the chat style."""
        return EVAL_PREFILL if self.chat else ""

    @abc.abstractmethod
    def dataset(self, split: str) -> datasets.Dataset:
        """The split ("train", "validation" or "test"): "prompt" and "eval_prompt" columns plus metadata."""

    @abc.abstractmethod
    def default_rewards(self) -> list[tuple[str, RewardFn]]:
        """(part name, function) pairs of the task's own reward, options of task.* already bound."""

    def reward(self, completion: str, example: Mapping[str, Any]) -> dict[str, float]:
        """Named reward parts for one completion; the task reward is their sum (see total_reward)."""
        return self.score([completion], [example], "completion")[0]

    def score(
        self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]], what: str, first_index: int = 0
    ) -> list[dict[str, float]]:
        """Named reward parts per completion, every value checked.

        A value that is not a finite number stops with a DllmRlError naming the function, the sample
        (``what`` and its index, from ``first_index``), a preview of the completion and the value; with
        task.on_bad_reward=zero it counts as 0 and one warning per call says how many there were.
        A function that raises stops with a DllmRlError naming it (the traceback stays on the chain).
        """
        bad: dict[str, list[str]] = {}
        out: list[dict[str, float]] = []
        for i, (completion, example) in enumerate(zip(completions, examples, strict=True)):
            fields = {k: v for k, v in example.items() if k not in ("prompt", "eval_prompt")}
            parts: dict[str, float] = {}
            for name, fn in self.reward_fns:
                try:
                    value = fn(completion, **fields)
                except Exception as exc:  # a plug-in's bug: name it instead of a bare traceback mid-run
                    where = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', name)}"
                    raise DllmRlError(
                        f"reward {name!r} failed on {what} {first_index + i} ({_preview(completion)}): "
                        f"{type(exc).__name__}: {exc} ({where}; traceback in the run's log files)"
                    ) from exc
                for part, raw in reward_parts(name, value).items():
                    number = as_reward(raw)
                    if number is None:
                        label = describe(name, fn) + ("" if part == name else f" part {part!r}")
                        case = f"{raw!r} for {what} {first_index + i} ({_preview(completion)})"
                        if self.on_bad_reward == "error":
                            raise DllmRlError(
                                f"reward {label} returned {case}: not a finite number "
                                "(task.on_bad_reward=zero counts such values as 0)"
                            )
                        bad.setdefault(label, []).append(case)
                        number = 0.0
                    parts[part] = number
            out.append(parts)
        for label, cases in bad.items():
            log.warning(
                "reward %s returned no finite number for %d of %d %ss, counted as 0 (task.on_bad_reward=zero); "
                "first: %s",
                label,
                len(cases),
                len(out),
                what.split()[-1],
                cases[0],
            )
        return out

    def reward_blind_positions(self, example: Mapping[str, Any], completion_length: int) -> list[bool] | None:
        """Completion positions whose tokens the training reward never reads for this example, as a
        mask of ``completion_length`` booleans, or None when the task cannot say (the default).

        Only the gradient-noise instrument asks (dllm_rl/variance.py): the part of a policy gradient
        that comes from such positions moves log-probs the reward gives no information about.
        """
        return None

    @abc.abstractmethod
    def target(self, example: Mapping[str, Any]) -> str:
        """The reference completion text of a training example (what the warm-start learns)."""

    @abc.abstractmethod
    def metrics(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Aggregate evaluation metrics over aligned completions and examples."""


def _preview(completion: str, chars: int = 60) -> str:
    """The completion's first characters, quoted, for a message."""
    text = completion if len(completion) <= chars else completion[:chars] + "..."
    return repr(text)


def check_split(split: str) -> None:
    """Raise ValueError for a split name outside SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")


def total_reward(parts: Mapping[str, float]) -> float:
    """The task reward: unweighted sum of the named parts."""
    return float(sum(parts.values()))


TASKS: dict[str, type[Task]] = {}


def register_task(name: str, config: type[TaskCfg] | None = None) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a Task subclass to TASKS under `name` (and setting its `name`).

    ``config`` is the task's schema, a subclass of TaskCfg declared beside it: it is stored for Hydra as
    ``base_<name>`` (the task's YAML names it first in its defaults list) and its ``check`` runs in
    config validation, before any process or model exists.
    """

    def decorator(cls: type[Task]) -> type[Task]:
        existing = TASKS.get(name)
        # Re-registering the same class (e.g. a module reload) is harmless; two classes under one
        # name would make get_task ambiguous.
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"task {name!r} already registered by {existing.__qualname__}")
        cls.name = name
        TASKS[name] = cls
        if config is not None:
            cls.prompt_styles = config.prompt_styles
            register_schema("task", name, config)
        return cls

    return decorator


def check_values(schema: type[TaskCfg], values: Mapping[str, Any]) -> None:
    """Run a task schema's rules on ``values`` (a task's typed options; absent keys take the defaults) and
    raise one ConfigError with every message, for a task built without a validated config."""
    errors: list[str] = []
    schema.check(values, lambda ok, message: ok or errors.append(message))
    if errors:
        raise ConfigError("; ".join(errors))


def get_task(name: str, cfg: Mapping[str, Any] | TaskCfg, cache_dir: str | Path) -> Task:
    """Instantiate the registered task `name`; ConfigError listing the available names if unknown."""
    cls = TASKS.get(name)
    if cls is None:
        available = ", ".join(sorted(TASKS)) or "(none)"
        raise ConfigError(f"unknown task {name!r}; available: {available}")
    task = cls(cfg, cache_dir)
    task.reward_fns  # noqa: B018  (resolve task.rewards now: a bad entry fails before any model is built)
    return task


# ------------------------------------------------------------------------------------------ data files


def carve_validation(train: datasets.Dataset, size: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train without held-out rows, held-out rows): the last ``size`` rows of a seeded shuffle.

    The d1 convention (shuffle, hold out the tail) for a validation split made of training rows, so
    that checkpoint selection never looks at the test split.
    """
    if size >= len(train):
        raise DataError(f"validation_size {size} leaves no training rows (the training data has {len(train)})")
    order = np.random.default_rng([seed, 4]).permutation(len(train))
    cut = len(train) - size
    kept = np.sort(order[:cut])
    return train.select(kept, keep_in_memory=True), train.select(order[cut:], keep_in_memory=True)


_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")


def read_local(path: str | Path, field: str, hf_cache: str | Path) -> datasets.Dataset:
    """Rows of a local data file or directory: JSONL, JSON, parquet, arrow, CSV, or a save_to_disk folder.

    JSON, JSONL and CSV text is checked here line by line first, so that a malformed line is reported
    by its number (1-based: the line of a JSON file, the row and line of a CSV file) and an empty
    file as empty. Raises DataError naming the file (and the config field it came from).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as exc:
                raise DataError(f"{path}: cannot read the saved data set ({field}): {exc}") from exc
            if isinstance(loaded, datasets.DatasetDict):
                raise DataError(f"{path}: holds several splits {list(loaded)}; point {field} at one of them")
            return loaded
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no data files ({', '.join(_LOCAL_SUFFIXES)}) in this directory ({field})")
        parts = [read_local(p, field, hf_cache) for p in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if not path.is_file():
        raise DataError(f"{path}: file not found (config key {field})")
    suffix = path.suffix.lower()
    if suffix not in _LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r} ({field}); use {', '.join(_LOCAL_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty ({field})")
    if suffix in (".jsonl", ".json"):
        return read_json_rows(path, field)
    if suffix == ".csv":
        check_csv(path, field)
    try:
        if suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        builder = {".parquet": "parquet", ".csv": "csv"}[suffix]
        kwargs: dict[str, Any] = {"keep_default_na": False} if suffix == ".csv" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(hf_cache), **kwargs)
    except Exception as exc:  # parser errors come as many types (pandas, pyarrow, datasets)
        raise DataError(f"{path}: cannot read file ({field}): {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message: datasets wraps parser errors in "An error occurred while generating"."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {exc}"


def _text(path: Path, field: str) -> str:
    """A data file's text; DataError naming the line of a byte that is not UTF-8, or the file if it is empty."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path} is empty ({field})")
    return text.removeprefix("\ufeff")


def read_json_rows(path: Path, field: str) -> datasets.Dataset:
    """Rows of a JSON Lines file (one object per line), or of a JSON file holding an array of objects.

    Parsed here, line by line, so that a malformed line is named by its 1-based number.
    """
    text = _text(path, field)
    rows: list[Any]
    if text.lstrip().startswith("["):  # one JSON array
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        for n, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: element {n} of the array: expected a JSON object, got {type(row).__name__}")
    else:  # JSON Lines
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = " (a JSON file holds one object per line, or one array of objects)" if n == 1 else ""
                raise DataError(f"{path}: line {n}: not valid JSON ({exc.msg} at column {exc.colno}){hint}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows ({field})")
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as exc:  # arrow cannot unify the rows' types
        raise DataError(f"{path}: rows do not share one schema: {exc}") from exc


def check_csv(path: Path, field: str) -> list[str]:
    """The header of a CSV file whose every row has the header's number of fields.

    Raises DataError naming the 1-based data row (and its line) of the first row that does not parse
    or has another number of fields; blank lines are skipped, as the CSV reader skips them.
    """
    text = _text(path, field)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    n = 0
    try:
        for fields in reader:
            if not fields:
                continue
            if header is None:
                header = fields
                continue
            n += 1
            if len(fields) != len(header):
                raise DataError(
                    f"{path}: row {n} (line {reader.line_num}): {len(fields)} fields, the header has "
                    f"{len(header)} ({', '.join(header)})"
                )
    except csv.Error as exc:
        raise DataError(f"{path}: row {n + 1} (line {reader.line_num}): not valid CSV ({exc})") from None
    if header is None or n == 0:
        raise DataError(f"{path}: no rows after the header ({field})")
    return header


def check_rows(
    ds: datasets.Dataset, where: str, problem: Callable[[Mapping[str, Any]], str | None], required: Sequence[str]
) -> None:
    """Raise DataError naming ``where`` and the 1-based row of the first row ``problem`` objects to."""
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: rows need the fields {list(required)}; missing {missing} (has {ds.column_names})")
    for n, row in enumerate(ds, start=1):
        message = problem(row)
        if message is not None:
            raise DataError(f"{where}: row {n}: {message}")


def load_hub(hub_id: str, config: str | None, split: str, field: str) -> datasets.Dataset:
    """One split of a hub data set through ``datasets`` (HF's own cache serves it offline once fetched).

    Raises DataError saying what to provide instead (``field``: a local file or directory) when the
    hub cannot be reached and the data set is not cached.
    """
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # offline, unknown id, missing split: all end in the same advice
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DataError(
            f"cannot load the hub data set {hub_id!r}"
            + (f" (config {config!r})" if config else "")
            + f", split {split!r}: {first}. Download it where the hub is reachable and set {field}=<path> "
            "to a local JSONL, JSON, parquet, arrow or CSV file, or a directory of them (or a save_to_disk folder)"
        ) from None
    if isinstance(ds, datasets.DatasetDict):  # defensive: split= always gives a Dataset
        ds = ds[split]
    return ds
