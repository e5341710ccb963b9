"""Speed and accuracy of the sampler's variants: Fast-dLLM KV caches and confidence-threshold decoding.

Two parts, one subcommand each:

    speed       random weights of any model config (tiny_llada ... llada_8b_instruct), random prompts of
                --prompt-length tokens, a grid of generation lengths x batch sizes; per cell and variant
                the median wall time of --repeats runs after one warm-up run, generated tokens/s, NFE,
                forward tokens, tokens committed per step, speed-up against plain, model FLOPs and MFU
    accuracy    the warm-started tiny base of a task (sudoku, countdown, compact style), its test split
                decoded greedily by evaluation.score for every variant: the task's primary metric, its
                paired difference to plain with a noise band, tokens/s, NFE and forward tokens per token

Variants (``--variants``, default all): plain (``cache: none``, no threshold: the reference sampler),
prefix, dual (``sampler.cache``), threshold, prefix+threshold, dual+threshold (``sampler.threshold``,
``--threshold``, default 0.9). Anything else of the sampler (``remasking``, ``max_tokens_per_step``, ...)
comes from the composed config and its trailing Hydra overrides, e.g. ``sampler.remasking=margin``.

Counting conventions:

    NFE                 forward passes of the model per sampler call (a call decodes the whole batch)
    NFE per token       NFE / gen_length (plain: steps / gen_length)
    forward tokens      positions run through the model per row, summed over a call's forwards
                        (GenerationOutput.forward_tokens); per generated token: / gen_length
    tokens per step     tokens a row commits per forward while it still has masked positions

Model FLOPs are counted from the architecture (``architecture()`` of bench/spg_step.py), never measured.
A forward that runs Q query positions against K keys (all positions of the sequence, computed or read
from the cache) costs

    2 Q (matmul weights of all layers + LM head + LoRA weights) + 4 layers Q K hidden

which for a full forward (Q = K = T, prompt + completion) is spg_step's ``sequence_flops`` forward. Every
forward of the sampler attends to all T positions (a cached forward splices its window between the cached
keys/values), so K = T throughout and a call's FLOPs per row are those of Q = its forward tokens. MFU is
achieved FLOP/s over the measured matmul peak in the run dtype (spg_step's ``matmul_peak``, taken before
and after the grid, best sample).

Random weights caveat: a randomly initialised model predicts near-uniform distributions, so a 0.9
threshold never fires and threshold decoding degenerates to one token per step (NFE = gen_length).
``--logit-scale S`` multiplies the LM head (``get_output_embeddings()``) by S, which sharpens the
predictions until the threshold fires; the tokens per step it achieves are in the table. How large S must
be depends on the model's size, so ``--logit-scale auto`` finds it: it doubles S from 1 until threshold
decoding of one block after the first prompt commits two tokens per step (``calibrate_logit_scale``). Only
the accuracy part shows what the threshold does on a trained model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def _load_spg_step() -> Any:
    """bench/spg_step.py as a module (bench/ is no package): config, architecture, FLOPs, peak, device."""
    spec = importlib.util.spec_from_file_location("spg_step", Path(__file__).resolve().parent / "spg_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


spg = _load_spg_step()

# name -> (sampler.cache, threshold on)
VARIANTS: dict[str, tuple[str, bool]] = {
    "plain": ("none", False),
    "prefix": ("prefix", False),
    "dual": ("dual", False),
    "threshold": ("none", True),
    "prefix+threshold": ("prefix", True),
    "dual+threshold": ("dual", True),
}


# ---------------------------------------------------------------------------------------------- arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not a comma-separated list of integers") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: needs positive integers")
    return values


def _variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return names


def _logit_scale(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number or 'auto'") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--variants", type=_variant_list, default=list(VARIANTS), help="comma-separated")
    common.add_argument("--threshold", type=float, default=0.9, help="sampler.threshold of the threshold variants")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    common.add_argument("--json", type=Path, default=None, help="write every number here")
    common.add_argument("overrides", nargs="*", help="Hydra overrides of the composed config, KEY=VALUE")

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("speed", parents=[common], formatter_class=fmt, help="random weights, a grid of sizes")
    s.add_argument("--model", default="tiny_llada", help="model config name (dllm_rl/conf/model/<name>.yaml)")
    s.add_argument("--task", default="gsm8k", help="task config (composition only; prompts are random)")
    s.add_argument("--prompt-length", type=int, default=128, help="tokens per random prompt")
    s.add_argument("--gen-lengths", type=_int_list, default=[128, 256, 512], help="L values, comma-separated")
    s.add_argument("--batch-sizes", type=_int_list, default=[1, 16], help="rows per sampler call")
    s.add_argument("--block-length", type=int, default=32, help="B")
    s.add_argument("--steps", type=int, default=None, help="T, denoising steps in all (default: gen_length/2)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (evaluation, Fast-dLLM)")
    s.add_argument(
        "--logit-scale",
        type=_logit_scale,
        default=1.0,
        help="multiply the LM head by this, or 'auto': the first power of 2 at which the threshold fires (module doc)",
    )
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bfloat16 on cuda")
    s.add_argument("--repeats", type=int, default=3, help="timed runs per cell after one warm-up (median)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--peak-size", type=int, default=None, help="peak matmul size (default: 8192 cuda, 2048 cpu)")
    s.add_argument("--peak-samples", type=int, default=5, help="timed samples per peak measurement")

    a = sub.add_parser("accuracy", parents=[common], formatter_class=fmt, help="warm-started tiny bases, test split")
    a.add_argument("--task", default="sudoku", help="task config (its warm-started base is built if not cached)")
    a.add_argument("--warmup-rows", type=int, default=8, help="rows decoded once per variant before timing")
    a.add_argument("--repeats", type=int, default=3, help="greedy passes over the split per variant (median time)")

    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if not 0.0 < args.threshold <= 1.0:
        p.error("--threshold must be in (0, 1]")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.part == "speed":
        if args.dtype is None:
            args.dtype = "bfloat16" if args.device == "cuda" else "float32"
        if args.peak_size is None:
            args.peak_size = 8192 if args.device == "cuda" else 2048
        for name in ("prompt_length", "block_length"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1")
        if args.logit_scale != "auto" and args.logit_scale <= 0:
            p.error("--logit-scale must be positive")
        for gen in args.gen_lengths:
            if gen % args.block_length:
                p.error(f"gen length {gen} is not a multiple of --block-length {args.block_length}")
            steps, blocks = steps_for(args, gen), gen // args.block_length
            if steps % blocks or not blocks <= steps <= gen:
                p.error(f"gen length {gen}: {steps} steps must be a multiple of its {blocks} blocks, at most {gen}")
    return args


def steps_for(args: argparse.Namespace, gen_length: int) -> int:
    return args.steps if args.steps is not None else gen_length // 2


def sampler_config(base: dict[str, Any], variant: str, threshold: float, **sizes: int) -> dict[str, Any]:
    """The composed sampler config with a variant's cache and threshold (and the cell's sizes)."""
    cache, adaptive = VARIANTS[variant]
    return {**base, **sizes, "cache": cache, "threshold": threshold if adaptive else None}


# ------------------------------------------------------------------------------------------------- FLOPs


def window_flops(arch: dict[str, int], queries: int, keys: int) -> float:
    """Model FLOPs of running ``queries`` positions against ``keys`` keys (module docstring); with
    queries = keys = T it is spg_step.sequence_flops(arch, T, ...)["forward"]."""
    weights = arch["matmul_params_counted"] + arch["lora_params"]
    return 2.0 * queries * weights + 4.0 * arch["num_hidden_layers"] * queries * keys * arch["hidden_size"]


FLOPS_CONVENTION = (
    "per forward of Q query positions against K keys: 2Q*(layer matmul weights + LM head + LoRA weights) "
    "+ 4*layers*Q*K*hidden; every sampler forward has K = prompt + gen (cached keys included), so a call "
    "costs window_flops(Q = forward tokens per row, K = prompt + gen) per row"
)


# ---------------------------------------------------------------------------------------------- helpers


def _device(name: str) -> torch.device:
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _threads(cfg: dict[str, Any]) -> None:
    if cfg["cluster"]["threads"]:
        torch.set_num_threads(int(cfg["cluster"]["threads"]))


def _header(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {
        "bench": "sampler",
        "part": args.part,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "argv": sys.argv,
        "device": spg.device_info(device),
    }


@contextlib.contextmanager
def no_gc() -> Any:
    """Timed code runs without the cyclic garbage collector, as timeit does: a full collection over the
    libraries' millions of objects takes a large part of a second and would land on an arbitrary run.
    What survives a collection is frozen (gc.freeze), so the next one only looks at newer objects."""
    enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def paired_difference(values: list[float], reference: list[float]) -> dict[str, Any]:
    """Mean per-example difference to the reference and its noise band: 2 x the standard error of the
    mean of the paired differences; within noise when |mean| <= band."""
    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    se = statistics.stdev(diffs) / math.sqrt(n) if n >= 2 else float("nan")
    band = 2.0 * se
    return {
        "difference": mean,
        "standard_error": se,
        "band": band,
        "within_noise": None if math.isnan(band) else bool(abs(mean) <= band),
        "examples_changed": sum(d != 0 for d in diffs),
    }


# ------------------------------------------------------------------------------------------------- speed


def speed_overrides(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> list[str]:
    """spg_step's config overrides for the same model, dtype, device, seed and the first cell's sampler
    sizes, without LoRA or warm-start; then ``extra``, then the command line's. spg_step's own argument
    parser fills the rest of its namespace (rollout and objective keys, which only keep the composed config
    valid here)."""
    gen = args.gen_lengths[0]
    bench_args = spg.parse_args(
        [
            f"--model={args.model}",
            f"--task={args.task}",
            "--no-lora",
            f"--gen-length={gen}",
            f"--block-length={args.block_length}",
            f"--steps={steps_for(args, gen)}",
            f"--dtype={args.dtype}",
            f"--device={args.device}",
            f"--seed={args.seed}",
        ]
    )
    bench_args.overrides = [*extra, *args.overrides]
    return spg.config_overrides(bench_args)


def speed_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = spg.compose_config(speed_overrides(args))
    longest = args.prompt_length + max(args.gen_lengths)
    if int(cfg["model"]["max_position_embeddings"]) < longest:
        # The longest prompt + completion must fit the position range (tiny configs are sized for 512).
        cfg = spg.compose_config(speed_overrides(args, (f"model.max_position_embeddings={longest}",)))
    return cfg


def build_random_policy(cfg: dict[str, Any], device: torch.device, logit_scale: float) -> tuple[Any, dict]:
    from dllm_rl.build import build_policy, quiet_libraries
    from dllm_rl.config import run_config

    quiet_libraries()
    _threads(cfg)
    # On the device itself, as spg_step: an 8B random init on the CPU would take minutes.
    with torch.device(device):
        policy, _ = build_policy(run_config(cfg), SimpleNamespace(alphabet=spg.ALPHABET))
    policy.model.to(device)
    head = policy.model.get_output_embeddings()
    tied = head.weight.data_ptr() == policy.model.get_input_embeddings().weight.data_ptr()
    sharpen_head(policy, logit_scale)
    spg.synchronize(device)
    return policy, {"logit_scale": logit_scale, "head_tied_to_input_embeddings": bool(tied)}


def sharpen_head(policy: Any, factor: float) -> None:
    """Multiply the LM head (weight and bias) by ``factor`` in place: every logit grows by that factor."""
    if factor == 1.0:
        return
    head = policy.model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(factor)
        if getattr(head, "bias", None) is not None:
            head.bias.mul_(factor)


def calibrate_logit_scale(
    policy: Any,
    sampler_cfg: dict[str, Any],
    ids: torch.Tensor,
    attn: torch.Tensor,
    threshold: float,
    block_length: int,
    seed: int,
    target: float = 2.0,
    limit: float = 2.0**16,
) -> dict[str, Any]:
    """Double the LM head's scale until threshold decoding of one block commits ``target`` tokens per step.

    Random weights predict almost uniform distributions, so the threshold never fires at scale 1; how far
    the logits must be stretched depends on the model's size. Each try decodes one block (greedy, no
    cache) after the prompts ``ids`` and reads the tokens committed per forward; the head is left at the
    first scale that reaches ``target`` (default: the fixed schedule's two tokens per step at steps =
    L / 2), or at ``limit``. Returns the scale and every try."""
    from dllm_rl.samplers import get_sampler

    scfg = sampler_config(
        sampler_cfg, "threshold", threshold, gen_length=block_length, block_length=block_length, steps=block_length
    )
    sampler = get_sampler(scfg)
    scale, tries = 1.0, []
    with policy.scoring():
        while True:
            _, out = time_call(policy, sampler, ids, attn, 0.0, seed)
            tries.append({"scale": scale, "tokens_per_step_mean": float(out.stats["tokens_per_step_mean"])})
            if tries[-1]["tokens_per_step_mean"] >= target or scale >= limit:
                break
            sharpen_head(policy, 2.0)  # exact in every float format: only the exponent changes
            scale *= 2.0
    return {"logit_scale": scale, "target_tokens_per_step": target, "tries": tries}


def time_call(policy: Any, sampler: Any, ids: torch.Tensor, attn: torch.Tensor, temperature: float, seed: int):
    device = policy.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with no_gc():
        spg.synchronize(device)
        start = time.perf_counter()
        out = sampler.generate(policy.logits, ids, attn, policy.mask_id, generator=generator, temperature=temperature)
        spg.synchronize(device)
        return time.perf_counter() - start, out


def measure_variant(
    args: argparse.Namespace,
    cfg: dict,
    policy: Any,
    arch: dict,
    ids: torch.Tensor,
    attn: torch.Tensor,
    gen: int,
    variant: str,
) -> tuple[dict[str, Any], torch.Tensor]:
    """One variant on one batch of prompts: a warm-up call, then the median of ``--repeats`` timed calls;
    the row of numbers and the completion tokens (for the comparison with plain)."""
    from dllm_rl.samplers import get_sampler

    batch, prompt = ids.shape
    steps = steps_for(args, gen)
    scfg = sampler_config(
        cfg["sampler"], variant, args.threshold, gen_length=gen, block_length=args.block_length, steps=steps
    )
    sampler = get_sampler(scfg)
    with policy.scoring():
        warmup, _ = time_call(policy, sampler, ids, attn, args.temperature, args.seed)
        runs = [time_call(policy, sampler, ids, attn, args.temperature, args.seed) for _ in range(args.repeats)]
    seconds = statistics.median(s for s, _ in runs)
    out = runs[0][1]
    flops = batch * window_flops(arch, out.forward_tokens, prompt + gen)
    row = {
        "gen_length": gen,
        "batch_size": batch,
        "prompt_length": prompt,
        "block_length": args.block_length,
        "steps": steps,
        "variant": variant,
        "cache": scfg["cache"],
        "threshold": scfg["threshold"],
        "sampler": scfg,
        "seconds": seconds,
        "seconds_repeats": [s for s, _ in runs],
        "warmup_seconds": warmup,
        "generated_tokens": batch * gen,
        "tokens_per_second": batch * gen / seconds,
        "nfe": out.nfe,
        "nfe_repeats": [o.nfe for _, o in runs],
        "nfe_per_token": out.nfe / gen,
        "forward_tokens": out.forward_tokens,
        "forward_tokens_per_token": out.forward_tokens / gen,
        **{k: float(v) for k, v in out.stats.items()},
        "flops": flops,
        "flops_per_forward_mean": flops / max(out.nfe, 1),
        "achieved_flops_per_second": flops / seconds,
    }
    return row, out.completion_ids


def speed_cell(
    args: argparse.Namespace, cfg: dict, policy: Any, arch: dict, ids: torch.Tensor, attn: torch.Tensor, gen: int
) -> list[dict[str, Any]]:
    """Every variant of ``--variants`` on one cell, with its speed-up over plain and token agreement."""
    measured = [measure_variant(args, cfg, policy, arch, ids, attn, gen, variant) for variant in args.variants]
    plain = next(((row, completion) for row, completion in measured if row["variant"] == "plain"), None)
    rows = []
    for row, completion in measured:
        row["speedup_vs_plain"] = plain[0]["seconds"] / row["seconds"] if plain else None
        row["token_agreement_with_plain"] = _agreement(completion, plain[1]) if plain else None
        rows.append(row)
    return rows


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    cfg = speed_config(args)
    device = _device(args.device)
    start = time.perf_counter()
    auto = args.logit_scale == "auto"
    policy, scale_info = build_random_policy(cfg, device, 1.0 if auto else args.logit_scale)
    setup_seconds = time.perf_counter() - start
    arch = spg.architecture(policy.model)
    dtype = getattr(torch, cfg["model"]["dtype"])
    peaks = [spg.matmul_peak(device, dtype, args.peak_size, args.peak_samples)]
    biggest = max(args.batch_sizes)
    prompts = spg.synthetic_prompts(policy, biggest, args.prompt_length, args.seed)
    all_ids, all_attn = policy.encode_prompts(prompts)
    if auto:
        calibration = calibrate_logit_scale(
            policy, cfg["sampler"], all_ids[:1], all_attn[:1], args.threshold, args.block_length, args.seed
        )
        scale_info.update(logit_scale=calibration["logit_scale"], logit_scale_calibration=calibration)
    rows: list[dict[str, Any]] = []
    for gen in args.gen_lengths:
        for batch in args.batch_sizes:
            rows += speed_cell(args, cfg, policy, arch, all_ids[:batch], all_attn[:batch], gen)
    peaks.append(spg.matmul_peak(device, dtype, args.peak_size, args.peak_samples))
    best = max(peaks, key=lambda p: p["flops_per_second"])
    for row in rows:
        row["mfu"] = row["achieved_flops_per_second"] / best["flops_per_second"]
    return {
        **_header(args, device),
        "settings": {
            "model": cfg["model"]["name"],
            "family": cfg["model"]["family"],
            "dtype": cfg["model"]["dtype"],
            "prompt_length": int(all_ids.shape[1]),
            "gen_lengths": args.gen_lengths,
            "batch_sizes": args.batch_sizes,
            "block_length": args.block_length,
            "steps": {str(g): steps_for(args, g) for g in args.gen_lengths},
            "variants": args.variants,
            "threshold": args.threshold,
            "temperature": args.temperature,
            "remasking": cfg["sampler"]["remasking"],
            "max_tokens_per_step": cfg["sampler"].get("max_tokens_per_step"),
            "repeats": args.repeats,
            "seed": args.seed,
            **scale_info,
        },
        "config": cfg,
        "model": arch,
        "setup_seconds": setup_seconds,
        "flops_convention": FLOPS_CONVENTION,
        "peak": {"dtype": cfg["model"]["dtype"], **best, "measurements": peaks},
        "rows": rows,
    }


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def render_speed(r: dict[str, Any]) -> str:
    s, m, d = r["settings"], r["model"], r["device"]
    lines = [
        f"sampler speed: {s['model']} ({s['family']}, {spg._count(m['params_total'])} params, random weights, "
        f"LM head x {s['logit_scale']:g}), {s['dtype']}, prompt {s['prompt_length']} tokens, block "
        f"{s['block_length']}, threshold {s['threshold']:g}, temperature {s['temperature']:g}, remasking "
        f"{s['remasking']}",
        f"device: {d['type']} {d['name']} (torch {d['torch']}, {d['torch_threads']} threads); median of "
        f"{s['repeats']} after 1 warm-up; peak {spg._si(r['peak']['flops_per_second'], 'FLOP/s')} "
        f"({r['peak']['size']}^2 {r['peak']['dtype']} {r['peak']['kernel']})",
        "",
        f"{'gen':>5}{'steps':>6}{'batch':>6}  {'variant':<17}{'seconds':>9}{'tok/s':>9}{'speed-up':>9}{'NFE':>6}"
        f"{'NFE/tok':>8}{'fwd/tok':>9}{'tok/step':>9}{'max':>5}{'agree':>7}{'MFU':>9}",
    ]
    for row in r["rows"]:
        speedup = _fmt(row["speedup_vs_plain"], ".2f")
        agree = _fmt(row["token_agreement_with_plain"] and 100 * row["token_agreement_with_plain"], ".0f")
        lines.append(
            f"{row['gen_length']:>5}{row['steps']:>6}{row['batch_size']:>6}  {row['variant']:<17}"
            f"{row['seconds']:>9.4g}{spg._si(row['tokens_per_second'], ''):>9}{speedup + 'x':>9}{row['nfe']:>6}"
            f"{row['nfe_per_token']:>8.3f}{row['forward_tokens_per_token']:>9.1f}"
            f"{row['tokens_per_step_mean']:>9.2f}{row['tokens_per_step_max']:>5.0f}{agree + '%':>7}"
            f"{100 * row['mfu']:>8.3f}%"
        )
    lines += [
        "",
        "NFE: forwards per sampler call; fwd/tok: positions run through the model per generated token (per row); "
        "tok/step: tokens committed per forward (mean, max); agree: completion tokens equal to plain's",
        f"FLOPs: {r['flops_convention']}",
    ]
    if m["matmul_params_counted"] != m["matmul_params_in_model"]:
        lines.append(
            f"WARNING: sizes imply {m['matmul_params_counted']} matmul weights, the network holds "
            f"{m['matmul_params_in_model']}"
        )
    if s["logit_scale"] == 1.0 and any(row["threshold"] is not None for row in r["rows"]):
        lines.append(
            "note: random weights predict near-uniform distributions, so the threshold rarely fires (tok/step ~ 1); "
            "--logit-scale sharpens them, the accuracy part shows trained models"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- accuracy


class RecordingSampler:
    """Wraps a sampler for evaluation.score: wall time (device synchronised), NFE, forward tokens and
    tokens per step of every call it makes."""

    def __init__(self, sampler: Any, device: torch.device) -> None:
        self.sampler, self.device = sampler, device
        self.calls = self.rows = self.nfe = 0
        self.seconds = self.forward_tokens = self.committed = 0.0
        self.tokens_per_step_max = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)

    def generate(self, logits_fn: Any, prompt_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with no_gc():
            spg.synchronize(self.device)
            start = time.perf_counter()
            out = self.sampler.generate(logits_fn, prompt_ids, *args, **kwargs)
            spg.synchronize(self.device)
            self.seconds += time.perf_counter() - start
        rows = int(prompt_ids.shape[0])
        self.calls, self.rows, self.nfe = self.calls + 1, self.rows + rows, self.nfe + out.nfe
        self.forward_tokens += rows * out.forward_tokens
        self.committed += rows * out.stats.get("tokens_per_step_mean", 0.0)
        self.tokens_per_step_max = max(self.tokens_per_step_max, out.stats.get("tokens_per_step_max", 0.0))
        return out


def accuracy_setup(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any, dict[str, Any], list[dict]]:
    """(config, task, base policy, base info, test examples) as worker.run and the trainer's test evaluation."""
    from dllm_rl import evaluation
    from dllm_rl.build import build_policy, quiet_libraries
    from dllm_rl.config import run_config
    from dllm_rl.tasks import get_task

    device_overrides = [
        f"cluster.device={args.device}",
        f"cluster.backend={'nccl' if args.device == 'cuda' else 'gloo'}",
    ]
    cfg = spg.compose_config([f"task={args.task}", "logging=none", *device_overrides, *args.overrides])
    quiet_libraries()
    _threads(cfg)
    run = run_config(cfg)  # the typed view the components read, as worker.run makes it of the same dict
    task = get_task(run.task.name, run.task, Path(run.cache_dir).expanduser())
    policy, base_info = build_policy(run, task)
    policy.model.to(_device(args.device))
    data = task.dataset("test")
    cap = cfg["eval"]["num_examples"]
    if cap is not None:
        data = data.select(range(min(int(cap), len(data))))
    examples, dropped = evaluation.fit_prompts(policy, task, data.to_list(), "eval_prompt", task.eval_prefill, "test")
    base_info = {**base_info, "dropped_test_prompts": dropped}
    return cfg, task, policy, base_info, examples


def per_example_metric(task: Any, completions: list[str], examples: list[dict], name: str) -> list[float]:
    return [float(task.metrics([c], [ex])[name]) for c, ex in zip(completions, examples, strict=True)]


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from dllm_rl import evaluation
    from dllm_rl.samplers import get_sampler

    device = _device(args.device)
    start = time.perf_counter()
    cfg, task, policy, base_info, examples = accuracy_setup(args)
    setup_seconds = time.perf_counter() - start
    primary = task.primary_metric
    batch_size = int(cfg["eval"]["batch_size"])
    cap = evaluation.truncation(task.cfg)
    gen = int(cfg["sampler"]["gen_length"])
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        scfg = sampler_config(cfg["sampler"], variant, args.threshold)
        sampler = get_sampler(scfg)
        if args.warmup_rows > 0:  # first-call costs (kernel selection, allocator) stay out of the timing
            warm = examples[: args.warmup_rows]
            evaluation.generate(
                policy,
                sampler,
                [ex["eval_prompt"] for ex in warm],
                batch_size,
                0.0,
                None,
                chat=task.chat,
                prefill=task.eval_prefill,
                max_prompt_tokens=cap,
            )
        passes = []  # greedy decoding is deterministic: the passes differ in time only (checked)
        for _ in range(args.repeats):
            recorder = RecordingSampler(sampler, device)
            started = time.perf_counter()
            metrics, records = evaluation.score(policy, recorder, task, examples, batch_size, cap)
            passes.append((recorder, time.perf_counter() - started, [rec["completion"] for rec in records]))
        recorder, score_seconds, completions = sorted(passes, key=lambda p: p[0].seconds)[len(passes) // 2]
        if any(c != completions for _, _, c in passes):
            raise SystemExit(f"{variant}: greedy passes over the same split gave different completions")
        per_example = per_example_metric(task, completions, examples, primary)
        rows.append(
            {
                "variant": variant,
                "cache": scfg["cache"],
                "threshold": scfg["threshold"],
                "sampler": scfg,
                "metric": float(metrics[primary]),
                "metrics": {k: float(v) for k, v in metrics.items()},
                "examples": len(examples),
                "score_seconds": score_seconds,
                "seconds": recorder.seconds,
                "seconds_repeats": [r.seconds for r, _, _ in passes],
                "sampler_calls": recorder.calls,
                "generated_tokens": recorder.rows * gen,
                "tokens_per_second": recorder.rows * gen / recorder.seconds if recorder.seconds else None,
                "nfe": recorder.nfe,
                "nfe_per_token": recorder.nfe / max(recorder.calls, 1) / gen,
                "forward_tokens_per_token": recorder.forward_tokens / max(recorder.rows, 1) / gen,
                "tokens_per_step_mean": recorder.committed / max(recorder.rows, 1),
                "tokens_per_step_max": recorder.tokens_per_step_max,
                "per_example_metric": per_example,
                "per_example_mean_equals_metric": bool(
                    abs(sum(per_example) / max(len(per_example), 1) - float(metrics[primary])) < 1e-9
                ),
                "per_example_reward": [float(rec["reward"]) for rec in records],
                "completions": completions,
            }
        )
    plain = next((row for row in rows if row["variant"] == "plain"), None)
    for row in rows:
        if plain is None:
            row["vs_plain"] = None
            continue
        row["vs_plain"] = {
            **paired_difference(row["per_example_metric"], plain["per_example_metric"]),
            "reward": paired_difference(row["per_example_reward"], plain["per_example_reward"]),
            "identical_completions": sum(a == b for a, b in zip(row["completions"], plain["completions"], strict=True))
            / max(len(examples), 1),
            "speedup": plain["seconds"] / row["seconds"] if row["seconds"] else None,
        }
    return {
        **_header(args, device),
        "settings": {
            "task": cfg["task"]["name"],
            "prompt_style": cfg["task"]["prompt_style"],
            "model": cfg["model"]["name"],
            "primary_metric": primary,
            "test_examples": len(examples),
            "eval_batch_size": batch_size,
            "gen_length": gen,
            "block_length": int(cfg["sampler"]["block_length"]),
            "steps": int(cfg["sampler"]["steps"]),
            "variants": args.variants,
            "threshold": args.threshold,
            "remasking": cfg["sampler"]["remasking"],
            "max_tokens_per_step": cfg["sampler"].get("max_tokens_per_step"),
            "repeats": args.repeats,
            "noise_band": "2 x standard error of the mean paired per-example difference to plain",
        },
        "base": base_info,
        "config": cfg,
        "setup_seconds": setup_seconds,
        "rows": rows,
    }


def render_accuracy(r: dict[str, Any]) -> str:
    s, d = r["settings"], r["device"]
    metric = s["primary_metric"]
    lines = [
        f"sampler accuracy: task {s['task']} ({s['prompt_style']}), model {s['model']}, base {r['base'].get('source')}",
        f"{s['test_examples']} test rows, greedy, eval micro-batch {s['eval_batch_size']}, median time of "
        f"{s['repeats']} passes; gen {s['gen_length']}, "
        f"block {s['block_length']}, {s['steps']} steps, threshold {s['threshold']:g}, remasking {s['remasking']}",
        f"device: {d['type']} {d['name']} (torch {d['torch']}, {d['torch_threads']} threads)",
        "",
        f"{'variant':<17}{metric:>10}{'diff':>9}{'+-2SE':>8}{'in noise':>9}{'changed':>8}{'same out':>9}"
        f"{'tok/s':>9}{'speed-up':>9}{'NFE/tok':>8}{'fwd/tok':>8}{'tok/step':>9}",
    ]
    for row in r["rows"]:
        vs = row["vs_plain"] or {}
        noise = {True: "yes", False: "NO", None: "-"}[vs.get("within_noise")]
        lines.append(
            f"{row['variant']:<17}{row['metric']:>10.4f}{_fmt(vs.get('difference'), '+.4f'):>9}"
            f"{_fmt(vs.get('band'), '.4f'):>8}{noise:>9}{_fmt(vs.get('examples_changed'), 'd'):>8}"
            f"{_fmt(vs.get('identical_completions') and 100 * vs['identical_completions'], '.1f') + '%':>9}"
            f"{spg._si(row['tokens_per_second'] or 0.0, ''):>9}{_fmt(vs.get('speedup'), '.2f') + 'x':>9}"
            f"{row['nfe_per_token']:>8.3f}{row['forward_tokens_per_token']:>8.1f}{row['tokens_per_step_mean']:>9.2f}"
        )
    lines += [
        "",
        f"diff: mean per-example {metric} difference to plain (paired); +-2SE: twice its standard error; "
        "changed: examples whose metric differs; same out: completions identical to plain's",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.part == "speed":
        result = run_speed(args)
        print(render_speed(result))
    else:
        result = run_accuracy(args)
        print(render_accuracy(result))
    spg.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
