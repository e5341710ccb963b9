"""Where the training processes of one run come from (README, "Several processes ..."; docs/SLURM.md).

The Hydra process composes, validates and resolves the config once; ``start`` then runs the plain dict:

- inside a SLURM task started by hydra-submitit-launcher (cluster=slurm), or by ``srun`` from an
  sbatch script: the torch.distributed variables come from SLURM through submitit, and this process
  is one rank of the job (nothing is spawned: srun already started one task per GPU);
- under torchrun or the deepspeed launcher (RANK is set): this process is that rank;
- cluster.launcher=local: one process runs the worker itself; with cluster.nproc > 1 it starts the
  workers with torch's elastic launch API (spawned, c10d rendezvous on a free local port);
- cluster.launcher=external: nothing runs; the command that would start the workers is returned (on
  several nodes, the torchrun line each node runs).

Workers never parse argv or call Hydra; they receive the resolved dict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dllm_rl import rundir
from dllm_rl.config import world_size
from dllm_rl.errors import ConfigError, DllmRlError

log = logging.getLogger("dllm_rl")


def in_slurm_task() -> bool:
    """This process is a task of a SLURM job step (srun / submitit), not the batch script itself."""
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ


def externally_launched() -> bool:
    """torchrun / deepspeed launcher / srun started this process as one rank of the run."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ or in_slurm_task()


def global_rank() -> int:
    """This process's rank before torch.distributed exists (0 for a single process)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def export_slurm_environment(cfg: dict[str, Any]) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT of this SLURM task (submitit's helper)."""
    from submitit.helpers import TorchDistributedEnvironment

    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return  # already exported (e.g. a torchrun inside an allocation)
    # submitit's own jobs say which environment they run in; a plain srun of the worker does not.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    dist_env = TorchDistributedEnvironment()
    # submitit takes the first node's name as the rendezvous address; a cluster may name nodes apart from hosts.
    dist_env.master_addr = node_address(dist_env.master_addr)
    # Each GPU task keeps all of the node's GPUs visible and picks cuda:<local rank> (worker.run).
    env = dist_env.export(set_cuda_visible_devices=False)
    expected = world_size(cfg["cluster"])
    if env.world_size != expected:
        raise ConfigError(
            f"cluster.nodes*cluster.nproc={expected} but this SLURM job has {env.world_size} tasks "
            "(submit with --ntasks-per-node=cluster.nproc and --nodes=cluster.nodes)"
        )


def node_address(name: str) -> str:
    """A SLURM node's name when it resolves as a host name, else the address SLURM has for the node
    (its NodeAddr: slurm.conf may give nodes names of their own, as the two-node test cluster does)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except (socket.gaierror, UnicodeError):
        pass
    try:
        shown = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return name
    for field in shown.stdout.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return name


def worker_command(config_path: Path, nproc: int, nodes: int = 1) -> str:
    """The command that starts the run's workers by hand (cluster.launcher=external).

    On several nodes it is one line for every node: torchrun's c10d rendezvous at $MASTER_ADDR:$MASTER_PORT
    (an address of the first node, set in each node's shell) gives the nodes their ranks, and the
    rendezvous id is derived from the run directory, so all nodes of one run agree on it."""
    path = shlex.quote(str(config_path))
    if nodes > 1:
        run_id = hashlib.sha256(str(Path(config_path).absolute().parent).encode()).hexdigest()[:16]
        return (
            f"torchrun --nnodes {nodes} --nproc_per_node {nproc} --rdzv-backend c10d "
            f'--rdzv-endpoint "$MASTER_ADDR:${{MASTER_PORT:-29500}}" --rdzv-id {run_id} -m dllm_rl.worker {path}'
        )
    if nproc == 1:
        return f"python -m dllm_rl.worker {path}"
    return f"torchrun --standalone --nproc_per_node {nproc} -m dllm_rl.worker {path}"


def rank_layout(cluster: dict[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Where this process sits in cluster.nodes x cluster.nproc, from what its launcher exported.

    torchrun and torch elastic launch set GROUP_RANK (the node's rank), LOCAL_RANK and LOCAL_WORLD_SIZE,
    the deepspeed launcher CROSS_RANK and LOCAL_SIZE; inside a SLURM task the node is SLURM_NODEID
    (submitit's export adds the others). ``expected_rank`` is node_rank * cluster.nproc + local_rank, the
    block layout of torchrun and of SLURM's default distribution. A node that started another number of
    processes than cluster.nproc is a ConfigError: its ranks would be counted against the wrong node."""
    env = os.environ if env is None else env
    nproc = int(cluster["nproc"])

    def read(*keys: str) -> int | None:
        return next((int(env[k]) for k in keys if env.get(k, "") != ""), None)

    layout = {
        "rank": read("RANK", "SLURM_PROCID") or 0,
        "world_size": read("WORLD_SIZE", "SLURM_NTASKS") or 1,
        "node_rank": read("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID") or 0,
        "local_rank": read("LOCAL_RANK", "SLURM_LOCALID") or 0,
        "local_world_size": read("LOCAL_WORLD_SIZE", "LOCAL_SIZE") or nproc,
        "host": socket.gethostname(),
        "slurm_node": env.get("SLURMD_NODENAME"),
    }
    layout["expected_rank"] = layout["node_rank"] * nproc + layout["local_rank"]
    if layout["local_world_size"] != nproc:
        raise ConfigError(
            f"{layout['local_world_size']} processes were started on node {layout['node_rank']}, but "
            f"cluster.nproc={nproc} (start cluster.nproc per node, cluster.nodes nodes)"
        )
    return layout


def start(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Run the resolved config here, or in the processes it asks for; rank 0's summary (None elsewhere).

    The process of global rank 0 holds the run directory's lock meanwhile (dllm_rl/rundir.py): this
    process when it runs alone or spawns the workers, rank 0 of a torchrun or SLURM job otherwise."""
    with rundir.owner_lock(cfg["run_dir"], global_rank() == 0):
        return _start(cfg)


def _start(cfg: dict[str, Any]) -> dict[str, Any] | None:
    from dllm_rl.worker import finished_summary, run

    launcher = cfg["cluster"]["launcher"]
    done = finished_summary(cfg, Path(cfg["run_dir"]))
    if done is not None:  # a finished run directory (resume_mode=auto): nothing to start
        log.info("%s already finished (status.json: done); nothing to resume", cfg["run_dir"])
        return done
    if externally_launched():
        if in_slurm_task():
            export_slurm_environment(cfg)
        return run(cfg)
    if launcher == "slurm":
        raise ConfigError(
            "cluster.launcher=slurm outside a SLURM task: submit with cluster=slurm (Hydra's submitit "
            "launcher) or srun the worker from an sbatch script (launch/sbatch_example.sh)"
        )
    nproc = int(cfg["cluster"]["nproc"])
    if nproc == 1:
        return run(cfg)
    return _elastic(cfg, nproc)


def _elastic(cfg: dict[str, Any], nproc: int) -> dict[str, Any]:
    """nproc spawned workers on this machine; a worker's user-facing error comes back as one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    import dllm_rl.worker as worker
    from dllm_rl.worker import local_launch_config

    try:
        # worker.run by its module path, so that the spawned interpreters can import it.
        results = elastic_launch(local_launch_config(nproc), entrypoint=worker.run)(cfg)
    except (ChildFailedError, SignalException) as exc:
        # A signal to this process reaches the workers too (the elastic agent forwards it); they
        # checkpoint and stop, and their status file says so.
        status = _read_status(Path(cfg["run_dir"]))
        if status.get("user_error"):
            raise DllmRlError(status["message"]) from None
        if status.get("status") == "preempted":
            raise Preempted(status["message"], int(status.get("signal", 15))) from None
        raise RuntimeError(f"a training process failed: {status.get('error') or exc}") from exc
    return results[0]


def _read_status(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


class Preempted(Exception):
    """The run stopped on a stop signal (SIGTERM, SIGUSR1, SIGUSR2) after writing a checkpoint it will resume from."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def exit_preempted(exc: Preempted) -> None:
    """The process's end after a preemption checkpoint: one line and the signal's exit status."""
    from dllm_rl.console import say

    say(f"stopped: {exc}", logging.WARNING, sys.stderr)
    sys.exit(128 + exc.signum)
