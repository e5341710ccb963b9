"""Supervised warm-start: a short masked-diffusion training run that gives RL an imperfect base.

Loss: for each training pair (prompt c, target x) draw t ~ U(t_min, 1), mask each target position
with probability t (at least one), and take the mean cross-entropy over the masked positions,
−(1/|S|) Σ_{i∈S} log f_θ(x_i | c, z_S). (The 1/t-weighted ELBO loss is the principled one, but with
t near 0 its variance kept a model this small at chance; the masked mean trains in seconds.)

The base is cached under cache_dir/bases/<model>-<task>-<hash of everything it depends on>, so
every RL run and seed with the same (model, task, warm-start) config starts from the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dllm_rl.config import RunConfig, WarmstartCfg
from dllm_rl.models.policy import Policy, build_tiny
from dllm_rl.positions import position_ids_from_attention_mask
from dllm_rl.schema import plain
from dllm_rl.tasks.base import Task

log = logging.getLogger(__name__)

# Task fields that only affect RL or evaluation (rewards, decoding, evaluated subsets), not the training
# data the base sees: runs that differ only in these start from the same cached base.
_TASK_KEYS_NOT_IN_BASE = {
    "credit_alternative_solutions",
    "rewards",
    "block_length",
    "diffusion_steps",
    "eval_gen_lengths",
    "eval_subset_size",
    "eval_subset_seed",
}
# Model fields that change how the base is loaded or trained on in RL, not the base's weights.
_MODEL_KEYS_NOT_IN_BASE = {
    "path",
    "adapter",
    "requires_path",
    "gradient_checkpointing",
    "compile",
    "attn_implementation",
    "quantization",
    "lora",
}


def base_signature(model_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], ws_cfg: Mapping[str, Any]) -> str:
    model = {k: v for k, v in model_cfg.items() if k not in _MODEL_KEYS_NOT_IN_BASE}
    task = {k: v for k, v in task_cfg.items() if k not in _TASK_KEYS_NOT_IN_BASE}
    ws = {k: v for k, v in ws_cfg.items() if k != "enabled"}
    blob = json.dumps({"model": model, "task": task, "warmstart": ws}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def encode_targets(policy: Policy, targets: list[str], length: int) -> torch.Tensor:
    """Target ids cut or padded with EOS to exactly ``length`` tokens (EOS padding is content)."""
    pad = policy.eos_id if policy.eos_id is not None else policy.pad_id
    rows = []
    for text in targets:
        ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        rows.append(ids + [pad] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long, device=policy.device)


def train_base(policy: Policy, task: Task, ws: WarmstartCfg, length: int) -> dict[str, float]:
    """Masked-diffusion training on the task's training split; returns timing and the last loss."""
    examples = task.dataset("train").to_list()
    g = torch.Generator().manual_seed(ws.seed)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=ws.lr, weight_decay=0.0)
    policy.model.train()
    start, last = time.perf_counter(), float("nan")
    batch_size, t_min = ws.batch_size, ws.t_min
    for _ in range(ws.steps):
        rows = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=g).tolist()]
        prompt_ids, prompt_attn = policy.encode_prompts([row["prompt"] for row in rows], chat=task.chat)
        target = encode_targets(policy, [task.target(row) for row in rows], length)
        t = t_min + (1 - t_min) * torch.rand(batch_size, 1, generator=g)
        masked = torch.rand(batch_size, length, generator=g) < t
        masked[torch.arange(batch_size), torch.randint(length, (batch_size,), generator=g)] = True
        masked = masked.to(policy.device)
        noisy = torch.where(masked, torch.full_like(target, policy.mask_id), target)
        inputs = torch.cat([prompt_ids, noisy], dim=1)
        attention = torch.cat([prompt_attn, torch.ones_like(target)], dim=1)
        positions = position_ids_from_attention_mask(attention)
        logits = policy.logits(inputs, attention, positions)[:, -length:]
        loss = F.cross_entropy(logits[masked].float(), target[masked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = float(loss.detach())
    policy.model.eval()
    return {"warmstart_seconds": time.perf_counter() - start, "warmstart_final_loss": last}


def ensure_base(cfg: RunConfig, task: Task) -> tuple[Path, dict[str, Any]]:
    """Path of the cached warm-started base for this config, training and caching it if missing."""
    ws = cfg.warmstart
    signature = base_signature(plain(cfg.model), plain(cfg.task), plain(ws))
    name = f"{cfg.model.name}-{cfg.task.name}-{signature}"
    target = Path(cfg.cache_dir).expanduser() / "bases" / name
    if (target / "warmstart.json").is_file():
        info = json.loads((target / "warmstart.json").read_text())
        log.info("using the cached warm-started base %s", target)
        return target, {**info, "cached": True}
    log.info("no warm-started base in the cache: training one (%d steps)", ws.steps)
    policy = build_tiny(cfg.model, task.alphabet, seed=ws.seed)
    info = train_base(policy, task, ws, cfg.sampler.gen_length)
    tmp = target.parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save(tmp)
    (tmp / "warmstart.json").write_text(json.dumps(info, indent=2))
    try:
        os.replace(tmp, target)  # atomic: a reader sees no base or a complete one
    except OSError:
        # Another run cached the same base meanwhile: keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached the warm-started base in %s (%.1f s)", target, info["warmstart_seconds"])
    return target, {**info, "cached": False}
