"""One training process: init distributed -> build from registries -> Trainer.fit() -> summary.json.

The Hydra parent hands over a plain, fully resolved dict; workers never parse argv. For users who
start processes themselves: ``python -m dllm_rl.worker <run_dir>/config.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dllm_rl.errors import DllmRlError

log = logging.getLogger("dllm_rl")


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


def quiet_libraries() -> None:
    """Library progress bars and INFO chatter would drown the run's own progress bar and log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def deepspeed_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed's dict: the deepspeed group's own keys plus the batch arithmetic and optimizer."""
    world = int(cfg["cluster"]["nproc"])
    completions = cfg["rollout"]["prompts_per_step"] * cfg["rollout"]["samples_per_prompt"]
    micro = int(cfg["train"]["micro_batch_per_gpu"])
    o = cfg["optim"]
    ds = {
        **cfg["deepspeed"],
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": completions // (world * micro),
        "gradient_clipping": o["max_grad_norm"],
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o["lr"],
                "betas": list(o["betas"]),
                "eps": o["eps"],
                "weight_decay": o["weight_decay"],
                "torch_adam": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.get("model", {}).get("dtype") == "bfloat16" and not ds.get("bf16", {}).get("enabled"):
        # bf16 parameters need DeepSpeed's bf16 mode, or AdamW would update bf16 weights with no fp32 master copy.
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    if ds.get("bf16", {}).get("enabled"):
        # The trainer's non-finite guard rides on ZeRO's overflow skip, which bf16 only runs with this on.
        ds["bf16"] = {**ds["bf16"], "check_grad_overflow": True}
    if o["warmup_steps"] > 0:
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": o["lr"],
                "warmup_num_steps": o["warmup_steps"],
                "warmup_type": "linear",
            },
        }
    return ds


def build_policy(cfg: dict[str, Any], task: Any) -> tuple[Any, dict[str, Any]]:
    """The starting policy: model.path (plus model.adapter) if given, else the (cached) warm-started base
    of the configured architecture; then a fresh LoRA adapter when model.lora.enabled."""
    from dllm_rl.models.policy import build_tiny, load_from_config
    from dllm_rl.warmstart import ensure_base

    mcfg = cfg["model"]
    if mcfg["path"] is not None:
        policy, info = load_from_config(mcfg["path"], mcfg, trainable=True), {"source": str(mcfg["path"])}
    elif mcfg.get("requires_path"):
        raise DllmRlError(f"model={mcfg['name']} needs model.path=<local checkpoint directory>")
    elif not cfg["warmstart"]["enabled"]:
        policy, info = build_tiny(mcfg, task.alphabet, seed=int(cfg["seed"])), {"source": "random init"}
    else:
        path, info = ensure_base(cfg, task)
        policy, info = load_from_config(path, mcfg, trainable=True), {"source": str(path), **info}
    if mcfg["lora"]["enabled"] and mcfg.get("adapter") is None:
        policy.apply_lora(mcfg["lora"], quantized=mcfg.get("quantization", "none") != "none")
    if mcfg.get("adapter") is not None:
        info["adapter"] = str(mcfg["adapter"])
    return policy, info


def build_training(cfg: dict[str, Any], policy: Any, device: torch.device) -> tuple[Any, Any, Any]:
    """Checkpointing, device, sampler, objective, π_ref and the DeepSpeed engine around ``policy``
    (``policy.forward_module`` becomes the engine): everything a run needs besides data and policy."""
    import deepspeed

    from dllm_rl.objectives import get_objective
    from dllm_rl.samplers import get_sampler

    if cfg["model"]["gradient_checkpointing"]:
        # Non-reentrant checkpointing needs no input that requires grad, so it also works under a
        # frozen base with a LoRA adapter.
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy.model.to(device)
    sampler = get_sampler(cfg["sampler"])
    objective = get_objective(
        cfg["objective"],
        int(cfg["seed"]),
        group_size=int(cfg["rollout"]["samples_per_prompt"]),
        micro_batch=int(cfg["train"]["micro_batch_per_gpu"]),
    )
    if objective.needs_reference:
        # Before deepspeed.initialize: a frozen copy must never be handed to the optimizer.
        policy.attach_reference()
    engine, *_ = deepspeed.initialize(
        model=policy.model,
        model_parameters=[p for p in policy.model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
    )
    policy.forward_module = engine
    return sampler, objective, engine


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one run described by the resolved config; returns (and writes) the summary."""
    from dllm_rl.tasks import get_task
    from dllm_rl.tracking import Tracker
    from dllm_rl.trainer import Trainer

    start = time.perf_counter()
    run_dir = Path(cfg["run_dir"])
    quiet_libraries()
    if cfg["cluster"]["threads"]:
        torch.set_num_threads(int(cfg["cluster"]["threads"]))
    init_distributed(cfg["cluster"]["backend"])

    task = get_task(cfg["task"]["name"], cfg["task"], Path(cfg["cache_dir"]).expanduser())
    policy, base_info = build_policy(cfg, task)
    sampler, objective, engine = build_training(cfg, policy, torch.device(cfg["cluster"]["device"]))
    tracker = Tracker(run_dir, cfg)
    status = {"status": "running", "started": time.time()}
    (run_dir / "status.json").write_text(json.dumps(status))
    try:
        result = Trainer(cfg, policy, engine, task, sampler, objective, tracker, run_dir).fit()
    except BaseException as exc:
        (run_dir / "status.json").write_text(json.dumps({**status, "status": "failed", "error": repr(exc)}))
        raise
    finally:
        tracker.finish()
    primary = result["primary_metric"]
    summary = {
        "run_dir": str(run_dir),
        "objective": cfg["objective"]["name"],
        "task": cfg["task"]["name"],
        "seed": cfg["seed"],
        "base_model": base_info,
        **result,
        "base_metric": result["base"][primary] if result["base"] else None,
        "final_metric": result["final"][primary],
        # the test metric of the weights the validation split picked (checkpoints/best, or the start)
        "best_step": result["best"]["step"] if result["best"] else None,
        "best_test_metric": (result["best"]["test"] or {}).get(primary) if result["best"] else None,
        "wall_seconds": time.perf_counter() - start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "status.json").write_text(json.dumps({**status, "status": "done"}))
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m dllm_rl.worker <run_dir>/config.yaml`: run a config the parent already resolved."""
    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dllm_rl.worker <run_dir>/config.yaml", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        cfg = yaml.safe_load(Path(args[0]).read_text())
        summary = run(cfg)
    except DllmRlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("base_metric", "final_metric", "run_dir")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
