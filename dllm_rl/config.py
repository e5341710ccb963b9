"""Typed configuration schema of the root sections (Hydra ConfigStore) and the cross-field validation pass.

The model, cluster, deepspeed and logging groups and the root sections (rollout, train, optim, eval, ...)
have their schemas here; each objective, sampler and task declares its section's schema beside its code
(their bases: ObjectiveCfg in dllm_rl/objectives/base.py, TaskCfg in dllm_rl/tasks/base.py; the mask
schedule's MaskCfg in dllm_rl/likelihood/masks.py) and registers it in dllm_rl/schema.py's SCHEMAS.
Every config group option names its schema first in its defaults list (``- /base_<name>@_here_``),
so a misspelt key or a wrong type fails while Hydra composes the config, with Hydra's own message.
``validate`` then refuses keys no schema declares (Hydra's ``+key=value`` adds them past the
schema), checks counts and the rules that involve several fields, before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dllm_rl.errors import ConfigError
from dllm_rl.objectives.base import ObjectiveCfg
from dllm_rl.schema import SCHEMAS, typed
from dllm_rl.zero3 import ZERO3_PARAMS

# --------------------------------------------------------------------------------------------- groups


@dataclass
class LoraCfg:
    enabled: bool = False
    r: int = 128
    alpha: float = 64.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class FamilyName(Enum):
    tiny = "tiny"
    llada = "llada"
    dream = "dream"


class AttnImplementation(Enum):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class Quantization(Enum):
    none = "none"
    nf4 = "nf4"


class ChatTemplate(Enum):
    family = "family"
    tokenizer = "tokenizer"


@dataclass
class ModelCfg:
    name: str = MISSING
    # architecture family: tiny | llada | dream (decides the network class, tokenizer specials, logit alignment)
    family: FamilyName = FamilyName.tiny
    # local save_pretrained directory to start from (null = warm-start or reuse the cached base)
    path: str | None = None
    # true for configs that describe an official checkpoint: model.path must then be given
    requires_path: bool = False
    # a saved LoRA adapter (adapter_config.json) to put on the starting weights and keep training (null = none)
    adapter: str | None = None
    # transformer width
    hidden_size: int = 64
    # transformer blocks
    num_layers: int = 4
    # attention heads
    num_heads: int = 4
    # key/value heads (null = num_heads)
    num_kv_heads: int | None = None
    # SwiGLU width (null = 8/3 of hidden_size, rounded up to a multiple of 8)
    intermediate_size: int | None = None
    # vocabulary size (null = the tokenizer's)
    vocab_size: int | None = None
    # longest prompt + completion the rotary embedding is sized for
    max_position_embeddings: int = 512
    # rotary base (null = the family's: tiny 1e4)
    rope_theta: float | None = None
    # parameter dtype: float32 on CPU; bfloat16 on GPUs
    dtype: str = "float32"
    # attention kernel: sdpa | eager | flash_attention_2 (needs the flash-attn package and a GPU)
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    # recompute activations in the backward pass to save memory
    gradient_checkpointing: bool = False
    # torch.compile the network's forward in place (dynamic shapes; CPU needs a C++ compiler, CUDA triton)
    compile: bool = False
    # 4-bit base weights: none | nf4 (bitsandbytes, needs a CUDA GPU)
    quantization: Quantization = Quantization.none
    # family = install the family's fixed chat template where it has one (LLaDA); tokenizer = keep the checkpoint's
    chat_template: ChatTemplate = ChatTemplate.family
    lora: LoraCfg = field(default_factory=LoraCfg)


@dataclass
class ClusterCfg:
    name: str = MISSING
    # how workers start: local = on this machine (the Hydra process itself for nproc 1, else spawned workers through
    # torch elastic launch); external = only write <run_dir>/config.yaml and print the torchrun command that starts them
    # (python -m dllm_rl.worker <run_dir>/config.yaml per rank)
    launcher: str = "local"
    # processes (one per GPU, or CPU processes with gloo); per node when nodes > 1
    nproc: int = 1
    # nodes: more than 1 only with launcher external, which prints the torchrun line every node runs (world size = nodes
    # * nproc; docs/SLURM.md, "Several nodes")
    nodes: int = 1
    # torch.distributed backend: gloo on CPU, nccl on GPUs
    backend: str = "gloo"
    # cpu or cuda
    device: str = "cpu"
    # torch threads per process (0 = torch's default)
    threads: int = 0
    # SLURM (cluster=slurm; hydra-submitit-launcher's fields are interpolated from these)
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60
    mem_gb: int | None = None
    setup: list[str] = field(default_factory=list)
    signal_delay_s: int = 120
    max_requeues: int = 3
    additional_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeepSpeedCfg:
    zero_optimization: dict[str, Any] = field(default_factory=lambda: {"stage": 2})
    bf16: dict[str, Any] = field(default_factory=lambda: {"enabled": False})


@dataclass
class LoggingCfg:
    backend: str = MISSING
    wandb_mode: str = "offline"
    # wandb project
    project: str = "dllm_rl"
    # wandb entity (team); null = your default
    entity: str | None = None
    # wandb group (e.g. a sweep name)
    group: str | None = None


# ---------------------------------------------------------------------------------------- root parts


@dataclass
class RolloutCfg:
    # Q: prompts per rollout round
    prompts_per_step: int = 16
    # G: completions sampled per prompt (the advantage group)
    samples_per_prompt: int = 8
    # completions per sampler call (rollout memory knob, independent of the training micro-batch)
    micro_batch: int = 128
    # a string checked by validate() (not an Enum), so a bad value is a ConfigError naming the field
    zero3_params: str = "lockstep"


@dataclass
class TrainCfg:
    # optimizer steps of RL (one rollout round every objective.inner_iterations steps; 0 = only evaluate the base)
    steps: int = 960
    # rollout rounds instead of steps: when set, train.steps = rounds * objective.inner_iterations, so objectives with
    # different mu see the same number of rollouts (null = train.steps decides)
    rounds: int | None = None
    # completions per gradient micro-batch; gradient accumulation = Q*G / (nproc * this)
    micro_batch_per_gpu: int = 128
    # skipped optimizer steps in a row (non-finite loss, surrogates or gradient) that abort the run, after saving
    # checkpoints/last_good; 0 = never abort
    max_skipped_steps: int = 3


class OptimType(Enum):
    AdamW = "AdamW"
    SGD = "SGD"


class LRSchedule(Enum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class OptimCfg:
    # AdamW (default) or SGD (torch.optim.SGD with optim.momentum; betas and eps unused)
    type: OptimType = OptimType.AdamW
    # AdamW learning rate (constant after warm-up); 3e-4 and above made the tiny model worse
    lr: float = 1e-4
    # SGD momentum (optim.type=SGD only)
    momentum: float = 0.0
    # AdamW betas
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    # AdamW epsilon
    eps: float = 1e-8
    # AdamW decoupled weight decay
    weight_decay: float = 0.0
    # global gradient-norm clip (DeepSpeed gradient_clipping)
    max_grad_norm: float = 1.0
    # linear learning-rate warm-up, in optimizer steps
    warmup_steps: int = 0
    # after the warm-up: constant or cosine (a half cosine from lr down to lr * min_lr_ratio at the last optimizer step;
    # a torch LambdaLR the DeepSpeed engine steps)
    schedule: LRSchedule = LRSchedule.constant
    # cosine only: the final learning rate as a fraction of lr
    min_lr_ratio: float = 0.0


@dataclass
class EvalCfg:
    # splits scored before RL, every every_n_steps and at the end: validation (held-out training rows) picks
    # checkpoints/best; test is the reported metric and never used for selection
    splits: list[str] = field(default_factory=lambda: ["validation", "test"])
    # evaluate every this many optimizer steps (0 = only before and after RL)
    every_n_steps: int = 150
    # evaluate every this many rollout rounds instead: when set, eval.every_n_steps = this * mu (null = off)
    every_n_rounds: int | None = None
    # evaluate the base before the first RL step
    before_train: bool = True
    # cap on evaluated examples, >= 1 (null = the whole split)
    num_examples: int | None = None
    # prompts per greedy generation call
    batch_size: int = 256
    # compact tasks: also log, per evaluation, how sure the model is of each answer token with the whole completion
    # masked (marginal_argmax_acc, marginal_mean_p, marginal_p_below_0.05 / _above_0.8; one extra forward per batch;
    # python -m dllm_rl.evaluate evaluate.marginals=true writes the histogram)
    marginals: bool = False


@dataclass
class WarmstartCfg:
    # train a supervised base when none is cached for (model, task, warmstart)
    enabled: bool = True
    steps: int = 100
    # sequences per step
    batch_size: int = 64
    # AdamW learning rate
    lr: float = 1e-3
    # mask ratio t ~ U(t_min, 1) per sequence; the loss is the mean cross-entropy over masked tokens
    t_min: float = 0.05
    # seed of the warm-start (independent of the RL seed, so every RL seed starts from one base)
    seed: int = 0


@dataclass
class CheckpointCfg:
    # save a DeepSpeed checkpoint every this many optimizer steps (0 = only the final one)
    every_n_steps: int = 0
    # how many step checkpoints to keep (the final one is always kept)
    keep_last: int = 2
    # auto = continue from the newest complete checkpoint in this run directory (a restarted or requeued run), disable =
    # always start fresh, path = start from checkpoint.resume_path
    resume_mode: str = "auto"
    # a checkpoint directory (checkpoints/<tag>) for resume_mode=path
    resume_path: str | None = None


@dataclass
class EvaluateCfg:
    # what to score: a save_pretrained directory, or a run directory (its checkpoints/best/hf, else
    # checkpoints/final/hf); null = model.path, else the cached warm-started base of the tiny model
    checkpoint: str | None = None
    # scored split (test: the papers' numbers; validation: held-out training rows)
    split: str = "test"
    gen_lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    # block length of the semi-autoregressive decoding (32 in the papers; capped at the length)
    block_length: int = 32
    # denoising steps per generated token (0.5: steps = length/2, d1/SPG/GDSD; 1.0: DMPO's full steps)
    steps_per_token: float = 0.5
    subset_size: int | None = None
    subset_seed: int = 42
    # prompts per greedy generation call and process (the papers: 8)
    batch_size: int = 8
    # also write marginals.json (compact tasks): with the whole completion masked, how likely the model finds each
    # reference answer token and whether it is the argmax (dllm_rl/evaluation.py target_marginals); compared with the
    # base it tells whether RL moved answers or only confidence
    marginals: bool = False


@dataclass
class VarianceCfg:
    # python -m dllm_rl.variance (dllm_rl/variance.py). K: independent rollout rounds (fresh prompts and completions
    # from the base policy); >= 2
    rounds: int = 16
    # R: independent mask draws per round, rollouts fixed; >= 2
    mask_draws: int = 2
    # also split every gradient into the positions the reward reads and those it cannot see
    # (Task.reward_blind_positions; costs a second backward per draw when the task names any)
    split_positions: bool = True
    # refuse to start when the stored gradients (2*K*R float32 vectors of the trainable parameters) exceed this
    max_gradient_gib: float = 4.0


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
    evaluate: EvaluateCfg = field(default_factory=EvaluateCfg)
    variance: VarianceCfg = field(default_factory=VarianceCfg)
    # seed of the RL run (rollouts, masks, data order); the warm-started base has its own seed
    seed: int = 0
    run_name: str = MISSING
    # parent directory of all run directories
    output_dir: str = "outputs"
    cache_dir: str = MISSING
    # print a progress line to the console every this many optimizer steps (every step goes to the logs)
    log_every: int = 10


def _by_style(style: str, compact: Any, chat: Any) -> Any:
    """``${by_style:${.prompt_style},<compact value>,<chat value>}``: a task default that depends on its style."""
    if style not in ("compact", "chat"):
        raise ConfigError(f"task.prompt_style={style!r} must be 'compact' or 'chat'")
    return compact if style == "compact" else chat


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore and the config resolvers in OmegaConf (on package import).

    The group schemas are stored outside the groups (``base_<name>`` at the root of the config tree),
    so that they are neither listed as options nor selectable (``objective=base_spg``); each option's
    YAML names its schema first in its defaults list (``- /base_spg@_here_``).
    """
    if not OmegaConf.has_resolver("by_style"):
        OmegaConf.register_new_resolver("by_style", _by_style)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, node in [
        ("base_model", ModelCfg),
        ("base_cluster", ClusterCfg),
        ("base_deepspeed", DeepSpeedCfg),
        ("base_logging", LoggingCfg),
    ]:
        cs.store(name=name, node=node)


# ---------------------------------------------------------------------------------------- validation

LAUNCHERS = ("local", "slurm", "external")
RESUME_MODES = ("auto", "disable", "path")


def world_size(cluster: Any) -> int:
    """Training processes of a run: cluster.nproc per node (one per GPU) times cluster.nodes (the typed
    section, or the composed one ``validate`` reads)."""
    if isinstance(cluster, ClusterCfg):
        return cluster.nproc * cluster.nodes
    return int(cluster["nproc"]) * int(cluster.get("nodes", 1) or 1)


def apply_round_budget(cfg: Any) -> None:
    """train.rounds and eval.every_n_rounds, when set, decide train.steps and eval.every_n_steps (in place).

    A rollout round is objective.inner_iterations optimizer steps on one rollout batch, so a budget in
    rounds gives objectives with different mu the same number of rollouts.
    """
    mu = cfg["objective"]["inner_iterations"]
    for section, key, per_round in (("train", "steps", "rounds"), ("eval", "every_n_steps", "every_n_rounds")):
        rounds = cfg[section].get(per_round)
        if rounds is None:
            continue
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise ConfigError(f"{section}.{per_round}={rounds!r} must be a whole number >= 0 (or null)")
        cfg[section][key] = rounds * mu


def unknown_keys(node: Any, path: str = "") -> list[str]:
    """One message per key that no schema declares, with the closest declared key when there is one.

    Hydra's ``+key=value`` adds a key even to a config its schema closes (Hydra's own typo message
    suggests that spelling), so this runs on every composed config; free-form dict fields (DeepSpeed's
    dict, cluster.additional_parameters) take any key.
    """
    if not isinstance(node, DictConfig):
        return []
    schema = OmegaConf.get_type(node)
    declared = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    errors = []
    for key in node.keys():
        where = f"{path}{key}"
        if declared is not None and key not in declared:
            close = difflib.get_close_matches(str(key), declared, n=1)
            errors.append(f"{where}: not a config key" + (f" (did you mean {path}{close[0]}?)" if close else ""))
        else:
            errors += unknown_keys(node._get_node(key), f"{where}.")
    return errors


def check_keys(cfg: Any) -> None:
    """ConfigError naming every key outside the schemas (see unknown_keys); a plain dict passes."""
    errors = unknown_keys(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


def validate(cfg: Any) -> None:
    """Cross-field rules. ``cfg`` is the composed config (DictConfig or a plain nested dict).

    Raises ConfigError naming the fields at fault; runs before any model or process exists.
    """
    check_keys(cfg)
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    s, r, t, o = cfg["sampler"], cfg["rollout"], cfg["train"], cfg["objective"]
    world = world_size(cfg["cluster"])

    sampler_schema = SCHEMAS["sampler"].get(s["name"])
    if sampler_schema is None:
        need(False, f"sampler.name={s['name']!r} is unknown; available: {', '.join(sorted(SCHEMAS['sampler']))}")
    else:
        sampler_schema.check(s, need)

    group, q = r["samples_per_prompt"], r["prompts_per_step"]
    need(group >= 2, f"rollout.samples_per_prompt={group} must be >= 2 (advantages are group-relative)")
    need(q >= 1, f"rollout.prompts_per_step={q} must be >= 1")
    completions = q * group
    micro = t["micro_batch_per_gpu"]
    nodes = int(cfg["cluster"].get("nodes", 1))
    procs = f"cluster.nodes*cluster.nproc={world}" if nodes > 1 else f"cluster.nproc={world}"
    need(int(cfg["cluster"]["nproc"]) >= 1, f"cluster.nproc={cfg['cluster']['nproc']} must be >= 1")
    need(int(cfg["cluster"].get("nodes", 1)) >= 1, f"cluster.nodes={cfg['cluster'].get('nodes')} must be >= 1")
    world = max(world, 1)
    # Counts with no meaning at 0 (or below): one line each. Where null or 0 means something, the
    # comment in conf/config.yaml says what, and the bound here allows it.
    for where, value, low, null in (
        ("rollout.micro_batch", r["micro_batch"], 1, None),
        ("train.micro_batch_per_gpu", micro, 1, None),
        ("train.max_skipped_steps", t["max_skipped_steps"], 0, None),
        ("optim.warmup_steps", cfg["optim"]["warmup_steps"], 0, None),
        ("eval.num_examples", cfg["eval"]["num_examples"], 1, "the whole split"),
        ("eval.batch_size", cfg["eval"]["batch_size"], 1, None),
        ("warmstart.steps", cfg["warmstart"]["steps"], 0, None),
        ("warmstart.batch_size", cfg["warmstart"]["batch_size"], 1, None),
        ("log_every", cfg["log_every"], 1, None),
        ("cluster.threads", cfg["cluster"]["threads"], 0, None),
        ("cluster.cpus_per_task", cfg["cluster"]["cpus_per_task"], 1, None),
        ("cluster.gpus_per_node", cfg["cluster"]["gpus_per_node"], 0, None),
        ("cluster.time_min", cfg["cluster"]["time_min"], 1, None),
        ("cluster.mem_gb", cfg["cluster"]["mem_gb"], 1, "the partition's default"),
        ("cluster.signal_delay_s", cfg["cluster"]["signal_delay_s"], 0, None),
        ("cluster.max_requeues", cfg["cluster"]["max_requeues"], 0, None),
    ):
        if value is not None:
            need(value >= low, f"{where}={value} must be >= {low}" + (f" (or null: {null})" if null else ""))
    ratio = cfg["optim"]["min_lr_ratio"]
    need(0.0 <= ratio <= 1.0, f"optim.min_lr_ratio={ratio} must be in [0, 1] (the final lr as a fraction of optim.lr)")
    if micro >= 1:
        need(
            completions % (world * micro) == 0,
            f"rollout.prompts_per_step*rollout.samples_per_prompt={completions} must be divisible by "
            f"processes*train.micro_batch_per_gpu={world}*{micro} ({procs})",
        )
        need(
            micro % group == 0 or group % micro == 0,
            f"train.micro_batch_per_gpu={micro} must hold whole groups or a slice of one group "
            f"(a multiple or a divisor of rollout.samples_per_prompt={group})",
        )
    per_rank = completions // max(world, 1)
    need(
        r["micro_batch"] < 1 or per_rank % r["micro_batch"] == 0,
        f"rollout.micro_batch={r['micro_batch']} must divide the completions per process ({per_rank})",
    )
    need(
        world == 1 or q % world == 0,
        f"rollout.prompts_per_step={q} must be divisible by the number of processes "
        f"({procs}; whole groups per process)",
    )
    zero3 = r.get("zero3_params", "lockstep")
    need(
        zero3 in ZERO3_PARAMS,
        f"rollout.zero3_params={zero3!r} must be one of {', '.join(ZERO3_PARAMS)}",
    )

    mu = o["inner_iterations"]
    need(t["steps"] >= 0, f"train.steps={t['steps']} must be >= 0")
    if mu >= 1:
        need(
            t["steps"] % mu == 0,
            f"train.steps={t['steps']} must be a multiple of objective.inner_iterations={mu} "
            "(each rollout round is inner_iterations optimizer steps)",
        )
    SCHEMAS["objective"].get(o["name"], ObjectiveCfg).check(o, s, need)

    need(cfg["eval"]["every_n_steps"] >= 0, "eval.every_n_steps must be >= 0 (0 = only before and after)")
    splits = list(cfg["eval"]["splits"])
    need(
        bool(splits) and all(x in ("validation", "test") for x in splits) and len(set(splits)) == len(splits),
        f"eval.splits={splits} must list validation and/or test, each once",
    )
    tcfg = cfg["task"]
    task_schema = SCHEMAS["task"].get(tcfg["name"])
    if task_schema is None:
        need(False, f"task.name={tcfg['name']!r} is unknown; available: {', '.join(sorted(SCHEMAS['task']))}")
    else:
        task_schema.check(tcfg, need)
    need(
        not cfg["eval"]["marginals"] or tcfg.get("prompt_style", "compact") == "compact",
        "eval.marginals=true needs task.prompt_style=compact (a chat answer has no fixed position)",
    )
    ckpt = cfg["checkpoint"]
    need(ckpt["every_n_steps"] >= 0, "checkpoint.every_n_steps must be >= 0 (0 = only at the end)")
    need(ckpt["keep_last"] >= 1, "checkpoint.keep_last must be >= 1")
    mode = ckpt["resume_mode"]
    need(mode in RESUME_MODES, f"checkpoint.resume_mode={mode!r} must be one of {', '.join(RESUME_MODES)}")
    if mode == "path":
        rp = ckpt.get("resume_path")
        need(
            rp is not None and Path(os.path.expanduser(str(rp))).is_dir(),
            f"checkpoint.resume_path={rp}: checkpoint.resume_mode=path needs an existing checkpoint directory",
        )
    ws = cfg["warmstart"]
    need(0.0 <= ws["t_min"] < 1.0, f"warmstart.t_min={ws['t_min']} must be in [0, 1)")

    cl = cfg["cluster"]
    need(
        cl["launcher"] in LAUNCHERS,
        f"cluster.launcher={cl['launcher']!r} must be one of {', '.join(LAUNCHERS)}",
    )
    need(
        cl["launcher"] != "local" or int(cl.get("nodes", 1)) == 1,
        f"cluster.nodes={cl.get('nodes')} needs cluster=slurm or cluster.launcher=external (torchrun on every node); "
        "cluster.launcher=local runs on this machine",
    )
    need(cl["backend"] in ("gloo", "nccl"), f"cluster.backend={cl['backend']!r} must be 'gloo' or 'nccl'")
    need(cl["device"] in ("cpu", "cuda"), f"cluster.device={cl['device']!r} must be 'cpu' or 'cuda'")
    need(
        cl["device"] != "cuda" or cl["backend"] == "nccl" or world == 1,
        f"cluster.backend={cl['backend']} with cluster.device=cuda: use nccl for several GPU processes",
    )
    need(
        cfg["logging"]["backend"] in ("wandb", "none"),
        f"logging.backend={cfg['logging']['backend']!r} must be 'wandb' or 'none'",
    )
    need(
        cfg["logging"]["wandb_mode"] in ("online", "offline", "disabled"),
        f"logging.wandb_mode={cfg['logging']['wandb_mode']!r} must be online, offline or disabled",
    )

    errors += model_errors(cfg["model"], str(cfg["cluster"]["device"]))
    errors += task_file_errors(cfg["task"])

    if len(errors) == 1:
        raise ConfigError(f"invalid configuration: {errors[0]}")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def model_errors(model: Any, device: str, path_given_elsewhere: bool = False) -> list[str]:
    """One message per problem in the model group that shows before anything is loaded."""
    errors = []
    model_path = model["path"]
    if model_path is not None:
        p = Path(os.path.expanduser(str(model_path)))
        if not p.is_dir():
            errors.append(f"model.path={model_path}: no such directory (give a save_pretrained checkpoint)")
        elif not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            errors.append(f"model.path={model_path}: no config.json in it (not a save_pretrained checkpoint)")
    elif model["requires_path"] and not path_given_elsewhere:
        errors.append(
            f"model={model['name']} needs model.path=<local copy of the official checkpoint: config.json, "
            "*.safetensors shards with their index, tokenizer files> (nothing is downloaded)"
        )
    for key in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
        if model[key] < 1:
            errors.append(f"model.{key}={model[key]} must be >= 1")
    for key in ("num_kv_heads", "intermediate_size", "vocab_size"):
        if model[key] is not None and model[key] < 1:
            errors.append(f"model.{key}={model[key]} must be >= 1 (or null)")
    adapter = model["adapter"]
    if adapter is not None and not (Path(os.path.expanduser(str(adapter))) / "adapter_config.json").is_file():
        errors.append(f"model.adapter={adapter}: no adapter_config.json there (expected a saved PEFT adapter)")
    lora = model["lora"]
    if lora["enabled"]:
        if int(lora["r"]) < 1:
            errors.append(f"model.lora.r={lora['r']} must be >= 1")
        if float(lora["alpha"]) <= 0:
            errors.append(f"model.lora.alpha={lora['alpha']} must be positive")
        if not 0.0 <= float(lora["dropout"]) < 1.0:
            errors.append(f"model.lora.dropout={lora['dropout']} must be in [0, 1)")
        if not list(lora["target_modules"]):
            errors.append("model.lora.target_modules is empty")
    quantization = model["quantization"].value if isinstance(model["quantization"], Enum) else model["quantization"]
    if quantization != "none" and not device.startswith("cuda"):
        errors.append(f"model.quantization={quantization} needs cluster.device=cuda (bitsandbytes 4-bit)")
    return errors


def task_file_errors(task: Any) -> list[str]:
    """One message per data file named in the task config that does not exist."""
    errors = []
    for key in ("train_file", "validation_file", "test_file"):
        value = task.get(key)
        if value is not None and not Path(os.path.expanduser(str(value))).exists():
            errors.append(f"task.{key}={value}: no such file or directory")
    return errors


# Config choices that need an optional extra: (key, value) -> (the module it brings, the extra's name in pyproject.toml)
EXTRAS: dict[tuple[str, str], tuple[str, str]] = {
    ("hparams_search", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "hpo"),
}


def missing_extra(overrides: list[str]) -> str | None:
    """The one-line error for a command-line choice whose optional extra is not installed, or None.

    Checked before Hydra composes: without the plug-in, Hydra only says "Could not find
    'hydra/sweeper/optuna'".
    """
    for arg in overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        needs = EXTRAS.get((key, value))
        if needs is not None and importlib.util.find_spec(needs[0]) is None:
            return f"{key}={value} needs the {needs[1]} extra: pip install -e '.[{needs[1]}]'"
    return None


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


# ---------------------------------------------------------------------------------- the typed run config

COMPONENT_GROUPS = ("objective", "task", "sampler")  # sections whose schema the section's name selects


@dataclass
class RunConfig(Config):
    """A resolved run config as the processes that train, evaluate or measure read it: every root section
    as its dataclass and the objective, task and sampler sections as the schemas their names select
    (``run_config``). Hydra composes ``Config``, whose group sections stay open (``Any``) so that each
    option's defaults list can name its own schema."""

    model: ModelCfg = MISSING
    cluster: ClusterCfg = MISSING
    deepspeed: DeepSpeedCfg = MISSING
    logging: LoggingCfg = MISSING
    # the run directory (python -m dllm_rl adds it to the resolved config it writes there; None for a config
    # composed outside a run, e.g. by a library user or a test)
    run_dir: str | None = None


def run_config(plain: Any) -> RunConfig:
    """The typed view of a resolved config (a plain dict, as config.yaml holds it, or a DictConfig).

    Every section gets its schema's types and defaults (enums as members); a key no schema declares or a
    value its field cannot take is one ConfigError naming it. The plain dict stays what is written to
    disk and logged; the typed view is what components read."""
    if isinstance(plain, RunConfig):
        return plain
    if isinstance(plain, DictConfig):  # composed onto Config, which RunConfig extends: merged as plain values
        plain = OmegaConf.to_container(plain, resolve=True, enum_to_str=True)
    cfg = typed(RunConfig, plain, "config")
    for group in COMPONENT_GROUPS:
        node = getattr(cfg, group)
        name = node.get("name") if isinstance(node, dict) else getattr(node, "name", None)
        schema = SCHEMAS[group].get(name)
        if schema is None:
            known = ", ".join(sorted(SCHEMAS[group])) or "(none)"
            raise ConfigError(f"{group}.name={name!r} is unknown; available: {known}")
        setattr(cfg, group, typed(schema, node, group))
    return cfg
