"""Typed configuration schema (Hydra ConfigStore) and the cross-field validation pass.

Every config group option names its schema first in its defaults list (``base_<name>``), so a
misspelt key or a wrong type fails while Hydra composes the config, with Hydra's own message.
``validate`` then checks the rules that involve several fields, before any model is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from dllm_rl.errors import ConfigError

# --------------------------------------------------------------------------------------------- groups


@dataclass
class ModelCfg:
    name: str = MISSING
    path: str | None = None
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 512
    dtype: str = "float32"
    gradient_checkpointing: bool = False


class MaskKind(Enum):
    random = "random"


class CountMode(Enum):
    bernoulli = "bernoulli"
    exact = "exact"


class MaskWeight(Enum):
    none = "none"
    inv_t_sampled = "inv_t_sampled"
    inv_t_empirical = "inv_t_empirical"


@dataclass
class MaskCfg:
    kind: MaskKind = MaskKind.random
    count_mode: CountMode = CountMode.exact
    t_min: float = 0.0
    t_max: float = 1.0
    weight: MaskWeight = MaskWeight.inv_t_empirical
    prompt_mask_prob: float = 0.0


class LossNorm(Enum):
    token_weighted = "token_weighted"
    per_sequence = "per_sequence"


@dataclass
class ObjectiveCfg:
    name: str = MISSING
    inner_iterations: int = 1
    mc_samples: int = 2
    mask: MaskCfg = field(default_factory=MaskCfg)
    loss_norm: LossNorm = LossNorm.token_weighted
    loss_forward_dropout: bool = True
    max_nonfinite_frac: float = 0.5


@dataclass
class ELBOCfg(ObjectiveCfg):
    name: str = "elbo"


@dataclass
class TaskCfg:
    name: str = MISSING
    completion_length: int = MISSING
    seed: int = 42


@dataclass
class SudokuTaskCfg(TaskCfg):
    name: str = "sudoku"
    completion_length: int = 16
    split: str = "leak_free"
    train_grids: int = 200
    train_size: int = 20000
    validation_size: int = 256
    test_size: int = 256
    blanks_min: int = 6
    blanks_max: int = 10
    test_blanks: int = 8
    require_unique: bool = False
    credit_alternative_solutions: bool = True
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None


class Remasking(Enum):
    low_confidence = "low_confidence"
    random = "random"


class NoiseDtype(Enum):
    float64 = "float64"
    float32 = "float32"


@dataclass
class SamplerCfg:
    name: str = MISSING
    gen_length: int = MISSING
    block_length: int = MISSING
    steps: int = MISSING
    temperature: float = 1.0
    remasking: Remasking = Remasking.low_confidence
    noise_dtype: NoiseDtype = NoiseDtype.float64


@dataclass
class ClusterCfg:
    name: str = MISSING
    launcher: str = "local"
    nproc: int = 1
    backend: str = "gloo"
    device: str = "cpu"
    threads: int = 0


@dataclass
class DeepSpeedCfg:
    zero_optimization: dict[str, Any] = field(default_factory=lambda: {"stage": 2})
    bf16: dict[str, Any] = field(default_factory=lambda: {"enabled": False})


@dataclass
class LoggingCfg:
    backend: str = MISSING
    wandb_mode: str = "offline"
    project: str = "dllm_rl"
    entity: str | None = None
    group: str | None = None


# ---------------------------------------------------------------------------------------- root parts


@dataclass
class RolloutCfg:
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    micro_batch: int = 128


@dataclass
class TrainCfg:
    steps: int = 900
    micro_batch_per_gpu: int = 128
    max_skipped_steps: int = 3


@dataclass
class OptimCfg:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0


@dataclass
class EvalCfg:
    split: str = "test"
    every_n_steps: int = 150
    before_train: bool = True
    num_examples: int | None = None
    batch_size: int = 256


@dataclass
class WarmstartCfg:
    enabled: bool = True
    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    t_min: float = 0.05
    seed: int = 0


@dataclass
class CheckpointCfg:
    every_n_steps: int = 0
    keep_last: int = 2


@dataclass
class Config:
    model: Any = MISSING
    objective: Any = MISSING
    task: Any = MISSING
    sampler: Any = MISSING
    cluster: Any = MISSING
    deepspeed: Any = MISSING
    logging: Any = MISSING
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    warmstart: WarmstartCfg = field(default_factory=WarmstartCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    seed: int = 0
    run_name: str = MISSING
    output_dir: str = "outputs"
    cache_dir: str = MISSING
    log_every: int = 10


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore (called on package import)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, name, node in [
        ("model", "base_model", ModelCfg),
        ("objective", "base_elbo", ELBOCfg),
        ("task", "base_sudoku", SudokuTaskCfg),
        ("sampler", "base_sampler", SamplerCfg),
        ("cluster", "base_cluster", ClusterCfg),
        ("deepspeed", "base_deepspeed", DeepSpeedCfg),
        ("logging", "base_logging", LoggingCfg),
    ]:
        cs.store(group=group, name=name, node=node)


# ---------------------------------------------------------------------------------------- validation


def validate(cfg: Any) -> None:
    """Cross-field rules. ``cfg`` is the composed config (DictConfig or a plain nested dict).

    Raises ConfigError naming the fields at fault; runs before any model or process exists.
    """
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    s, r, t, o, m = cfg["sampler"], cfg["rollout"], cfg["train"], cfg["objective"], cfg["objective"]["mask"]
    world = int(cfg["cluster"]["nproc"])

    need(s["gen_length"] > 0, f"sampler.gen_length={s['gen_length']} must be positive")
    need(s["block_length"] > 0, f"sampler.block_length={s['block_length']} must be positive")
    if s["gen_length"] > 0 and s["block_length"] > 0:
        need(
            s["gen_length"] % s["block_length"] == 0,
            f"sampler.gen_length={s['gen_length']} must be divisible by sampler.block_length={s['block_length']}",
        )
        blocks = max(1, s["gen_length"] // s["block_length"])
        need(
            s["steps"] > 0 and s["steps"] % blocks == 0,
            f"sampler.steps={s['steps']} must be a positive multiple of the number of blocks "
            f"(sampler.gen_length/sampler.block_length = {blocks})",
        )
        need(
            s["steps"] <= s["gen_length"],
            f"sampler.steps={s['steps']} exceeds sampler.gen_length={s['gen_length']}: "
            "every step must commit at least one token",
        )
    need(s["temperature"] >= 0, f"sampler.temperature={s['temperature']} must be >= 0")

    group, q = r["samples_per_prompt"], r["prompts_per_step"]
    need(group >= 2, f"rollout.samples_per_prompt={group} must be >= 2 (advantages are group-relative)")
    need(q >= 1, f"rollout.prompts_per_step={q} must be >= 1")
    completions = q * group
    micro = t["micro_batch_per_gpu"]
    need(world >= 1, f"cluster.nproc={world} must be >= 1")
    need(
        micro >= 1 and completions % (world * max(micro, 1)) == 0,
        f"rollout.prompts_per_step*rollout.samples_per_prompt={completions} must be divisible by "
        f"cluster.nproc*train.micro_batch_per_gpu={world}*{micro}",
    )
    need(
        micro >= 1 and (micro % group == 0 or group % micro == 0),
        f"train.micro_batch_per_gpu={micro} must hold whole groups or a slice of one group "
        f"(a multiple or a divisor of rollout.samples_per_prompt={group})",
    )
    per_rank = completions // max(world, 1)
    need(
        r["micro_batch"] >= 1 and per_rank % max(r["micro_batch"], 1) == 0,
        f"rollout.micro_batch={r['micro_batch']} must divide the completions per process ({per_rank})",
    )
    need(
        world == 1 or q % world == 0,
        f"rollout.prompts_per_step={q} must be divisible by cluster.nproc={world} (whole groups per process)",
    )

    mu = o["inner_iterations"]
    need(mu >= 1, f"objective.inner_iterations={mu} must be >= 1")
    need(t["steps"] >= 0, f"train.steps={t['steps']} must be >= 0")
    if mu >= 1:
        need(
            t["steps"] % mu == 0,
            f"train.steps={t['steps']} must be a multiple of objective.inner_iterations={mu} "
            "(each rollout round is inner_iterations optimizer steps)",
        )
    need(o["mc_samples"] >= 1, f"objective.mc_samples={o['mc_samples']} must be >= 1")
    need(
        0.0 <= m["t_min"] < m["t_max"] <= 1.0,
        f"objective.mask.t_min={m['t_min']} and objective.mask.t_max={m['t_max']} need 0 <= t_min < t_max <= 1",
    )
    need(
        0.0 <= m["prompt_mask_prob"] < 1.0,
        f"objective.mask.prompt_mask_prob={m['prompt_mask_prob']} must be in [0, 1)",
    )

    need(cfg["eval"]["every_n_steps"] >= 0, "eval.every_n_steps must be >= 0 (0 = only before and after)")
    need(cfg["eval"]["split"] in ("test", "validation"), "eval.split must be 'test' or 'validation'")
    ckpt = cfg["checkpoint"]
    need(ckpt["every_n_steps"] >= 0, "checkpoint.every_n_steps must be >= 0 (0 = only at the end)")
    need(ckpt["keep_last"] >= 1, "checkpoint.keep_last must be >= 1")
    ws = cfg["warmstart"]
    need(0.0 <= ws["t_min"] < 1.0, f"warmstart.t_min={ws['t_min']} must be in [0, 1)")

    cl = cfg["cluster"]
    need(cl["launcher"] == "local", f"cluster.launcher={cl['launcher']!r}: only 'local' is available")
    need(cl["backend"] in ("gloo", "nccl"), f"cluster.backend={cl['backend']!r} must be 'gloo' or 'nccl'")
    need(cl["device"] in ("cpu", "cuda"), f"cluster.device={cl['device']!r} must be 'cpu' or 'cuda'")
    need(
        world == 1,
        f"cluster.nproc={world}: multi-process launch is not implemented yet; use cluster.nproc=1",
    )
    need(
        cfg["logging"]["backend"] in ("wandb", "none"),
        f"logging.backend={cfg['logging']['backend']!r} must be 'wandb' or 'none'",
    )
    need(
        cfg["logging"]["wandb_mode"] in ("online", "offline", "disabled"),
        f"logging.wandb_mode={cfg['logging']['wandb_mode']!r} must be online, offline or disabled",
    )

    model_path = cfg["model"]["path"]
    if model_path is not None:
        p = Path(os.path.expanduser(str(model_path)))
        if not p.is_dir():
            errors.append(f"model.path={model_path}: no such directory (give a save_pretrained checkpoint)")
        elif not (p / "config.json").is_file():
            errors.append(f"model.path={model_path}: no config.json in it (not a save_pretrained checkpoint)")
    for key in ("train_file", "validation_file", "test_file"):
        value = cfg["task"].get(key)
        if value is not None and not Path(os.path.expanduser(str(value))).is_file():
            errors.append(f"task.{key}={value}: no such file")

    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def check_writable(directory: str | Path, what: str) -> None:
    """Fail early, naming the directory, if nothing can be written there."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what}={d}: not writable ({exc.strerror or exc})") from None
