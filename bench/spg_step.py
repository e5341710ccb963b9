"""Peak memory and time of one RL training step by phase, model FLOPs utilisation, and how they grow.

One step is what the trainer charges to the first optimizer step of a rollout round (SPG by default,
``--objective`` for any registered one):

    rollout         G x Q completions of synthetic prompts through trainer.generate_round, the function
                    Trainer.rollout decodes with (real sampler, policy.logits, one seeded generator per
                    rollout micro-batch): decoding only
    reward          policy.decode of the completions, the task's real reward functions on them, the training
                    rewards, objective.advantages and the RolloutBatch (trainer.rollout_batch)
    prepare         no-grad precomputation: objective.prepare(batch, policy), once per round (SPG, ELBO: nothing;
                    diffu-GRPO: old and reference log-probs of every inner step; DMPO: current and reference
                    ELBOs; GDSD: old and reference scores; wd1: the advantage weights)
    likelihood fwd  objective.loss per train micro-batch (m masked copies per completion, one forward)
    backward        engine.backward(loss)
    optimizer step  engine.step()

The model has random weights (``build_tiny`` builds any family at any size, the 8B ones included), so no
checkpoint is needed. The reward phase runs the task's own reward functions (``--task``, GSM8K by default) on
the decoded texts, each completion scored against the example row its function is registered with
(``tasks.rewards.REWARDS``), so its time is that of the real reward code. Text from random weights earns the
same reward in every row, which would leave every advantage 0, so the rewards the objective trains on are
seeded 0/1 draws instead (the task's values are reported next to them, not used). Config, policy, LoRA,
gradient checkpointing and the DeepSpeed engine come from the same functions ``worker.run`` uses (build.py);
the update is ``trainer.accumulate_step``, the loop ``Trainer.optimize`` runs, with a clock around each call.
The same command runs on CPU and on a CUDA GPU; the device only changes the defaults (dtype, backend, peak-matmul size).

``--mc`` sets the objective's own Monte Carlo key: ``mc_samples`` (m masked copies per completion) for SPG,
ELBO and DMPO (DMPO's rollout-time copies stay ``objective.rollout_mc_samples``, an override), ``mc_pairs``
(coupled pairs, two copies each) for GDSD; diffu-GRPO and wd1 use d1's one-step estimator (one copy per
completion) and take no ``--mc``. ``--grow KEY=V1,V2,...`` (gen_length, batch = prompts per step, group, mc;
repeatable) reruns the measured step, on a freshly built model and engine, for each value with everything
else fixed, and prints per key each phase's seconds, the total, the peak memory and the model FLOPs, with
their ratios to the first value: compute-bound phases grow with their FLOPs, overheads do not.

Model FLOPs are counted from the architecture (``policy.model.config``), never measured, so that MFU does
not depend on kernels. Every forward through the policy network (and the frozen reference copy, if any) is
recorded with its rows, its tokens and whether it builds a graph, so the count follows what each objective
really runs (masked copies, chunks, reference scoring). Convention, per sequence of T tokens:

    forward   = 2 T (matmul weights of all layers + LM head) + 4 layers T^2 hidden   (bidirectional T x T)
                + 2 T (LoRA adapter weights)
    fwd + bwd = 3 x forward for full fine-tuning;
                with a frozen base and LoRA: 2 x the base matmuls (input gradients only, no weight gradients),
                3 x the attention score/value products (they have no weights: both inputs need gradients)
                and 3 x the adapters.

A forward without gradients (the sampler, objective.prepare) counts its forward only; LoRA adapters are
counted in reference forwards too (they are switched off there: a small overcount). With a sampler KV cache
(``sampler.cache``) a windowed forward is counted on its window's tokens alone. Activation recomputation from
gradient checkpointing is not counted (the usual MFU convention), so a checkpointed backward shows up as a
lower fwd+bwd MFU. The peak is measured, not looked up: the best rate of large square matmuls in the run
dtype on this device, before and after all timed steps.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

# "prepare" keeps its JSON key; its label says what it is.
PHASES = ("rollout", "reward", "prepare", "likelihood_forward", "backward", "optimizer_step")
PHASE_LABELS = {
    "rollout": "rollout (decoding)",
    "reward": "reward (decode, reward, advantages)",
    "prepare": "no-grad precompute (objective.prepare)",
    "likelihood_forward": "likelihood forward (loss)",
    "backward": "backward",
    "optimizer_step": "optimizer step",
}
# Short column headers of the growth tables.
PHASE_COLUMNS = {
    "rollout": "rollout",
    "reward": "reward",
    "prepare": "precomp",
    "likelihood_forward": "lik fwd",
    "backward": "backward",
    "optimizer_step": "optim",
}
# The model FLOPs of each phase (flops[...] keys); reward and optimizer step run no model.
PHASE_FLOPS = {
    "rollout": "rollout",
    "prepare": "precompute",
    "likelihood_forward": "likelihood_forward",
    "backward": "backward",
}
# --grow KEY -> the argument it sets.
GROW_KEYS = {"gen_length": "gen_length", "batch": "prompts", "group": "group", "mc": "mc"}
# Objective config keys that hold the Monte Carlo sample count, in the order looked for.
MC_KEYS = ("mc_samples", "mc_pairs")
# The character tokenizer only supplies the family's special ids; prompts are random strings over this.
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
GIB = 2**30


# ---------------------------------------------------------------------------------------------- arguments


def parse_grow(text: str) -> tuple[str, list[int]]:
    """``KEY=V1,V2,...`` -> (KEY, [V1, V2, ...])."""
    key, sep, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in GROW_KEYS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=V1,V2,... with KEY in {', '.join(GROW_KEYS)}")
    try:
        out = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the values must be integers") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one value, every one >= 1")
    return key, out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Trailing KEY=VALUE arguments are Hydra overrides of the composed config (e.g. deepspeed=zero3).",
    )
    p.add_argument("--model", default="tiny_llada", help="model config name (dllm_rl/conf/model/<name>.yaml)")
    p.add_argument("--task", default="gsm8k", help="task config: its reward functions and objective_task settings")
    p.add_argument("--objective", default="spg", help="objective config (spg, elbo, dmpo, gdsd, diffu_grpo, wd1)")
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
    p.add_argument(
        "--mc",
        type=int,
        default=None,
        help="m: the objective's Monte Carlo count (objective.mc_samples, or mc_pairs for gdsd; "
        "diffu_grpo and wd1 have none); default: the objective's config (spg: 2)",
    )
    p.add_argument("--micro-batch", type=int, default=None, help="train micro-batch (default: all completions)")
    p.add_argument("--rollout-micro-batch", type=int, default=None, help="completions per sampler call (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bfloat16 on cuda")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-size", type=int, default=None, help="peak matmul size (default: 8192 cuda, 2048 cpu)")
    p.add_argument("--peak-samples", type=int, default=5, help="timed samples per peak measurement")
    p.add_argument(
        "--grow",
        type=parse_grow,
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help=f"rerun the step for each value of KEY ({', '.join(GROW_KEYS)}; batch = prompts per step), "
        "the rest fixed, and print a growth table per key (repeatable)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE")
    # Intermixed: Hydra overrides may come before, between or after the options.
    args = p.parse_intermixed_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.peak_size is None:
        args.peak_size = 8192 if args.device == "cuda" else 2048
    for name in ("group", "prompts", "prompt_length", "gen_length", "block_length", "steps", "mc", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    keys = [key for key, _ in args.grow]
    if len(set(keys)) < len(keys):
        p.error("--grow: give each KEY once")
    return args


def config_overrides(args: argparse.Namespace, mc_key: str | None = None) -> list[str]:
    """The Hydra overrides that turn the bench's arguments into the trainer's own config keys
    (``--mc`` only with the objective's ``mc_key``, which ``build_config`` finds)."""
    completions = args.group * args.prompts
    out = [
        f"model={args.model}",
        f"task={args.task}",
        f"objective={args.objective}",
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
        f"seed={args.seed}",
        "warmstart.enabled=false",
        "logging=none",
    ]
    if mc_key is not None and args.mc is not None:
        out.append(f"objective.{mc_key}={args.mc}")
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


def mc_key(objective_cfg: dict[str, Any]) -> str | None:
    """The objective's Monte Carlo count key (mc_samples, mc_pairs), None for a one-step estimator."""
    return next((key for key in MC_KEYS if key in objective_cfg), None)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The composed config, ``--mc`` written to the objective's own key (composed once more to find it)."""
    cfg = compose_config(config_overrides(args))
    if args.mc is None:
        return cfg
    key = mc_key(cfg["objective"])
    if key is None:
        raise SystemExit(
            f"--mc: objective {cfg['objective']['name']} has no Monte Carlo count ({' or '.join(MC_KEYS)}); "
            "it scores one masked copy per completion"
        )
    return compose_config(config_overrides(args, key))


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


class ForwardCounter:
    """Every forward through the given networks, per clock phase: (tokens, builds a graph) -> rows.

    A pre-hook on the top-level module sees each call of the network once, whoever makes it (the sampler
    through ``policy.logits``, the objectives through ``masked_logp``, ``policy.reference_logits``); the
    recomputation of gradient checkpointing happens inside the layers and is not seen.
    """

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.phase = "outside phases"
        self.rows: dict[str, dict[tuple[int, bool], int]] = defaultdict(lambda: defaultdict(int))
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self.rows[self.phase][(int(ids.shape[1]), torch.is_grad_enabled())] += int(ids.shape[0])

    def take(self) -> dict[str, list[dict[str, Any]]]:
        """The forwards recorded since the last take, as JSON-ready lists per phase."""
        out = {
            phase: [{"tokens": t, "grad": g, "rows": n} for (t, g), n in sorted(counts.items())]
            for phase, counts in self.rows.items()
        }
        self.rows.clear()
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Clock:
    """Seconds and peak memory per phase of one step; the device is synchronised at every clock reading,
    so asynchronous CUDA work is charged to the phase that launched it. The forwards the counter sees
    are charged to the phase they run in."""

    def __init__(self, device: torch.device, memory: Memory, counter: ForwardCounter) -> None:
        self.device, self.memory, self.counter = device, memory, counter
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.phase_peak: dict[str, dict[str, int]] = {}
        self.step_peak: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        # What happened between phases still counts towards the step's peak.
        merge_peak(self.step_peak, self.memory.peak())
        self.memory.reset()
        self.counter.phase = name
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start
        self.counter.phase = "outside phases"
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


def forward_flops(arch: dict[str, int], lora: bool, forwards: list[dict[str, Any]]) -> dict[str, float]:
    """Rows and model FLOPs of a phase's recorded forwards: ``forward`` counts every forward once,
    ``with_backward`` adds the backward of those that built a graph (what engine.backward then runs)."""
    out = {"rows": 0, "grad_rows": 0, "forward": 0.0, "with_backward": 0.0}
    for entry in forwards:
        per_row = sequence_flops(arch, entry["tokens"], lora)
        out["rows"] += entry["rows"]
        out["forward"] += entry["rows"] * per_row["forward"]
        if entry["grad"]:
            out["grad_rows"] += entry["rows"]
            out["with_backward"] += entry["rows"] * per_row["forward_backward"]
        else:
            out["with_backward"] += entry["rows"] * per_row["forward"]
    return out


# ------------------------------------------------------------------------------------------------- a step


def synthetic_prompts(policy: Any, count: int, length: int, seed: int) -> list[str]:
    """``count`` random strings that encode to exactly ``length`` tokens (the tokenizer's BOS included)."""
    added = len(policy.tokenizer("a")["input_ids"]) - 1
    chars = length - added
    if chars < 1:
        raise SystemExit(f"--prompt-length {length} leaves no room next to the tokenizer's {added} special tokens")
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(chars)) for _ in range(count)]


def reward_example(task: Any) -> dict[str, Any]:
    """A data row for the task's reward functions: the example rows they are registered with, merged."""
    from dllm_rl.tasks.rewards import REWARDS

    row: dict[str, Any] = {}
    for _, fn in task.reward_fns:
        row.update(next((dict(spec.example) for spec in REWARDS.values() if spec.fn is fn), {}))
    return row


def train_step(ctx: SimpleNamespace, round_index: int) -> dict[str, Any]:
    """One rollout round's rollout + reward + prepare + first optimizer step, clocked per phase."""
    from dllm_rl.likelihood.masks import mask_seed
    from dllm_rl.tasks import total_reward
    from dllm_rl.trainer import accumulate_step, generate_round, rollout_batch

    cfg, policy, engine, objective = ctx.cfg, ctx.policy, ctx.engine, ctx.objective
    group = int(cfg["rollout"]["samples_per_prompt"])
    seed = int(cfg["seed"])
    clock = Clock(ctx.device, ctx.memory, ctx.counter)
    ctx.counter.take()
    synchronize(ctx.device)
    clock.memory.reset()
    baseline = clock.memory.current()
    skipped_before = engine.skipped_steps
    start = time.perf_counter()

    with clock.phase("rollout"):
        # Trainer.rollout's decoding: each prompt G times, one seeded generator per rollout micro-batch.
        prompt_ids, attention, completion_ids, nfe = generate_round(
            policy, ctx.sampler, ctx.prompts, group, int(cfg["rollout"]["micro_batch"]), seed, round_index
        )

    with clock.phase("reward"):
        # As Trainer.rollout after generation; the training rewards are the seeded draws (module docstring).
        texts = policy.decode(completion_ids)
        parts = [ctx.task.reward(text, ctx.reward_row) for text in texts]
        task_rewards = torch.tensor([total_reward(p) for p in parts], dtype=torch.float32)
        reward_parts = {f"task/{k}": torch.tensor([p[k] for p in parts], dtype=torch.float32) for k in parts[0]}
        reward_gen = torch.Generator().manual_seed(mask_seed(seed, "bench_rewards", round_index))
        rewards = torch.randint(0, 2, (len(texts),), generator=reward_gen).float()
        batch = rollout_batch(
            policy,
            objective,
            group,
            round_index,
            prompt_ids,
            attention,
            completion_ids,
            rewards,
            {"random": rewards, **reward_parts},
        )

    with clock.phase("prepare"):
        objective.prepare(batch, policy)

    # Trainer.optimize's micro-batch loop for inner step 0, each call on its own clock.
    ocfg, micro = cfg["objective"], int(cfg["train"]["micro_batch_per_gpu"])
    dropout = bool(ocfg["loss_forward_dropout"])
    records = accumulate_step(engine, objective, policy, batch, micro, 0, dropout, phase=clock.phase)
    losses = [loss for loss, _, _ in records]
    synchronize(ctx.device)
    total = time.perf_counter() - start
    merge_peak(clock.step_peak, clock.memory.peak())
    return {
        "phases": dict(clock.seconds),
        "total_seconds": total,
        "untimed_seconds": total - sum(clock.seconds.values()),
        "memory": {"baseline": baseline, "peak": clock.step_peak, "phase_peak": clock.phase_peak},
        "forwards": ctx.counter.take(),
        "nfe": int(nfe),
        "prompt_tokens": int(prompt_ids.shape[1]),
        "completion_tokens": int(completion_ids.shape[1]),
        "task_reward_mean": float(task_rewards.mean()),
        "loss": sum(losses) / len(losses),
        "optimizer_step_skipped": bool(engine.skipped_steps > skipped_before),
    }


def init_process(cfg: dict[str, Any]) -> torch.device:
    """Threads, torch.distributed and the device, once per process (before the peak is measured)."""
    from dllm_rl.build import quiet_libraries
    from dllm_rl.distributed import init_distributed

    quiet_libraries()
    if cfg["cluster"]["threads"]:
        torch.set_num_threads(int(cfg["cluster"]["threads"]))
    init_distributed(cfg["cluster"]["backend"])
    device = torch.device(cfg["cluster"]["device"])
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def setup(args: argparse.Namespace, cfg: dict[str, Any], device: torch.device) -> SimpleNamespace:
    """Policy, LoRA, checkpointing, sampler, objective and DeepSpeed engine, as worker.run builds them,
    and the task whose reward functions score the completions."""
    from dllm_rl.build import build_policy, build_training
    from dllm_rl.config import run_config
    from dllm_rl.tasks import get_task

    start = time.perf_counter()
    run = run_config(cfg)  # the typed view the components read, as worker.run makes it of the same dict
    task = get_task(run.task.name, run.task, Path(run.cache_dir).expanduser())
    # Initialising on the device itself: an 8B random init on the CPU would take minutes; the stand-in task
    # only lends build_policy the alphabet of the character tokenizer.
    with torch.device(device):
        policy, _ = build_policy(run, SimpleNamespace(alphabet=ALPHABET))
    sampler, objective, engine = build_training(run, policy, device)
    networks = [policy.model] + ([policy._reference_copy] if policy._reference_copy is not None else [])
    synchronize(device)
    return SimpleNamespace(
        cfg=cfg,
        device=device,
        policy=policy,
        engine=engine,
        sampler=sampler,
        objective=objective,
        task=task,
        reward_row=reward_example(task),
        counter=ForwardCounter(networks),
        memory=Memory(device),
        prompts=synthetic_prompts(policy, args.prompts, args.prompt_length, args.seed),
        setup_seconds=time.perf_counter() - start,
    )


def teardown(ctx: SimpleNamespace) -> None:
    """Free the model, the engine and the optimizer state before the next setting of a growth run."""
    ctx.counter.remove()
    if hasattr(ctx.engine, "destroy"):
        with contextlib.suppress(Exception):
            ctx.engine.destroy()
    ctx.policy.forward_module = None
    for name in ("engine", "policy", "objective", "sampler", "task"):
        setattr(ctx, name, None)
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def measure(args: argparse.Namespace, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One setting: build everything, one warm-up step, ``--repeats`` timed steps, then free it all.
    What ``summarise`` needs of the built objects (the architecture, the memory kind) is kept."""
    ctx = setup(args, cfg, device)
    try:
        warmup = train_step(ctx, 0)
        runs = [train_step(ctx, i) for i in range(1, args.repeats + 1)]
        return {
            "cfg": cfg,
            "device": device,
            "arch": architecture(ctx.policy.model),
            "memory_kind": ctx.memory.kind,
            "setup_seconds": ctx.setup_seconds,
            "reward_functions": [name for name, _ in ctx.task.reward_fns],
            "reward_row": ctx.reward_row,
            "warmup": warmup,
            "runs": runs,
        }
    finally:
        teardown(ctx)


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


def summarise(m: dict[str, Any], peaks: list[dict]) -> dict[str, Any]:
    """The report of one measured setting (``measure``), MFU against the best of ``peaks``."""
    cfg, runs, arch = m["cfg"], m["runs"], m["arch"]
    lora = bool(cfg["model"]["lora"]["enabled"])
    group, prompts = int(cfg["rollout"]["samples_per_prompt"]), int(cfg["rollout"]["prompts_per_step"])
    completions = group * prompts
    seq = runs[0]["prompt_tokens"] + runs[0]["completion_tokens"]
    per_row = sequence_flops(arch, seq, lora)
    key = mc_key(cfg["objective"])
    steps = int(cfg["sampler"]["steps"])
    # Shapes do not change between repeats: the first timed step's forwards are every step's.
    counted = {name: forward_flops(arch, lora, runs[0]["forwards"].get(name, [])) for name in PHASES}
    flops = {
        "convention": flops_convention(lora),
        "sequence_tokens": seq,
        "per_sequence_forward": per_row["forward"],
        "per_sequence_forward_backward": per_row["forward_backward"],
        "rollout_sequence_forwards": counted["rollout"]["rows"],
        "precompute_sequence_forwards": counted["prepare"]["rows"],
        "likelihood_sequences": counted["likelihood_forward"]["rows"],
        "rollout": counted["rollout"]["forward"],
        "precompute": counted["prepare"]["forward"],
        "likelihood_forward": counted["likelihood_forward"]["forward"],
        "forward_backward": counted["likelihood_forward"]["with_backward"],
        "by_phase": counted,
    }
    flops["backward"] = flops["forward_backward"] - flops["likelihood_forward"]
    flops["step"] = flops["rollout"] + flops["precompute"] + flops["forward_backward"]
    phases = {name: statistics.median(r["phases"][name] for r in runs) for name in PHASES}
    total = statistics.median(r["total_seconds"] for r in runs)
    best = max(peaks, key=lambda p: p["flops_per_second"])
    peak = best["flops_per_second"]
    achieved = {
        "rollout": flops["rollout"] / phases["rollout"],
        "likelihood_forward": flops["likelihood_forward"] / phases["likelihood_forward"],
        "forward_backward": flops["forward_backward"] / (phases["likelihood_forward"] + phases["backward"]),
        "step": flops["step"] / total,
    }
    if flops["precompute"] > 0:
        achieved["precompute"] = flops["precompute"] / phases["prepare"]
    mu = int(cfg["objective"]["inner_iterations"])
    update = phases["likelihood_forward"] + phases["backward"] + phases["optimizer_step"]
    memory_peak: dict[str, int] = {}
    phase_peak: dict[str, dict[str, int]] = {}
    for r in runs:
        merge_peak(memory_peak, r["memory"]["peak"])
        for name, reading in r["memory"]["phase_peak"].items():
            merge_peak(phase_peak.setdefault(name, {}), reading)
    return {
        "bench": "spg_step",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "argv": sys.argv,
        "device": device_info(m["device"]),
        "settings": {
            "model": cfg["model"]["name"],
            "family": cfg["model"]["family"],
            "dtype": cfg["model"]["dtype"],
            "lora": dict(cfg["model"]["lora"]) if lora else None,
            "gradient_checkpointing": bool(cfg["model"]["gradient_checkpointing"]),
            "zero_stage": cfg["deepspeed"]["zero_optimization"]["stage"],
            "deepspeed_bf16": bool(cfg["deepspeed"]["bf16"]["enabled"]),
            "objective": cfg["objective"]["name"],
            "task": cfg["task"]["name"],
            "group": group,
            "prompts": prompts,
            "completions": completions,
            "prompt_length": runs[0]["prompt_tokens"],
            "gen_length": int(cfg["sampler"]["gen_length"]),
            "block_length": int(cfg["sampler"]["block_length"]),
            "steps": steps,
            "mc_key": key,
            "mc": int(cfg["objective"][key]) if key else None,
            "mc_samples": cfg["objective"].get("mc_samples"),
            "mask": cfg["objective"]["mask"]["kind"],
            "negative_surrogate": cfg["objective"].get("negative_surrogate"),
            "train_micro_batch": int(cfg["train"]["micro_batch_per_gpu"]),
            "rollout_micro_batch": int(cfg["rollout"]["micro_batch"]),
            "inner_iterations": mu,
            "repeats": len(runs),
            "seed": int(cfg["seed"]),
        },
        "config": cfg,
        "model": arch,
        "setup_seconds": m["setup_seconds"],
        "reward": {
            "functions": m["reward_functions"],
            "example_row": m["reward_row"],
            "training_rewards": "seeded 0/1 draws (the task's rewards are timed and reported, not trained on)",
            "task_reward_mean": statistics.mean(r["task_reward_mean"] for r in runs),
        },
        "phases": {name: {"seconds": s, "share": s / total} for name, s in phases.items()},
        "total_seconds": total,
        "untimed_seconds": statistics.median(r["untimed_seconds"] for r in runs),
        "round_seconds_estimate": phases["rollout"] + phases["reward"] + phases["prepare"] + mu * update,
        "memory": {
            "kind": m["memory_kind"],
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
        "warmup": m["warmup"],
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


def _mc_text(s: dict[str, Any]) -> str:
    return f"m={s['mc']} (objective.{s['mc_key']})" if s["mc_key"] else "one-step estimator (no m)"


def render_header(r: dict[str, Any]) -> list[str]:
    s, m = r["settings"], r["model"]
    lora = f"LoRA r{s['lora']['r']} alpha{s['lora']['alpha']:g}" if s["lora"] else "full fine-tuning"
    return [
        f"{s['objective']} step: {s['model']} ({s['family']}, {_count(m['params_total'])} params, "
        f"{_count(m['params_trainable'])} trainable, {lora}), {s['dtype']}, ZeRO-{s['zero_stage']}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
        f"device: {r['device']['type']} {r['device']['name']} (torch {r['device']['torch']}, "
        f"{r['device']['torch_threads']} threads)",
    ]


def render(r: dict[str, Any]) -> str:
    s, m, f, mfu = r["settings"], r["model"], r["flops"], r["mfu"]
    width = 42
    lines = [
        *render_header(r),
        f"G={s['group']} x Q={s['prompts']} = {s['completions']} completions; prompt {s['prompt_length']} + "
        f"gen {s['gen_length']} tokens, block {s['block_length']}, {s['steps']} steps; {_mc_text(s)}; "
        f"train micro-batch {s['train_micro_batch']}; median of {s['repeats']} after 1 warm-up",
        f"rewards: {s['task']} reward functions ({', '.join(r['reward']['functions'])}) timed, mean "
        f"{r['reward']['task_reward_mean']:.3g}; trained on seeded 0/1 rewards",
        "",
        f"{'phase':<{width}}{'seconds':>12}{'share':>9}",
    ]
    for name in PHASES:
        p = r["phases"][name]
        lines.append(f"{PHASE_LABELS[name]:<{width}}{p['seconds']:>12.4g}{100 * p['share']:>8.1f}%")
    untimed = r["untimed_seconds"]
    lines.append(f"{'(between phases)':<{width}}{untimed:>12.4g}{100 * untimed / r['total_seconds']:>8.1f}%")
    lines.append(f"{'total':<{width}}{r['total_seconds']:>12.4g}{100.0:>8.1f}%")
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
            lines.append(f"  {PHASE_LABELS[name]:<{width}}{reading}")
    lines.append("")
    lines.append(
        f"model FLOPs: rollout {_si(f['rollout'], 'FLOP')} ({f['rollout_sequence_forwards']} sequence forwards), "
        f"precompute {_si(f['precompute'], 'FLOP')} ({f['precompute_sequence_forwards']} sequence forwards), "
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
        ("precompute", "no-grad precompute"),
        ("likelihood_forward", "likelihood forward"),
        ("forward_backward", "likelihood forward+backward"),
        ("step", "whole step"),
    ):
        if key in achieved:
            lines.append(f"{label:<30}{_si(achieved[key], ''):>12}{100 * mfu[key]:>8.2f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ growth


def _ratio(value: float, first: float) -> float | None:
    return value / first if first > 0 else None


def growth_rows(key: str, values: list[int], reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per value: each phase's seconds, the total, peak memory, model FLOPs, and their ratios to the first.

    A phase under a millisecond at the first value gets no time ratio (it would be timer noise), a phase
    without model FLOPs (reward, optimizer step) no FLOPs ratio.
    """
    rows = []
    for value, r in zip(values, reports, strict=True):
        mem = r["memory"]
        peak = next(iter(mem["peak_bytes"].values()))
        rows.append(
            {
                "key": key,
                "value": value,
                "seconds": {name: r["phases"][name]["seconds"] for name in PHASES},
                "total_seconds": r["total_seconds"],
                "peak_memory_bytes": peak,
                "step_memory_bytes": max(peak - mem["baseline_bytes"], 0),
                "flops": {name: r["flops"][PHASE_FLOPS[name]] for name in PHASE_FLOPS},
                "flops_step": r["flops"]["step"],
                "mfu_step": r["mfu"]["step"],
            }
        )
    first = rows[0]
    for row in rows:
        row["time_ratio"] = {
            name: _ratio(row["seconds"][name], first["seconds"][name]) if first["seconds"][name] >= 1e-3 else None
            for name in PHASES
        }
        row["time_ratio"]["total"] = _ratio(row["total_seconds"], first["total_seconds"])
        row["peak_memory_ratio"] = _ratio(row["peak_memory_bytes"], first["peak_memory_bytes"])
        row["step_memory_ratio"] = _ratio(row["step_memory_bytes"], first["step_memory_bytes"])
        row["flops_ratio"] = {name: _ratio(row["flops"][name], first["flops"][name]) for name in PHASE_FLOPS}
        row["flops_ratio"]["step"] = _ratio(row["flops_step"], first["flops_step"])
    return rows


def _mib(value: int) -> str:
    return f"{value / GIB:.2f}G" if value >= GIB else f"{value / 2**20:.0f}M"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_growth(key: str, fixed: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    label, col = 16, 10
    columns = [PHASE_COLUMNS[name] for name in PHASES] + ["total", "peak mem", "step mem", "FLOPs", "MFU"]
    first = f"{key}={rows[0]['value']}"
    lines = [
        f"growth in {key} ({', '.join(f'{k} {v}' for k, v in fixed.items())})",
        f"{key:<{label}}" + "".join(f"{c:>{col}}" for c in columns),
    ]
    for row in rows:
        cells = [f"{row['seconds'][name]:.3g}" for name in PHASES]
        cells += [f"{row['total_seconds']:.3g}", _mib(row["peak_memory_bytes"]), _mib(row["step_memory_bytes"])]
        cells += [_si(row["flops_step"], "").strip(), f"{100 * row['mfu_step']:.2f}%"]
        lines.append(f"{row['value']:<{label}}" + "".join(f"{c:>{col}}" for c in cells))
    lines.append(f"ratio to {first}: time (seconds above), FLOPs (model FLOPs of the phase; the step's under total)")
    for row in rows[1:]:
        time_cells = [_x(row["time_ratio"][name]) for name in PHASES] + [_x(row["time_ratio"]["total"])]
        time_cells += [_x(row["peak_memory_ratio"]), _x(row["step_memory_ratio"]), _x(row["flops_ratio"]["step"])]
        flop_cells = [_x(row["flops_ratio"][name]) if name in PHASE_FLOPS else "" for name in PHASES]
        flop_cells.append(_x(row["flops_ratio"]["step"]))
        for kind, cells in (("time", time_cells), ("FLOPs", flop_cells)):
            name = f"{row['value']} {kind}"
            lines.append(f"{name:<{label}}" + "".join(f"{c:>{col}}" for c in cells))
    return "\n".join(lines)


def varied(args: argparse.Namespace, key: str, value: int) -> argparse.Namespace:
    """The arguments with one --grow KEY set to ``value``."""
    return argparse.Namespace(**{**vars(args), GROW_KEYS[key]: value})


def grow(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, list[dict]], dict[str, list[int]]]:
    """Measure every value of every --grow key: per key, one measurement per value, in order. A setting
    whose resolved config was already measured (the base value of several keys) is measured once."""
    measured: dict[str, dict] = {}
    out: dict[str, list[dict]] = {}
    for key, values in args.grow:
        out[key] = []
        for value in values:
            grown = varied(args, key, value)
            cfg = build_config(grown)
            identity = json.dumps(cfg, sort_keys=True)
            if identity not in measured:
                print(f"measuring {key}={value} ...", file=sys.stderr, flush=True)
                measured[identity] = measure(grown, cfg, device)
            out[key].append(measured[identity])
    return out, dict(args.grow)


def growth_report(measurements: dict[str, list[dict]], plan: dict[str, list[int]], peaks: list[dict]) -> dict[str, Any]:
    growth = {}
    for key, values in plan.items():
        reports = [summarise(m, peaks) for m in measurements[key]]
        s = reports[0]["settings"]
        fixed = {
            "gen_length": s["gen_length"],
            "batch": s["prompts"],
            "group": s["group"],
            "mc": s["mc"] if s["mc_key"] else "-",
            "prompt": s["prompt_length"],
            "block": s["block_length"],
            "steps": s["steps"],
        }
        fixed = {k: v for k, v in fixed.items() if k != key}
        fixed["timed steps"] = f"{s['repeats']} (median) after 1 warm-up"
        growth[key] = {
            "values": values,
            "fixed": fixed,
            "rows": growth_rows(key, values, reports),
            "reports": reports,
        }
    first = next(iter(growth.values()))["reports"][0]
    return {
        "bench": "spg_step",
        "command": first["command"],
        "argv": first["argv"],
        "device": first["device"],
        "peak": first["peak"],
        "model": first["model"],
        "growth": growth,
    }


def render_growth_report(result: dict[str, Any]) -> str:
    first = next(iter(result["growth"].values()))["reports"][0]
    pk = result["peak"]
    lines = [
        *render_header(first),
        f"measured peak: {_si(pk['flops_per_second'], 'FLOP/s')} ({pk['size']}^2 {pk['dtype']} {pk['kernel']}); "
        f"memory: {first['memory']['kind']}; step mem = peak - memory at the step's start",
        f"columns: seconds per phase ({', '.join(f'{PHASE_COLUMNS[n]} = {PHASE_LABELS[n]}' for n in PHASES)}), "
        "model FLOPs of the step, MFU of the step",
    ]
    for key, g in result["growth"].items():
        lines += ["", render_growth(key, g["fixed"], g["rows"])]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    cfg = build_config(args)
    device = init_process(cfg)
    dtype = getattr(torch, cfg["model"]["dtype"])
    peaks = [matmul_peak(device, dtype, args.peak_size, args.peak_samples)]
    if not args.grow:
        measured = measure(args, cfg, device)
        peaks.append(matmul_peak(device, dtype, args.peak_size, args.peak_samples))
        result = summarise(measured, peaks)
        text = render(result)
    else:
        measurements, plan = grow(args, device)
        peaks.append(matmul_peak(device, dtype, args.peak_size, args.peak_samples))
        result = growth_report(measurements, plan, peaks)
        text = render_growth_report(result)
    print(text)
    write_json(args.json, result)
    return 0


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """The whole result as JSON at ``path`` (nothing without one); shared by the benches."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
