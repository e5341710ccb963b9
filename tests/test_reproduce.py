"""`python -m dllm_rl.experiments.reproduce`: the plan (every job composes, validates and gets the same
rollout budget), the papers' numbers (papers.yaml against the tables they come from, and its errors),
the write-up (tables, verdicts against the papers, the page's markers) and, once, the quick variant end
to end through the real entry point."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

import dllm_rl
from dllm_rl.config import apply_round_budget, validate
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.experiments import pages, papers, reproduce
from dllm_rl.experiments.reproduce import Group, Record

CONF_DIR = Path(dllm_rl.__file__).parent / "conf"
REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _compose(*overrides: str):
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _jobs(chunk: reproduce.Chunk) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for a chunk: its sweep file's grid, narrowed by the command line."""
    sweep = next(o.split("=", 1)[1] for o in chunk.overrides if o.startswith("+sweep="))
    params = yaml.safe_load((CONF_DIR / "sweep" / f"{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
    arguments = [f"{k}={v}" for k, v in params.items()] + [o for o in chunk.overrides if not o.startswith("+sweep=")]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_every_planned_job_composes_and_gets_the_same_rollout_budget(quick):
    plan = reproduce.make_plan(quick)
    rollouts, seen = defaultdict(set), set()
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):  # one context for all jobs
        for chunk in plan.chunks:
            jobs = _jobs(chunk)
            assert len(jobs) == chunk.jobs, chunk.name
            sweep = next(o for o in chunk.overrides if o.startswith("+sweep="))
            budget = reproduce.budget_overrides(chunk, plan)
            for job in jobs:
                cfg = compose("config", overrides=[sweep, *job, *budget])
                with open_dict(cfg):
                    cfg.pop("hydra", None)
                apply_round_budget(cfg)
                validate(cfg)
                mu = cfg.objective.inner_iterations
                assert cfg.train.steps == plan.rounds * mu and cfg.eval.every_n_steps == plan.eval_every * mu, job
                per_round = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
                rollouts[cfg.task.name].add(cfg.train.steps // mu * per_round)
                seen.add((chunk.experiment, cfg.task.name, cfg.objective.name, cfg.seed))
    # every run of a task sees the same number of rollouts, whatever its mu and its testbed preset's Q
    assert all(len(budgets) == 1 for budgets in rollouts.values()), dict(rollouts)
    assert rollouts["sudoku"] == {plan.rounds * 32 * 8} and rollouts["countdown"] == {plan.rounds * 16 * 8}
    objectives = {o for e, _, o, _ in seen if e == "main"}
    assert objectives == set(plan.objectives)
    assert {t for _, t, _, _ in seen} == set(reproduce.TASKS)
    if not quick:
        assert plan.runs == sum(c.jobs for c in plan.chunks) >= 80
        assert {e for e, *_ in seen} == {"main", "negative", "beta", "masking", "omega", "grid"}


def test_round_budget_sets_steps_from_mu_and_rejects_bad_values():
    spg = _compose("objective=spg", "objective.inner_iterations=4", "train.rounds=3", "eval.every_n_rounds=2")
    wd1 = _compose("objective=wd1", "train.rounds=3", "eval.every_n_rounds=2")
    for cfg in (spg, wd1):
        apply_round_budget(cfg)
    assert (spg.train.steps, spg.eval.every_n_steps) == (12, 8)  # mu 4
    assert (wd1.train.steps, wd1.eval.every_n_steps) == (24, 16)  # mu 8
    unset = _compose("objective=spg", "train.steps=40", "eval.every_n_steps=150")
    apply_round_budget(unset)
    assert unset.train.steps == 40 and unset.eval.every_n_steps == 150
    bad = _compose("train.rounds=-1")
    with pytest.raises(ConfigError, match=r"train\.rounds=-1"):
        apply_round_budget(bad)


def test_runs_that_differ_in_decoding_only_share_one_base():
    from dllm_rl.warmstart import base_signature

    def signature(*overrides):
        cfg = _compose("task=sudoku", *overrides)
        return base_signature(cfg.model, cfg.task, cfg.warmstart)

    same = signature()
    assert signature(f"task.block_length={reproduce.MASKING_BLOCK}", "task.diffusion_steps=4") == same
    assert signature("task.train_size=500") != same and signature("warmstart.steps=7") != same


# ------------------------------------------------------------------------------------------ the papers
# The numbers as the papers print them (percent), transcribed here a second time: papers.yaml must hold
# exactly these. (task, main-table row) -> (score, base, cite) of the entry the main table shows.
CITED_MAIN = {
    ("sudoku", "spg (mix)"): (90.0, 19.9, "SPG T1, avg"),
    ("sudoku", "spg (eubo)"): (86.1, 19.9, "SPG T1, avg"),
    ("sudoku", "elbo"): (82.4, 19.9, "SPG T10 (w/ ELBO), avg"),
    ("sudoku", "diffu_grpo"): (23.0, 19.9, "SPG T1 (D1 re-run), avg"),
    ("sudoku", "wd1"): (29.2, 19.9, "SPG T1 (WD1 re-run), avg"),
    ("sudoku", "gdsd"): (89.8, None, "GDSD, LLaDA table, best"),
    ("sudoku", "dmpo"): (32.8, None, "GDSD, LLaDA table, best"),
    ("countdown", "spg (mix)"): (69.9, 17.5, "SPG T1, avg"),
    ("countdown", "spg (eubo)"): (69.3, 17.5, "SPG T1, avg"),
    ("countdown", "elbo"): (67.1, 17.5, "SPG T10 (w/ ELBO), avg"),
    ("countdown", "diffu_grpo"): (32.1, 17.5, "SPG T1 (D1 re-run), avg"),
    ("countdown", "wd1"): (50.6, 17.5, "SPG T1 (WD1 re-run), avg"),
    ("countdown", "gdsd"): (84.0, None, "GDSD, LLaDA table, best"),
    ("countdown", "dmpo"): (82.8, None, "GDSD, LLaDA table, best"),
}
GDSD_TABLE_SPG = {"sudoku": 88.2, "countdown": 70.7}  # SPG's own row in the GDSD paper's table


def test_papers_yaml_holds_the_numbers_the_tables_cite():
    data = papers.load_papers()
    assert data.objectives == {"spg": 1.0, "elbo": 1.0, "dmpo": 3.5, "gdsd": 3.0, "diffu_grpo": 1.5, "wd1": 1.0}
    assert data.main_rows == ("spg (mix)", "spg (eubo)", "elbo", "gdsd", "dmpo", "diffu_grpo", "wd1")
    assert {key: (s[0].score, s[0].base, s[0].cite) for key, s in data.main.items()} == CITED_MAIN
    for task, score in GDSD_TABLE_SPG.items():
        assert [(s.paper, s.score) for s in data.main[(task, "spg (mix)")]] == [
            ("SPG", CITED_MAIN[(task, "spg (mix)")][0]),
            ("GDSD", score),
        ]
    gdsd_cite = "GDSD, LLaDA table (SPG 88.2 Sudoku, 70.7 Countdown)"  # the claims name that row's numbers
    assert [(c.a, c.b, c.cite) for c in data.main_claims] == [
        ("spg (mix)", "spg (eubo)", "SPG T1"),
        ("spg (mix)", "elbo", "SPG T1/T10"),
        ("spg (mix)", "diffu_grpo", "SPG T1"),
        ("spg (mix)", "wd1", "SPG T1"),
        ("spg (eubo)", "elbo", "SPG T10"),
        ("gdsd", "spg (mix)", gdsd_cite),
        ("dmpo", "spg (mix)", gdsd_cite),
    ]
    assert (data.negative.task, data.negative.scores) == (
        "sudoku",
        {"zero": 68.8, "elbo": 82.4, "eubo": 86.1, "mix": 90.0},
    )
    assert (data.masking.task, data.masking.scores) == (
        "countdown",
        {"eubo": {"random": 45.4, "blockwise": 69.3}, "mix": {"random": 62.8, "blockwise": 69.9}},
    )
    assert (data.omega.task, data.omega.scores) == (
        "countdown",
        {0.0: 67.1, 0.25: 68.9, 0.5: 69.9, 0.75: 70.9, 1.0: 66.8},
    )
    assert (data.beta.task, data.beta.scores) == (
        "sudoku",
        {"eubo": {1.0: 86.1, 1.5: 37.7, 2.0: 29.3}, "mix": {1.0: 90.0, 1.5: 84.6, 2.0: 55.2}},
    )
    # every number names its table: SPG's by table number, the GDSD paper's by its LLaDA-8B-Instruct table
    sources = [s.source for scores in data.main.values() for s in scores]
    sources += [a.source for a in (data.negative, data.masking, data.omega, data.beta)]
    assert all("Table" in source or "table" in source for source in sources)
    # and the committed page cites the same numbers
    page = (REPO / "docs" / "RESULTS.md").read_text().split("<!-- reproduce:begin")[1].split("<!-- reproduce:end")[0]
    for task in reproduce.TASKS:
        table = page.split(f"**{task}**")[1].split("claims against these runs")[0]
        for (t, row), (score, base, cite) in CITED_MAIN.items():
            if t == task:
                cell = f"{score:.1f}" + ("" if base is None else f" (base {base:.1f})") + f", {cite}"
                assert f"| `{row}` |" in table and f"| {cell} |" in table, (task, row, cell)
    assert "| 86.1 / 37.7 / 29.3 |" in page and "| 90.0 / 84.6 / 55.2 |" in page


BROKEN = [  # (what is changed in papers.yaml, the key the error must name, what it must say)
    (("score: 29.2", "score: lots"), "main.sudoku.wd1[0].score", "expected a number, got 'lots'"),
    (('base: 17.5, cite: "SPG T1 (WD1', 'cite: "SPG T1 (WD1'), "main.countdown.wd1[0].base", "missing"),
    (("score: 84.0,", "score: 84.0, scroe: 1,"), "main.countdown.gdsd[0]", "unknown key(s) scroe"),
    (("{a: dmpo,", "{a: dpmo,"), "main_claims[6].a", "'dpmo' is not one of main_rows"),
    (
        ("  wd1: {round_cost: 1.0}", "  wd1: {round_cost: 1.0}\n  sft: {round_cost: 1.0}"),
        "main_rows",
        "'sft' has no row",
    ),
    (("0.75: 70.9", "0.75: [70.9]"), "omega.scores.0.75", "expected a number"),
    (("mix: {random: 62.8, blockwise: 69.9}", "mix: {random: 62.8}"), "masking.scores.mix.blockwise", "missing"),
    (("beta:\n  task: sudoku", "beta:\n  task: [sudoku"), "", "not valid YAML"),
]


@pytest.mark.parametrize(("change", "key", "problem"), BROKEN, ids=[k or "yaml" for _, k, _ in BROKEN])
def test_a_malformed_papers_file_gives_one_error_naming_the_file_and_key(tmp_path, change, key, problem):
    text = papers.PAPERS_FILE.read_text()
    assert text.count(change[0]) == 1, change[0]
    broken = tmp_path / "papers.yaml"
    broken.write_text(text.replace(*change))
    with pytest.raises(DllmRlError) as error:
        papers.load_papers(broken)
    message = str(error.value)
    assert message.startswith(f"{broken}: {key}") and problem in message and "\n" not in message, message


def test_reproduce_stops_on_a_broken_papers_file_before_running(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "papers.yaml"
    broken.write_text(papers.PAPERS_FILE.read_text().replace("score: 29.2", "score: lots"))
    monkeypatch.setattr(reproduce, "PAPERS_FILE", broken)
    reproduce.papers.cache_clear()
    try:
        assert reproduce.main(["--report-only", "--out", str(tmp_path / "out")]) == 2
    finally:
        reproduce.papers.cache_clear()
    err = capsys.readouterr().err
    assert err == f"{reproduce.COMMAND}: error: {broken}: main.sudoku.wd1[0].score: expected a number, got 'lots'\n"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ write-up
def _record(task="sudoku", objective="spg", negative="mix", final=0.5, seed=0, experiment="main", **kw) -> Record:
    fields = dict(
        experiment=experiment,
        chunk=f"{experiment}-{task}",
        path=f"{experiment}/{objective}-{seed}",
        task=task,
        objective=objective,
        negative=negative if objective == "spg" else None,
        mask="blockwise",
        omega=0.5,
        beta=1.0,
        seed=seed,
        mu=4,
        steps=64,
        base=0.40,
        final=final,
        rl_seconds=30.0,
        metric="cell_acc" if task == "sudoku" else "acc",
        rollouts_per_round=128,
        group=8,
        test_examples=256,
        curve={0: 0.40, 4: final},
        reward={1: 0.3, 4: 0.4},
    )
    fields.update(kw)
    return Record(**fields)


def test_verdict_needs_the_same_sign_outside_two_standard_errors():
    assert reproduce.verdict(0.05, 0.01, 0.07) == "**agrees**"
    assert reproduce.verdict(-0.05, 0.01, 0.07).startswith("**disagrees**")
    assert reproduce.verdict(0.015, 0.01, 0.07).startswith("**not shown**")  # inside ±2 SE
    assert reproduce.verdict(0.05, 0.01, None) == "no paper claim"
    assert reproduce.verdict(None, 0.01, 0.07) == "not run"


def test_standard_error_borrows_the_pooled_sd_for_a_single_seed():
    three = Group([_record(final=f) for f in (0.40, 0.42, 0.44)])
    one = Group([_record(final=0.5)])
    assert three.sd == pytest.approx(0.02)
    assert reproduce.pooled_sd([three, one]) == pytest.approx(0.02)
    assert reproduce.standard_error(three, one, 0.03) == pytest.approx((0.02**2 / 3 + 0.03**2) ** 0.5)
    assert reproduce.standard_error(one, one, None) is None


def test_paper_differences_stay_within_one_papers_table():
    assert reproduce.paper_difference("sudoku", "spg (mix)", "spg (eubo)") == pytest.approx(0.039)
    # GDSD against SPG: the GDSD paper's own SPG row (88.2), not SPG's 90.0
    assert reproduce.paper_difference("sudoku", "gdsd", "spg (mix)") == pytest.approx(0.016)
    assert reproduce.paper_difference("countdown", "dmpo", "spg (mix)") == pytest.approx(0.121)
    assert reproduce.paper_difference("sudoku", "gdsd", "wd1") is None  # no shared table


def _records() -> list[Record]:
    out = []
    finals = {"spg": (0.50, 0.52, 0.51), "elbo": (0.41, 0.40, 0.42), "wd1": (0.30, 0.31, 0.29)}
    for task in reproduce.TASKS:
        for objective, values in finals.items():
            for seed, final in enumerate(values):
                out.append(_record(task=task, objective=objective, final=final, seed=seed))
        for seed in range(3):
            out.append(_record(task=task, negative="eubo", final=0.45, seed=seed))
    out += [_record(experiment="negative", negative=n, final=0.35, seed=s) for n in ("zero", "elbo") for s in range(3)]
    out += [_record(experiment="beta", negative="mix", beta=b, final=0.5 - b / 10) for b in (1.5, 2.0, 3.0)]
    for mask, final in (("random", 0.30), ("blockwise", 0.40)):
        out.append(_record(task="countdown", experiment="masking", negative="mix", mask=mask, final=final))
    for w, final in ((0.0, 0.30), (0.25, 0.35), (0.5, 0.45), (0.75, 0.40), (1.0, 0.32)):
        out.append(_record(task="countdown", experiment="omega", omega=w, final=final))
        for mask in ("random", "blockwise"):
            out.append(_record(experiment="grid", mask=mask, omega=w, final=final))
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    images = tmp_path_factory.mktemp("page") / "results"
    plan = reproduce.make_plan(quick=False)
    text = reproduce.render_page(_records(), [], [], plan, images, "results/", 1234.0, 2, "make reproduce")
    return text, images


def test_page_has_the_main_table_with_paper_numbers_and_verdicts(page):
    text, _ = page
    assert "wall time **1234 s (20.6 min)**" in text
    assert "16 rollout rounds of Q 16 prompts × G 8 completions = 2048 rollouts" in text
    assert "the whole test split (256 examples)" in text
    main = text.split("### 1. Main comparison")[1].split("### 2.")[0]
    assert "| `spg (mix)` | 4 | 64 | 3 | 0.4000 | 0.5100 ± 0.0100 | 0.5000 / 0.5200 / 0.5100 | +11.0 ± 1.0 |" in main
    assert "90.0 (base 19.9), SPG T1, avg" in main
    # spg - wd1: +21 pts here, +60.8 in SPG's Table 1, far outside the noise
    assert "| `spg (mix)` − `wd1` (SPG T1) | +60.8 | +21.0 | **agrees** |" in main
    # spg - eubo: +6 pts here against +3.9 in the paper (seed sd 0 -> pooled 0.01)
    assert "| `spg (mix)` − `spg (eubo)` (SPG T1) | +3.9 | +6.0 | **agrees** |" in main


def test_page_states_disagreements_plainly(page):
    text, _ = page
    # wd1 falls from 0.40 to 0.30 on both tasks; WD1's paper gains +9.3 / +33.1 points
    glance = text.split("**At a glance**")[1].split("### 1.")[0]
    resolved = "21 of 24 comparisons with a paper claim are resolved (88%): 19 agree in sign beyond noise, 2 disagree"
    assert resolved in glance
    for task in reproduce.TASKS:
        assert f"every objective with its defaults, {task}: `wd1` improves on its base · +" in glance
        main = text.split(f"**{task}**")[1]
        assert "| `wd1` improves on its base |" in main.split("**disagrees**")[0]
    negative = text.split("#### 2a.")[1].split("#### 2b.")[0]
    # elbo (0.35) equals zero (0.35): the paper's +13.6 is not shown here
    assert "| `elbo` − `zero` | +13.6 | +0.0 | **not shown**" in negative
    beta = text.split("#### 2d.")[1].split("### 3.")[0]
    assert "| `mix`: β 1 − β 1.5 | +5.4 | +16.0 | **agrees** |" in beta
    masking = text.split("#### 2b.")[1].split("#### 2c.")[0]
    assert "| countdown | `mix` | 0.3000 | 0.4000 | +10.0 | +7.1 | **agrees** |" in masking
    omega = text.split("#### 2c.")[1].split("#### 2d.")[0]
    assert "| countdown | 0.3000 | 0.3500 | 0.4500 | 0.4000 | 0.3200 | 0.5 | +3.8 | +13.0 | **agrees** |" in omega
    assert "| sudoku |" in omega and "- (not in the paper)" in omega


def test_page_shows_its_plots(page):
    text, images = page
    for name in ("reproduce_accuracy.png", "reproduce_reward.png", "reproduce_heatmap_sudoku.png"):
        assert f"](results/{name})" in text
        assert (images / name).read_bytes().startswith(PNG_MAGIC)
    grid = text.split("### 3.")[1]
    assert "| random | 0.3000 | 0.3500 | 0.4500 | 0.4000 | 0.3200 |" in grid


def test_write_section_replaces_only_its_own_section(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("# Results\n\nearlier issue's text\n")
    begin, end = pages.markers("reproduce", reproduce.COMMAND)
    pages.write_section(page, "reproduce", reproduce.COMMAND, "first\n")
    pages.write_section(page, "reproduce", reproduce.COMMAND, "second\n")
    pages.write_section(page, "variance", "python -m dllm_rl.variance --report --page", "theirs\n")
    text = page.read_text()
    assert text.startswith("# Results\n\nearlier issue's text\n")
    assert text.count(begin) == 1 and "second" in text and "first" not in text and "theirs" in text
    page.write_text(text + "\n## a later section\n")
    pages.write_section(page, "reproduce", reproduce.COMMAND, "third\n")
    text = page.read_text()
    assert "\nthird\n" + end + "\n\n<!-- variance:begin" in text and text.endswith("\n## a later section\n")
    # a section whose begin marker names another command (the tool was renamed) is found by its name
    pages.write_section(page, "reproduce", "python -m somewhere.else", "fourth\n")
    text = page.read_text()
    assert "third" not in text and text.count("<!-- reproduce:begin") == 1
    assert "<!-- reproduce:begin (written by python -m somewhere.else; edits here are overwritten) -->" in text


# ------------------------------------------------------------------------------------------ end to end
SMALL = [  # the quick variant, shrunk to seconds per run (the whole split still evaluated, 32 rows)
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.micro_batch=16",
    "train.micro_batch_per_gpu=16",
    "warmstart.steps=10",
    "task.train_size=500",
    "task.validation_size=32",
    "task.test_size=32",
]


def test_quick_reproduction_runs_end_to_end_and_writes_tables_and_plots(tmp_path):
    out, page = tmp_path / "out", tmp_path / "docs" / "RESULTS.md"
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    }
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "dllm_rl.experiments.reproduce", "--quick", "--out", str(out), "--page", str(page)]
    done = subprocess.run(
        [*command, "--", f"cache_dir={tmp_path / 'cache'}", *SMALL],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    plan = reproduce.make_plan(quick=True)
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == plan.runs == 8
    assert {(r["task"], r["objective"]) for r in rows if r["experiment"] == "main"} == {
        (t, o) for t in reproduce.TASKS for o in ("spg", "elbo")
    }
    assert json.loads((out / "timing.json").read_text())["wall_seconds"] > 0
    for text, images in (
        (page.read_text(), page.parent / "results"),
        ((out / "RESULTS.md").read_text(), out / "results"),
    ):
        assert "### 1. Main comparison" in text and "**countdown** (test acc)" in text
        assert "| `elbo` | 4 | 8 | 1 |" in text  # mu 4, 2 rounds, one seed
        assert "### 3. Mask schedule × ω" in text and "Runs that did not finish" not in text
        for name in ("reproduce_accuracy.png", "reproduce_reward.png", "reproduce_heatmap_sudoku.png"):
            assert f"](results/{name})" in text
            assert (images / name).read_bytes().startswith(PNG_MAGIC)
    # the page again from the same runs, without running anything: one section, the same tables
    assert reproduce.main([*command[3:], "--report-only"]) == 0
    assert page.read_text().count(pages.markers("reproduce", reproduce.COMMAND)[0]) == 1
