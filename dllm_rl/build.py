"""Building a run's components from the resolved config: the starting policy (model.path or the cached
warm-started base, LoRA), the sampler, the objective, the frozen reference and the DeepSpeed engine with
its config (batch arithmetic, optimizer, precision), and torch.compile of the network. ``worker.run``,
the variance instrument and the benches build through these same functions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from dllm_rl.config import LRSchedule, ModelCfg, OptimCfg, OptimType, Quantization, RunConfig, world_size
from dllm_rl.errors import DllmRlError
from dllm_rl.schema import plain

log = logging.getLogger("dllm_rl")


def quiet_libraries() -> None:
    """Library progress bars and INFO chatter would drown the run's own progress bar and log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def optimizer_config(o: OptimCfg) -> dict[str, Any]:
    """DeepSpeed's optimizer entry: AdamW (DeepSpeed's torch-backed AdamW) or SGD with momentum (torch.optim.SGD)."""
    if o.type is OptimType.SGD:
        return {"type": "SGD", "params": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}}
    params = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    return {"type": "AdamW", "params": {**params, "torch_adam": True}}


def lr_lambda(steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """optim.schedule=cosine as a factor of optim.lr per optimizer step k = 0 .. steps - 1: a linear
    warm-up over ``warmup`` steps ((k + 1) / warmup, so no step runs at lr 0), then a half cosine that
    reaches ``min_ratio`` at the last step."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        span = max(1, steps - 1 - warmup)
        progress = min(1.0, (k - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def lr_scheduler(cfg: RunConfig) -> Callable[[Any], Any] | None:
    """What deepspeed.initialize takes as lr_scheduler for optim.schedule=cosine (a callable that builds a
    torch LambdaLR on the optimizer; its step count is saved in every checkpoint); None otherwise, where the
    DeepSpeed dict's own WarmupLR (warm-up only) or nothing sets the learning rate."""
    o = cfg.optim
    if o.schedule is not LRSchedule.cosine:
        return None
    factor = lr_lambda(cfg.train.steps, o.warmup_steps, o.min_lr_ratio)

    def build(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return build


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """DeepSpeed's dict: the deepspeed group's own keys plus the batch arithmetic and optimizer."""
    world = world_size(cfg.cluster)
    completions = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    micro = cfg.train.micro_batch_per_gpu
    o = cfg.optim
    ds = {
        **plain(cfg.deepspeed),
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": completions // (world * micro),
        "gradient_clipping": o.max_grad_norm,
        "optimizer": optimizer_config(o),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds["optimizer"]["type"] != "AdamW":
        # ZeRO runs any torch.optim optimizer; DeepSpeed only asks that non-Adam ones be allowed explicitly.
        ds["zero_allow_untested_optimizer"] = True
    if cfg.model.dtype == "bfloat16" and not ds.get("bf16", {}).get("enabled"):
        # bf16 parameters need DeepSpeed's bf16 mode, or AdamW would update bf16 weights with no fp32 master copy.
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    if ds.get("bf16", {}).get("enabled"):
        # The trainer's non-finite guard rides on ZeRO's overflow skip, which bf16 only runs with this on.
        ds["bf16"] = {**ds["bf16"], "check_grad_overflow": True}
    if o.warmup_steps > 0 and o.schedule is LRSchedule.constant:
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": o.warmup_steps,
                "warmup_type": "linear",
            },
        }
    return ds


def build_policy(cfg: RunConfig, task: Any) -> tuple[Any, dict[str, Any]]:
    """The starting policy: model.path (plus model.adapter) if given, else the (cached) warm-started base
    of the configured architecture; then a fresh LoRA adapter when model.lora.enabled."""
    from dllm_rl.models.policy import build_tiny, load_from_config
    from dllm_rl.warmstart import ensure_base

    m: ModelCfg = cfg.model
    if m.path is not None:
        policy, info = load_from_config(m.path, m, trainable=True), {"source": str(m.path)}
    elif m.requires_path:
        raise DllmRlError(f"model={m.name} needs model.path=<local checkpoint directory>")
    elif not cfg.warmstart.enabled:
        policy, info = build_tiny(m, task.alphabet, seed=cfg.seed), {"source": "random init"}
    else:
        path, info = ensure_base(cfg, task)
        policy, info = load_from_config(path, m, trainable=True), {"source": str(path), **info}
    if m.lora.enabled and m.adapter is None:
        policy.apply_lora(m.lora, quantized=m.quantization is not Quantization.none, seed=cfg.seed)
    if m.adapter is not None:
        info["adapter"] = str(m.adapter)
    return policy, info


def build_training(cfg: RunConfig, policy: Any, device: torch.device) -> tuple[Any, Any, Any]:
    """Checkpointing, device, sampler, objective, π_ref and the DeepSpeed engine around ``policy``
    (``policy.forward_module`` becomes the engine): everything a run needs besides data and policy."""
    import deepspeed

    from dllm_rl.objectives import get_objective
    from dllm_rl.samplers import get_sampler

    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it also works under a
        # frozen base with a LoRA adapter.
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy.model.to(device)
    sampler = get_sampler(cfg.sampler)
    objective = get_objective(
        cfg.objective, cfg.seed, group_size=cfg.rollout.samples_per_prompt, micro_batch=cfg.train.micro_batch_per_gpu
    )
    if objective.needs_reference:
        # Before deepspeed.initialize: a frozen copy must never be handed to the optimizer.
        policy.attach_reference()
    engine, *_ = deepspeed.initialize(
        model=policy.model,
        model_parameters=[p for p in policy.model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
        lr_scheduler=lr_scheduler(cfg),
    )
    policy.forward_module = engine
    if cfg.model.compile:
        compile_network(policy.model, device)
    return sampler, objective, engine


def compile_network(model: torch.nn.Module, device: torch.device, backend: Any = "inductor") -> None:
    """torch.compile ``model``'s forward in place (nn.Module.compile): the DeepSpeed engine and a PEFT
    wrapper keep calling the same module object, now through the compiled graph. Dynamic shapes, since
    rollout, scoring and training forwards all have their own batch and sequence sizes.

    The backend (inductor) builds its kernels at the first forward, deep inside the first rollout; what
    it needs is checked here so that a machine without it fails at once with one clear line."""
    why = _compile_unsupported(device) if backend == "inductor" else None
    if why:
        raise DllmRlError(f"model.compile=true: torch.compile cannot run on {device.type} here: {why}")
    model.compile(backend=backend, dynamic=True)
    log.info("model.compile: the network's forward is compiled by torch.compile at its first call")


def _compile_unsupported(device: torch.device) -> str | None:
    """Why inductor cannot build kernels for ``device`` on this machine, or None."""
    try:
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "inductor needs triton for CUDA kernels (pip install triton), or set model.compile=false"
        else:
            from torch._inductor import cpp_builder

            try:
                cpp_builder.get_cpp_compiler()
            except Exception as exc:  # InvalidCxxCompiler and what the search may raise
                return (
                    f"inductor needs a C++ compiler for CPU kernels ({type(exc).__name__}: {exc}); "
                    "install g++ (or point $CXX at one), or set model.compile=false"
                )
    except ImportError:  # private helpers moved in this torch version: let torch.compile report itself
        return None
    return None
