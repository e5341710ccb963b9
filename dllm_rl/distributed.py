"""Where this process sits in the run and how the processes find each other: rank arithmetic from what
the launcher (torchrun, torch elastic launch, the deepspeed launcher, SLURM) exported, torch.distributed
and DeepSpeed initialisation, the local launch settings and small collectives. No dllm_rl module above
this one is imported here, so the launcher, the worker and the trainer can all use it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dllm_rl.errors import ConfigError

if TYPE_CHECKING:
    import torch

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


def rank_layout(nproc: int, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Where this process sits in cluster.nodes x cluster.nproc (``nproc``), from what its launcher exported.

    torchrun and torch elastic launch set GROUP_RANK (the node's rank), LOCAL_RANK and LOCAL_WORLD_SIZE,
    the deepspeed launcher CROSS_RANK and LOCAL_SIZE; inside a SLURM task the node is SLURM_NODEID
    (submitit's export adds the others). ``expected_rank`` is node_rank * cluster.nproc + local_rank, the
    block layout of torchrun and of SLURM's default distribution. A node that started another number of
    processes than cluster.nproc is a ConfigError: its ranks would be counted against the wrong node."""
    env = os.environ if env is None else env

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_launch_config(nproc: int) -> Any:
    """torch elastic launch settings for ``nproc`` processes on this machine (spawned, free port, no restarts)."""
    import uuid

    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        run_id=uuid.uuid4().hex,
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )


def init_distributed(backend: str) -> None:
    """Single-process defaults for the torch.distributed environment, then DeepSpeed's init."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def end_distributed() -> None:
    """After a run's last collective: every rank waits for the others, then tears its process group down.

    A worker that exits with its gloo process group alive can abort at interpreter shutdown ("terminate
    called without an active exception", exit 134 under srun) when another rank, or the store it
    rendezvoused through, is already gone; a successful multi-process run must not end that way.
    """
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def gather_layouts(layout: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``rank_layout``, in rank order (collective; after the device is set, as NCCL needs)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [layout]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, layout)
    return out


def run_device(device: str) -> torch.device:
    """cluster.device as this process uses it: cpu, or cuda:<local rank> (each process of a node drives its own GPU)."""
    import torch

    if device != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device
