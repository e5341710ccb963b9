"""`python -m dllm_rl.experiments.report <run or sweep dir>`: every run under the directory in one report.

Writes into the directory, and prints the markdown:
  report.md, report.csv     one row per finished run (its summary.json) with the hyper-parameters that
                            vary, then the mean ± sd over the seeds of each configuration; runs
                            without a summary.json are listed with what their status.json says
  plots/reward_<task>.png   reward_mean against step (metrics.jsonl), mean over seeds, min-max band
  plots/eval_<task>.png     the primary metric on test (eval/...) and validation (val/...) against step
  plots/heatmap_<task>.png  SPG's final metric over mask schedule × ω, mean over the runs of each cell

Hyper-parameters come from the resolved config.yaml beside summary.json and the Hydra group choices
in .hydra/hydra.yaml. A column appears when it differs between runs of the same objective and task;
a config key that differs only because a group choice differs is left to that choice's column
(objective/mask=coupled names the preset, not the five fields it sets).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# keys that say where a run happened or repeat another column
NOT_HYPERPARAMETERS = {"run_dir", "run_name", "cache_dir", "output_dir", "seed", "objective.name", "task.name"}
RESULT_COLUMNS = ("base", "final", "delta", "steps", "wall_s", "run_dir")
REWARD_KEY = "reward_mean"
EVAL_PREFIXES = {"test": "eval", "validation": "val"}  # trainer.EVAL_PREFIX, without importing torch


@dataclass
class Run:
    path: str  # the run directory relative to the report's root
    config: dict[str, Any]  # config.yaml flattened to dotted keys ({} when missing)
    choices: dict[str, str]  # Hydra group choices, hydra/* left out ({} without .hydra/hydra.yaml)
    summary: dict[str, Any] | None
    status: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records

    def get(self, key: str) -> Any:
        """A column's value: a group choice (objective/mask, model) or a config key (objective.omega)."""
        return self.choices[key] if key in self.choices else self.config.get(key)

    @property
    def objective(self) -> str:
        return self.summary["objective"] if self.summary else self.config.get("objective.name", "?")

    @property
    def task(self) -> str:
        return self.summary["task"] if self.summary else self.config.get("task.name", "?")

    @property
    def seed(self) -> Any:
        return self.summary["seed"] if self.summary else self.config.get("seed")


# ------------------------------------------------------------------------------------------ reading
def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
    return records


def _natural_key(path: Path) -> list[Any]:
    """10_... after 9_...: Hydra's job numbers in sweep sub-directory names."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def load_run(root: Path, directory: Path) -> Run:
    hydra = _read_yaml(directory / ".hydra" / "hydra.yaml").get("hydra", {})
    choices = hydra.get("runtime", {}).get("choices", {}) or {}
    return Run(
        path=str(directory.relative_to(root)),
        config=_flatten(_read_yaml(directory / "config.yaml")),
        choices={k: v for k, v in choices.items() if not k.startswith("hydra/")},
        summary=_read_json(directory / "summary.json"),
        status=_read_json(directory / "status.json"),
        metrics=_read_jsonl(directory / "metrics.jsonl"),
    )


def find_runs(root: Path) -> list[Run]:
    """Every run directory under root: it holds summary.json or status.json, or (a run that stopped
    before the worker started) the config.yaml that the Hydra parent writes beside .hydra/."""
    directories = {p.parent for name in ("summary.json", "status.json") for p in root.rglob(name)}
    directories |= {p.parent for p in root.rglob("config.yaml") if (p.parent / ".hydra").is_dir()}
    return [load_run(root, d) for d in sorted(directories, key=_natural_key)]


# ------------------------------------------------------------------------------------------ columns
def _hashable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def varying_columns(runs: list[Run]) -> list[str]:
    """Group choices, then config keys, that differ between runs of the same objective and task.

    A key inside a group's package (objective.mask.kind inside objective/mask) counts only when it
    differs between runs of the same choice there: the preset's own fields are its choice's column.
    Runs without a config.yaml are left out.
    """
    configured = [r for r in runs if r.config]

    def varies(source: str, key: str, owners: list[str]) -> bool:
        values: dict[tuple[Any, ...], set[str]] = defaultdict(set)
        for r in configured:
            values[(r.objective, r.task, *(r.choices.get(o) for o in owners))].add(
                _hashable(getattr(r, source).get(key))
            )
        return any(len(v) > 1 for v in values.values())

    groups = sorted({g for r in configured for g in r.choices})
    choices = [g for g in groups if varies("choices", g, [])]
    keys = sorted({k for r in configured for k in r.config} - NOT_HYPERPARAMETERS)
    return choices + [
        k
        for k in keys
        if not k.startswith("logging.")
        and varies("config", k, [g for g in groups if k.startswith(g.replace("/", ".") + ".")])
    ]


def _metric_label(summary: dict[str, Any]) -> str:
    split = summary.get("final_split", "test")
    return summary["primary_metric"] if split == "test" else f"{summary['primary_metric']} ({split})"


def result_row(run: Run, columns: list[str]) -> dict[str, Any]:
    s = run.summary
    assert s is not None
    base, final = s.get("base_metric"), s["final_metric"]
    return {
        "objective": run.objective,
        "task": run.task,
        "seed": run.seed,
        **{c: run.get(c) for c in columns},
        "metric": _metric_label(s),
        "base": base,
        "final": final,
        "delta": None if base is None else final - base,
        "steps": s["steps"],
        "wall_s": round(s["wall_seconds"], 1),
        "run_dir": run.path,
    }


# ------------------------------------------------------------------------------------------ curves
def _number(value: Any) -> float | None:
    """A metric value as a float; non-finite floats are stored as the strings "nan", "inf", "-inf"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:  # a string that is no number
        return None


def series(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    """key against step; a step logged twice (a resumed run) keeps its last value."""
    points = {}
    for record in records:
        value = _number(record.get(key))
        if value is not None and "step" in record:
            points[int(record["step"])] = value
    return points


@dataclass
class Band:
    """The mean and min-max of several runs' series, per step, over the runs with a finite value there."""

    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    nonfinite: int  # values left out because they were nan or inf


def band(all_series: list[dict[int, float]]) -> Band:
    result = Band([], [], [], [], 0)
    for step in sorted({s for points in all_series for s in points}):
        values = [points[step] for points in all_series if step in points]
        finite = [v for v in values if math.isfinite(v)]
        result.nonfinite += len(values) - len(finite)
        if finite:
            result.steps.append(step)
            result.mean.append(statistics.fmean(finite))
            result.low.append(min(finite))
            result.high.append(max(finite))
    return result


def _short(column: str) -> str:
    return column.removeprefix("objective.").removeprefix("objective/")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def configuration(run: Run, columns: list[str]) -> str:
    """A run's label without its seed: the objective and its varying hyper-parameters."""
    return ", ".join([run.objective, *(f"{_short(c)}={_cell(run.get(c))}" for c in columns)])


def curves(runs: list[Run], key: str, columns: list[str]) -> dict[str, Band]:
    """key against step per configuration (seeds pooled); configurations that never logged key are left out."""
    grouped: dict[str, list[dict[int, float]]] = defaultdict(list)
    for run in runs:
        points = series(run.metrics, key)
        if points:
            grouped[configuration(run, columns)].append(points)
    return {label: band(s) for label, s in grouped.items()}


# ------------------------------------------------------------------------------------------ heatmap
def mask_schedule(run: Run) -> str:
    """The mask preset by name when Hydra recorded it, else its kind (+coupled) from the config."""
    if "objective/mask" in run.choices:
        return str(run.choices["objective/mask"])
    kind = str(run.config.get("objective.mask.kind", "?"))
    return f"{kind}+coupled" if run.config.get("objective.mask.coupled") else kind


@dataclass
class Grid:
    """Final metrics of SPG runs per (mask schedule, ω) cell; axes in order of first appearance / ω."""

    masks: list[str]
    omegas: list[float]
    finals: dict[tuple[str, float], list[float]]

    def mean(self, mask: str, omega: float) -> float | None:
        values = self.finals.get((mask, omega))
        return statistics.fmean(values) if values else None

    @property
    def cells(self) -> int:
        return len(self.finals)


def omega_mask_grid(runs: list[Run]) -> Grid:
    """The finished spg runs (of one task) by mask schedule and objective.omega."""
    finals: dict[tuple[str, float], list[float]] = defaultdict(list)
    for run in runs:
        if run.summary and run.objective == "spg" and "objective.omega" in run.config:
            finals[(mask_schedule(run), float(run.config["objective.omega"]))].append(run.summary["final_metric"])
    masks = list(dict.fromkeys(mask for mask, _ in finals))
    return Grid(masks, sorted({omega for _, omega in finals}), dict(finals))


# ------------------------------------------------------------------------------------------ plots
def _plot_panels(path: Path, panels: list[tuple[str, str, dict[str, Band]]], xlabel: str = "step") -> None:
    """One PNG with a panel per (title, y label, curves); each curve a mean line and its min-max band."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # the object API: no pyplot state, Agg canvas for savefig

    labels = list(dict.fromkeys(label for _, _, bands in panels for label in bands))
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    color = {label: palette(i % palette.N) for i, label in enumerate(labels)}  # one colour per label in every panel
    fig = Figure(figsize=(6 * len(panels) + (3 if len(labels) > 1 else 0), 4), layout="constrained")
    for ax, (title, ylabel, bands) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for label, b in bands.items():
            ax.plot(b.steps, b.mean, label=label, color=color[label], linewidth=1.2)
            ax.fill_between(b.steps, b.low, b.high, color=color[label], alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    if len(labels) > 1:
        handles, names = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right upper", fontsize="small")
    fig.savefig(path, dpi=110)


def _plot_heatmap(path: Path, grid: Grid, title: str, metric: str) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    values = np.array([[grid.mean(m, w) if (m, w) in grid.finals else np.nan for w in grid.omegas] for m in grid.masks])
    fig = Figure(figsize=(1.1 * len(grid.omegas) + 3, 0.6 * len(grid.masks) + 2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.omegas)), [f"{w:g}" for w in grid.omegas])
    ax.set_yticks(range(len(grid.masks)), grid.masks)
    ax.set(title=title, xlabel="ω (objective.omega)", ylabel="mask schedule")
    middle = np.nanmean(values)
    for i, mask in enumerate(grid.masks):
        for j, omega in enumerate(grid.omegas):
            if (mask, omega) in grid.finals:
                color = "black" if values[i, j] >= middle else "white"
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color=color, fontsize="small")
    fig.colorbar(image, ax=ax, label=metric)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------ markdown
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def _runs_section(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    metric_format = {"base": "{:.4f}", "final": "{:.4f}", "delta": "{:+.4f}"}

    def cell(column: str, value: Any) -> str:
        return metric_format[column].format(value) if column in metric_format and value is not None else _cell(value)

    header = ["objective", "task", "seed", *columns, *RESULT_COLUMNS]
    cells = [[cell(c, r[c]) for c in header] for r in rows]
    return ["## Runs", "", *_table(header, cells)]


def _seeds_section(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(_cell(r[c]) for c in ("objective", "task", *columns, "metric"))].append(r)
    body = []
    for key, rs in groups.items():
        stats = (_mean_std([r[k] for r in rs if r[k] is not None]) for k in ("base", "final", "delta"))
        body.append([*key, str(len(rs)), *stats])
    header = [
        "objective",
        "task",
        *columns,
        "metric",
        "runs",
        "base (mean ± sd)",
        "final (mean ± sd)",
        "gain (mean ± sd)",
    ]
    return ["## Mean ± sd over seeds", "", *_table(header, body)]


def _curves_section(root: Path, runs: list[Run], columns: list[str]) -> list[str]:
    lines = ["## Curves", "", "Mean over the seeds of each configuration; the band spans their min and max.", ""]
    nonfinite = 0
    for task in dict.fromkeys(r.task for r in runs):
        of_task = [r for r in runs if r.task == task]
        metric = of_task[0].summary["primary_metric"]
        figures = {
            "reward": [(f"{REWARD_KEY} ({task})", REWARD_KEY, curves(of_task, REWARD_KEY, columns))],
            "eval": [
                (f"{split} {metric} ({task})", metric, curves(of_task, f"{prefix}/{metric}", columns))
                for split, prefix in EVAL_PREFIXES.items()
            ],
        }
        for name, panels in figures.items():
            panels = [panel for panel in panels if panel[2]]  # splits or keys a run never logged
            if not panels:
                lines.append(f"No {name} curve for {task}: no such records in metrics.jsonl.")
                continue
            _plot_panels(root / "plots" / f"{name}_{task}.png", panels)
            nonfinite += sum(b.nonfinite for _, _, bands in panels for b in bands.values())
            lines.append(f"![{name} {task}](plots/{name}_{task}.png)")
        lines.append("")
    if nonfinite:
        lines += [f"{nonfinite} non-finite values (nan, inf) in metrics.jsonl are left out of the curves.", ""]
    return lines


def _grid_cell(grid: Grid, mask: str, omega: float) -> str:
    mean = grid.mean(mask, omega)
    return "-" if mean is None else f"{mean:.4f} ({len(grid.finals[(mask, omega)])})"


def _heatmap_section(root: Path, runs: list[Run]) -> list[str]:
    lines = ["## SPG: final metric over mask schedule × ω", ""]
    for task in dict.fromkeys(r.task for r in runs):
        of_task = [r for r in runs if r.task == task]
        grid = omega_mask_grid(of_task)
        if grid.cells < 2:
            lines.append(
                f"No heatmap for {task}: the spg runs cover {grid.cells} (mask schedule, ω) cell(s), fewer than 2."
            )
            continue
        metric = _metric_label(next(r.summary for r in of_task if r.objective == "spg"))
        _plot_heatmap(root / "plots" / f"heatmap_{task}.png", grid, f"spg on {task}: final {metric}", metric)
        body = [[mask, *(_grid_cell(grid, mask, omega) for omega in grid.omegas)] for mask in grid.masks]
        lines += [
            f"{task}, final {metric}: the mean over the runs of each cell (their number in parentheses).",
            "",
            *_table(["mask \\ ω", *(f"{w:g}" for w in grid.omegas)], body),
            "",
            f"![heatmap {task}](plots/heatmap_{task}.png)",
        ]
    return [*lines, ""]


def _unfinished_section(runs: list[Run]) -> list[str]:
    body = []
    for run in runs:
        status = run.status or {}
        last = max((int(r["step"]) for r in run.metrics if "step" in r), default=None)
        body.append(
            [
                run.path,
                _cell(run.objective),
                _cell(run.task),
                _cell(run.seed),
                status.get("status", "no status.json (stopped before the worker started)"),
                _cell(last),
                _cell(str(status.get("error") or status.get("message") or "-")[:300]),
            ]
        )
    header = ["run_dir", "objective", "task", "seed", "status", "last logged step", "error"]
    return [
        "## Unfinished runs",
        "",
        "No summary.json: still running, failed or killed.",
        "",
        *_table(header, body),
        "",
    ]


def render(root: Path, runs: list[Run]) -> tuple[str, list[dict[str, Any]], list[str]]:
    """The markdown (plots written under root/plots), the finished runs' rows and their hyper-parameter columns."""
    finished = [r for r in runs if r.summary is not None]
    unfinished = [r for r in runs if r.summary is None]
    columns = varying_columns(finished)
    rows = [result_row(r, columns) for r in finished]
    lines = [f"# Report: {root.resolve().name}", ""]
    if finished:
        (root / "plots").mkdir(exist_ok=True)
        lines += [
            *_runs_section(rows, columns),
            "",
            *_seeds_section(rows, columns),
            "",
            *_curves_section(root, finished, columns),
            *_heatmap_section(root, finished),
        ]
    else:
        lines += ["No finished run yet (no summary.json).", ""]
    if unfinished:
        lines += _unfinished_section(unfinished)
    return "\n".join(lines).rstrip("\n") + "\n", rows, columns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dllm_rl.experiments.report",
        description="Every run under a run or sweep directory in one report: report.md, report.csv and "
        "plots/ written into the directory, the markdown printed.",
    )
    parser.add_argument("root", type=Path, help="a run directory, or a sweep (multirun) directory holding runs")
    root = parser.parse_args(sys.argv[1:] if argv is None else argv).root
    if not root.is_dir():
        parser.error(f"{root}: not a directory")
    runs = find_runs(root)
    if not runs:
        print(f"error: no run under {root} (no summary.json, status.json or Hydra job directory)", file=sys.stderr)
        return 1
    text, rows, columns = render(root, runs)
    (root / "report.md").write_text(text)
    with (root / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["objective", "task", "seed", *columns, *RESULT_COLUMNS, "metric"])
        writer.writeheader()
        writer.writerows(rows)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
