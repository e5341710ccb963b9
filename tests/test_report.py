"""The sweep report: run table with the varying hyper-parameters, seed means, curves, the SPG
ω × mask heatmap and the unfinished runs, from run directories written as a real sweep writes them."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import dllm_rl  # noqa: F401  (ConfigStore registration)
from dllm_rl.experiments import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(directory, overrides, *, final=None, rewards=(), evals=(), status="done", hydra=True, **state):
    """A run directory as `python -m dllm_rl` leaves it: config.yaml (the resolved config, as __main__
    writes it), .hydra/hydra.yaml (Hydra's record of the group choices), status.json, metrics.jsonl
    (Tracker records: training steps, eval/ and val/ records) and, for a finished run, summary.json
    (worker.run's keys)."""
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    directory.mkdir(parents=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    del cfg.hydra
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    plain["run_dir"] = str(directory)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(plain))
    if hydra:
        (directory / ".hydra").mkdir()
        (directory / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (directory / ".hydra" / "hydra.yaml").write_text(
            OmegaConf.to_yaml({"hydra": {"runtime": {"choices": choices}}})
        )
    if status is None:  # stopped before the worker wrote status.json (e.g. while building the base)
        return
    (directory / "status.json").write_text(json.dumps({"status": status, "started": 1.7e9, "world_size": 1, **state}))
    with (directory / "metrics.jsonl").open("w") as f:
        for step, value in enumerate(rewards, start=1):
            f.write(json.dumps({"step": step, "reward_mean": value, "loss": 0.1, "inner_step": 0}) + "\n")
        for step, value in evals:
            f.write(json.dumps({"step": step, "eval/cell_acc": value, "eval/seconds": 1.0}) + "\n")
            f.write(json.dumps({"step": step, "val/cell_acc": value - 0.01, "val/seconds": 1.0}) + "\n")
    if final is None:
        return
    base = 0.40
    summary = {
        "run_dir": str(directory),
        "objective": plain["objective"]["name"],
        "task": plain["task"]["name"],
        "seed": plain["seed"],
        "base_model": {"path": "cache"},
        "primary_metric": "cell_acc",
        "base": {"cell_acc": base},
        "final": {"cell_acc": final},
        "final_split": "test",
        "best": None,
        "evals": [],
        "dropped_prompts": 0,
        "steps": len(rewards),
        "rl_wall_seconds": 10.0,
        "checkpoint": str(directory / "checkpoints" / "final"),
        "model_export": str(directory / "checkpoints" / "final" / "hf"),
        "base_metric": base,
        "final_metric": final,
        "best_step": None,
        "best_test_metric": None,
        "wall_seconds": 12.34,
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=2))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A mask × ω sweep: two seeds in one cell, one run in two more cells; a failed, a running, a
    preempted run and one that stopped before the worker wrote status.json."""
    root = tmp_path_factory.mktemp("sweep")
    spg = ["objective=spg", "objective.negative_surrogate=mix"]
    _write_run(
        root / "0_mask=random,objective.omega=0.0,seed=0",
        [*spg, "objective/mask=random", "objective.omega=0.0", "seed=0"],
        final=0.40,
        rewards=[0.1, "nan", 0.3],
        evals=[(0, 0.40), (3, 0.40)],
    )
    _write_run(
        root / "1_mask=random,objective.omega=0.0,seed=1",
        [*spg, "objective/mask=random", "objective.omega=0.0", "seed=1"],
        final=0.44,
        rewards=[0.3, 0.2, 0.5],
        evals=[(0, 0.40), (3, 0.44)],
    )
    _write_run(
        root / "2_mask=blockwise,objective.omega=0.5,seed=0",
        [*spg, "objective/mask=blockwise", "objective.omega=0.5", "seed=0"],
        final=0.50,
        rewards=[0.2, 0.3, 0.4],
        evals=[(0, 0.40), (3, 0.50)],
    )
    _write_run(
        root / "10_mask=coupled,objective.omega=0.5,seed=0",
        [*spg, "objective/mask=coupled", "objective.omega=0.5", "seed=0"],
        final=0.46,
        rewards=[0.2, 0.2, 0.2],
        evals=[(0, 0.40), (3, 0.46)],
    )
    _write_run(
        root / "11_mask=coupled,objective.omega=1.0,seed=0",
        [*spg, "objective/mask=coupled", "objective.omega=1.0", "seed=0"],
        rewards=[0.2, "inf"],
        status="failed",
        error="NonFiniteError('3 optimizer steps in a row were skipped')",
        message="3 optimizer steps in a row were skipped",
        user_error=True,
    )
    _write_run(
        root / "12_mask=stratified,objective.omega=1.0,seed=0",
        [*spg, "objective/mask=stratified", "objective.omega=1.0", "seed=0"],
        rewards=[0.2],
        status="running",
    )
    _write_run(root / "13_objective.omega=1.0,seed=0", [*spg, "objective.omega=1.0"], status=None)
    _write_run(
        root / "14_mask=random,objective.omega=0.75,seed=0",
        [*spg, "objective/mask=random", "objective.omega=0.75", "seed=0"],
        rewards=[0.2, 0.3],
        status="preempted",
        message="SIGUSR1: checkpoint saved at step 2",
        signal=10,
    )
    return root


@pytest.fixture(scope="module")
def sweep_report(sweep):
    assert report.main([str(sweep)]) == 0
    return (sweep / "report.md").read_text()


def test_report_prints_the_markdown_it_writes(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    assert capsys.readouterr().out == (sweep / "report.md").read_text()


def test_runs_table_shows_the_swept_choices_not_the_fields_their_presets_set(sweep_report):
    header = next(line for line in sweep_report.splitlines() if line.startswith("| objective | task | seed"))
    assert header == (
        "| objective | task | seed | objective/mask | objective.omega "
        "| base | final | delta | steps | wall_s | run_dir |"
    )
    # job 10 sorts after job 2
    rows = [line for line in sweep_report.split("## Mean")[0].splitlines() if line.startswith("| spg")]
    assert [row.split(" | ")[3] for row in rows] == ["random", "random", "blockwise", "coupled"]
    assert rows[1] == (
        "| spg | sudoku | 1 | random | 0 | 0.4000 | 0.4400 | +0.0400 | 3 | 12.3 "
        "| 1_mask=random,objective.omega=0.0,seed=1 |"
    )


def test_seed_means_per_configuration(sweep_report):
    # the two seeds of (random, ω 0): finals 0.40 and 0.44 -> 0.42 ± 0.0283
    assert (
        "| spg | sudoku | random | 0 | cell_acc | 2 | 0.4000 ± 0.0000 | 0.4200 ± 0.0283 | 0.0200 ± 0.0283 |"
        in sweep_report
    )
    assert "| spg | sudoku | blockwise | 0.5 | cell_acc | 1 |" in sweep_report


def test_csv_has_one_row_per_finished_run_with_the_varying_columns(sweep):
    lines = (sweep / "report.csv").read_text().splitlines()
    assert lines[0] == "objective,task,seed,objective/mask,objective.omega,base,final,delta,steps,wall_s,run_dir,metric"
    assert len(lines) == 5


def test_unfinished_runs_are_listed_with_status_and_error(sweep_report):
    section = sweep_report.split("## Unfinished runs")[1]
    failed = next(line for line in section.splitlines() if line.startswith("| 11_"))
    assert "| failed | 2 |" in failed and "NonFiniteError('3 optimizer steps in a row were skipped')" in failed
    assert "| 12_mask=stratified,objective.omega=1.0,seed=0 | spg | sudoku | 0 | running | 1 | - |" in section
    assert "| 13_objective.omega=1.0,seed=0 | spg | sudoku | 0 | no status.json" in section
    assert "| preempted | 2 | SIGUSR1: checkpoint saved at step 2 |" in section
    # unfinished runs are not in the results
    assert "11_mask" not in sweep_report.split("## Unfinished runs")[0]


def test_plots_are_png_files_linked_from_the_report(sweep, sweep_report):
    for name in ("reward_sudoku", "eval_sudoku", "heatmap_sudoku"):
        path = sweep / "plots" / f"{name}.png"
        assert f"](plots/{name}.png)" in sweep_report
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100


def test_reward_curves_pool_seeds_and_skip_non_finite_values(sweep):
    runs = [r for r in report.find_runs(sweep) if r.summary]
    bands = report.curves(runs, "reward_mean", report.varying_columns(runs))
    pooled = bands["spg, mask=random, omega=0"]
    # seed 0 logged 0.1, "nan", 0.3 and seed 1 0.3, 0.2, 0.5: step 2 has only seed 1's value
    assert pooled.steps == [1, 2, 3]
    assert pooled.mean == pytest.approx([0.2, 0.2, 0.4])
    assert pooled.low == pytest.approx([0.1, 0.2, 0.3]) and pooled.high == pytest.approx([0.3, 0.2, 0.5])
    assert pooled.nonfinite == 1
    assert bands["spg, mask=blockwise, omega=0.5"].mean == pytest.approx([0.2, 0.3, 0.4])
    assert report.curves(runs, "eval/cell_acc", [])["spg"].mean == pytest.approx(
        [0.40, (0.40 + 0.44 + 0.50 + 0.46) / 4]
    )


def test_non_finite_values_are_noted(sweep_report):
    assert "1 non-finite values (nan, inf) in metrics.jsonl are left out of the curves." in sweep_report


def test_heatmap_grid_means_over_the_runs_of_each_cell(sweep, sweep_report):
    grid = report.omega_mask_grid(report.find_runs(sweep))
    assert grid.masks == ["random", "blockwise", "coupled"] and grid.omegas == [0.0, 0.5]
    assert grid.mean("random", 0.0) == pytest.approx(0.42)
    assert grid.mean("blockwise", 0.5) == pytest.approx(0.50)
    assert grid.mean("coupled", 0.5) == pytest.approx(0.46)
    assert grid.mean("random", 0.5) is None and grid.cells == 3
    assert "| random | 0.4200 (2) | - |" in sweep_report
    assert "| coupled | - | 0.4600 (1) |" in sweep_report


def test_without_hydra_records_the_preset_fields_are_the_columns(tmp_path, capsys):
    """Runs started without Hydra's .hydra/ (launch/worker.sh) only have config.yaml to go by."""
    for seed, mask, final in ((0, "random", 0.41), (0, "coupled", 0.43)):
        _write_run(
            tmp_path / f"{mask}",
            ["objective=spg", f"objective/mask={mask}", f"seed={seed}"],
            final=final,
            rewards=[0.1],
            hydra=False,
        )
    runs = report.find_runs(tmp_path)
    columns = report.varying_columns(runs)
    assert "objective.mask.coupled" in columns and "objective.mask.count_mode" in columns
    assert "objective.mask.kind" not in columns  # both presets are kind: random
    assert [report.mask_schedule(r) for r in runs] == ["random+coupled", "random"]
    assert report.main([str(tmp_path)]) == 0
    assert "| random+coupled | 0.4300 (1) |" in capsys.readouterr().out


def _summary(directory, seed, base, final):
    directory.mkdir(parents=True)
    (directory / "summary.json").write_text(
        json.dumps(
            {
                "objective": "elbo",
                "task": "sudoku",
                "seed": seed,
                "primary_metric": "cell_acc",
                "base_metric": base,
                "final_metric": final,
                "steps": 10,
                "wall_seconds": 12.0,
            }
        )
    )


def test_report_aggregates_seeds(tmp_path, capsys):
    for seed, (base, final) in enumerate([(0.40, 0.50), (0.40, 0.46), (0.40, 0.48)]):
        _summary(tmp_path / f"{seed}_seed={seed}", seed, base, final)
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text == capsys.readouterr().out
    # gains 0.10, 0.06, 0.08: mean 0.08, sample sd 0.02
    assert "| elbo | sudoku | cell_acc | 3 | 0.4000 ± 0.0000 | 0.4800 ± 0.0200 | 0.0800 ± 0.0200 |" in text
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("objective,task,seed")
    # summaries alone (no metrics.jsonl): the curves are missing, not made up
    assert "No reward curve for sudoku" in text and not (tmp_path / "plots" / "reward_sudoku.png").exists()
    assert "No heatmap for sudoku: the spg runs cover 0 (mask schedule, ω) cell(s), fewer than 2." in text
    assert not (tmp_path / "plots" / "heatmap_sudoku.png").exists()


def test_series_keeps_the_last_value_of_a_step_logged_twice():
    records = [{"step": 1, "x": 0.5}, {"step": 2, "x": "-inf"}, {"step": 1, "x": 0.7}, {"step": 3, "x": "n/a"}]
    points = report.series(records, "x")
    assert points[1] == 0.7 and math.isinf(points[2]) and 3 not in points


def test_a_sweep_without_finished_runs_lists_the_unfinished_ones(tmp_path, capsys):
    _write_run(tmp_path / "0_seed=0", ["seed=0"], rewards=[0.2], status="running")
    assert report.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "No finished run yet" in text and "| 0_seed=0 | spg | sudoku | 0 | running | 1 | - |" in text
    assert (tmp_path / "report.csv").read_text().startswith("objective,task,seed,base")


def test_report_without_runs_fails_clearly(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err
