"""One command for a CUDA device: sampler speed and one SPG step at the 8B shapes, resumable.

    python -m bench.gpu_check [--out outputs/bench/gpu_check.json] [--page docs/RESULTS.md]
    python -m bench.gpu_check --smoke          # the same code path on CPU with the tiny models

What it measures, with randomly initialised weights in the shapes of the official LLaDA-8B-Instruct and
Dream-7B-Instruct configs (no checkpoint; bf16, flash-attention 2 where the flash_attn package is
installed, else sdpa):

- the sampler (bench/sampler.py's ``measure_variant``): tokens/s, NFE, tokens per step and forward MFU of
  the variants plain, prefix, dual, threshold and dual+threshold at batch 16 and 1, prompt 256, generation
  256, block 32, 128 steps; the LM head sharpened until the 0.9 threshold fires
  (``calibrate_logit_scale``, once per model);
- one SPG step (bench/spg_step.py's ``measure`` and ``summarise``): G = 6, prompt 256, generation 256,
  m = 2, with LoRA r 128 and with full fine-tuning under ZeRO-2: seconds per phase, forward + backward
  MFU, peak memory. Full fine-tuning takes the first ZeRO-2 layout whose estimated memory fits
  (``full_finetune_plan``): everything on the GPU, else the optimizer offloaded to the CPU, else (bf16
  only) master weights and Adam states kept in bf16 on the GPU;
- the matmul peak of the device (spg_step's ``matmul_peak``) at the start and at the end, the GPU's
  name and the torch / CUDA / DeepSpeed versions.

Progress is kept: every finished measurement is written at once (atomically) to the JSON, with the
Markdown tables beside it (same name, .md) and, with ``--page``, in a marked section of that page. A rerun
with the same ``--out`` skips what is already there, so a run cut off by a time limit keeps what it
measured and the next one continues. A measurement that raised (out of memory, say) is recorded with its
error and not retried unless ``--retry-failed``; an error after which the device runs nothing more ends the
run, and what is left stays for the next one. The measurements run most important first: the matmul
peak, LLaDA's batch-16 plain and dual+threshold sampler and its LoRA step, the same for Dream, the full
fine-tuning steps, then the remaining sampler cells. MFU is always taken against the best peak measured
so far, and recomputed whenever the file is written.

``--smoke`` runs every measurement of the plan on the CPU with tiny_llada and tiny_dream and tiny sizes
(tests/test_gpu_check.py runs it). Trailing KEY=VALUE arguments are Hydra overrides applied to every
composed config (e.g. ``cluster.threads=1``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from dllm_rl.experiments.pages import markers

HERE = Path(__file__).resolve().parent
SECTION, COMMAND = "gpu_check", "python -m bench.gpu_check --page"
BEGIN, END = markers(SECTION, COMMAND)
DEFAULT_OUT = Path("outputs/bench/gpu_check.json")
DEFAULT_SMOKE_OUT = Path("outputs/bench/gpu_check_smoke.json")
VARIANTS = ("plain", "prefix", "dual", "threshold", "dual+threshold")
# Sampler cells measured before the training steps: the reference and the fastest combination.
HEADLINE_VARIANTS = ("plain", "dual+threshold")
THRESHOLD = 0.9
# Share of the device's (and the host's) memory a full fine-tuning layout may plan to fill; the rest is
# for activations, logits and the allocator.
MEMORY_SHARE = 0.8


def _load(name: str) -> Any:
    """bench/<name>.py as a module (bench/ is no package; this file also runs as bench/gpu_check.py)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sampler_bench = _load("sampler")
spg = sampler_bench.spg


class Sizes(NamedTuple):
    """The shapes of one check: the GPU plan, or the smoke plan's tiny stand-ins."""

    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    prompt_length: int
    gen_length: int
    block_length: int
    steps: int
    group: int
    mc: int
    lora_r: int
    repeats: int
    peak_size: int
    peak_samples: int


GPU = Sizes(
    models=("llada_8b_instruct", "dream_7b_instruct"),
    batch_sizes=(16, 1),
    prompt_length=256,
    gen_length=256,
    block_length=32,
    steps=128,
    group=6,
    mc=2,
    lora_r=128,
    repeats=1,
    peak_size=8192,
    peak_samples=5,
)
SMOKE = Sizes(
    models=("tiny_llada", "tiny_dream"),
    batch_sizes=(2, 1),
    prompt_length=16,
    gen_length=32,
    block_length=16,
    steps=16,
    group=2,
    mc=2,
    lora_r=4,
    repeats=1,
    peak_size=256,
    peak_samples=2,
)


# ---------------------------------------------------------------------------------------------- the plan


def plan(sizes: Sizes) -> list[str]:
    """Every measurement's key, most important first (module docstring)."""
    first, rest = sizes.batch_sizes[0], sizes.batch_sizes[1:]
    keys = ["peak/start"]
    for model in sizes.models:
        keys += [f"sampler/{model}/b{first}/{v}" for v in HEADLINE_VARIANTS]
        keys.append(f"spg/{model}/lora")
    keys += [f"spg/{model}/full" for model in sizes.models]
    for model in sizes.models:
        keys += [f"sampler/{model}/b{first}/{v}" for v in VARIANTS if v not in HEADLINE_VARIANTS]
        keys += [f"sampler/{model}/b{batch}/{v}" for batch in rest for v in VARIANTS]
    return [*keys, "peak/end"]


def parse_key(key: str) -> dict[str, Any]:
    kind, *parts = key.split("/")
    if kind == "sampler":
        return {"kind": kind, "model": parts[0], "batch": int(parts[1][1:]), "variant": parts[2]}
    if kind == "spg":
        return {"kind": kind, "model": parts[0], "training": parts[1]}
    return {"kind": kind, "when": parts[0]}


def _layouts(dtype: str) -> dict[str, dict[str, Any]]:
    """ZeRO-2 layouts for training every weight on one device, in the order tried, with bytes per parameter.

    weights and gradients in the run dtype (w bytes), DeepSpeed's master copy (fp32) and AdamW's two moments
    (fp32), and the fp32 copy of the gradients DeepSpeed makes at the optimizer step; offloaded, the last
    three live in host memory; with bf16 master weights and optimizer states all of them are bf16."""
    w = 2 if dtype == "bfloat16" else 4
    layouts = {
        "on_device": {
            "label": "ZeRO-2, optimizer on the device",
            "device_bytes_per_param": 2 * w + 16,
            "host_bytes_per_param": 0,
            "overrides": [],
        },
        "offload": {
            "label": "ZeRO-2, optimizer offloaded to the CPU",
            "device_bytes_per_param": 2 * w,
            "host_bytes_per_param": 16,
            "overrides": [
                "+deepspeed.zero_optimization.offload_optimizer.device=cpu",
                "+deepspeed.zero_optimization.offload_optimizer.pin_memory=true",
            ],
        },
    }
    if dtype == "bfloat16":
        layouts["bf16_states"] = {
            "label": "ZeRO-2, bf16 master weights and AdamW states on the device",
            "device_bytes_per_param": 12,
            "host_bytes_per_param": 0,
            "overrides": [
                "+deepspeed.bf16.bf16_master_weights_and_grads=true",
                "+deepspeed.bf16.bf16_optimizer_states=true",
            ],
        }
    return layouts


def full_finetune_plan(params: int, dtype: str, device_bytes: int, host_bytes: int, offload: bool) -> dict[str, Any]:
    """The first layout of ``_layouts`` whose estimate fits MEMORY_SHARE of the device and of the host
    (``offload``: whether moving the optimizer to host memory means anything, i.e. the device is a GPU).
    Every layout's estimate comes back with it; when none fits, ``name`` is None."""
    layouts = _layouts(dtype)
    estimates = {
        name: {
            "device_bytes": params * layout["device_bytes_per_param"],
            "host_bytes": params * layout["host_bytes_per_param"],
        }
        for name, layout in layouts.items()
    }
    for name, layout in layouts.items():
        if name == "offload" and not offload:
            continue
        need = estimates[name]
        if need["device_bytes"] <= MEMORY_SHARE * device_bytes and need["host_bytes"] <= MEMORY_SHARE * host_bytes:
            return {"name": name, **layout, "params": params, "estimates": estimates}
    return {"name": None, "label": "no ZeRO-2 layout fits", "overrides": [], "params": params, "estimates": estimates}


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return host_memory_bytes()


def attention_kernel(choice: str, device: torch.device) -> str:
    """flash_attention_2 on a CUDA device where the flash_attn package is installed, imports (a build for
    another torch fails there) and is one transformers accepts (``auto``); else sdpa."""
    if choice != "auto":
        return choice
    if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError):
        return "sdpa"
    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def device_usable(device: torch.device) -> bool:
    """Whether the device still runs kernels: after some CUDA errors (unlike running out of memory) the
    process's CUDA context is lost and every later measurement would fail too."""
    try:
        torch.ones(1, device=device).add_(1)
        spg.synchronize(device)
        return True
    except Exception:
        return False


# -------------------------------------------------------------------------------------------- measuring


class Checker:
    """Runs the plan's missing measurements in order, writing the result after each one."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, device: torch.device, result: dict[str, Any]) -> None:
        self.args, self.sizes, self.device, self.result = args, sizes, device, result
        self.attn = result["settings"]["attn_implementation"]
        self.dtype = result["settings"]["dtype"]
        self.loaded: SimpleNamespace | None = None  # the sampler's policy, kept across a model's cells

    def common_overrides(self) -> list[str]:
        return [f"model.attn_implementation={self.attn}", *self.args.overrides]

    # ------------------------------------------------------------------ sampler

    def sampler_args(self, model: str, batch: int) -> argparse.Namespace:
        s = self.sizes
        return sampler_bench.parse_args(
            [
                "speed",
                f"--model={model}",
                f"--prompt-length={s.prompt_length}",
                f"--gen-lengths={s.gen_length}",
                f"--batch-sizes={batch}",
                f"--block-length={s.block_length}",
                f"--steps={s.steps}",
                f"--repeats={s.repeats}",
                f"--threshold={THRESHOLD}",
                f"--dtype={self.dtype}",
                f"--device={self.device.type}",
                *self.common_overrides(),
            ]
        )

    def sampler_policy(self, model: str) -> SimpleNamespace:
        """The model's random-weight policy with its head sharpened; built once for consecutive cells. The
        scale is calibrated at the first build and stored, so later builds (and reruns) reuse it."""
        if self.loaded is not None and self.loaded.model == model:
            return self.loaded
        self.release()
        args = self.sampler_args(model, max(self.sizes.batch_sizes))
        cfg = sampler_bench.speed_config(args)
        start = time.perf_counter()
        policy, _ = sampler_bench.build_random_policy(cfg, self.device, 1.0)
        prompts = spg.synthetic_prompts(policy, max(self.sizes.batch_sizes), self.sizes.prompt_length, args.seed)
        ids, attn = policy.encode_prompts(prompts)
        calibration = self.result["calibration"].get(model)
        if calibration is None:
            calibration = sampler_bench.calibrate_logit_scale(
                policy, cfg["sampler"], ids[:1], attn[:1], THRESHOLD, self.sizes.block_length, args.seed
            )
            self.result["calibration"][model] = calibration
        else:
            sampler_bench.sharpen_head(policy, calibration["logit_scale"])
        spg.synchronize(self.device)
        self.loaded = SimpleNamespace(
            model=model,
            cfg=cfg,
            policy=policy,
            arch=spg.architecture(policy.model),
            ids=ids,
            attn=attn,
            build_seconds=time.perf_counter() - start,
        )
        return self.loaded

    def release(self) -> None:
        if self.loaded is not None:
            self.loaded = None
            free_memory(self.device)

    def measure_sampler(self, model: str, batch: int, variant: str) -> dict[str, Any]:
        loaded = self.sampler_policy(model)
        args = self.sampler_args(model, batch)
        row, _ = sampler_bench.measure_variant(
            args,
            loaded.cfg,
            loaded.policy,
            loaded.arch,
            loaded.ids[:batch],
            loaded.attn[:batch],
            self.sizes.gen_length,
            variant,
        )
        return {
            **row,
            "model": model,
            "family": loaded.cfg["model"]["family"],
            "dtype": loaded.cfg["model"]["dtype"],
            "attn_implementation": loaded.cfg["model"]["attn_implementation"],
            "logit_scale": self.result["calibration"][model]["logit_scale"],
            "params_total": loaded.arch["params_total"],
            "policy_build_seconds": loaded.build_seconds,
        }

    # ------------------------------------------------------------------ one SPG step

    def spg_args(self, model: str, lora: bool, extra: list[str]) -> argparse.Namespace:
        s = self.sizes
        return spg.parse_args(
            [
                f"--model={model}",
                f"--group={s.group}",
                f"--prompt-length={s.prompt_length}",
                f"--gen-length={s.gen_length}",
                f"--block-length={s.block_length}",
                f"--steps={s.steps}",
                f"--mc={s.mc}",
                "--lora" if lora else "--no-lora",
                f"--lora-r={s.lora_r}",
                f"--repeats={s.repeats}",
                f"--dtype={self.dtype}",
                f"--device={self.device.type}",
                "deepspeed=zero2",
                *extra,
                *self.common_overrides(),
            ]
        )

    def parameter_count(self, cfg: dict[str, Any]) -> int:
        """The network's parameters, counted on the meta device (no memory, no initialisation)."""
        from dllm_rl.build import build_policy
        from dllm_rl.config import run_config

        with torch.device("meta"):
            policy, _ = build_policy(run_config(cfg), SimpleNamespace(alphabet=spg.ALPHABET))
        return sum(p.numel() for p in policy.model.parameters())

    def measure_spg(self, model: str, training: str) -> dict[str, Any]:
        self.release()
        lora = training == "lora"
        layout = None
        extra: list[str] = []
        if not lora:
            params = self.parameter_count(spg.build_config(self.spg_args(model, False, [])))
            layout = full_finetune_plan(
                params,
                self.dtype,
                device_memory_bytes(self.device),
                host_memory_bytes(),
                offload=self.device.type == "cuda",
            )
            if layout["name"] is None:
                raise MemoryError(f"full fine-tuning of {params} parameters: {layout['label']} ({layout['estimates']})")
            extra = layout["overrides"]
        args = self.spg_args(model, lora, extra)
        cfg = spg.build_config(args)
        at_start = spg.Memory(self.device).current()
        measured = spg.measure(args, cfg, self.device)
        # MFU needs a peak; refresh() puts every MFU against the best one later.
        report = spg.summarise(measured, self.result["peaks"] or [self.measure("peak/fallback")])
        report["memory"]["at_start_bytes"] = at_start
        report["training"] = training
        report["full_finetune_layout"] = layout
        return report

    # ------------------------------------------------------------------ the run

    def measure(self, key: str) -> dict[str, Any]:
        what = parse_key(key)
        if what["kind"] == "peak":
            self.release()
            dtype = getattr(torch, self.dtype)
            return spg.matmul_peak(self.device, dtype, self.sizes.peak_size, self.sizes.peak_samples)
        if what["kind"] == "sampler":
            return self.measure_sampler(what["model"], what["batch"], what["variant"])
        return self.measure_spg(what["model"], what["training"])

    def run(self, save: Any) -> None:
        r = self.result
        for key in r["plan"]:
            if key in r["measurements"] or (key in r["failed"] and not self.args.retry_failed):
                continue
            print(f"gpu_check: measuring {key} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                value = self.measure(key)
            except Exception as exc:  # recorded, and the plan goes on (an OOM in one must not cost the rest)
                self.release()
                free_memory(self.device)
                r["failed"][key] = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:],
                    "seconds": time.perf_counter() - start,
                    "finished": _now(),
                }
                print(f"gpu_check: {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                if not device_usable(self.device):
                    # Nothing after this could run here; what is left stays unmeasured, not failed.
                    save(r)
                    raise SystemExit(
                        f"gpu_check: the {self.device.type} device stopped working after {key}; run the same "
                        "command again to measure the rest in a fresh process"
                    ) from exc
            else:
                value["wall_seconds"] = time.perf_counter() - start
                value["finished"] = _now()
                if parse_key(key)["kind"] == "peak":
                    r["peaks"].append(value)
                r["measurements"][key] = value
                r["failed"].pop(key, None)
            save(r)
        self.release()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ the result


def identity(args: argparse.Namespace, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """What makes two runs' measurements comparable: a rerun into the same file must match it (in the
    form it takes in the JSON, tuples as lists)."""
    settings = {
        "smoke": bool(args.smoke),
        "sizes": sizes._asdict(),
        "variants": list(VARIANTS),
        "threshold": THRESHOLD,
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "attn_implementation": attention_kernel(args.attn, device),
        "device_name": spg.device_info(device)["name"],
        "overrides": list(args.overrides),
    }
    return json.loads(json.dumps(settings))


def start_or_resume(path: Path, settings: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """The result so far at ``path`` (its settings must be these), or a fresh one."""
    if path.is_file():
        result = json.loads(path.read_text())
        if result.get("bench") != "gpu_check":
            raise SystemExit(f"{path} is not a gpu_check result; give another --out")
        if result["settings"] != settings:
            changed = sorted(k for k in settings if result["settings"].get(k) != settings[k])
            raise SystemExit(
                f"{path} was measured with other settings ({', '.join(changed)}); give another --out or remove it"
            )
        result["plan"] = plan(sizes)  # this version's plan; measurements of keys it dropped stay in the file
        return result
    return {
        "bench": "gpu_check",
        "settings": settings,
        "plan": plan(sizes),
        "device": None,
        "calibration": {},
        "peaks": [],
        "peak": None,
        "measurements": {},
        "failed": {},
        "runs": [],
        "complete": False,
    }


def refresh(result: dict[str, Any]) -> None:
    """Derived numbers: the best peak, every MFU against it, whether the plan is done."""
    if result["peaks"]:
        best = max(result["peaks"], key=lambda p: p["flops_per_second"])
        result["peak"] = best
        for key, value in result["measurements"].items():
            kind = parse_key(key)["kind"]
            if kind == "sampler":
                value["mfu"] = value["achieved_flops_per_second"] / best["flops_per_second"]
            elif kind == "spg":
                value["mfu"] = {k: v / best["flops_per_second"] for k, v in value["achieved_flops_per_second"].items()}
                value["peak"] = {**value["peak"], **best}
    result["complete"] = all(key in result["measurements"] for key in result["plan"])


def _tflops(value: float) -> str:
    return f"{value / 1e12:.1f}" if value >= 1e11 else f"{value / 1e12:.3g}"


def _gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def render_markdown(result: dict[str, Any]) -> str:
    s, d = result["settings"], result["device"] or {}
    sizes = s["sizes"]
    measured = result["measurements"]
    done = sum(key in measured for key in result["plan"])
    cuda = f", CUDA {d['cuda']}" if d.get("cuda") else ""
    lines = [
        "## GPU check (`python -m bench.gpu_check`)",
        "",
        f"{'Smoke run (CPU, tiny models)' if s['smoke'] else 'Run'} on {d.get('name', s['device_name'])}: "
        f"torch {d.get('torch')}{cuda}, DeepSpeed {d.get('deepspeed')}, transformers {d.get('transformers')}; "
        f"{s['dtype']}, attention {s['attn_implementation']}; random weights.",
        "",
    ]
    if result["peak"]:
        pk = result["peak"]
        lines.append(
            f"Matmul peak: {_tflops(pk['flops_per_second'])} TFLOP/s ({pk['size']}² {s['dtype']} {pk['kernel']}, "
            f"best of {len(result['peaks'])} measurements); every MFU below is against it."
        )
    lines.append(
        f"Measured {done} of {len(result['plan'])}"
        + (" (complete)." if result["complete"] else "; a rerun with the same --out measures the rest.")
    )
    # Tables in the plan's model order, whatever order the measurements finished in.
    order = {model: i for i, model in enumerate(sizes["models"])}
    rows = [(key, measured[key]) for key in result["plan"] if key in measured and key.startswith("sampler/")]
    if rows:
        plain = {(v["model"], v["batch_size"]): v for _, v in rows if v["variant"] == "plain"}
        lines += [
            "",
            f"Sampler: prompt {sizes['prompt_length']}, generation {sizes['gen_length']}, block "
            f"{sizes['block_length']}, {sizes['steps']} steps, greedy, threshold {s['threshold']:g}; the LM head "
            "multiplied by the scale at which the threshold fires (random weights are otherwise too flat).",
            "",
            "| model | batch | variant | tok/s | speed-up | NFE | tok/step | forward MFU | seconds | head x |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows.sort(key=lambda kv: (order[kv[1]["model"]], -kv[1]["batch_size"], VARIANTS.index(kv[1]["variant"])))
        for _, v in rows:
            ref = plain.get((v["model"], v["batch_size"]))
            speedup = f"{ref['seconds'] / v['seconds']:.2f}x" if ref else "-"
            lines.append(
                f"| {v['model']} | {v['batch_size']} | {v['variant']} | {v['tokens_per_second']:.1f} | {speedup} | "
                f"{v['nfe']} | {v['tokens_per_step_mean']:.2f} | {100 * v['mfu']:.1f}% | {v['seconds']:.3g} | "
                f"{v['logit_scale']:g} |"
            )
    steps = [(key, measured[key]) for key in result["plan"] if key in measured and key.startswith("spg/")]
    steps.sort(key=lambda kv: (order[parse_key(kv[0])["model"]], kv[1]["training"] != "lora"))
    if steps:
        lines += [
            "",
            f"One SPG step: G = {sizes['group']}, prompt {sizes['prompt_length']}, generation {sizes['gen_length']} "
            f"(block {sizes['block_length']}, {sizes['steps']} steps), m = {sizes['mc']}, gradient checkpointing as "
            f"the model config says; median of {sizes['repeats']} after one warm-up step. Seconds per phase.",
            "",
            "| model | training | rollout | reward | precompute | lik. fwd | backward | optimizer | step | "
            "fwd+bwd MFU | step MFU | peak memory |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for _, v in steps:
            ph = {name: v["phases"][name]["seconds"] for name in spg.PHASES}
            if v["training"] == "lora":
                training = f"LoRA r{v['settings']['lora']['r']}"
            else:
                training = f"full ({v['full_finetune_layout']['label']})"
            peak = v["memory"]["peak_bytes"]
            if "allocated" in peak:  # CUDA: what tensors held, and what the allocator reserved
                memory = f"{_gib(peak['allocated'])} ({_gib(peak['reserved'])} reserved)"
            else:
                memory = _gib(max(peak.values()))
            lines.append(
                f"| {v['settings']['model']} | {training} | "
                + " | ".join(f"{ph[name]:.3g}" for name in spg.PHASES)
                + f" | {v['total_seconds']:.3g} | {100 * v['mfu']['forward_backward']:.1f}% | "
                f"{100 * v['mfu']['step']:.1f}% | {memory} |"
            )
    if result["failed"]:
        lines += ["", "Failed (not retried without --retry-failed):"]
        lines += [f"- `{key}`: {f['error'][:300]}" for key, f in result["failed"].items()]
    missing = [k for k in result["plan"] if k not in measured and k not in result["failed"]]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(f'`{k}`' for k in missing)}."]
    return "\n".join(lines) + "\n"


def saver(out: Path, page: Path | None) -> Any:
    """Writes the result, its Markdown beside it and the page's section; each file replaced atomically."""
    from dllm_rl.checkpoint import write_text_atomic
    from dllm_rl.experiments.pages import write_section

    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:
        refresh(result)
        write_text_atomic(out, json.dumps(result, indent=2))
        markdown = render_markdown(result)
        write_text_atomic(out.with_suffix(".md"), markdown)
        if page is not None:
            write_section(page, SECTION, COMMAND, markdown)

    return save


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Trailing KEY=VALUE arguments are Hydra overrides of every composed config.",
    )
    p.add_argument("--smoke", action="store_true", help="the same plan on the CPU with tiny models and sizes")
    p.add_argument(
        "--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT}, smoke {DEFAULT_SMOKE_OUT})"
    )
    p.add_argument("--page", type=Path, default=None, help="also write the Markdown into a marked section of this page")
    p.add_argument(
        "--attn",
        choices=("auto", "sdpa", "flash_attention_2"),
        default="auto",
        help="attention kernel (auto: flash_attention_2 on CUDA where flash_attn is installed, else sdpa)",
    )
    p.add_argument("--retry-failed", action="store_true", help="measure again what failed in an earlier run")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE")
    args = p.parse_intermixed_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("torch sees no CUDA device (--smoke runs the same plan on the CPU)")
    if args.smoke and args.attn == "flash_attention_2":
        p.error("--smoke runs on the CPU, where flash_attention_2 does not")
    if args.out is None:
        args.out = DEFAULT_SMOKE_OUT if args.smoke else DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else GPU
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    result = start_or_resume(args.out, identity(args, sizes, device), sizes)
    save = saver(args.out, args.page)
    checker = Checker(args, sizes, device, result)
    # torch.distributed and threads once per process, from the first training config (DeepSpeed needs them).
    first = parse_key(next(k for k in result["plan"] if k.startswith("spg/")))
    device = spg.init_process(spg.build_config(checker.spg_args(first["model"], True, [])))
    checker.device = device
    result["device"] = {**spg.device_info(device), "flash_attn": _version("flash_attn")}
    result["runs"].append({"started": _now(), "command": [Path(sys.executable).name, *sys.argv]})
    save(result)
    checker.run(save)
    result["runs"][-1]["ended"] = _now()
    save(result)
    print(render_markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}" + (f"; section in {args.page}" if args.page else ""))
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
