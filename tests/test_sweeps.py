"""Sweep files (conf/sweep, +sweep=<name>) and the Optuna search (conf/hparams_search): every grid
point composes, passes validate() and carries its swept values; a real Hydra multirun of a stand-in
task function names its job directories as the sweep says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

import dllm_rl
from dllm_rl.config import validate

CONF_DIR = Path(dllm_rl.__file__).parent / "conf"
SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
GRID_SIZES = {
    "beta": 8,
    "mask_omega": 20,
    "negative_surrogate": 4,
    "objectives": 18,
    "seeds": 3,
    "variance": 32,
    "variance_objectives": 6,
}
OPTUNA_FILE = CONF_DIR / "hparams_search" / "optuna.yaml"

# A task function in place of dllm_rl's (no training): it checks the composed job and reports where
# Hydra put it, and returns a number for the Optuna sweeper to maximise.
STAND_IN_APP = """
import json, sys
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
import dllm_rl
from dllm_rl.config import validate

@hydra.main(config_path=sys.argv.pop(1), config_name="config", version_base="1.3")
def main(cfg):
    validate(cfg)
    job = {"dir": HydraConfig.get().runtime.output_dir, **OmegaConf.to_container(cfg.objective, enum_to_str=True)}
    job.update(lr=cfg.optim.lr, steps=cfg.train.steps, splits=list(cfg.eval.splits))
    print("JOB " + json.dumps(job), flush=True)
    return -(cfg.objective.omega - 0.6) ** 2

main()
"""


def _compose(*overrides: str):
    """The config as the Hydra parent sees it, and the group choices Hydra recorded."""
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    hydra = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, hydra


def _grid(params: dict[str, str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for hydra.sweeper.params (its own expansion)."""
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return BasicSweeper.split_arguments(overrides, None)[0]


def _run_stand_in(tmp_path: Path, conf_dir: Path, *overrides: str) -> list[dict]:
    app = tmp_path / "app.py"
    app.write_text(STAND_IN_APP)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "DLLM_RL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(app), str(conf_dir), *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [yaml.safe_load(line[4:]) for line in done.stdout.splitlines() if line.startswith("JOB ")]


def test_every_sweep_file_has_a_known_grid_size():
    assert set(SWEEPS) == set(GRID_SIZES)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_grid_point_composes_validates_and_carries_its_values(name):
    _, hydra = _compose(f"+sweep={name}")
    assert hydra.mode == RunMode.MULTIRUN  # a multirun without -m
    jobs = _grid(OmegaConf.to_container(hydra.sweeper.params))
    assert len(jobs) == GRID_SIZES[name]
    parser = OverridesParser.create()
    for job in jobs:
        cfg, job_hydra = _compose(f"+sweep={name}", *job)
        OmegaConf.to_object(cfg)  # the type checks __main__ runs
        validate(cfg)
        plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        for override in parser.parse_overrides(job):
            key, value = override.key_or_group, override.value()
            if key in job_hydra.runtime.choices:  # a config group: objective=spg, objective/mask=coupled
                assert job_hydra.runtime.choices[key] == value, job
            else:
                assert OmegaConf.select(OmegaConf.create(plain), key) == value, job


def test_spg_sweeps_fix_the_objective_and_an_equal_budget():
    for name in ("mask_omega", "beta", "negative_surrogate"):
        cfg, _ = _compose(f"+sweep={name}", "objective=spg")
        assert cfg.train.steps == 320 and cfg.eval.every_n_steps == 80, name
    cfg, _ = _compose("+sweep=mask_omega", "objective/mask=coupled", "objective.omega=0.25")
    assert cfg.objective.negative_surrogate.value == "mix"
    assert cfg.objective.mask.kind.value == "random" and cfg.objective.mask.coupled
    # the sweep overrides the task preset's beta (objective_task/spg_sudoku.yaml sets 1.0)
    cfg, _ = _compose("+sweep=beta", "objective=spg", "objective.beta=3.0")
    assert cfg.objective.beta == 3.0


def test_mask_omega_keeps_the_run_directory_names_of_config_yaml():
    _, base = _compose()
    _, sweep = _compose("+sweep=mask_omega")
    excluded = list(sweep.job.config.override_dirname.exclude_keys)
    assert excluded == [*base.job.config.override_dirname.exclude_keys, "objective/mask"]
    assert OmegaConf.to_container(sweep.sweep)["dir"] == OmegaConf.to_container(base.sweep)["dir"]


def test_mask_omega_multirun_names_each_job_directory_after_its_preset(tmp_path):
    """A real Hydra multirun (basic sweeper and launcher) of the sweep file, a stand-in task function;
    two of the five omegas from the command line, as a user narrows a sweep."""
    jobs = _run_stand_in(tmp_path, CONF_DIR, "+sweep=mask_omega", "objective.omega=0.0,0.5")
    assert len(jobs) == 8
    names = [Path(job["dir"]).relative_to(tmp_path / "sweep") for job in jobs]
    assert all(len(name.parts) == 1 for name in names)  # no '/' from objective/mask in the name
    assert str(names[0]) == "0_mask=random,objective.omega=0.0,objective=spg"
    coupled = next(job for job, name in zip(jobs, names, strict=True) if str(name).startswith("4_mask=coupled,"))
    assert coupled["mask"]["kind"] == "random" and coupled["mask"]["coupled"] and coupled["omega"] == 0.0
    assert {(job["negative_surrogate"], job["steps"]) for job in jobs} == {("mix", 320)}


# ------------------------------------------------------------------------------------------ Optuna
def _optuna() -> dict:
    return yaml.safe_load(OPTUNA_FILE.read_text())


def test_optuna_file_is_a_seeded_maximising_search_over_existing_keys():
    spec = _optuna()
    assert OPTUNA_FILE.read_text().startswith("# @package _global_\n")
    assert {"override /hydra/sweeper": "optuna"} in spec["defaults"]
    sweeper = spec["hydra"]["sweeper"]
    assert spec["hydra"]["mode"] == "MULTIRUN"
    assert sweeper["direction"] == "maximize" and sweeper["n_jobs"] == 1 and sweeper["n_trials"] > 0
    assert isinstance(sweeper["sampler"]["seed"], int)
    searched = {}
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper["params"].items()]):
        if override.is_sweep_override():
            searched[override.key_or_group] = override.value()
    assert set(searched) == {"objective.omega", "objective.beta", "optim.lr"}
    assert (searched["objective.omega"].start, searched["objective.omega"].end) == (0.0, 1.0)
    assert "log" in searched["optim.lr"].tags
    # the rest of the file is plain config: it merges onto the spg config and passes validate()
    cfg, _ = _compose("objective=spg")
    rest = {k: v for k, v in spec.items() if k not in ("defaults", "hydra")}
    merged = OmegaConf.merge(cfg, rest)
    validate(merged)
    assert list(merged.eval.splits) == ["validation"]  # trials never look at the test split
    for key in searched:
        assert OmegaConf.select(merged, key) is not None, key


def test_hparams_search_is_an_optional_group_after_self():
    """`python -m dllm_rl hparams_search=optuna` needs the group in config.yaml's defaults, after
    _self_ so that the search file's train/eval values win over config.yaml's."""
    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    assert {"hparams_search": None} in defaults
    assert defaults.index({"hparams_search": None}) > defaults.index("_self_")


def test_optuna_search_composes_with_the_plugin():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg, hydra = _compose("hparams_search=optuna")
    validate(cfg)
    assert hydra.sweeper._target_.endswith("OptunaSweeper") and hydra.sweeper.sampler.seed == 0
    assert cfg.train.steps == 320 and list(cfg.eval.splits) == ["validation"]


def test_optuna_search_runs_trials_with_the_plugin(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    jobs = _run_stand_in(tmp_path, CONF_DIR, "hparams_search=optuna", "hydra.sweeper.n_trials=3")
    assert [Path(job["dir"]).name for job in jobs] == ["0", "1", "2"]
    for job in jobs:
        assert 0.0 <= job["omega"] <= 1.0 and 1.0 <= job["beta"] <= 3.0 and 1e-5 <= job["lr"] <= 1e-3
        assert job["negative_surrogate"] == "mix" and job["splits"] == ["validation"]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best = max(jobs, key=lambda job: -((job["omega"] - 0.6) ** 2))
    assert results["best_params"]["objective.omega"] == pytest.approx(best["omega"])
