"""Peak memory and time of one SPG training step, and model FLOPs utilisation.

One "SPG step" is what the trainer charges to the first optimizer step of a rollout round:

    rollout         G x Q completions of synthetic prompts through evaluation.generate (the real sampler
                    and policy.logits), seeded 0/1 rewards, objective.advantages, the RolloutBatch
    prepare         objective.prepare(batch, policy), once per round
    likelihood fwd  objective.loss per train micro-batch (m masked copies per completion, one forward)
    backward        engine.backward(loss)
    optimizer step  engine.step()

The model has random weights (``build_tiny`` builds any family at any size, the 8B ones included), so no
checkpoint is needed, and the rewards are random because reward code is not what is measured here. Config,
policy, LoRA, gradient checkpointing and the DeepSpeed engine come from the same functions ``worker.run``
uses; the update loop is ``Trainer.optimize``'s, split only so that each phase can be clocked. The same
command runs on CPU and on a CUDA GPU; the device only changes the defaults (dtype, backend, peak-matmul size).

Model FLOPs are counted from the architecture (``policy.model.config``), never measured, so that MFU does
not depend on kernels. Convention, per sequence of T tokens:

    forward   = 2 T (matmul weights of all layers + LM head) + 4 layers T^2 hidden   (bidirectional T x T)
                + 2 T (LoRA adapter weights)
    fwd + bwd = 3 x forward for full fine-tuning;
                with a frozen base and LoRA: 2 x the base matmuls (input gradients only, no weight gradients),
                3 x the attention score/value products (they have no weights: both inputs need gradients)
                and 3 x the adapters.

Activation recomputation from gradient checkpointing is not counted (the usual MFU convention), so a
checkpointed backward shows up as a lower fwd+bwd MFU. The peak is measured, not looked up: the best
rate of large square matmuls in the run dtype on this device, before and after the timed steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

PHASES = ("rollout", "prepare", "likelihood_forward", "backward", "optimizer_step")
PHASE_LABELS = {
    "rollout": "rollout (generate + rewards)",
    "prepare": "objective.prepare",
    "likelihood_forward": "likelihood forward (loss)",
    "backward": "backward",
    "optimizer_step": "optimizer step",
}
# The character tokenizer only supplies the family's special ids; prompts are random strings over this.
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
GIB = 2**30


# ---------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Trailing KEY=VALUE arguments are Hydra overrides of the composed config (e.g. deepspeed=zero3).",
    )
    p.add_argument("--model", default="tiny_llada", help="model config name (dllm_rl/conf/model/<name>.yaml)")
    p.add_argument("--task", default="gsm8k", help="task config (only its objective_task settings apply)")
    p.add_argument(
        "--lora", action=argparse.BooleanOptionalAction, default=True, help="model/lora=paper (r 128, alpha 64)"
    )
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the paper's)")
    p.add_argument("--group", type=int, default=6, help="G: completions per prompt")
    p.add_argument("--prompts", type=int, default=1, help="Q: prompts per step")
    p.add_argument("--prompt-length", type=int, default=128, help="tokens per synthetic prompt")
    p.add_argument("--gen-length", type=int, default=256, help="L: generated tokens")
    p.add_argument("--block-length", type=int, default=32, help="B: block length")
    p.add_argument("--steps", type=int, default=128, help="T: denoising steps in all")
    p.add_argument("--mc", type=int, default=2, help="m: Monte Carlo masked copies per completion")
    p.add_argument("--micro-batch", type=int, default=None, help="train micro-batch (default: all completions)")
    p.add_argument("--rollout-micro-batch", type=int, default=None, help="completions per sampler call (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bfloat16 on cuda")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-size", type=int, default=None, help="peak matmul size (default: 8192 cuda, 2048 cpu)")
    p.add_argument("--peak-samples", type=int, default=5, help="timed samples per peak measurement")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.peak_size is None:
        args.peak_size = 8192 if args.device == "cuda" else 2048
    for name in ("group", "prompts", "prompt_length", "gen_length", "block_length", "steps", "mc", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The Hydra overrides that turn the bench's arguments into the trainer's own config keys."""
    completions = args.group * args.prompts
    out = [
        f"model={args.model}",
        f"task={args.task}",
        "objective=spg",
        f"model/lora={'paper' if args.lora else 'none'}",
        # Random weights: the 8B configs describe an official checkpoint, but only their sizes are used here.
        "model.requires_path=false",
        f"model.dtype={args.dtype}",
        f"deepspeed.bf16.enabled={str(args.dtype == 'bfloat16').lower()}",
        f"cluster.device={args.device}",
        f"cluster.backend={'nccl' if args.device == 'cuda' else 'gloo'}",
        f"rollout.samples_per_prompt={args.group}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.micro_batch={args.rollout_micro_batch or completions}",
        f"train.micro_batch_per_gpu={args.micro_batch or completions}",
        f"sampler.gen_length={args.gen_length}",
        f"sampler.block_length={args.block_length}",
        f"sampler.steps={args.steps}",
        f"objective.mc_samples={args.mc}",
        f"seed={args.seed}",
        "warmstart.enabled=false",
        "logging=none",
    ]
    if args.lora_r is not None:
        out.append(f"model.lora.r={args.lora_r}")
    return out + list(args.overrides)


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved plain dict a worker receives, after the same type and cross-field checks as a run."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import dllm_rl  # noqa: F401  (registers the config schemas)
    from dllm_rl.config import validate

    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    OmegaConf.to_object(cfg)
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


# ---------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """Peak memory over a window: CUDA's allocator peak, or on CPU the process's peak resident set.

    On Linux the resident-set peak (VmHWM) can be reset by writing 5 to /proc/self/clear_refs, so each
    window gets its own peak; where that is refused, the reading is the process's lifetime peak (getrusage),
    which then includes model building and the warm-up step. ``kind`` says which one a number is.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda: torch.cuda.max_memory_allocated / max_memory_reserved"
        elif self._reset_rss():
            self.kind = "cpu: peak resident set size of the process (VmHWM, reset per window)"
        else:
            self.kind = "cpu: lifetime peak resident set size of the process (getrusage ru_maxrss)"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return Memory._status("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif "VmHWM" in self.kind:
            self._reset_rss()

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return self._status("VmRSS") or 0

    def peak(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {
                "allocated": int(torch.cuda.max_memory_allocated(self.device)),
                "reserved": int(torch.cuda.max_memory_reserved(self.device)),
            }
        if "VmHWM" in self.kind:
            return {"rss": self._status("VmHWM") or 0}
        # ru_maxrss is in KiB on Linux, in bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def merge_peak(into: dict[str, int], reading: dict[str, int]) -> None:
    """Keep the larger value of every memory counter (peaks of successive windows make the step's peak)."""
    for k, v in reading.items():
        into[k] = max(into.get(k, 0), v)


class Clock:
    """Seconds and peak memory per phase of one step; the device is synchronised at every clock reading,
    so asynchronous CUDA work is charged to the phase that launched it."""

    def __init__(self, device: torch.device, memory: Memory) -> None:
        self.device, self.memory = device, memory
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.phase_peak: dict[str, dict[str, int]] = {}
        self.step_peak: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        # What happened between phases still counts towards the step's peak.
        merge_peak(self.step_peak, self.memory.peak())
        self.memory.reset()
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start
        reading = self.memory.peak()
        merge_peak(self.phase_peak.setdefault(name, {}), reading)
        merge_peak(self.step_peak, reading)


def _time_chain(device: torch.device, kernel: Any, a: torch.Tensor, b: torch.Tensor, chain: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(chain):
        kernel(a, b)
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, samples: int) -> dict[str, Any]:
    """Best FLOP/s of size x size matmuls in the run dtype: the denominator of MFU on this very machine.

    Two kernels are tried, ``a @ b`` and ``F.linear(a, b)`` (a @ b.T, what every layer of the model runs):
    they are the same GEMM on a GPU, but on CPUs without native bfloat16 the plain matmul falls back to a
    far slower path than linear's. Each sample chains enough matmuls to last a while, so that launch
    overhead and timer resolution do not count; the best sample is taken because interference (other
    processes, clocks ramping up) only ever makes a sample slower.
    """
    g = torch.Generator(device=device).manual_seed(0)
    operands = [torch.randn(size, size, device=device, dtype=dtype, generator=g) for _ in range(2)]
    flops = 2.0 * size**3
    rates: dict[str, list[float]] = {}
    chains: dict[str, int] = {}
    for name, kernel in (("matmul", torch.matmul), ("linear", torch.nn.functional.linear)):
        _time_chain(device, kernel, *operands, 1)  # warm-up: kernel selection, lazy initialisation
        chain = 1
        while (elapsed := _time_chain(device, kernel, *operands, chain)) < 0.1 and chain < 1024:
            chain *= 2  # until one sample fills a tenth of a second
        rates[name] = [chain * flops / elapsed]
        rates[name] += [chain * flops / _time_chain(device, kernel, *operands, chain) for _ in range(samples - 1)]
        chains[name] = chain
    operands.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the operands' cached blocks would otherwise count as reserved in the step
    best = max(rates, key=lambda k: max(rates[k]))
    return {
        "flops_per_second": max(rates[best]),
        "kernel": best,
        "size": size,
        "samples": rates,
        "matmuls_per_sample": chains,
    }


# ------------------------------------------------------------------------------------------------- FLOPs


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def architecture(model: torch.nn.Module) -> dict[str, int]:
    """Sizes by their standard Hugging Face names (with the LLaDA/OLMo spellings as fallbacks), and the
    matmul weights they imply next to those the network really holds, so a misread size shows."""
    config = model.config
    hidden = _config_int(config, "hidden_size", "d_model")
    layers = _config_int(config, "num_hidden_layers", "n_layers", "num_layers")
    heads = _config_int(config, "num_attention_heads", "n_heads", "num_heads")
    kv = _config_int(config, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or heads
    inter = _config_int(config, "intermediate_size", "mlp_hidden_size")
    # LLaDA's head is embedding_size wide (the vocabulary padded up); elsewhere it is vocab_size.
    vocab = _config_int(config, "embedding_size", "vocab_size")
    missing = [n for n, v in (("hidden", hidden), ("layers", layers), ("heads", heads), ("inter", inter)) if not v]
    if missing or not vocab:
        raise SystemExit(f"cannot read the architecture sizes {missing or ['vocab']} from {type(config).__name__}")
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter
    in_model = sum(
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "matmul_params_counted": layers * per_layer + hidden * vocab,
        "matmul_params_in_model": in_model,
        "lora_params": lora,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def sequence_flops(arch: dict[str, int], tokens: int, lora: bool) -> dict[str, float]:
    """Model FLOPs of one sequence of ``tokens`` tokens: forward, and forward + backward (module docstring)."""
    dense = 2.0 * tokens * arch["matmul_params_counted"]
    attention = 4.0 * arch["num_hidden_layers"] * tokens**2 * arch["hidden_size"]
    adapter = 2.0 * tokens * arch["lora_params"]
    forward = dense + attention + adapter
    backward_factor = 2.0 if lora else 3.0  # base matmuls: input gradients only under a frozen base
    return {"forward": forward, "forward_backward": backward_factor * dense + 3.0 * (attention + adapter)}


def flops_convention(lora: bool) -> str:
    base = (
        "forward = 2T*(layer matmul weights + LM head) + 4*layers*T^2*hidden (full bidirectional attention)"
        " + 2T*(LoRA weights); "
    )
    if lora:
        base += "fwd+bwd = 2x base matmuls (frozen base) + 3x attention products + 3x LoRA adapters"
    else:
        base += "fwd+bwd = 3x forward (full fine-tuning)"
    return base + "; gradient-checkpointing recomputation not counted"


# ------------------------------------------------------------------------------------------------- a step


def synthetic_prompts(policy: Any, count: int, length: int, seed: int) -> list[str]:
    """``count`` random strings that encode to exactly ``length`` tokens (the tokenizer's BOS included)."""
    added = len(policy.tokenizer("a")["input_ids"]) - 1
    chars = length - added
    if chars < 1:
        raise SystemExit(f"--prompt-length {length} leaves no room next to the tokenizer's {added} special tokens")
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(chars)) for _ in range(count)]


def spg_step(ctx: SimpleNamespace, round_index: int) -> dict[str, Any]:
    """One rollout round's rollout + prepare + first optimizer step, clocked per phase."""
    from dllm_rl import evaluation
    from dllm_rl.likelihood.masks import mask_seed
    from dllm_rl.trainer import rollout_batch

    cfg, policy, engine, objective = ctx.cfg, ctx.policy, ctx.engine, ctx.objective
    group = int(cfg["rollout"]["samples_per_prompt"])
    seed = int(cfg["seed"])
    clock = Clock(ctx.device, ctx.memory)
    synchronize(ctx.device)
    clock.memory.reset()
    baseline = clock.memory.current()
    skipped_before = engine.skipped_steps
    start = time.perf_counter()

    with clock.phase("rollout"):
        # As Trainer.rollout: each prompt repeated G times in consecutive rows, one seeded generator per round.
        prompts = [p for p in ctx.prompts for _ in range(group)]
        generator = torch.Generator(device=policy.device).manual_seed(mask_seed(seed, "rollout", round_index))
        prompt_ids, attention, completion_ids, nfe = evaluation.generate(
            policy, ctx.sampler, prompts, int(cfg["rollout"]["micro_batch"]), None, generator
        )
        n = len(prompts)
        reward_gen = torch.Generator().manual_seed(mask_seed(seed, "bench_rewards", round_index))
        rewards = torch.randint(0, 2, (n,), generator=reward_gen).float()
        batch = rollout_batch(
            policy, objective, group, round_index, prompt_ids, attention, completion_ids, rewards, {"random": rewards}
        )

    with clock.phase("prepare"):
        objective.prepare(batch, policy)

    # Trainer.optimize's loop for inner step 0, each call on its own clock.
    engine.train(bool(cfg["objective"]["loss_forward_dropout"]))
    micro = int(cfg["train"]["micro_batch_per_gpu"])
    losses = []
    for lo in range(0, len(batch), micro):
        part = batch.select(slice(lo, lo + micro))
        with clock.phase("likelihood_forward"):
            loss, _ = objective.loss(part, policy, 0)
        losses.append(float(loss.detach()))
        with clock.phase("backward"):
            engine.backward(loss)
        with clock.phase("optimizer_step"):
            engine.step()
    synchronize(ctx.device)
    total = time.perf_counter() - start
    merge_peak(clock.step_peak, clock.memory.peak())
    return {
        "phases": dict(clock.seconds),
        "total_seconds": total,
        "untimed_seconds": total - sum(clock.seconds.values()),
        "memory": {"baseline": baseline, "peak": clock.step_peak, "phase_peak": clock.phase_peak},
        "nfe": int(nfe),
        "prompt_tokens": int(prompt_ids.shape[1]),
        "completion_tokens": int(completion_ids.shape[1]),
        "loss": sum(losses) / len(losses),
        "optimizer_step_skipped": bool(engine.skipped_steps > skipped_before),
    }


def setup(args: argparse.Namespace, cfg: dict[str, Any]) -> SimpleNamespace:
    """Policy, LoRA, checkpointing, sampler, objective and DeepSpeed engine, as worker.run builds them."""
    from dllm_rl.worker import build_policy, build_training, init_distributed, quiet_libraries

    quiet_libraries()
    if cfg["cluster"]["threads"]:
        torch.set_num_threads(int(cfg["cluster"]["threads"]))
    init_distributed(cfg["cluster"]["backend"])
    device = torch.device(cfg["cluster"]["device"])
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    # Initialising on the device itself: an 8B random init on the CPU would take minutes; the stand-in task
    # only lends build_policy the alphabet of the character tokenizer.
    with torch.device(device):
        policy, _ = build_policy(cfg, SimpleNamespace(alphabet=ALPHABET))
    sampler, objective, engine = build_training(cfg, policy, device)
    synchronize(device)
    return SimpleNamespace(
        cfg=cfg,
        device=device,
        policy=policy,
        engine=engine,
        sampler=sampler,
        objective=objective,
        memory=Memory(device),
        prompts=synthetic_prompts(policy, args.prompts, args.prompt_length, args.seed),
        setup_seconds=time.perf_counter() - start,
    )


# ------------------------------------------------------------------------------------------------ report


def device_info(device: torch.device) -> dict[str, Any]:
    import deepspeed
    import peft
    import transformers

    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=int(props.total_memory), cuda=torch.version.cuda)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        info["name"] = name
    return info


def summarise(
    args: argparse.Namespace, ctx: SimpleNamespace, warmup: dict, runs: list[dict], peaks: list[dict]
) -> dict[str, Any]:
    cfg = ctx.cfg
    lora = bool(cfg["model"]["lora"]["enabled"])
    arch = architecture(ctx.policy.model)
    completions = args.group * args.prompts
    seq = runs[0]["prompt_tokens"] + runs[0]["completion_tokens"]
    per_row = sequence_flops(arch, seq, lora)
    mc = int(cfg["objective"]["mc_samples"])
    steps = int(cfg["sampler"]["steps"])
    flops = {
        "convention": flops_convention(lora),
        "sequence_tokens": seq,
        "per_sequence_forward": per_row["forward"],
        "per_sequence_forward_backward": per_row["forward_backward"],
        "rollout_sequence_forwards": completions * steps,
        "likelihood_sequences": completions * mc,
        "rollout": completions * steps * per_row["forward"],
        "likelihood_forward": completions * mc * per_row["forward"],
        "forward_backward": completions * mc * per_row["forward_backward"],
    }
    phases = {name: statistics.median(r["phases"][name] for r in runs) for name in PHASES}
    total = statistics.median(r["total_seconds"] for r in runs)
    best = max(peaks, key=lambda p: p["flops_per_second"])
    peak = best["flops_per_second"]
    fwd_bwd_seconds = phases["likelihood_forward"] + phases["backward"]
    achieved = {
        "rollout": flops["rollout"] / phases["rollout"],
        "likelihood_forward": flops["likelihood_forward"] / phases["likelihood_forward"],
        "forward_backward": flops["forward_backward"] / fwd_bwd_seconds,
        "step": (flops["rollout"] + flops["forward_backward"]) / total,
    }
    mu = int(cfg["objective"]["inner_iterations"])
    update = phases["likelihood_forward"] + phases["backward"] + phases["optimizer_step"]
    memory_peak: dict[str, int] = {}
    phase_peak: dict[str, dict[str, int]] = {}
    for r in runs:
        for k, v in r["memory"]["peak"].items():
            memory_peak[k] = max(memory_peak.get(k, 0), v)
        for name, reading in r["memory"]["phase_peak"].items():
            for k, v in reading.items():
                phase_peak.setdefault(name, {})[k] = max(phase_peak.get(name, {}).get(k, 0), v)
    return {
        "bench": "spg_step",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "argv": sys.argv,
        "device": device_info(ctx.device),
        "settings": {
            "model": cfg["model"]["name"],
            "family": cfg["model"]["family"],
            "dtype": cfg["model"]["dtype"],
            "lora": dict(cfg["model"]["lora"]) if lora else None,
            "gradient_checkpointing": bool(cfg["model"]["gradient_checkpointing"]),
            "zero_stage": cfg["deepspeed"]["zero_optimization"]["stage"],
            "deepspeed_bf16": bool(cfg["deepspeed"]["bf16"]["enabled"]),
            "group": args.group,
            "prompts": args.prompts,
            "completions": completions,
            "prompt_length": runs[0]["prompt_tokens"],
            "gen_length": int(cfg["sampler"]["gen_length"]),
            "block_length": int(cfg["sampler"]["block_length"]),
            "steps": steps,
            "mc_samples": mc,
            "mask": cfg["objective"]["mask"]["kind"],
            "negative_surrogate": cfg["objective"]["negative_surrogate"],
            "train_micro_batch": int(cfg["train"]["micro_batch_per_gpu"]),
            "rollout_micro_batch": int(cfg["rollout"]["micro_batch"]),
            "inner_iterations": mu,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        "config": cfg,
        "model": arch,
        "setup_seconds": ctx.setup_seconds,
        "phases": {name: {"seconds": s, "share": s / total} for name, s in phases.items()},
        "total_seconds": total,
        "untimed_seconds": statistics.median(r["untimed_seconds"] for r in runs),
        "round_seconds_estimate": phases["rollout"] + phases["prepare"] + mu * update,
        "memory": {
            "kind": ctx.memory.kind,
            "peak_bytes": memory_peak,
            "phase_peak_bytes": phase_peak,
            # weights, optimizer state and (on CPU) the libraries: what the step starts from
            "baseline_bytes": max(r["memory"]["baseline"] for r in runs),
        },
        "flops": flops,
        "peak": {"dtype": cfg["model"]["dtype"], **best, "measurements": peaks},
        "achieved_flops_per_second": achieved,
        "mfu": {k: v / peak for k, v in achieved.items()},
        "repeats": runs,
        "warmup": warmup,
    }


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _count(value: int) -> str:
    return f"{value / 1e9:.3g} B" if value >= 1e9 else f"{value / 1e6:.3g} M"


def _bytes(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def render(r: dict[str, Any]) -> str:
    s, m, f, mfu = r["settings"], r["model"], r["flops"], r["mfu"]
    lora = f"LoRA r{s['lora']['r']} alpha{s['lora']['alpha']:g}" if s["lora"] else "full fine-tuning"
    lines = [
        f"SPG step: {s['model']} ({s['family']}, {_count(m['params_total'])} params, "
        f"{_count(m['params_trainable'])} trainable, {lora}), {s['dtype']}, ZeRO-{s['zero_stage']}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
        f"device: {r['device']['type']} {r['device']['name']} (torch {r['device']['torch']}, "
        f"{r['device']['torch_threads']} threads)",
        f"G={s['group']} x Q={s['prompts']} = {s['completions']} completions; prompt {s['prompt_length']} + "
        f"gen {s['gen_length']} tokens, block {s['block_length']}, {s['steps']} steps; m={s['mc_samples']}; "
        f"train micro-batch {s['train_micro_batch']}; median of {s['repeats']} after 1 warm-up",
        "",
        f"{'phase':<30}{'seconds':>12}{'share':>9}",
    ]
    for name in PHASES:
        p = r["phases"][name]
        lines.append(f"{PHASE_LABELS[name]:<30}{p['seconds']:>12.4g}{100 * p['share']:>8.1f}%")
    untimed = r["untimed_seconds"]
    lines.append(f"{'(between phases)':<30}{untimed:>12.4g}{100 * untimed / r['total_seconds']:>8.1f}%")
    lines.append(f"{'total':<30}{r['total_seconds']:>12.4g}{100.0:>8.1f}%")
    lines.append(
        f"a round of {s['inner_iterations']} optimizer steps (rollout once): about {r['round_seconds_estimate']:.4g} s"
    )
    lines.append("")
    mem = r["memory"]
    peak = ", ".join(f"{k} {_bytes(v)}" for k, v in mem["peak_bytes"].items())
    lines.append(f"peak memory: {peak}; {_bytes(mem['baseline_bytes'])} at the step's start  [{mem['kind']}]")
    for name in PHASES:
        if name in mem["phase_peak_bytes"]:
            reading = ", ".join(f"{k} {_bytes(v)}" for k, v in mem["phase_peak_bytes"][name].items())
            lines.append(f"  {PHASE_LABELS[name]:<30}{reading}")
    lines.append("")
    lines.append(
        f"model FLOPs: rollout {_si(f['rollout'], 'FLOP')} ({f['rollout_sequence_forwards']} sequence forwards), "
        f"likelihood forward {_si(f['likelihood_forward'], 'FLOP')}, "
        f"forward+backward {_si(f['forward_backward'], 'FLOP')} ({f['likelihood_sequences']} sequences of "
        f"{f['sequence_tokens']} tokens)"
    )
    lines.append(f"  convention: {f['convention']}")
    if m["matmul_params_counted"] != m["matmul_params_in_model"]:
        lines.append(
            f"  WARNING: sizes imply {m['matmul_params_counted']} matmul weights, the network holds "
            f"{m['matmul_params_in_model']}"
        )
    pk = r["peak"]
    lines.append(
        f"measured peak: {_si(pk['flops_per_second'], 'FLOP/s')} ({pk['size']}^2 {pk['dtype']} {pk['kernel']}, "
        "best sample)"
    )
    achieved = r["achieved_flops_per_second"]
    lines.append(f"{'MFU':<30}{'FLOP/s':>12}{'MFU':>9}")
    for key, label in (
        ("rollout", "rollout forwards"),
        ("likelihood_forward", "likelihood forward"),
        ("forward_backward", "likelihood forward+backward"),
        ("step", "whole step"),
    ):
        lines.append(f"{label:<30}{_si(achieved[key], ''):>12}{100 * mfu[key]:>8.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    cfg = compose_config(config_overrides(args))
    ctx = setup(args, cfg)
    dtype = getattr(torch, cfg["model"]["dtype"])
    peaks = [matmul_peak(ctx.device, dtype, args.peak_size, args.peak_samples)]
    warmup = spg_step(ctx, 0)
    runs = [spg_step(ctx, i) for i in range(1, args.repeats + 1)]
    peaks.append(matmul_peak(ctx.device, dtype, args.peak_size, args.peak_samples))
    result = summarise(args, ctx, warmup, runs, peaks)
    print(render(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
