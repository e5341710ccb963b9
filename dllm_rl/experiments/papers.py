"""papers.yaml read into typed records: the reproduction's objectives and the papers' numbers.

The file is checked as it is read: every key present, no key unknown, every value of its type, and
the names it uses consistent (rows that exist, claims between rows). A fault raises one DllmRlError
that names the file and the key, e.g. ``papers.yaml: main.sudoku.wd1[0].score: expected a number``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import yaml

from dllm_rl.errors import DllmRlError

PAPERS_FILE = Path(__file__).with_name("papers.yaml")
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class PaperScore:
    """One row's score in one paper's table."""

    paper: str  # whose table: differences are taken between two scores of the same paper only
    score: float  # percent
    base: float | None  # the base model's score in the same table (None: the table has no base row)
    cite: str  # how our tables name it
    source: str  # the table, task and setting it was read from


@dataclass(frozen=True)
class Claim:
    """A paper's claim that row ``a`` scores above (or below) row ``b``."""

    a: str
    b: str
    cite: str


@dataclass(frozen=True)
class Ablation(Generic[K, V]):
    """One ablation's numbers: the task they were measured on, where they come from, a score per setting."""

    task: str
    source: str
    scores: dict[K, V]


@dataclass(frozen=True)
class Papers:
    objectives: dict[str, float]  # main comparison: objective -> relative cost of a rollout round, in run order
    main_rows: tuple[str, ...]  # the main table's rows, in order
    main: dict[tuple[str, str], tuple[PaperScore, ...]]  # (task, row) -> its scores, the one shown first
    main_claims: tuple[Claim, ...]
    negative: Ablation[str, float]  # negative-sample surrogate -> score
    masking: Ablation[str, dict[str, float]]  # surrogate -> {"random": score, "blockwise": score}
    omega: Ablation[float, float]  # ω -> score
    beta: Ablation[str, dict[float, float]]  # surrogate -> β -> score


class _Reader:
    """Typed access to the parsed file; every failure names the file and the dotted key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str) -> NoReturn:
        raise DllmRlError(f"{self.path}: {where or 'top level'}: {problem}")

    def mapping(self, value: Any, where: str, keys: tuple[str, ...] | None = None) -> dict[Any, Any]:
        """A non-empty mapping; with ``keys``, exactly those keys."""
        if not isinstance(value, dict) or not value:
            self.fail(where, f"expected a non-empty mapping, got {value!r}")
        if keys is not None:
            missing = [k for k in keys if k not in value]
            unknown = [str(k) for k in value if k not in keys]
            if missing:
                self.fail(_join(where, missing[0]), "missing")
            if unknown:
                self.fail(where, f"unknown key(s) {', '.join(unknown)} (expected {', '.join(keys)})")
        return value

    def number(self, value: Any, where: str, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(where, f"expected a number{' or null' if optional else ''}, got {value!r}")
        return float(value)

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def sequence(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            self.fail(where, f"expected a non-empty list, got {value!r}")
        return value

    def scores(self, value: Any, where: str, numeric_keys: bool = False) -> dict[Any, float]:
        """setting -> score; with ``numeric_keys`` the settings are numbers (ω, β) read as floats."""
        out: dict[Any, float] = {}
        for key, score in self.mapping(value, where).items():
            at = _join(where, key)
            out[self.number(key, at) if numeric_keys else self.text(key, at)] = self.number(score, at)
        return out

    def per_surrogate(self, value: Any, where: str, read: Callable[[Any, str], Any]) -> dict[str, Any]:
        """surrogate -> read(its value, its key)."""
        return {self.text(s, where): read(inner, _join(where, s)) for s, inner in self.mapping(value, where).items()}

    def ablation(self, tree: dict[str, Any], name: str, read: Callable[[Any, str], Any]) -> Ablation:
        node = self.mapping(tree[name], name, ("task", "source", "scores"))
        task, source = self.text(node["task"], f"{name}.task"), self.text(node["source"], f"{name}.source")
        return Ablation(task, source, read(node["scores"], f"{name}.scores"))


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def load_papers(path: Path = PAPERS_FILE) -> Papers:
    """The file at ``path``, checked (see the module docstring)."""
    r = _Reader(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DllmRlError(f"{path}: cannot read the reproduction's data file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise DllmRlError(f"{path}: not valid YAML{where}: {problem}") from exc
    top = ("objectives", "main_rows", "main", "main_claims", "negative", "masking", "omega", "beta")
    tree = r.mapping(tree, "", top)

    objectives = {}
    for name, node in r.mapping(tree["objectives"], "objectives").items():
        at = f"objectives.{name}"
        objectives[r.text(name, "objectives")] = r.number(
            r.mapping(node, at, ("round_cost",))["round_cost"], f"{at}.round_cost"
        )
    rows = tuple(r.text(row, f"main_rows[{i}]") for i, row in enumerate(r.sequence(tree["main_rows"], "main_rows")))
    for i, row in enumerate(rows):
        if row not in objectives and not (row.startswith("spg (") and row.endswith(")") and "spg" in objectives):
            r.fail(f"main_rows[{i}]", f"{row!r} is neither an objective above nor 'spg (<surrogate>)'")
    for name in objectives:
        if name != "spg" and name not in rows:
            r.fail("main_rows", f"objective {name!r} has no row (its runs would be left out of the main table)")

    main: dict[tuple[str, str], tuple[PaperScore, ...]] = {}
    keys = ("paper", "score", "base", "cite", "source")
    for task, by_row in r.mapping(tree["main"], "main").items():
        for row, entries in r.mapping(by_row, f"main.{task}").items():
            where = f"main.{task}.{row}"
            if row not in rows:
                r.fail(where, f"{row!r} is not one of main_rows")
            scores = []
            for i, entry in enumerate(r.sequence(entries, where)):
                at = f"{where}[{i}]"
                node = r.mapping(entry, at, keys)
                scores.append(
                    PaperScore(
                        paper=r.text(node["paper"], f"{at}.paper"),
                        score=r.number(node["score"], f"{at}.score"),
                        base=r.number(node["base"], f"{at}.base", optional=True),
                        cite=r.text(node["cite"], f"{at}.cite"),
                        source=r.text(node["source"], f"{at}.source"),
                    )
                )
            main[(r.text(task, "main"), row)] = tuple(scores)

    claims = []
    for i, entry in enumerate(r.sequence(tree["main_claims"], "main_claims")):
        at = f"main_claims[{i}]"
        node = r.mapping(entry, at, ("a", "b", "cite"))
        claim = Claim(r.text(node["a"], f"{at}.a"), r.text(node["b"], f"{at}.b"), r.text(node["cite"], f"{at}.cite"))
        for side in ("a", "b"):
            if getattr(claim, side) not in rows:
                r.fail(f"{at}.{side}", f"{getattr(claim, side)!r} is not one of main_rows")
        claims.append(claim)

    return Papers(
        objectives=objectives,
        main_rows=rows,
        main=main,
        main_claims=tuple(claims),
        negative=r.ablation(tree, "negative", r.scores),
        masking=r.ablation(
            tree,
            "masking",
            lambda v, at: r.per_surrogate(
                v, at, lambda arms, w: r.scores(r.mapping(arms, w, ("random", "blockwise")), w)
            ),
        ),
        omega=r.ablation(tree, "omega", lambda v, at: r.scores(v, at, numeric_keys=True)),
        beta=r.ablation(
            tree, "beta", lambda v, at: r.per_surrogate(v, at, lambda betas, w: r.scores(betas, w, numeric_keys=True))
        ),
    )
