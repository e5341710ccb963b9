"""cluster=slurm for real: a one-node SLURM cluster on this machine (launch/slurm_local.sh), a sweep
of two jobs submitted through Hydra's submitit launcher (1 task and 2 gloo tasks), then the report;
and the by-hand batch script (launch/sbatch_example.sh). A second cluster of two nodes on the same
machine (two slurmd daemons, ``slurm_local.sh --nodes 2``) runs a 2-node job both ways.

The only tests that need SLURM. They install and start it (root on Debian/Ubuntu, as in CI) and
skip elsewhere; a second run finds the cluster up and only verifies it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forked import run_module
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_e2e import FAST, REPO, child_env

from dllm_rl.config import ClusterCfg

# The CPU test cluster: gloo ranks, no GPU requested, one core per task.
CPU_CLUSTER = [
    "cluster=slurm",
    "cluster.device=cpu",
    "cluster.backend=gloo",
    "cluster.gpus_per_node=0",
    "cluster.cpus_per_task=1",
    "cluster.partition=debug",
    "cluster.threads=1",
    # a hung job is killed by SLURM instead of holding the queue
    "cluster.time_min=5",
]
TINY = [
    *FAST,
    "train.steps=2",
    "eval.every_n_steps=0",
    "checkpoint.every_n_steps=0",
    "eval.num_examples=8",
    "task.validation_size=8",
    "task.test_size=8",
    "logging=none",
]
# Without accounting (sacct) submitit learns that a job ended only from its result file, so a job
# killed by SLURM would leave the submitting process waiting: bound it by more than the job limit.
SUBMIT_TIMEOUT_S = 2 * 5 * 60 + 120


def test_cluster_slurm_composes_a_typed_cluster_and_the_launcher_fields_from_it():
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = compose("config", [*CPU_CLUSTER, "cluster.nproc=2", "cluster.nodes=3"], return_hydra_config=True)
        with pytest.raises(Exception, match="nproc"):
            compose("config", ["cluster=slurm", "cluster.nproc=two"])
    assert OmegaConf.get_type(cfg.cluster) is ClusterCfg
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"  # submits without -m
    assert cfg.hydra.launcher._target_ == "hydra_plugins.dllm_rl_slurm.SlurmLauncher"
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (3, 2, 0)
    assert (launcher["partition"], launcher["timeout_min"], launcher["cpus_per_task"]) == ("debug", 5, 1)
    assert launcher["additional_parameters"] == {"requeue": True}
    assert launcher["max_num_timeout"] == cfg.cluster.max_requeues


def start_cluster(*args: str) -> str:
    """launch/slurm_local.sh with ``args``; the SLURM_CONF its last line names."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (launch/slurm_local.sh installs and starts daemons)")
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        pytest.skip("the SLURM test cluster needs Debian/Ubuntu (apt-get, dpkg) to install SLURM")
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm_local.sh"), *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    return proc.stdout.strip().splitlines()[-1].rsplit("SLURM_CONF=", 1)[1]


@pytest.fixture(scope="module")
def slurm_cluster():
    start_cluster()


@pytest.fixture(scope="module")
def two_node_cluster() -> str:
    """The second test cluster: two slurmd daemons on this machine (nodes dllm0, dllm1); its SLURM_CONF."""
    return start_cluster("--nodes", "2")


def _cancel_jobs(sweep: Path, env: dict[str, str] | None = None) -> None:
    """Cancel whatever this sweep left in the queue (its job ids name the .submitit folders)."""
    ids = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("*") if p.is_dir()}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60, env=env)


def sbatch_example(tmp_path: Path, env: dict[str, str], options: list[str], overrides: list[str]) -> Path:
    """launch/sbatch_example.sh submitted with sbatch ``options`` and the run's ``overrides``, waited for;
    the run directory it wrote (relative to the submission directory, ``tmp_path``)."""
    start = time.perf_counter()
    job_id = None
    try:
        proc = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--wait",
                "--time=5",
                "--gpus-per-node=0",
                "--cpus-per-task=1",
                *options,
                f"--output={tmp_path}/%x-%j.out",
                str(REPO / "launch" / "sbatch_example.sh"),
                *overrides,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBMIT_TIMEOUT_S,
        )
        job_id = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else None
    finally:
        if job_id:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=60, env=env)
    print(f"sbatch_example.sh {' '.join(options)}: {time.perf_counter() - start:.1f} s wall")
    log = "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("*.out"))
    assert proc.returncode == 0, proc.stderr[-2000:] + log
    return tmp_path / "outputs" / "dllm_rl" / job_id


def submit(sweep: Path, env: dict[str, str], overrides: list[str]) -> None:
    """``python -m dllm_rl <overrides>`` with cluster=slurm among them, into ``sweep``, waited for; whatever
    it leaves in the queue is cancelled."""
    start = time.perf_counter()
    try:
        proc = run_module(
            "dllm_rl", *overrides, f"hydra.sweep.dir={sweep}", cwd=REPO, env=env, timeout=SUBMIT_TIMEOUT_S
        )
    finally:
        _cancel_jobs(sweep, env)
    print(f"cluster=slurm submission: {time.perf_counter() - start:.1f} s wall")
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(sweep.glob(".submitit/*/*_log.*")))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: later jobs reuse the warm-started base of the first."""
    return tmp_path_factory.mktemp("slurm_cache")


@pytest.mark.slow
def test_sweep_runs_one_slurm_job_per_point_with_its_own_task_count(slurm_cluster, cache, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [*CPU_CLUSTER, *TINY, "cluster.nproc=1,2", f"cache_dir={cache}", "hydra.sweep.subdir=${hydra.job.num}"]
    submit(sweep, child_env(), ["-m", *overrides])

    # One SLURM job per point, with as many tasks as that point asks for (submitit: a log per task).
    task_logs = sorted(p.name for p in sweep.glob(".submitit/*/*_log.out"))
    assert len(task_logs) == 1 + 2, task_logs
    for num, world in ((0, 1), (1, 2)):
        run_dir = sweep / str(num)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["world_size"] == world and summary["steps"] == 2
        assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
        assert sorted(p.name for p in (run_dir / "logs").glob("rank*.log")) == [f"rank{r}.log" for r in range(world)]

    report = run_module("dllm_rl.experiments.report", str(sweep), cwd=REPO, env=child_env(), timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    runs_table = report.stdout.split("## Mean")[0]
    header = next(line for line in runs_table.splitlines() if line.startswith("| objective"))
    assert "cluster.nproc" in header, runs_table
    rows = [line.strip("| ").split(" | ") for line in runs_table.splitlines() if line.startswith("| spg")]
    assert sorted(row[-1] for row in rows) == ["0", "1"], runs_table


@pytest.mark.slow
def test_sbatch_example_runs_the_worker_on_every_task(slurm_cluster, cache, tmp_path):
    """launch/sbatch_example.sh with the test cluster's sbatch options: compose once with
    cluster.launcher=external, then srun one worker per task (ranks from SLURM)."""
    run_dir = sbatch_example(
        tmp_path,
        child_env(PYTHON=sys.executable, PYTHONPATH=str(REPO)),
        ["--ntasks-per-node=2", "--partition=debug"],
        [*CPU_CLUSTER[1:], *TINY, f"cache_dir={cache}"],
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DLLM_RL_SLURM_REQUEUE") != "1",
    reason="SLURM holds a requeued job ~2 minutes before it may start again; DLLM_RL_SLURM_REQUEUE=1 runs it",
)
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, cache, tmp_path):
    """submitit's signal (USR2) to a running 2-task job: checkpoint after the step, requeue through
    submitit, and the requeued job continues in the same run directory, each step logged once."""
    sweep = tmp_path / "sweep"
    steps = 30
    args = [*TINY, f"train.steps={steps}", "objective.inner_iterations=2", "checkpoint.every_n_steps=0"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dllm_rl",
            *CPU_CLUSTER,
            *args,
            "cluster.nproc=2",
            "cluster.time_min=10",
            f"cache_dir={cache}",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=0",
        ],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = sweep / "0"
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").is_file() or '"step": 5,' not in (run_dir / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the job never reached step 5"
            time.sleep(0.5)
        job_id = next((sweep / ".submitit").iterdir()).name.split("_")[0]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
        _, stderr = proc.communicate(timeout=SUBMIT_TIMEOUT_S + 300)
    finally:
        proc.kill()
        _cancel_jobs(sweep)
    assert proc.returncode == 0, stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "done" and "/checkpoints/step_" in status["resumed_from"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.out"))
    assert "Requeued job" in logs


# The two-node cluster's CPU settings: one task per node, partition `two`.
TWO_NODES = [*(o for o in CPU_CLUSTER if not o.startswith("cluster.partition")), "cluster.partition=two"]


def _run_steps(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "reward_mean", "reward_std")} for r in records if "loss" in r]


@pytest.mark.slow
def test_two_node_jobs_by_hand_and_through_submitit(two_node_cluster, cache, tmp_path):
    """A 2-node job (one task per node) twice on the two-node cluster: launch/sbatch_example.sh with
    --nodes=2, and cluster=slurm cluster.nodes=2 through Hydra's submitit launcher. Each rank runs on its
    own SLURM node with node rank = its node's index; both runs take the same steps."""
    env = child_env(PYTHON=sys.executable, PYTHONPATH=str(REPO), SLURM_CONF=two_node_cluster)
    by_hand = sbatch_example(
        tmp_path,
        env,
        ["--nodes=2", "--ntasks-per-node=1", "--partition=two"],
        [*TWO_NODES[1:], *TINY, f"cache_dir={cache}"],
    )

    sweep = tmp_path / "sweep"
    overrides = [*TWO_NODES, *TINY, "cluster.nodes=2", "cluster.nproc=1", f"cache_dir={cache}", "hydra.sweep.subdir=0"]
    submit(sweep, env, overrides)

    runs = [by_hand, sweep / "0"]
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 2
        assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
        ranks = summary["ranks"]
        assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 0, 0), (1, 1, 0)]
        assert [r["slurm_node"] for r in ranks] == ["dllm0", "dllm1"]
        assert all(r["rank"] == r["expected_rank"] for r in ranks)
    assert _run_steps(runs[0]) == _run_steps(runs[1])
