"""The sanity task (dllm_rl/tasks/sanity.py): generator, reward, metrics and bad input, then every
objective variant through the real CLI from the cached base, which must reach the known optimum
(measurements: docs/RESULTS.md, section "Sanity task")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_e2e import run_cli

from dllm_rl.errors import ConfigError
from dllm_rl.tasks import get_task
from dllm_rl.tasks.rewards import REWARDS
from dllm_rl.tasks.sanity import RULES, SanityConfig, apply_rule, sanity_digits, sanity_metrics

# ------------------------------------------------------------------------------------------- the task


def _task(tmp_path: Path, **cfg):
    return get_task("sanity", cfg, tmp_path)


def test_rules_on_examples():
    assert apply_rule("4821", "succ", 10) == "5932"
    assert apply_rule("4821", "add_index", 10) == "5055"
    assert apply_rule("4821", "mirror", 10) == "5178"
    assert apply_rule("4821", "copy", 10) == "4821"
    assert apply_rule("0123", "succ", 4) == "1230"
    assert apply_rule("0123", "mirror", 4) == "3210"
    assert apply_rule("3333", "add_index", 4) == "0123"
    assert apply_rule("0123", "upper", 4) == "4567"  # outside the prompt alphabet: never an answer
    # Every rule but copy moves every digit, so a copying base scores 0 on succ and mirror (radix 4).
    assert all(apply_rule(d, "succ", 4) != d for d in "0123")


def test_splits_are_disjoint_sized_and_follow_the_rule(tmp_path):
    task = _task(tmp_path)
    splits = {s: task.dataset(s) for s in ("train", "validation", "test")}
    assert {s: len(ds) for s, ds in splits.items()} == {"train": 384, "validation": 64, "test": 64}
    prompts = {s: set(ds["prompt"]) for s, ds in splits.items()}
    assert all(len(prompts[s]) == len(splits[s]) for s in splits), "repeated prompts within a split"
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    for ds in splits.values():
        for row in ds:
            assert row["prompt"] == row["eval_prompt"] == row["digits"]
            assert len(row["digits"]) == 5 and set(row["digits"]) <= set("0123")
            assert row["answer"] == apply_rule(row["digits"], "succ", 4)
            assert task.reward(row["answer"], row) == {"correct_digits": 1.0}
            assert len(task.target(row)) == 5 and set(task.target(row)) <= set("0123")
    assert task.primary_metric == "acc" and set(task.alphabet) == set("0123456789")


def test_base_targets_copy_the_prompt_up_to_the_noise(tmp_path):
    rows = _task(tmp_path).dataset("train")
    same = sum(a == b for row in rows for a, b in zip(row["digits"], row["base_target"], strict=True))
    # warmstart_noise 0.6 replaces a digit by a uniform one (radix 4): P(copy) = 0.4 + 0.6 / 4 = 0.55
    assert 0.48 < same / (5 * len(rows)) < 0.62
    clean = _task(tmp_path, warmstart_noise=0.0).dataset("train")
    assert clean["base_target"] == clean["digits"]
    ruled = _task(tmp_path, warmstart_noise=0.0, warmstart_rule="succ").dataset("train")
    assert ruled["base_target"] == ruled["answer"]


def test_generation_is_seeded_and_test_split_is_stable(tmp_path):
    a, b = _task(tmp_path), _task(tmp_path)
    for split in ("train", "validation", "test"):
        assert a.dataset(split).to_list() == b.dataset(split).to_list()
    assert _task(tmp_path, seed=7).dataset("test")["prompt"] != a.dataset("test")["prompt"]
    # The test split has its own stream: a different training set size keeps it.
    assert _task(tmp_path, train_size=100).dataset("test")["prompt"] == a.dataset("test")["prompt"]
    ranged = _task(tmp_path, radix=10, length_min=3, length_max=6, rule="add_index", train_size=200)
    lengths = {len(p) for p in ranged.dataset("train")["prompt"]}
    assert lengths == {3, 4, 5, 6}


def test_reward_is_the_fraction_of_right_positions():
    row = {"digits": "01230", "answer": "12301"}
    assert sanity_digits("12301", **row) == 1.0
    assert sanity_digits("12300", **row) == pytest.approx(0.8)
    assert sanity_digits("01230", **row) == 0.0
    assert sanity_digits("123", **row) == pytest.approx(0.6)  # short: missing positions are wrong
    assert sanity_digits("1230000", **row) == pytest.approx(4 / 7)  # long: extra characters cost
    assert sanity_digits("", **row) == 0.0
    assert sanity_digits(None, **row) == 0.0  # type: ignore[arg-type]
    assert REWARDS["sanity_digits"].low == 0.0 and REWARDS["sanity_digits"].high == 1.0


def test_metrics_are_the_mean_reward_and_exact_matches():
    answers = ["12301", "00000"]
    metrics = sanity_metrics(["12301", "00011"], answers)
    assert metrics == {"acc": pytest.approx(0.8), "exact": 0.5}
    rewards = [sanity_digits(t, answer=a) for t, a in zip(["12301", "00011"], answers, strict=True)]
    assert metrics["acc"] == pytest.approx(sum(rewards) / 2)
    with pytest.raises(ValueError, match="completions"):
        sanity_metrics(["1"], answers)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"radix": 11}, "task.radix"),
        ({"radix": 1}, "task.radix"),
        ({"length_min": 6, "length_max": 5}, "task.length_min"),
        ({"length_max": 99}, "task.length_min"),
        ({"rule": "double"}, "task.rule"),
        ({"warmstart_rule": "double"}, "task.warmstart_rule"),
        ({"warmstart_noise": 1.5}, "task.warmstart_noise"),
        ({"warmstart_rule": "upper", "radix": 6}, "task.radix"),
        ({"train_size": 5000}, "distinct prompts"),
        ({"test_size": 0}, "task.seed"),
        ({"prompt_style": "chat"}, "task.prompt_style"),
    ],
)
def test_bad_config_is_one_clear_error(cfg, field, tmp_path):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _task(tmp_path, **cfg)


def test_bad_prompts_are_rejected():
    with pytest.raises(ValueError, match="digits 0..3"):
        apply_rule("0145", "succ", 4)
    with pytest.raises(ValueError, match="unknown rule"):
        apply_rule("01", "nope", 4)
    with pytest.raises(ValueError, match="radix"):
        apply_rule("01", "succ", 12)
    with pytest.raises(ValueError, match="radix"):
        apply_rule("01", "upper", 6)
    assert set(RULES) == {"copy", "succ", "add_index", "mirror", "upper"}
    config = SanityConfig.from_cfg({"radix": "3", "length_min": 7, "length_max": "7", "warmstart_noise": "0.5"})
    assert (config.radix, config.length_max, config.warmstart_noise) == (3, 7, 0.5)


def test_task_composes_and_validates():
    from omegaconf import OmegaConf

    from dllm_rl.config import validate
    from tests.test_config import _compose

    cfg = _compose("task=sanity")
    assert cfg.task.name == "sanity" and cfg.sampler.gen_length == cfg.task.completion_length == 5
    assert cfg.sampler.steps == 5 and cfg.warmstart.steps == 300
    validate(cfg)
    OmegaConf.to_object(cfg)


# ------------------------------------------------------------------- every objective reaches the optimum

# The variants of docs/RESULTS.md "Sanity task": objective name -> extra overrides.
VARIANTS = {
    "spg": [],
    "spg_eubo": ["objective.negative_surrogate=eubo"],
    "elbo": [],
    "gdsd": [],
    "dmpo": [],
    "diffu_grpo": [],
    "wd1": [],
    # the worked example of docs/ARCHITECTURE.md, "Adding an objective"
    "rloo_elbo": [],
}
# The task's RL settings (docs/RESULTS.md "Sanity task"): every objective with its own defaults; the
# learning rate is the task's testbed preset (conf/testbed/tiny_sanity.yaml), repeated here so that
# the test keeps measuring the documented setting.
SANITY_RL = ["task=sanity", "optim.lr=3e-4", "logging=none"]
# Seed 0 after 10 rounds measured 0.93 (gdsd) to 1.00 (dmpo) greedy test accuracy (docs/RESULTS.md):
# 0.85 leaves a margin for other platforms. (Seeds 1 and 2 of the ELBO-based objectives sit on a
# plateau for a few rounds first and need up to ~20 rounds: docs/RESULTS.md.)
ROUNDS = 10
THRESHOLD = 0.85
# Only the base and the final test evaluations, no mid-run checkpoint.
FAST_EVAL = ["eval.splits=[test]", "eval.every_n_steps=0", "checkpoint.every_n_steps=0", "seed=0"]


@pytest.fixture(scope="module")
def sanity_runs(tmp_path_factory):
    """Every variant from one cached base: one Hydra multirun over the objectives and one run of
    SPG with the EUBO, so that the eight runs pay for the interpreter start twice, not eight times."""
    root = tmp_path_factory.mktemp("sanity")
    common = [*SANITY_RL, *FAST_EVAL, f"train.rounds={ROUNDS}", f"cache_dir={root / 'cache'}"]
    objectives = [name for name, extra in VARIANTS.items() if not extra]
    multi = run_cli("-m", *common, f"objective={','.join(objectives)}", f"hydra.sweep.dir={root / 'multi'}")
    assert multi.returncode == 0, multi.stderr[-3000:]
    eubo = run_cli(*common, "objective=spg", *VARIANTS["spg_eubo"], f"hydra.run.dir={root / 'spg_eubo'}")
    assert eubo.returncode == 0, eubo.stderr[-3000:]
    runs = {"spg_eubo": json.loads((root / "spg_eubo" / "summary.json").read_text())}
    for path in (root / "multi").glob("*/summary.json"):
        summary = json.loads(path.read_text())
        runs[summary["objective"]] = summary
    return runs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_objective_reaches_the_optimum_from_the_base(variant, sanity_runs):
    summary = sanity_runs[variant]
    assert summary["primary_metric"] == "acc"
    # The base writes five digits (the format) but copies the prompt: greedy reward near 0.
    assert summary["base"]["reward_mean"] <= 0.3 and summary["base_metric"] <= 0.3
    assert summary["final"]["reward_mean"] >= THRESHOLD, summary["final"]
    assert summary["final"]["acc"] == pytest.approx(summary["final"]["reward_mean"])
