"""Bad input named where it happens (docs/RELIABILITY.md, "Bad input"): reward values and plug-in
errors, data files, config keys outside the schemas, schema entries, counts, a missing extra."""

from __future__ import annotations

import copy
import logging
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from forked import run_module
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from test_config import _compose
from test_e2e import FAST, REPO, child_env

import dllm_rl.config
from dllm_rl.config import check_keys, missing_extra, validate
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.tasks import DataError, get_task

SMALL = {"train_size": 300, "validation_size": 32, "test_size": 32}
SOLUTION = "1234341221434321"
PUZZLE = "0204300201030301"
ROW = {"puzzle": PUZZLE, "solution": SOLUTION}

PLUGIN = """
import math

def nan_reward(completion, **_):
    return math.nan

def inf_reward(completion, **_):
    return -math.inf

def text_reward(completion, **_):
    return "high"

def none_reward(completion, **_):
    return None

def parts_reward(completion, **_):
    return {"fine": 1.0, "broken": math.nan}

def boom(completion, **_):
    return {}["no such key"]
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plugin")
    (directory / "faulty_rewards.py").write_text(textwrap.dedent(PLUGIN))
    return directory


@pytest.fixture
def plugin(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    return plugin_dir


# --- rewards -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "value"),
    [("nan_reward", "nan"), ("inf_reward", "-inf"), ("text_reward", "'high'"), ("none_reward", "None")],
)
def test_a_bad_reward_value_names_function_sample_and_value(tmp_path, plugin, function, value):
    task = get_task("sudoku", {**SMALL, "rewards": [f"faulty_rewards:{function}"]}, tmp_path)
    completions = [SOLUTION, "2" * 100]
    with pytest.raises(DllmRlError) as info:
        task.score(completions, [ROW, ROW], "round 3 rollout sample", first_index=8)
    message = str(info.value)
    assert f"'{function}' (faulty_rewards:{function})" in message
    assert f"returned {value} for round 3 rollout sample 8 ('{SOLUTION}')" in message
    assert "task.on_bad_reward=zero" in message and "\n" not in message


def test_a_bad_part_is_named_and_the_preview_clipped(tmp_path, plugin):
    task = get_task("sudoku", {**SMALL, "rewards": ["faulty_rewards:parts_reward"]}, tmp_path)
    with pytest.raises(DllmRlError, match=r"part 'broken' returned nan for evaluation example 0 \('2{60}\.\.\.'\)"):
        task.score(["2" * 100, SOLUTION], [ROW, ROW], "evaluation example")


def test_on_bad_reward_zero_counts_them_as_zero_and_warns(tmp_path, plugin, caplog):
    cfg = {**SMALL, "rewards": ["faulty_rewards:parts_reward", "sudoku_cells"], "on_bad_reward": "zero"}
    task = get_task("sudoku", cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dllm_rl"):
        parts = task.score([SOLUTION, PUZZLE], [ROW, ROW], "evaluation example")
    assert parts == [
        {"fine": 1.0, "broken": 0.0, "sudoku_cells": 1.0},
        {"fine": 1.0, "broken": 0.0, "sudoku_cells": 0.0},
    ]
    assert "'parts_reward' (faulty_rewards:parts_reward) part 'broken'" in caplog.text
    assert "for 2 of 2 examples, counted as 0" in caplog.text
    with pytest.raises(ConfigError, match="task.on_bad_reward='skip'"):
        get_task("sudoku", {**SMALL, "on_bad_reward": "skip"}, tmp_path)
    with pytest.raises(ConfigError, match="task.on_bad_reward='skip' must be error or zero"):
        validate(_compose("task.on_bad_reward=skip"))


def _run(plugin_dir: Path, root: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    args = [*FAST, "logging=none", f"cache_dir={root / 'cache'}", f"hydra.run.dir={root / name}", *overrides]
    return run_module("dllm_rl", *args, cwd=REPO, env=child_env(PYTHONPATH=str(plugin_dir)))


@pytest.fixture(scope="module")
def faulty_runs(plugin_dir, tmp_path_factory):
    """A NaN reward (met first at the step-0 evaluation) and a raising one (in the first rollout)."""
    root = tmp_path_factory.mktemp("faulty")
    nan = _run(plugin_dir, root, "nan", "task.rewards=[faulty_rewards:nan_reward]")
    boom = _run(plugin_dir, root, "boom", "task.rewards=[faulty_rewards:boom]", "eval.before_train=false")
    return root, nan, boom


@pytest.mark.slow
def test_a_nan_reward_stops_the_run_naming_it_not_the_loss(faulty_runs):
    _, nan, _ = faulty_runs
    assert nan.returncode != 0
    assert "Traceback" not in nan.stderr, nan.stderr[-2000:]
    assert "reward 'nan_reward' (faulty_rewards:nan_reward) returned nan for evaluation example 0" in nan.stderr
    assert "non-finite loss" not in nan.stdout + nan.stderr


@pytest.mark.slow
def test_a_plugin_exception_is_one_line_with_its_traceback_in_the_rank_log(faulty_runs):
    root, _, boom = faulty_runs
    assert boom.returncode != 0
    assert "Traceback" not in boom.stderr, boom.stderr[-2000:]
    assert "reward 'boom' failed on round 0 rollout sample 0" in boom.stderr
    assert "KeyError: 'no such key' (faulty_rewards:boom;" in boom.stderr
    rank_log = (root / "boom" / "logs" / "rank0.log").read_text()
    assert "Traceback" in rank_log and "faulty_rewards.py" in rank_log and 'return {}["no such key"]' in rank_log


# --- data files ----------------------------------------------------------------------------------------

GOOD = {"puzzle": PUZZLE, "solution": SOLUTION}
JSONL_BROKEN = f'{{"puzzle": "{PUZZLE}", "solution": "{SOLUTION}"}}\n{{"puzzle": "{PUZZLE}", "solution": \n'
CSV_EXTRA_FIELD = f"Puzzle,Solution\n{PUZZLE},{SOLUTION}\n\n{PUZZLE},{SOLUTION},7\n"
CSV_OPEN_QUOTE = f'Puzzle,Solution\n{PUZZLE},{SOLUTION}\n"{PUZZLE},{SOLUTION}\n'


@pytest.mark.parametrize("task", ["sudoku", "gsm8k", "countdown"])
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("broken.jsonl", JSONL_BROKEN, "broken.jsonl: line 2: not valid JSON"),
        ("broken.json", JSONL_BROKEN, "broken.json: line 2: not valid JSON"),
        ("array.json", '[{"puzzle": "1"},\n {"puzzle": }]', "array.json: line 2: not valid JSON"),
        ("empty.jsonl", "", "empty.jsonl is empty (task.train_file)"),
        ("blank.jsonl", "\n  \n", "blank.jsonl is empty (task.train_file)"),
        ("empty.csv", "", "empty.csv is empty (task.train_file)"),
        ("header.csv", "Puzzle,Solution\n", "header.csv: no rows after the header (task.train_file)"),
        ("extra.csv", CSV_EXTRA_FIELD, "extra.csv: row 2 (line 4): 3 fields, the header has 2"),
        ("quote.csv", CSV_OPEN_QUOTE, "quote.csv: row 2 (line 3): not valid CSV"),
    ],
)
def test_a_broken_data_file_names_file_and_line(tmp_path, task, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        get_task(task, {"train_file": str(path), "validation_size": 1}, tmp_path / "cache").dataset("train")
    assert str(path) in str(info.value) and message in str(info.value)
    assert "An error occurred while generating" not in str(info.value)


def test_a_test_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl: line 2: not UTF-8 text"):
        get_task("gsm8k", {"test_file": str(path)}, tmp_path / "cache").dataset("test")


# --- config keys, schema entries, counts, extras -----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+objective.bta=1", "objective.bta: not a config key (did you mean objective.beta?)"),
        ("+eval.num_exmples=3", "eval.num_exmples: not a config key (did you mean eval.num_examples?)"),
        ("+model.lora.rr=8", "model.lora.rr: not a config key (did you mean model.lora.r?)"),
        ("+task.x.y=1", "task.x: not a config key"),
        ("+zzz=1", "zzz: not a config key"),
    ],
)
def test_a_plus_added_key_outside_the_schemas_is_refused(override, message):
    with pytest.raises(ConfigError) as info:
        validate(_compose(override))
    assert str(info.value) == message


def test_legitimate_plus_overrides_still_compose():
    validate(_compose("+sweep=seeds"))
    # Free-form dicts (DeepSpeed's own keys, SLURM's extra parameters) take new keys.
    validate(_compose("+deepspeed.zero_optimization.reduce_bucket_size=1000", "+cluster.additional_parameters.x=1"))
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        from hydra import compose

        with pytest.raises(ConfigError, match="evaluate.chekpoint: not a config key"):
            check_keys(compose(config_name="evaluate", overrides=["+evaluate.chekpoint=x"]))


def test_schema_entries_are_neither_listed_nor_selectable():
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = [g for g in loader.list_groups("") if g != "hydra"]
        assert {"objective", "task", "model", "sampler", "cluster", "deepspeed", "logging"} <= set(groups)
        listed = {g: loader.get_group_options(g) for g in groups}
    assert not [(g, o) for g, options in listed.items() for o in options if o.startswith("base_")], listed
    for override in ("objective=base_spg", "task=base_sudoku", "sampler=base_low_confidence"):
        with pytest.raises(ConfigCompositionException, match=override.replace("=", "/")):
            _compose(override)
    # The schemas still type the groups: a misspelt key fails at composition.
    with pytest.raises(ConfigCompositionException):
        _compose("objective.bta=1")


@pytest.fixture(scope="module")
def composed():
    return _compose()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("eval.num_examples", "eval.num_examples=0 must be >= 1 (or null: the whole split)"),
        ("eval.batch_size", "eval.batch_size=0 must be >= 1"),
        ("rollout.micro_batch", "rollout.micro_batch=0 must be >= 1"),
        ("train.micro_batch_per_gpu", "train.micro_batch_per_gpu=0 must be >= 1"),
        ("rollout.prompts_per_step", "rollout.prompts_per_step=0 must be >= 1"),
        ("objective.mc_samples", "objective.mc_samples=0 must be >= 1"),
        ("warmstart.batch_size", "warmstart.batch_size=0 must be >= 1"),
        ("log_every", "log_every=0 must be >= 1"),
        ("task.test_size", "task.test_size=0 must be >= 1"),
        ("model.num_heads", "model.num_heads=0 must be >= 1"),
        ("checkpoint.keep_last", "checkpoint.keep_last must be >= 1"),
    ],
)
def test_counts_that_must_be_positive_are_one_line_naming_the_field(composed, key, message):
    cfg = copy.deepcopy(composed)
    OmegaConf.update(cfg, key, 0)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_zero_where_zero_means_something_is_accepted(composed):
    cfg = copy.deepcopy(composed)
    for key in ("train.steps", "eval.every_n_steps", "checkpoint.every_n_steps", "train.max_skipped_steps"):
        OmegaConf.update(cfg, key, 0)
    validate(cfg)


def test_a_missing_extra_names_the_pip_command(monkeypatch, capsys):
    real = dllm_rl.config.importlib.util.find_spec

    def without_optuna(name, *args):
        return None if name == "hydra_plugins.hydra_optuna_sweeper" else real(name, *args)

    monkeypatch.setattr(dllm_rl.config.importlib.util, "find_spec", without_optuna)
    expected = "hparams_search=optuna needs the hpo extra: pip install -e '.[hpo]'"
    assert missing_extra(["hparams_search=optuna", "optim.lr=1e-4"]) == expected
    assert missing_extra(["objective=spg"]) is None
    # The entry point answers before Hydra composes (which would say "Could not find 'hydra/sweeper/optuna'").
    monkeypatch.setattr(sys, "argv", ["dllm_rl", "hparams_search=optuna"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("dllm_rl", run_name="__main__")
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"
    monkeypatch.setattr(dllm_rl.config.importlib.util, "find_spec", lambda name, *args: object())
    assert missing_extra(["hparams_search=optuna"]) is None
