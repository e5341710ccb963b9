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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dllm_rl import rundir
from dllm_rl.config import ClusterCfg, RunConfig, run_config, world_size
from dllm_rl.distributed import externally_launched, global_rank, in_slurm_task, local_launch_config
from dllm_rl.errors import ConfigError, DllmRlError, Preempted

log = logging.getLogger("dllm_rl")


def export_slurm_environment(cluster: ClusterCfg) -> None:
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
    expected = world_size(cluster)
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


def start(cfg: dict[str, Any], run: Callable[[Any], dict[str, Any]]) -> dict[str, Any] | None:
    """Run the resolved config here, or in the processes it asks for; rank 0's summary (None elsewhere).

    ``run`` is the worker's entry, ``dllm_rl.worker.run``, called here with the config typed and in spawned
    workers with the plain dict. The caller passes it, so that the launcher imports no training code (and
    the worker's command line can use the launcher).

    The process of global rank 0 holds the run directory's lock meanwhile (dllm_rl/rundir.py): this
    process when it runs alone or spawns the workers, rank 0 of a torchrun or SLURM job otherwise."""
    typed = run_config(cfg)  # what this process and ``run`` read; the plain dict is what spawned workers get
    with rundir.owner_lock(typed.run_dir, global_rank() == 0):
        return _start(cfg, typed, run)


def _start(cfg: dict[str, Any], typed: RunConfig, run: Callable[[Any], dict[str, Any]]) -> dict[str, Any] | None:
    done = rundir.finished_summary(typed.checkpoint.resume_mode, Path(typed.run_dir))
    if done is not None:  # a finished run directory (resume_mode=auto): nothing to start
        log.info("%s already finished (status.json: done); nothing to resume", typed.run_dir)
        return done
    if externally_launched():
        if in_slurm_task():
            export_slurm_environment(typed.cluster)
        return run(typed)
    if typed.cluster.launcher == "slurm":
        raise ConfigError(
            "cluster.launcher=slurm outside a SLURM task: submit with cluster=slurm (Hydra's submitit "
            "launcher) or srun the worker from an sbatch script (launch/sbatch_example.sh)"
        )
    if typed.cluster.nproc == 1:
        return run(typed)
    return _elastic(cfg, typed, run)


def _elastic(cfg: dict[str, Any], typed: RunConfig, run: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """nproc spawned workers on this machine; a worker's user-facing error comes back as one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        # ``run`` is pickled by its module path (dllm_rl.worker.run), which the spawned interpreters import.
        results = elastic_launch(local_launch_config(typed.cluster.nproc), entrypoint=run)(cfg)
    except (ChildFailedError, SignalException) as exc:
        # A signal to this process reaches the workers too (the elastic agent forwards it); they
        # checkpoint and stop, and their status file says so.
        status = _read_status(Path(typed.run_dir))
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
