"""The main job end to end through the real entry point (Hydra, DeepSpeed, datasets, transformers),
shrunk to seconds, and the one-line errors a user gets for bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from forked import run_module

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds on 2 cores, big enough to exercise gradient accumulation (GAS 2),
# evaluation during training and a mid-run checkpoint.
FAST = [
    # one optimizer step per rollout round, so that step counts below are also round counts
    "objective.inner_iterations=1",
    "train.steps=4",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.micro_batch=8",
    "train.micro_batch_per_gpu=8",
    "eval.num_examples=32",
    "eval.every_n_steps=2",
    "checkpoint.every_n_steps=2",
    "warmstart.steps=10",
    "task.train_size=500",
    "task.validation_size=32",
    "task.test_size=32",
]


def child_env(**extra: str) -> dict[str, str]:
    # The in-process DeepSpeed test sets the torch.distributed variables of this process; a child
    # must pick its own rendezvous port.
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """``python -m dllm_rl <args>`` as its own process, forked from a preloaded server (tests/forked.py;
    ``fresh=True``: a new interpreter)."""
    return run_module("dllm_rl", *args, env=child_env(), cwd=cwd or REPO, fresh=fresh)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    run_dir = root / "run"
    proc = run_cli(
        *FAST, "eval.marginals=true", f"cache_dir={root / 'cache'}", f"hydra.run.dir={run_dir}", "logging=none"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run_dir, proc


def test_eval_marginals_are_logged_with_every_evaluation(finished_run):
    """eval.marginals=true: each evaluation also logs how sure the model is of the answers with the
    completion masked, the same statistics python -m dllm_rl.evaluate evaluate.marginals=true writes."""
    _, run_dir, _ = finished_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in rows if "eval/cell_acc" in r]
    assert [r["step"] for r in tests] == [0, 2, 4]
    for row in tests:
        assert 0.0 <= row["eval/marginal_argmax_acc"] <= 1.0 and 0.0 < row["eval/marginal_mean_p"] < 1.0
        assert row["eval/marginal_p_below_0.05"] + row["eval/marginal_p_above_0.8"] <= 1.0
    assert all("val/marginal_mean_p" in r for r in rows if "val/cell_acc" in r)


def test_run_writes_summary_metrics_and_config(finished_run):
    _, run_dir, proc = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["primary_metric"] == "cell_acc"
    assert 0.0 <= summary["base_metric"] <= 1.0 and 0.0 <= summary["final_metric"] <= 1.0
    assert summary["base"]["cell_acc"] == summary["base_metric"]
    assert summary["wall_seconds"] > 0 and summary["steps"] == 4
    # Validation (selection) and test (reported) before RL, every 2 steps and at the end.
    assert [(e["step"], e["split"]) for e in summary["evals"]] == [
        (step, split) for step in (0, 2, 4) for split in ("validation", "test")
    ]
    # checkpoints/best holds the weights of the best validation score; its test score is reported.
    best = summary["best"]
    by_step = {(e["step"], e["split"]): e for e in summary["evals"]}
    assert best["validation"]["cell_acc"] == max(by_step[(s, "validation")]["cell_acc"] for s in (0, 2, 4))
    assert best["test"]["cell_acc"] == by_step[(best["step"], "test")]["cell_acc"] == summary["best_test_metric"]
    if best["step"] > 0:
        assert (Path(best["export"]) / "config.json").is_file()
    assert Path(summary["checkpoint"]).is_dir()
    assert summary["base_model"]["cached"] is False
    # The one summary line: base -> final, wall time, run directory.
    last = proc.stdout.strip().splitlines()[-1]
    assert "cell_acc" in last and "->" in last and "wall" in last and str(run_dir) in last
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"


def test_every_step_is_logged_with_finite_loss(finished_run):
    _, run_dir, _ = finished_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in (
            "reward_mean",
            "reward_std",
            "loss",
            "grad_norm",
            "step_seconds",
            "gen_tokens_per_s",
            "lr",
        ):
            assert math.isfinite(r[key]), (key, r)
        assert 0.0 <= r["reward_mean"] <= 1.0
    evals = [r for r in records if "eval/cell_acc" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert [r["step"] for r in records if "val/cell_acc" in r] == [0, 2, 4]
    assert len((run_dir / "eval" / "validation_step_4.jsonl").read_text().splitlines()) == 32
    assert len((run_dir / "eval" / "step_4.jsonl").read_text().splitlines()) == 32


def test_checkpoints_are_complete_and_pruned(finished_run):
    _, run_dir, _ = finished_run
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "final"
    assert {p.name for p in ckpt.iterdir() if p.is_dir()} - {"best"} == {"final", "step_2"}
    assert not any(p.name.startswith(".staging") for p in ckpt.iterdir())
    assert (ckpt / "final" / "hf" / "config.json").is_file()


def test_checkpoint_reloads_into_deepspeed_and_from_pretrained(finished_run):
    """The DeepSpeed checkpoint and its save_pretrained export hold the same trained weights,
    which differ from the warm-started base the run began from."""
    import deepspeed

    from dllm_rl.distributed import init_distributed
    from dllm_rl.models.policy import load_pretrained

    root, run_dir, _ = finished_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    exported = load_pretrained(run_dir / "checkpoints" / "final" / "hf")
    base = load_pretrained(summary["base_model"]["source"])

    init_distributed("gloo")
    from dllm_rl.build import deepspeed_config
    from dllm_rl.config import run_config

    engine, *_ = deepspeed.initialize(
        model=base.model, model_parameters=list(base.model.parameters()), config=deepspeed_config(run_config(cfg))
    )
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    path, client_state = engine.load_checkpoint(str(run_dir / "checkpoints"), tag="final")
    assert path is not None
    assert client_state["global_step"] == 4
    assert client_state["prompt_stream"]["position"] == 4 * 4  # 4 rounds of 4 prompts
    loaded = engine.module.state_dict()
    changed = any(not torch.equal(before[k], loaded[k]) for k in before)
    assert changed, "RL steps left every weight unchanged"
    for k, v in exported.model.state_dict().items():
        torch.testing.assert_close(loaded[k], v)


def test_second_run_reuses_the_cached_base(finished_run):
    root, _, _ = finished_run
    run_dir = root / "again"
    proc = run_cli(
        *FAST,
        "train.steps=0",
        "eval.num_examples=8",
        f"cache_dir={root / 'cache'}",
        f"hydra.run.dir={run_dir}",
        "logging=none",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["base_model"]["cached"] is True
    assert "using the cached warm-started base" in proc.stdout + proc.stderr


def test_wandb_offline_run_is_written(tmp_path):
    proc = run_cli(
        *FAST,
        "train.steps=1",
        "eval.every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "eval.num_examples=8",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "logging=wandb",
        "logging.wandb_mode=offline",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline wandb run directory"


# ----------------------------------------------------------------------------- bad input


def _one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


def test_unknown_objective_task_and_model_names(tmp_path):
    proc = run_cli("objective=nope", f"hydra.run.dir={tmp_path}")
    _one_clear_line(proc, "objective/nope")
    # The other groups fail in the same composition step, checked in this process.
    from hydra.errors import ConfigCompositionException

    from tests.test_config import _compose

    for group in ("task", "model", "sampler"):
        with pytest.raises(ConfigCompositionException, match=f"{group}/nope"):
            _compose(f"{group}=nope")


def test_model_path_that_does_not_exist(tmp_path):
    proc = run_cli(f"model.path={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'run'}", "logging=none")
    _one_clear_line(proc, "model.path=", "missing")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_cli(f"output_dir={blocker / 'out'}")
    _one_clear_line(proc, "output_dir=", "not writable")


def test_malformed_data_row(tmp_path):
    bad = tmp_path / "train.csv"
    good = "1234341221434321"
    bad.write_text(f"Puzzle,Solution\n0234341221434321,{good}\n0034341221434321,{good}\n12x4,{good}\n")
    proc = run_cli(
        *FAST,
        f"task.train_file={bad}",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "logging=none",
    )
    _one_clear_line(proc, str(bad), "row 3")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_worker_entry_runs_a_resolved_config(finished_run, tmp_path):
    """launch/worker.sh: a resolved config file runs without Hydra, into the run_dir it names."""
    _, run_dir, _ = finished_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg.update(run_dir=str(tmp_path / "rerun"))
    cfg["train"]["steps"] = 2
    (tmp_path / "rerun").mkdir()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "worker.sh"), str(config_file)],
        env=child_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "rerun" / "summary.json").read_text())
    assert summary["steps"] == 2 and json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"] == str(
        tmp_path / "rerun"
    )


@pytest.mark.parametrize("objective", ["spg", "elbo", "dmpo", "gdsd", "diffu_grpo", "wd1"])
def test_every_objective_trains_the_tiny_model_without_non_finite_steps(objective, finished_run):
    root, _, _ = finished_run  # reuses its cached warm-started base
    run_dir = root / f"obj-{objective}"
    # Two rollout rounds of the objective's own inner iterations, with every default knob of its preset.
    mu = {"spg": 4, "elbo": 4}.get(objective, 8)
    # The fast samplers ride along: DMPO's rollouts use the prefix cache (its reference rollouts' setting),
    # GDSD's threshold decoding with the dual cache and a per-step cap.
    samplers = {
        "dmpo": ["sampler.cache=prefix"],
        "gdsd": ["sampler=threshold", "sampler.cache=dual", "sampler.max_tokens_per_step=3"],
    }.get(objective, [])
    proc = run_cli(
        *[a for a in FAST if not a.startswith(("objective.", "train.steps", "eval.every", "checkpoint.every"))],
        f"objective={objective}",
        *samplers,
        f"train.steps={2 * mu}",
        "eval.every_n_steps=0",
        f"cache_dir={root / 'cache'}",
        f"hydra.run.dir={run_dir}",
        "logging=none",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 * mu
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert r["skipped"] == 0 and r["nonfinite_seq_frac"] == 0.0
    if objective == "spg":  # the sandwich per step, over the negative-advantage samples (objectives/spg.py)
        logged = [r for r in steps if "eubo_below_elbo_frac" in r]
        assert logged and all(0.0 <= r["eubo_below_elbo_frac"] <= 1.0 for r in logged), steps
        assert all(math.isfinite(r["eubo_elbo_gap_per_token"]) for r in logged)
        assert not any(key.endswith(":weight") for r in steps for key in r)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objective"] == objective and summary["steps"] == 2 * mu
    if objective == "gdsd":  # adaptive decoding logs how much each step committed, within the cap
        firsts = [r for r in steps if r["inner_step"] == 0]
        assert all(1 <= r["rollout_tokens_per_step_mean"] <= r["rollout_tokens_per_step_max"] <= 3 for r in firsts)
    else:
        assert "rollout_tokens_per_step_mean" not in steps[0]
