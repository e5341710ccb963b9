"""`python -m dllm_rl.experiments.reproduce [--quick] [--out DIR] [--page FILE] [--lanes N] [-- overrides]`.

The papers' comparisons at small scale (make reproduce / make reproduce-quick): every objective with
its defaults, SPG's ablations and the mask-schedule x omega grid, trained from the same cached tiny
bases on the compact Sudoku and Countdown tasks, then written up beside the papers' numbers.

What it compares is data, in papers.yaml beside this file (read by papers.py): the main comparison's
objectives and the order of its table's rows, and the papers' numbers, each naming its table. Adding
an objective to the comparison is an entry there (with conf/objective/<name>.yaml to run).

How it runs:
- The plan is a list of chunks. A chunk is one Hydra multirun of ``python -m dllm_rl`` (one process,
  its jobs one after another), mostly through the sweep files of conf/sweep/ with the grid narrowed
  on the command line. ``--lanes`` chunks run side by side, each with cluster.threads = cores / lanes,
  longest first.
- Every run gets the same budget in rollout rounds (train.rounds: steps = rounds x mu), so objectives
  with mu = 4 and mu = 8 see the same number of rollouts, and evaluates every eval.every_n_rounds.
- Runs land in <out>/<chunk>/<job>/. A finished run directory is not run again (checkpoint.resume_mode
  auto), so the same --out continues an interrupted reproduction.
- The write-up goes to <out>/RESULTS.md and, with --page, into that file's reproduce section (pages.py;
  the rest of the file is kept); its PNG plots go to results/ beside the page.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dllm_rl.checkpoint import write_text_atomic
from dllm_rl.errors import DllmRlError
from dllm_rl.experiments import report
from dllm_rl.experiments.pages import write_section
from dllm_rl.experiments.papers import PAPERS_FILE, Papers, PaperScore, load_papers

COMMAND = "python -m dllm_rl.experiments.reproduce"
PAGE_SECTION = "reproduce"  # the section of --page this tool owns (pages.py)
TASKS = ("sudoku", "countdown")
QUICK_OBJECTIVES = ("spg", "elbo")
MASK_OMEGA_LABEL = "${hydra:runtime.choices.objective/mask}_omega${objective.omega}"
MASKING_BLOCK = 4  # sampler and mask block length of the masking ablation (compact tasks decode 16 tokens)


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Chunk:
    """One Hydra multirun: its sub-directory, the experiment it serves, its overrides and job count."""

    name: str
    experiment: str  # main | negative | beta | masking | omega | grid
    overrides: tuple[str, ...]
    jobs: int
    objectives: tuple[str, ...] = ("spg",)
    # job directory name after the job number: the swept values only (Hydra's default names every
    # override, and a file name has at most 255 bytes)
    label: str = "${objective.name}_s${seed}"

    def cost(self, rounds: int) -> float:
        per_job = statistics.fmean(papers().objectives[o] for o in self.objectives)
        return self.jobs * (rounds * per_job + 3.0)  # + start-up and evaluations


@dataclass(frozen=True)
class Plan:
    rounds: int  # rollout rounds of every run
    eval_every: int  # evaluation every this many rounds (the accuracy curves)
    seeds: tuple[int, ...]
    objectives: tuple[str, ...]
    chunks: tuple[Chunk, ...]

    @property
    def runs(self) -> int:
        return sum(c.jobs for c in self.chunks)


def _values(*xs: Any) -> str:
    return ",".join(str(x) for x in xs)


def make_plan(quick: bool = False) -> Plan:
    """The full reproduction, or the quick one (1 seed, 2 rounds, spg and elbo, a 2 x 2 corner of the grid)."""
    seeds = (0,) if quick else (0, 1, 2)
    objectives = QUICK_OBJECTIVES if quick else tuple(papers().objectives)
    chunks: list[Chunk] = []
    for task in TASKS:
        for seed in seeds:
            chunks.append(
                Chunk(
                    f"main-{task}-s{seed}",
                    "main",
                    ("+sweep=objectives", f"task={task}", f"seed={seed}", f"objective={_values(*objectives)}"),
                    len(objectives),
                    objectives,
                )
            )
        if not quick:  # SPG with the EUBO alone for negatives: the paper's other main-table row
            chunks.append(
                Chunk(
                    f"main-{task}-spg_eubo",
                    "main",
                    (
                        "+sweep=negative_surrogate",
                        f"task={task}",
                        "objective.negative_surrogate=eubo",
                        f"seed={_values(*seeds)}",
                    ),
                    len(seeds),
                    label="spg_${objective.negative_surrogate}_s${seed}",
                )
            )
    if not quick:  # the quick variant keeps the main comparison and a 2 x 2 corner of the grid
        chunks += _ablation_chunks(seeds)
    grid = (
        [("random,blockwise", "0.0,1.0", 4)]
        if quick
        else [
            ("random,blockwise", "0.0,0.25,0.5,0.75,1.0", 10),  # the whole 4 x 5 grid of sweep/mask_omega.yaml,
            ("coupled,stratified", "0.0,0.25,0.5,0.75,1.0", 10),  # in two halves
        ]
    )
    for i, (masks, omega, jobs) in enumerate(grid):
        chunks.append(
            Chunk(
                f"grid-sudoku-{'ab'[i]}",
                "grid",
                ("+sweep=mask_omega", "task=sudoku", f"objective/mask={masks}", f"objective.omega={omega}"),
                jobs,
                label=MASK_OMEGA_LABEL,
            )
        )
    return Plan(
        rounds=2 if quick else 16,
        eval_every=1 if quick else 4,
        seeds=seeds,
        objectives=objectives,
        chunks=tuple(chunks),
    )


def _ablation_chunks(seeds: tuple[int, ...]) -> list[Chunk]:
    """SPG's ablations: negative surrogate, beta, masking (both tasks), omega (Countdown)."""
    chunks = []
    negatives = ("zero", "elbo")  # eubo and mix come from the main comparison
    chunks.append(
        Chunk(
            "negative-sudoku",
            "negative",
            (
                "+sweep=negative_surrogate",
                "task=sudoku",
                f"objective.negative_surrogate={_values(*negatives)}",
                f"seed={_values(*seeds)}",
            ),
            len(negatives) * len(seeds),
            label="${objective.negative_surrogate}_s${seed}",
        )
    )
    surrogates, betas = ("eubo", "mix"), (1.5, 2.0, 3.0)  # beta 1: the main comparison
    chunks.append(
        Chunk(
            "beta-sudoku",
            "beta",
            (
                "+sweep=beta",
                "task=sudoku",
                f"objective.negative_surrogate={_values(*surrogates)}",
                f"objective.beta={_values(*betas)}",
            ),
            len(surrogates) * len(betas),
            label="${objective.negative_surrogate}_beta${objective.beta}",
        )
    )
    for task in TASKS:
        surrogates = ("eubo", "mix")
        chunks.append(
            Chunk(
                f"masking-{task}",
                "masking",
                (
                    "+sweep=negative_surrogate",
                    f"task={task}",
                    f"task.block_length={MASKING_BLOCK}",
                    f"objective.negative_surrogate={_values(*surrogates)}",
                    "objective/mask=random,blockwise",
                ),
                2 * len(surrogates),
                label="${objective.negative_surrogate}_${hydra:runtime.choices.objective/mask}",
            )
        )
    omegas = (0.0, 0.25, 0.5, 0.75, 1.0)
    chunks.append(
        Chunk(
            "omega-countdown",
            "omega",
            ("+sweep=mask_omega", "task=countdown", "objective/mask=blockwise", f"objective.omega={_values(*omegas)}"),
            len(omegas),
            label=MASK_OMEGA_LABEL,
        )
    )
    return chunks


# Q, rollout prompts per round, of every run of a task: part of the reproduction's budget, fixed here so
# that a testbed preset measured for one objective (Q = 64 for the SPG main job on Sudoku) does not give
# that objective more rollouts than the others or stretch the 60-minute plan
PROMPTS_PER_ROUND = {"sudoku": 32, "countdown": 16}


def budget_overrides(chunk: Chunk, plan: Plan) -> list[str]:
    """Rounds, evaluation cadence and Q: the same budget for every run of a task."""
    task = next(o.split("=", 1)[1] for o in chunk.overrides if o.startswith("task="))
    return [
        f"train.rounds={plan.rounds}",
        f"eval.every_n_rounds={plan.eval_every}",
        f"rollout.prompts_per_step={PROMPTS_PER_ROUND[task]}",
    ]


def chunk_command(chunk: Chunk, plan: Plan, root: Path, threads: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dllm_rl",
        *chunk.overrides,
        *budget_overrides(chunk, plan),
        f"cluster.threads={threads}",
        "logging=none",
        f"hydra.sweep.dir={root / chunk.name}",
        f"hydra.sweep.subdir=${{hydra.job.num}}_{chunk.label}",
        *extra,
    ]


# ------------------------------------------------------------------------------------------ running
@dataclass
class ChunkResult:
    chunk: Chunk
    returncode: int
    seconds: float


def prepare_bases(extra: list[str]) -> dict[str, Path]:
    """Each task's data and cached base (a warm-started model), made here once before lanes could build the
    same ones twice; a run from model.path has no base to make."""
    from hydra import compose, initialize_config_module

    from dllm_rl.config import run_config
    from dllm_rl.tasks import get_task
    from dllm_rl.warmstart import ensure_base

    bases = {}
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        for task in TASKS:
            cfg = run_config(compose("config", overrides=[f"task={task}", *extra]))
            loaded = get_task(task, cfg.task, Path(cfg.cache_dir).expanduser())  # generates and caches the data set
            if cfg.model.path is None and cfg.warmstart.enabled and not cfg.model.requires_path:
                bases[task], _ = ensure_base(cfg, loaded)
    return bases


def run_plan(plan: Plan, root: Path, lanes: int, extra: list[str]) -> list[ChunkResult]:
    """Every chunk, ``lanes`` at a time (longest first); each one's output in <root>/<chunk>.log."""
    threads = max(1, (os.cpu_count() or 1) // lanes)
    order = sorted(plan.chunks, key=lambda c: -c.cost(plan.rounds))
    start = time.monotonic()

    def one(chunk: Chunk) -> ChunkResult:
        began = time.monotonic()
        (root / chunk.name).mkdir(parents=True, exist_ok=True)
        with (root / f"{chunk.name}.log").open("w") as log:
            done = subprocess.run(
                chunk_command(chunk, plan, root, threads, extra), stdout=log, stderr=subprocess.STDOUT
            )
        seconds = time.monotonic() - began
        state = "done" if done.returncode == 0 else f"FAILED (exit {done.returncode}, see {chunk.name}.log)"
        print(
            f"[{time.monotonic() - start:6.0f} s] {chunk.name}: {chunk.jobs} runs {state} in {seconds:.0f} s",
            flush=True,
        )
        return ChunkResult(chunk, done.returncode, seconds)

    with ThreadPoolExecutor(max_workers=lanes) as pool:
        return list(pool.map(one, order))


# ------------------------------------------------------------------------------------------ results
@dataclass
class Record:
    """One finished run, as the tables read it."""

    experiment: str
    chunk: str
    path: str
    task: str
    objective: str
    negative: str | None
    mask: str
    omega: float | None
    beta: float | None
    seed: int
    mu: int
    steps: int
    base: float
    final: float
    rl_seconds: float
    metric: str
    rollouts_per_round: int  # Q prompts x G completions
    group: int  # G
    test_examples: int | None  # task.test_size (null: the task's whole test file)
    curve: dict[int, float] = field(default_factory=dict)  # test metric by rollout round
    reward: dict[int, float] = field(default_factory=dict)  # reward_mean by rollout round

    @property
    def label(self) -> str:
        return f"spg ({self.negative})" if self.objective == "spg" else self.objective


def _by_round(points: dict[int, float], mu: int) -> dict[int, float]:
    """Steps to rollout rounds: step s is in round ceil(s / mu); the evaluation at step 0 is round 0."""
    return {-(-step // mu): value for step, value in points.items()}


def collect(root: Path, plan: Plan) -> tuple[list[Record], list[report.Run]]:
    """The finished runs of every chunk, and the runs that did not finish."""
    records, unfinished = [], []
    for chunk in plan.chunks:
        directory = root / chunk.name
        if not directory.is_dir():
            continue
        for run in report.find_runs(directory):
            if run.summary is None:
                unfinished.append(run)
                continue
            s, c = run.summary, run.config
            mu = int(c.get("objective.inner_iterations", 1))
            records.append(
                Record(
                    experiment=chunk.experiment,
                    chunk=chunk.name,
                    path=f"{chunk.name}/{run.path}",
                    task=run.task,
                    objective=run.objective,
                    negative=c.get("objective.negative_surrogate"),
                    mask=report.mask_schedule(run),
                    omega=c.get("objective.omega"),
                    beta=c.get("objective.beta"),
                    seed=int(run.seed),
                    mu=mu,
                    steps=int(s["steps"]),
                    base=float(s["base_metric"]),
                    final=float(s["final_metric"]),
                    rl_seconds=float(s.get("rl_wall_seconds", s["wall_seconds"])),
                    metric=s["primary_metric"],
                    rollouts_per_round=int(c.get("rollout.prompts_per_step", 0))
                    * int(c.get("rollout.samples_per_prompt", 0)),
                    group=int(c.get("rollout.samples_per_prompt", 0)),
                    test_examples=c.get("task.test_size"),
                    curve=_by_round(report.series(run.metrics, f"eval/{s['primary_metric']}"), mu),
                    reward=_by_round(report.series(run.metrics, report.REWARD_KEY), mu),
                )
            )
    return records, unfinished


@dataclass
class Group:
    """The seeds of one configuration."""

    records: list[Record]

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def finals(self) -> list[float]:
        return [r.final for r in self.records]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finals)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.finals) if self.n > 1 else None

    @property
    def gains(self) -> list[float]:
        return [r.final - r.base for r in self.records]


def group(records: list[Record], **where: Any) -> Group:
    def match(r: Record) -> bool:
        return all(
            (getattr(r, k) == v)
            if not isinstance(v, float)
            else (getattr(r, k) is not None and math.isclose(getattr(r, k), v))
            for k, v in where.items()
        )

    return Group([r for r in records if match(r)])


def pooled_sd(groups: list[Group]) -> float | None:
    """The seed-to-seed standard deviation pooled over configurations with at least two seeds."""
    parts = [(g.n - 1, g.sd**2) for g in groups if g.n > 1 and g.sd is not None]
    dof = sum(d for d, _ in parts)
    return math.sqrt(sum(d * v for d, v in parts) / dof) if dof else None


SPG_FAMILY = ("spg (mix)", "spg (eubo)", "elbo")


def spg_noise(rows: dict[str, Group], *more: Group) -> float | None:
    """Seed sd for the SPG ablations: pooled over the main table's SPG-family rows (and more groups).

    The ablations are all SPG configurations, so objectives with another loss (and another failure
    mode, e.g. a DMPO seed that collapses) do not widen their noise band.
    """
    return pooled_sd([g for label, g in rows.items() if label in SPG_FAMILY] + list(more))


def standard_error(a: Group, b: Group, noise: float | None) -> float | None:
    """SE of mean(a) - mean(b); a configuration with one seed borrows the pooled seed sd."""
    total = 0.0
    for g in (a, b):
        sd = g.sd if g.sd is not None else noise
        if sd is None:
            return None
        total += sd**2 / g.n
    return math.sqrt(total)


def verdict(diff: float | None, se: float | None, paper: float | None) -> str:
    """How a measured difference (here) reads against the paper's difference for the same comparison."""
    if diff is None:
        return "not run"
    if paper is None:
        return "no paper claim"
    if se is None:
        return "no noise estimate (one seed, no seed spread measured)"
    band = 2 * se
    if abs(diff) <= band:
        return f"**not shown**: within noise (±{100 * band:.1f} pts)"
    if (diff > 0) == (paper > 0):
        return "**agrees**"
    return "**disagrees**: opposite sign, beyond noise"


def _pts(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _mean_sd(g: Group) -> str:
    if not g.n:
        return "-"
    return f"{g.mean:.4f} ± {g.sd:.4f}" if g.sd is not None else f"{g.mean:.4f}"


# ------------------------------------------------------------------------------------------ the papers
@functools.cache
def papers() -> Papers:
    """papers.yaml (the objectives and the papers' numbers), read and checked once."""
    return load_papers(PAPERS_FILE)


def _row_order(label: str) -> int:
    rows = papers().main_rows
    return rows.index(label) if label in rows else len(rows)


def paper_score(task: str, row: str) -> PaperScore | None:
    """The score the main table shows for a row: the first of its papers' entries."""
    scores = papers().main.get((task, row))
    return scores[0] if scores else None


def paper_difference(task: str, a: str, b: str) -> float | None:
    """The paper's a - b (as a fraction), within the first paper whose table has both rows (GDSD and DMPO
    against SPG: the GDSD paper's own SPG row); None when no one paper has both."""
    for x in papers().main.get((task, a), ()):
        for y in papers().main.get((task, b), ()):
            if x.paper == y.paper:
                return (x.score - y.score) / 100
    return None


def _paper_gap(scores: dict[Any, float], a: Any, b: Any) -> float | None:
    """A paper's score of setting a minus that of setting b (as a fraction), None without both."""
    return (scores[a] - scores[b]) / 100 if a in scores and b in scores else None


def _inverted_u(scores: dict[float, float]) -> float | None:
    """The paper's best interior ω minus its better end point (ω 0 or 1), as a fraction."""
    interior = [v for w, v in scores.items() if 0.0 < w < 1.0]
    ends = [v for w, v in scores.items() if w in (0.0, 1.0)]
    return (max(interior) - max(ends)) / 100 if interior and ends else None


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ------------------------------------------------------------------------------------------ sections
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return report._table(header, rows)


def main_rows(records: list[Record]) -> dict[str, dict[str, Group]]:
    """task -> main-table row -> its seeds."""
    main = [r for r in records if r.experiment == "main"]
    out: dict[str, dict[str, Group]] = {}
    for task in TASKS:
        rows = {label: Group([r for r in main if r.task == task and r.label == label]) for label in papers().main_rows}
        out[task] = {k: g for k, g in rows.items() if g.n}
    return out


def _main_section(records: list[Record], plan: Plan) -> list[str]:
    lines = ["### 1. Main comparison: every objective with its defaults", ""]
    lines += [
        f"Each row: {len(plan.seeds)} seed(s) × {plan.rounds} rollout rounds. The test metric is measured "
        "before RL (base) and after the last round (final); gain = final − base, in points. The paper column "
        "gives the paper's own number and, where its table has one, the base model's (LLaDA-8B-Instruct, not "
        "the tiny base).",
        "",
    ]
    for task, rows in main_rows(records).items():
        if not rows:
            continue
        metric = next(iter(rows.values())).records[0].metric
        body = []
        for label, g in rows.items():
            r0 = g.records[0]
            paper = paper_score(task, label)
            paper_cell = (
                "-"
                if paper is None
                else (
                    f"{paper.score:.1f}"
                    + ("" if paper.base is None else f" (base {paper.base:.1f})")
                    + f", {paper.cite}"
                )
            )
            gains = Group(g.records).gains
            gain = statistics.fmean(gains)
            gain_sd = statistics.stdev(gains) if len(gains) > 1 else None
            body.append(
                [
                    f"`{label}`",
                    str(r0.mu),
                    str(r0.steps),
                    str(g.n),
                    f"{statistics.fmean(r.base for r in g.records):.4f}",
                    _mean_sd(g),
                    " / ".join(f"{x:.4f}" for x in g.finals),
                    _pts(gain) + ("" if gain_sd is None else f" ± {100 * gain_sd:.1f}"),
                    f"{statistics.fmean(r.rl_seconds for r in g.records):.0f}",
                    paper_cell,
                ]
            )
        lines += [
            f"**{task}** (test {metric})",
            "",
            *_table(
                [
                    "objective",
                    "μ",
                    "optimizer steps",
                    "runs",
                    "base",
                    "final (mean ± sd)",
                    "final per seed",
                    "gain (pts)",
                    "RL wall s/run",
                    "paper",
                ],
                body,
            ),
            "",
        ]
        lines += _main_claims(task, rows)
    return lines


def _main_claims(task: str, rows: dict[str, Group]) -> list[str]:
    noise = pooled_sd(list(rows.values()))
    body = []
    for label, g in rows.items():  # every objective improves on its base in its paper
        paper = paper_score(task, label)
        paper_gain = None if paper is None or paper.base is None else (paper.score - paper.base) / 100
        gains = g.gains
        gain = statistics.fmean(gains)
        sd = statistics.stdev(gains) if len(gains) > 1 else noise
        se = None if sd is None else sd / math.sqrt(g.n)
        claim_paper = paper_gain if paper_gain is not None else (0.01 if paper is not None else None)
        body.append(
            [
                f"`{label}` improves on its base",
                "-" if paper is None else (_pts(paper_gain) if paper_gain is not None else "gain (no base row)"),
                _pts(gain),
                verdict(gain, se, claim_paper),
            ]
        )
    for claim in papers().main_claims:
        a, b = claim.a, claim.b
        if a not in rows or b not in rows:
            continue
        diff = rows[a].mean - rows[b].mean
        paper = paper_difference(task, a, b)
        body.append(
            [
                f"`{a}` − `{b}` ({claim.cite})",
                _pts(paper),
                _pts(diff),
                verdict(diff, standard_error(rows[a], rows[b], noise), paper),
            ]
        )
    pooled = "-" if noise is None else f"{noise:.4f}"
    return [
        f"{task}: the papers' claims against these runs (noise band = 2 standard errors; seed sd pooled over "
        f"objectives {pooled}):",
        "",
        *_table(["claim", "paper (pts)", "here (pts)", "verdict"], body),
        "",
    ]


def _negative_section(records: list[Record]) -> list[str]:
    paper = papers().negative
    main = main_rows(records).get(paper.task, {})
    rows = {
        "zero": group(records, experiment="negative", task=paper.task, negative="zero"),
        "elbo": group(records, experiment="negative", task=paper.task, negative="elbo"),
        "eubo": main.get("spg (eubo)", Group([])),
        "mix": main.get("spg (mix)", Group([])),
    }
    rows = {k: g for k, g in rows.items() if g.n}
    if not rows:
        return []
    noise = spg_noise(main, *rows.values())
    body = [
        [f"`{k}`", str(g.n), _mean_sd(g), _pts(statistics.fmean(g.gains)), _score(paper.scores.get(k))]
        for k, g in rows.items()
    ]
    claims = []
    for a, b in (("mix", "eubo"), ("eubo", "elbo"), ("elbo", "zero"), ("mix", "zero")):
        if a in rows and b in rows:
            diff = rows[a].mean - rows[b].mean
            gap = _paper_gap(paper.scores, a, b)
            claims.append(
                [
                    f"`{a}` − `{b}`",
                    _pts(gap),
                    _pts(diff),
                    verdict(diff, standard_error(rows[a], rows[b], noise), gap),
                ]
            )
    return [
        "#### 2a. Surrogate for negative-advantage samples (Sudoku; SPG Table 3 / 10)",
        "",
        "`zero` drops the negative samples, `elbo` uses the lower bound for them (ELBO everywhere), `eubo` the "
        "upper bound, `mix` ω·EUBO + (1 − ω)·ELBO. `eubo` and `mix` are the main comparison's runs.",
        "",
        *_table(["surrogate", "runs", "final (mean ± sd)", "gain (pts)", "paper, Sudoku avg"], body),
        "",
        *_table(["claim", "paper (pts)", "here (pts)", "verdict"], claims),
        "",
    ]


def _masking_section(records: list[Record], noise_by_task: dict[str, float | None]) -> list[str]:
    body = []
    for task in TASKS:
        for surrogate in ("eubo", "mix"):
            rnd = group(records, experiment="masking", task=task, negative=surrogate, mask="random")
            blk = group(records, experiment="masking", task=task, negative=surrogate, mask="blockwise")
            if not (rnd.n or blk.n):
                continue
            diff = blk.mean - rnd.mean if rnd.n and blk.n else None
            paper = None
            if task == papers().masking.task:
                paper = _paper_gap(papers().masking.scores.get(surrogate, {}), "blockwise", "random")
            se = standard_error(blk, rnd, noise_by_task.get(task)) if diff is not None else None
            body.append(
                [
                    task,
                    f"`{surrogate}`",
                    _mean_sd(rnd),
                    _mean_sd(blk),
                    _pts(diff),
                    _pts(paper) if paper is not None else "- (not in the paper)",
                    verdict(diff, se, paper),
                ]
            )
    if not body:
        return []
    return [
        "#### 2b. Masking: random vs blockwise (SPG Table 4 / 11)",
        "",
        f"Both arms decode and mask in blocks of {MASKING_BLOCK} tokens (`task.block_length={MASKING_BLOCK}`): with "
        "the compact tasks' single 16-token block the blockwise schedule would have one block and differ from "
        "random masking only in its weights. The paper measured MATH500 and Countdown; its Countdown averages "
        "are the reference.",
        "",
        *_table(
            [
                "task",
                "surrogate",
                "random",
                "blockwise",
                "blockwise − random (pts)",
                "paper (pts, Countdown)",
                "verdict",
            ],
            body,
        ),
        "",
    ]


def _omega_section(records: list[Record], noise_by_task: dict[str, float | None]) -> list[str]:
    omegas = (0.0, 0.25, 0.5, 0.75, 1.0)
    body = []
    for task, experiment in (("countdown", "omega"), ("sudoku", "grid")):
        cells = {w: group(records, experiment=experiment, task=task, mask="blockwise", omega=w) for w in omegas}
        cells = {w: g for w, g in cells.items() if g.n}
        if not cells:
            continue
        interior = [w for w in cells if 0.0 < w < 1.0]
        ends = [w for w in cells if w in (0.0, 1.0)]
        diff = se = None
        if interior and ends:
            top = max(interior, key=lambda w: cells[w].mean)
            end = max(ends, key=lambda w: cells[w].mean)
            diff = cells[top].mean - cells[end].mean
            se = standard_error(cells[top], cells[end], noise_by_task.get(task))
        paper = _inverted_u(papers().omega.scores) if task == papers().omega.task else None
        best = max(cells, key=lambda w: cells[w].mean)
        body.append(
            [
                task,
                *(f"{cells[w].mean:.4f}" if w in cells else "-" for w in omegas),
                f"{best:g}",
                _pts(paper) if paper is not None else "- (not in the paper)",
                _pts(diff),
                verdict(diff, se, paper),
            ]
        )
    if not body:
        return []
    paper_omegas = papers().omega
    return [
        "#### 2c. ω sweep, mixture surrogate, blockwise masks (SPG Table 13)",
        "",
        f"Paper ({paper_omegas.task.capitalize()} avg): ω {' / '.join(f'{w:g}' for w in paper_omegas.scores)} = "
        f"{' / '.join(f'{v:.1f}' for v in paper_omegas.scores.values())}, an inverted U "
        "(Proposition 1). The claim tested: the best interior ω beats the better end point (ω = 0 is the "
        "ELBO, ω = 1 the EUBO). Sudoku's row is the blockwise row of the grid below (one seed each).",
        "",
        *_table(
            [
                "task",
                "ω=0",
                "0.25",
                "0.5",
                "0.75",
                "1",
                "best ω here",
                "paper: best interior − best end (pts)",
                "here (pts)",
                "verdict",
            ],
            body,
        ),
        "",
    ]


def _beta_section(records: list[Record], noise: float | None) -> list[str]:
    paper = papers().beta
    paper_betas = sorted({b for scores in paper.scores.values() for b in scores})
    main = main_rows(records).get(paper.task, {})
    body, claims = [], []
    betas = (1.0, 1.5, 2.0, 3.0)
    for surrogate in ("eubo", "mix"):
        cells = {b: group(records, experiment="beta", task=paper.task, negative=surrogate, beta=b) for b in betas[1:]}
        cells[1.0] = main.get(f"spg ({surrogate})", Group([]))
        cells = {b: g for b, g in cells.items() if g.n}
        if not cells or set(cells) == {1.0}:
            continue
        body.append(
            [
                f"`{surrogate}`",
                *(_mean_sd(cells[b]) if b in cells else "-" for b in betas),
                " / ".join(_score(paper.scores.get(surrogate, {}).get(b)) for b in paper_betas),
            ]
        )
        for hi in (b for b in paper_betas if b > 1.0):
            if 1.0 in cells and hi in cells:
                diff = cells[1.0].mean - cells[hi].mean
                gap = _paper_gap(paper.scores.get(surrogate, {}), 1.0, hi)
                claims.append(
                    [
                        f"`{surrogate}`: β 1 − β {hi:g}",
                        _pts(gap),
                        _pts(diff),
                        verdict(diff, standard_error(cells[1.0], cells[hi], noise), gap),
                    ]
                )
    if not body:
        return []
    return [
        "#### 2d. β sweep (Sudoku; SPG Table 12)",
        "",
        "β = 1 is the main comparison's runs (the Sudoku setting of objective_task/spg_sudoku.yaml). The paper: "
        "EUBO alone collapses for β > 1 on Sudoku, the mixture much less.",
        "",
        *_table(["surrogate", "β=1", "1.5", "2", "3", "paper β " + " / ".join(f"{b:g}" for b in paper_betas)], body),
        "",
        *_table(["claim", "paper (pts)", "here (pts)", "verdict"], claims),
        "",
    ]


def _grid_section(records: list[Record], images: Path, prefix: str) -> list[str]:
    grid_records = [r for r in records if r.experiment == "grid"]
    if not grid_records:
        return []
    finals: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in grid_records:
        finals[(r.mask, float(r.omega))].append(r.final)
    grid = report.Grid(list(dict.fromkeys(m for m, _ in finals)), sorted({w for _, w in finals}), dict(finals))
    metric = grid_records[0].metric
    lines = ["### 3. Mask schedule × ω (Sudoku; sweep/mask_omega.yaml)", ""]
    body = [[m, *(f"{grid.mean(m, w):.4f}" if (m, w) in grid.finals else "-" for w in grid.omegas)] for m in grid.masks]
    lines += [
        "Mixture surrogate, one seed per cell. `coupled` is random masks plus their complements, `stratified` "
        "stratified mask ratios; the presets are in conf/objective/mask/.",
        "",
        *_table(["mask \\ ω", *(f"{w:g}" for w in grid.omegas)], body),
        "",
    ]
    if grid.cells >= 2:
        name = "reproduce_heatmap_sudoku.png"
        report._plot_heatmap(images / name, grid, f"spg on sudoku: final test {metric}", metric)
        lines += [f"![mask schedule x omega heatmap]({prefix}{name})", ""]
    return lines


def _curves(records: list[Record], images: Path, prefix: str) -> list[str]:
    main = [r for r in records if r.experiment == "main"]
    lines = []
    for kind, attr, ylabel in (("accuracy", "curve", "test metric"), ("reward", "reward", "reward_mean")):
        panels = []
        for task in TASKS:
            of_task = [r for r in main if r.task == task]
            if not of_task:
                continue
            grouped: dict[str, list[dict[int, float]]] = defaultdict(list)
            for r in sorted(of_task, key=lambda r: _row_order(r.label)):
                if getattr(r, attr):
                    grouped[r.label].append(getattr(r, attr))
            if grouped:
                metric = f"test {of_task[0].metric}" if attr == "curve" else ylabel
                panels.append((f"{task}: {metric}", metric, {k: report.band(v) for k, v in grouped.items()}))
        if panels:
            name = f"reproduce_{kind}.png"
            report._plot_panels(images / name, panels, xlabel="rollout round")
            lines += [f"![{kind} curves per objective]({prefix}{name})", ""]
    if lines:
        lines = [
            "Curves (mean over seeds, band = min–max): test metric every "
            "evaluation, and the rollout reward of every round, against the rollout round.",
            "",
            *lines,
        ]
    return lines


def render_page(
    records: list[Record],
    unfinished: list[report.Run],
    failed: list[ChunkResult],
    plan: Plan,
    images: Path,
    prefix: str,
    wall_seconds: float | None,
    lanes: int,
    command: str,
) -> str:
    images.mkdir(parents=True, exist_ok=True)
    main = main_rows(records)
    noise_by_task = {task: spg_noise(rows) for task, rows in main.items()}
    spg_sd = (
        ", ".join(f"{task} {'-' if sd is None else f'{sd:.4f}'}" for task, sd in noise_by_task.items())
        or "none measured"
    )
    tests = " or ".join(str(n) for n in sorted({r.test_examples for r in records if r.test_examples})) or "all"
    per_round = sorted({r.rollouts_per_round for r in records}) or [0]
    rollouts = " or ".join(str(plan.rounds * n) for n in per_round)
    shape = " or ".join(
        sorted(
            {
                f"Q {n // g} prompts × G {g} completions"
                for n, g in ((r.rollouts_per_round, max(1, r.group)) for r in records)
            }
        )
    )
    wall = "-" if wall_seconds is None else f"{wall_seconds:.0f} s ({wall_seconds / 60:.1f} min)"
    lines = [
        f"## Small-scale reproduction of the papers' comparisons (`{command}`)",
        "",
        f"Written by `{COMMAND}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: "
        f"{len(records)} finished runs of the {plan.runs} planned, {lanes} lane(s) side by side on "
        f"{os.cpu_count()} CPU core(s), wall time **{wall}** (base preparation included).",
        "",
        f"- Every run starts from the same cached warm-started tiny base of its task (compact format) and gets "
        f"the same budget: {plan.rounds} rollout rounds of {shape or 'Q × G'} = {rollouts} rollouts "
        "(`train.rounds`; optimizer steps = rounds × μ, so μ = 8 objectives take twice the steps of μ = 4 ones "
        "on the same rollouts).",
        f"- Each objective, surrogate and mask schedule runs with its config file's defaults (the papers' "
        f"settings); nothing is tuned per objective. Evaluation: greedy, the whole test split ({tests} examples), "
        f"before RL and every {plan.eval_every} rounds.",
        '- "Verdict" compares the sign of each measured difference with the paper\'s, outside a band of 2 '
        "standard errors (from the seeds' spread; a single-seed ablation borrows the seed sd pooled "
        f"over the main table's SPG-family rows of its task, {spg_sd}). "
        '"Not shown" means this budget cannot tell.',
        "- The papers train 8B models for thousands of steps; these runs are tiny models for a few minutes. "
        "A disagreement here is a fact about this scale, stated as measured, not a verdict on the paper.",
        "",
        *_main_section(records, plan),
        *_curves(records, images, prefix),
        "### 2. SPG ablations",
        "",
        *_negative_section(records),
        *_masking_section(records, noise_by_task),
        *_omega_section(records, noise_by_task),
        *_beta_section(records, noise_by_task.get("sudoku")),
        *_grid_section(records, images, prefix),
    ]
    at = next(i for i, line in enumerate(lines) if line.startswith("### "))  # after the intro
    lines[at:at] = _at_a_glance(lines[at:])
    if failed or unfinished:
        lines += ["### Runs that did not finish", ""]
        lines += [
            f"- chunk `{c.chunk.name}` exited with {c.returncode} (its log: `{c.chunk.name}.log`)" for c in failed
        ]
        for run in unfinished:
            status = run.status or {}
            lines.append(
                f"- `{run.path}`: {status.get('status', 'no status.json')} {status.get('error') or ''}".rstrip()
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _at_a_glance(section: list[str]) -> list[str]:
    """Count the verdicts of every claims table below and name each disagreement with its section."""
    counts = {"agrees": 0, "disagrees": 0, "not shown": 0}
    disagreements, heading, where = [], "", ""
    for line in section:
        if line.startswith("#"):
            heading = where = line.lstrip("#").strip()
        elif line.startswith("**"):  # a task's sub-table, e.g. "**countdown** (test acc)"
            where = f"{heading}, {line.split('**')[1]}"
        if not line.startswith("|"):
            continue
        found = next((v for v in counts if f"**{v}**" in line), None)
        if found is None:
            continue
        counts[found] += 1
        if found == "disagrees":
            cells = [c.strip() for c in line.strip("|").split("|")]
            disagreements.append(f"  - {where}: {' · '.join(cells[:-1])}")
    total = sum(counts.values())
    if not total:
        return []
    resolved = counts["agrees"] + counts["disagrees"]
    lines = [
        f"**At a glance**: {resolved} of {total} comparisons with a paper claim are resolved "
        f"({resolved / total:.0%}): {counts['agrees']} agree in sign beyond noise, {counts['disagrees']} disagree "
        f"beyond noise, and {counts['not shown']} are within noise at this scale.",
    ]
    if disagreements:
        lines += ["", "- Disagreements (where: the table row's cells):", *disagreements]
    return [*lines, ""]


def write_csv(path: Path, records: list[Record]) -> None:
    columns = [
        "experiment",
        "task",
        "objective",
        "negative",
        "mask",
        "omega",
        "beta",
        "seed",
        "mu",
        "steps",
        "base",
        "final",
        "rl_seconds",
        "path",
    ]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            writer.writerow([getattr(r, c) for c in columns])


# ------------------------------------------------------------------------------------------ entry
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description=" ".join(__doc__.split("\n\n")[1].split()),  # the docstring's first paragraph
        epilog="Arguments after -- are Hydra overrides given to every run (e.g. -- cache_dir=/scratch/cache).",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, two objectives (a smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="output root (default outputs/reproduce[-quick]/<time>)")
    parser.add_argument("--page", type=Path, default=None, help="also write the section into this markdown page")
    parser.add_argument("--lanes", type=int, default=2, help="chunks run side by side (default 2)")
    parser.add_argument("--report-only", action="store_true", help="write the page from the runs under --out")
    args = parser.parse_args(argv)
    if args.lanes < 1:
        parser.error(f"--lanes={args.lanes} must be >= 1")
    if args.report_only and args.out is None:
        parser.error("--report-only needs --out (the directory of an earlier reproduction)")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        papers()
    except DllmRlError as exc:  # a broken papers.yaml: one line, before anything runs
        print(f"{COMMAND}: error: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(args.quick)
    name = "reproduce-quick" if args.quick else "reproduce"
    root = args.out or Path("outputs") / name / datetime.now().strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    results: list[ChunkResult] = []
    wall = None
    if not args.report_only:
        print(f"{name}: {plan.runs} runs in {len(plan.chunks)} chunks, {args.lanes} lane(s), output {root}", flush=True)
        began = time.monotonic()
        for task, path in prepare_bases(extra).items():
            print(f"{task} base: {path}", flush=True)
        results = run_plan(plan, root, args.lanes, extra)
        wall = time.monotonic() - began
        timing = {"wall_seconds": wall, "lanes": args.lanes, "chunks": {r.chunk.name: r.seconds for r in results}}
        write_text_atomic(root / "timing.json", json.dumps(timing, indent=2))
    elif (root / "timing.json").is_file():  # the wall time of the run that produced these directories
        wall = json.loads((root / "timing.json").read_text())["wall_seconds"]
    records, unfinished = collect(root, plan)
    failed = [r for r in results if r.returncode != 0]
    command = "make reproduce-quick" if args.quick else "make reproduce"
    pages = [root / "RESULTS.md"] + ([args.page] if args.page else [])
    for page in pages:
        section = render_page(
            records, unfinished, failed, plan, page.parent / "results", "results/", wall, args.lanes, command
        )
        write_section(page, PAGE_SECTION, COMMAND, section)
    write_csv(root / "runs.csv", records)
    print(
        f"{len(records)} runs finished; wrote {', '.join(str(p) for p in pages)} and {root / 'runs.csv'}"
        + ("" if wall is None else f"; wall {wall:.0f} s")
    )
    if failed or not records:
        print(f"error: {len(failed)} chunk(s) failed; their logs are under {root}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
