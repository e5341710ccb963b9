"""Several processes and interrupted runs, through the real entry points (Hydra, torch elastic launch,
DeepSpeed over gloo, torchrun, real signals):

- 2 processes at ZeRO stages 2 and 3 take the same RL steps as 1 process with the same global batch;
- a run stopped by SIGTERM midway and resumed ends with the parameters and metrics of an
  uninterrupted run; so does a run killed outright after a checkpoint inside a rollout round;
- a damaged newest checkpoint is detected and the previous one resumed from, with a warning;
- cluster.launcher=external prints the torchrun command, and torchrun runs the written config;
  a finished run directory is not trained again;
- two nodes for real: two torchrun agents (one process each, c10d rendezvous) take the same steps as
  one process, and every rank knows its node and local rank.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from forked import run_module
from safetensors.torch import load_file

from tests.test_e2e import REPO, child_env, run_cli

pytestmark = pytest.mark.slow

SMALL = [
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.micro_batch=8",
    "eval.num_examples=16",
    "warmstart.steps=10",
    "task.train_size=500",
    "task.validation_size=16",
    "task.test_size=16",
    "cluster.threads=1",
    "logging=none",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scale") / "cache"


def cli(cache: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = run_cli(*SMALL, f"cache_dir={cache}", f"hydra.run.dir={run_dir}", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def steps(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def evals(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval/cell_acc" in r or "val/cell_acc" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "final" / "hf" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0.0, atol=atol, msg=name)


# Two optimizer steps with gradient accumulation: 16 completions per step, 4 per micro-batch, so
# GAS 4 on one process and GAS 2 on each of two. Rollouts are split by prompt groups.
TWO_STEPS = ["objective.inner_iterations=1", "train.steps=2", "train.micro_batch_per_gpu=4", "eval.every_n_steps=0"]


@pytest.fixture(scope="module")
def one_process(cache, tmp_path_factory) -> Path:
    """The reference: one process, ZeRO-2 (with one process every stage computes the same update)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    cli(cache, run_dir, *TWO_STEPS, "deepspeed=zero2")
    return run_dir


@pytest.mark.parametrize("stage, launch", [("zero2", "torchrun"), ("zero3", "elastic")])
def test_two_processes_take_the_same_steps_as_one(cache, tmp_path, one_process, stage, launch):
    """2 processes started by torchrun from the command cluster.launcher=external prints (ZeRO-2), or
    by the Hydra process itself through torch elastic launch (ZeRO-3)."""
    run_dir = tmp_path / "two"
    args = [*TWO_STEPS, f"deepspeed={stage}", "cluster.nproc=2"]
    if launch == "torchrun":
        printed = cli(cache, run_dir, *args, "cluster.launcher=external").stdout.strip().splitlines()[-1]
        assert printed == f"torchrun --standalone --nproc_per_node 2 -m dllm_rl.worker {run_dir / 'config.yaml'}"
        assert not (run_dir / "metrics.jsonl").exists()  # nothing trained yet
        out = run_ok(str(Path(sys.executable).with_name("torchrun")), *printed.split()[1:]).stdout
    else:
        out = cli(cache, run_dir, *args).stdout
    one_steps, two_steps = steps(one_process), steps(run_dir)
    assert [r["step"] for r in two_steps] == [1, 2]
    for a, b in zip(one_steps, two_steps, strict=True):
        # The same rollouts (same rewards), the same loss and gradient norm over the global batch.
        assert b["reward_mean"] == a["reward_mean"] and b["reward_std"] == a["reward_std"]
        # The loss is a sum of positive- and negative-advantage terms of about 1e-2 that nearly cancel
        # (|loss| ~ 3e-3): float32 rounding of the terms (micro-batches batched differently on two
        # ranks) is a few 1e-9 in absolute terms, which is above 1e-6 of the net value.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=3e-8)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert_same_weights(weights(one_process), weights(run_dir), atol=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["final_metric"] == json.loads((one_process / "summary.json").read_text())["final_metric"]
    # Both ranks logged to their own file; only rank 0 printed the result.
    assert (run_dir / "logs" / "rank1.log").stat().st_size > 0
    printed_lines = [line for line in out.splitlines() if line.startswith(("{", "spg on sudoku"))]
    assert len(printed_lines) == 1, out
    if launch == "torchrun":
        # Run again, a finished run directory is not trained again: the summary comes back as it was.
        before = (run_dir / "metrics.jsonl").read_text()
        again = resume(run_dir)
        assert json.loads(again.stdout.strip().splitlines()[-1])["final_metric"] == summary["final_metric"]
        assert (run_dir / "metrics.jsonl").read_text() == before


# Two optimizer steps of 16 completions in micro-batches of 8: one process accumulates two micro-batches
# (GAS 2), two processes take one each (GAS 1), so the reduction adds the same two halves of the gradient
# and the runs agree bit for bit.
WHOLE_SHARES = [
    "objective.inner_iterations=1",
    "train.steps=2",
    "train.micro_batch_per_gpu=8",
    "eval.every_n_steps=0",
    "deepspeed=zero2",
]


def test_two_nodes_take_the_same_steps_as_one_process(cache, tmp_path):
    """Two torchrun agents, one per "node" (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1),
    each running the line cluster.launcher=external prints for cluster.nodes=2: python -m dllm_rl.worker
    on the written config, as launch/sbatch_example.sh does under srun. The rendezvous hands out the node
    ranks. The run equals one process with the same global batch bit for bit (weights, rewards, losses),
    and every rank records its place: global rank = node rank * nproc + local rank."""
    reference, run_dir = tmp_path / "one", tmp_path / "two_nodes"
    cli(cache, reference, *WHOLE_SHARES)
    args = [*WHOLE_SHARES, "cluster.nodes=2", "cluster.nproc=1", "cluster.launcher=external"]
    printed = cli(cache, run_dir, *args).stdout.strip().splitlines()[-1]
    assert printed.startswith("torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d ")
    assert printed.endswith(f"-m dllm_rl.worker {run_dir / 'config.yaml'}")
    # The same line on both nodes; each node's shell supplies the first node's address.
    command = shlex.quote(str(Path(sys.executable).with_name("torchrun"))) + printed.removeprefix("torchrun")
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    agents = [
        subprocess.Popen(
            ["bash", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        results = [agent.communicate(timeout=600) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (_, err) in zip(agents, results, strict=True):
        assert agent.returncode == 0, err[-3000:]

    one_steps, two_steps = steps(reference), steps(run_dir)
    assert [r["step"] for r in two_steps] == [1, 2]
    for a, b in zip(one_steps, two_steps, strict=True):
        for key in ("reward_mean", "reward_std", "loss"):
            assert b[key] == a[key], key
        # the norm's partial sums are added per rank, then across ranks: the last bits may differ
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
    assert_same_weights(weights(reference), weights(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["final_metric"] == json.loads((reference / "summary.json").read_text())["final_metric"]
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and sorted(r["node_rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["rank"] == r["expected_rank"] == r["node_rank"] * 1 + r["local_rank"]
        assert (r["local_rank"], r["local_world_size"], r["world_size"]) == (0, 1, 2)
    # Only the agent of rank 0 printed the result line.
    assert sum(out.strip().startswith("{") for out, _ in results) == 1


def test_rank_layout_is_node_major():
    """nodes x nproc = 2 x 2 as torchrun and as SLURM export it; a node with another process count is refused."""
    from dllm_rl.distributed import rank_layout
    from dllm_rl.errors import ConfigError

    for node in (0, 1):
        for local in (0, 1):
            rank = node * 2 + local
            torchrun = {"RANK": rank, "WORLD_SIZE": 4, "GROUP_RANK": node, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": 2}
            slurm = {"SLURM_PROCID": rank, "SLURM_NTASKS": 4, "SLURM_NODEID": node, "SLURM_LOCALID": local}
            for env in (torchrun, slurm):
                layout = rank_layout(2, {k: str(v) for k, v in env.items()})
                assert (layout["rank"], layout["node_rank"], layout["local_rank"]) == (rank, node, local)
                assert layout["expected_rank"] == rank and layout["world_size"] == 4
    with pytest.raises(ConfigError, match="3 processes were started on node 1, but cluster.nproc=2"):
        rank_layout(2, {"RANK": "5", "GROUP_RANK": "1", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RESUME = [
    # two optimizer steps per rollout round, so a stop can fall inside a round
    "objective.inner_iterations=2",
    "train.steps=8",
    "train.micro_batch_per_gpu=8",
    "eval.every_n_steps=4",
    "objective.loss_forward_dropout=true",
]


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    cli(cache, run_dir, *RESUME)
    return run_dir


def start(cache: Path, run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dllm_rl", *SMALL, *RESUME, f"cache_dir={cache}", f"hydra.run.dir={run_dir}", *args],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(r["step"] >= step for r in steps(run_dir)):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} never logged")


def run_ok(*command: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def resume(run_dir: Path) -> subprocess.CompletedProcess:
    """The documented way back: the worker entry on the run's own resolved config."""
    proc = run_module("dllm_rl.worker", str(run_dir / "config.yaml"), cwd=REPO, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert_same_weights(weights(run_dir), weights(reference))
    assert steps(run_dir) and [
        {k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in steps(run_dir)
    ] == [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in steps(reference)]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]  # noqa: E731
    assert strip(evals(run_dir)) == strip(evals(reference))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    for key in ("final_metric", "base_metric", "best_step", "best_test_metric", "steps"):
        assert a[key] == b[key], key


def test_sigterm_midway_then_resume_equals_an_uninterrupted_run(cache, tmp_path, uninterrupted):
    run_dir = tmp_path / "stopped"
    proc = start(cache, run_dir)
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    # It finished the step it was in, checkpointed, and said how to continue.
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted"
    stopped_at = max(r["step"] for r in steps(run_dir))
    assert 3 <= stopped_at < 8
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at}"
    assert "dllm_rl.worker" in stderr and str(run_dir / "config.yaml") in stderr
    assert not (run_dir / "summary.json").exists()

    resume(run_dir)
    assert json.loads((run_dir / "status.json").read_text())["resumed_from"].endswith(latest)
    assert_same_run(run_dir, uninterrupted)


def test_kill_then_resume_skips_a_damaged_checkpoint_and_continues_inside_a_round(cache, tmp_path, uninterrupted):
    # Checkpoints every 3 steps: step_3 falls inside a rollout round (2 steps each) and must carry the
    # round's rollouts and prepare() outputs; step_6 is then damaged, so the resumed run has to detect
    # it and go back to step_3. SIGKILL leaves no chance to save anything more.
    run_dir = tmp_path / "killed"
    proc = start(cache, run_dir, "checkpoint.every_n_steps=3", "checkpoint.keep_last=5")
    wait_for_step(proc, run_dir, 7)
    proc.kill()
    proc.communicate()
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_6"
    assert (ckpt / "step_3" / "rank0_state.pt").is_file()
    # A truncated shard in the newest checkpoint, and a half-written one that never got renamed.
    shard = next((ckpt / "step_6").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    shutil.copytree(ckpt / "step_6", ckpt / ".staging-step_9")

    resume(run_dir)
    assert json.loads((run_dir / "status.json").read_text())["resumed_from"].endswith("step_3")
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"checkpoint {ckpt / 'step_6'} cannot be resumed from" in log and "optim_states.pt has 100 bytes" in log
    assert_same_run(run_dir, uninterrupted)


def test_bad_process_layout_is_one_clear_error():
    from hydra import compose, initialize_config_module

    from dllm_rl.config import validate
    from dllm_rl.errors import ConfigError

    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        for overrides, message in (
            (["cluster.nodes=2"], "cluster.nodes=2 needs cluster=slurm"),
            (
                ["cluster.nproc=3", "rollout.prompts_per_step=16"],
                "rollout.prompts_per_step=16 must be divisible by the number of processes (cluster.nproc=3",
            ),
            (
                ["cluster.nproc=2", "rollout.prompts_per_step=16"],
                "must be divisible by processes*train.micro_batch_per_gpu=2*128 (cluster.nproc=2)",
            ),
            (["cluster.launcher=mpi"], "cluster.launcher='mpi' must be one of local, slurm, external"),
            (["checkpoint.resume_mode=path"], "checkpoint.resume_mode=path needs an existing checkpoint directory"),
        ):
            with pytest.raises(ConfigError, match=re.escape(message)):
                validate(compose("config", overrides))
