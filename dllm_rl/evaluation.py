"""Evaluation primitives shared by the trainer's evaluations and ``python -m dllm_rl.evaluate``.

- ``generate``: prompts -> completions through a sampler, in micro-batches, with the task's prompt
  style (chat template or literal) and the evaluation prefill;
- ``fit_prompts``: ``task.max_prompt_tokens`` applied to a list of examples (drop / error / left_truncate);
- ``paper_subset``: the papers' seeded evaluation subsets (``np.random.seed(s); np.random.choice(n, k, False)``);
- ``score``: greedy completions -> the task's metrics, the training reward and one JSONL row each,
  optionally split across ranks (every rank decodes its share, rank 0 gathers and scores).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dllm_rl import zero3
from dllm_rl.errors import ConfigError
from dllm_rl.models.policy import Policy
from dllm_rl.tasks.base import Task, total_reward

log = logging.getLogger(__name__)

OVERFLOW_MODES = ("drop", "error", "left_truncate")


@torch.no_grad()
def generate(
    policy: Policy,
    sampler: Any,
    prompts: Sequence[str],
    micro_batch: int,
    temperature: float | None,
    generator: torch.Generator | None,
    chat: bool = False,
    prefill: str = "",
    max_prompt_tokens: int | None = None,
    zero3_params: str = "lockstep",
    micro_seeds: Sequence[int] | None = None,
    stats: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(prompt ids, attention, completion ids, sampler forwards) for a list of prompts.

    The sampler forwards are the model forwards of all the micro-batches' sampler calls, summed: the
    cost on this process. The NFE that evaluation and rollouts report is ``stats["nfe"]``: forwards
    of the denoiser per generated sequence (each row's call's forwards, averaged over the rows; the
    sampler's steps for a fixed-step sampler), whatever the micro-batch size.

    ``micro_seeds``: one seed per micro-batch, each then drawing its noise from its own generator
    (instead of ``generator`` shared by all), so that a micro-batch's completions do not depend on
    which micro-batches ran before it on this process: rollouts split over ranks equal one process's.
    ``max_prompt_tokens`` left-truncates the rendered prompts (None: as they are). ``zero3_params``
    (rollout.zero3_params) is how a ZeRO-3 engine's sharded parameters are used for the whole call
    (dllm_rl/zero3.py): under ZeRO-3 every rank must call this, with the same number of prompts, so that
    the micro-batches below give every rank the same number of sampler calls. ``stats``, when given, is
    filled with the sampler's decoding statistics over all micro-batches: ``nfe``, ``forward_tokens``
    (positions run through the model per row, summed), ``tokens_per_step_mean`` / ``_max`` and
    ``steps_per_block``.
    """
    prompt_ids, attention = policy.encode_prompts(
        list(prompts), chat=chat, prefill=prefill, max_tokens=max_prompt_tokens
    )
    outputs, nfe = [], 0
    parts: list[tuple[int, Any]] = []
    with zero3.rollout_params(policy, zero3_params), policy.scoring():
        for j, lo in enumerate(range(0, len(prompts), micro_batch)):
            if micro_seeds is not None:
                generator = torch.Generator(device=policy.device).manual_seed(int(micro_seeds[j]))
            # Each micro-batch only needs the padding of its own longest prompt.
            rows = attention[lo : lo + micro_batch]
            width = int(rows.sum(dim=1).max())
            out = sampler.generate(
                policy.logits,
                prompt_ids[lo : lo + micro_batch, -width:],
                rows[:, -width:],
                policy.mask_id,
                generator=generator,
                temperature=temperature,
            )
            outputs.append(out.completion_ids)
            nfe += out.nfe
            parts.append((int(rows.shape[0]), out))
    if stats is not None and parts:
        rows_total = sum(n for n, _ in parts)
        stats["nfe"] = sum(n * out.nfe for n, out in parts) / max(rows_total, 1)
        stats["forward_tokens"] = float(sum(n * out.forward_tokens for n, out in parts))
        for key in ("tokens_per_step_mean", "steps_per_block"):
            values = [(n, out.stats[key]) for n, out in parts if key in out.stats]
            if values:
                stats[key] = sum(n * v for n, v in values) / max(rows_total, 1)
        maxima = [out.stats["tokens_per_step_max"] for _, out in parts if "tokens_per_step_max" in out.stats]
        if maxima:
            stats["tokens_per_step_max"] = max(maxima)
    return prompt_ids, attention, torch.cat(outputs), nfe


def truncation(task_cfg: Mapping[str, Any]) -> int | None:
    """The token cap encode_prompts applies: task.max_prompt_tokens under left_truncate, else None."""
    if task_cfg.get("on_prompt_overflow", "drop") == "left_truncate":
        return task_cfg.get("max_prompt_tokens")
    return None


def fit_prompts(
    policy: Policy, task: Task, examples: list[dict[str, Any]], column: str, prefill: str, where: str
) -> tuple[list[dict[str, Any]], int]:
    """(examples kept, number dropped) under task.max_prompt_tokens and task.on_prompt_overflow."""
    cap, mode = task.cfg.get("max_prompt_tokens"), task.cfg.get("on_prompt_overflow", "drop")
    if mode not in OVERFLOW_MODES:
        raise ConfigError(f"task.on_prompt_overflow={mode!r} must be one of {', '.join(OVERFLOW_MODES)}")
    if cap is None or mode == "left_truncate" or not examples:
        return examples, 0
    lengths = policy.prompt_lengths([ex[column] for ex in examples], chat=task.chat, prefill=prefill)
    over = [i for i, n in enumerate(lengths) if n > cap]
    if not over:
        return examples, 0
    if mode == "error":
        raise ConfigError(
            f"task.max_prompt_tokens={cap}: {len(over)} of {len(examples)} {where} prompts are longer "
            f"(row {over[0] + 1} has {lengths[over[0]]} tokens); raise the cap or set "
            "task.on_prompt_overflow=drop or left_truncate"
        )
    if len(over) == len(examples):
        raise ConfigError(
            f"task.max_prompt_tokens={cap}: every {where} prompt is longer (the shortest has {min(lengths)} tokens)"
        )
    log.warning("%s: dropped %d of %d prompts over task.max_prompt_tokens=%d", where, len(over), len(examples), cap)
    dropped = set(over)
    return [ex for i, ex in enumerate(examples) if i not in dropped], len(over)


def paper_subset(total: int, size: int | None, seed: int) -> list[int]:
    """Indices of the evaluated subset: all rows in order, or the papers' seeded choice.

    d1 seeds NumPy's global generator and draws ``choice(total, size, replace=False)`` first; the
    legacy RandomState with the same seed gives the same indices without touching global state.
    """
    if size is None:
        return list(range(total))
    return np.random.RandomState(seed).choice(total, min(size, total), replace=False).tolist()


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def score(
    policy: Policy,
    sampler: Any,
    task: Task,
    examples: list[dict[str, Any]],
    batch_size: int,
    max_prompt_tokens: int | None = None,
    shard: bool = False,
    zero3_params: str = "lockstep",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy completions of the examples' eval prompts -> (metrics, one record per example).

    ``shard``: every rank decodes examples rank, rank + world, ... and all ranks receive the full,
    ordered result, so that metrics and records do not depend on the number of processes.
    Every rank decodes the same number of prompts (a short share is padded with copies of an example
    whose outputs are dropped), so every rank runs the same number of sampler forwards: under ZeRO-3
    each forward gathers the sharded parameters collectively, and ranks must stay in lockstep.
    Under ZeRO-3 every rank must call this (sharded or not), whichever ``zero3_params`` (see generate).
    ``metrics["nfe"]`` is forwards of the denoiser per generated sequence (generate's ``stats["nfe"]``),
    the same number whatever ``batch_size`` and the number of processes.
    """
    rank, world = _rank_world() if shard else (0, 1)
    mine = examples[rank::world]
    share = -(-len(examples) // world) if examples else 0
    # Pad with this rank's own last example where it has one, so no micro-batch gets a longer prompt.
    filler = mine[-1] if mine else examples[0] if examples else None
    padded = mine + [filler] * (share - len(mine)) if examples else []
    prefill = task.eval_prefill
    texts: list[str] = []
    decoding: dict[str, float] = {}
    if padded:
        _, _, completion_ids, _ = generate(
            policy,
            sampler,
            [ex["eval_prompt"] for ex in padded],
            batch_size,
            0.0,
            None,
            chat=task.chat,
            prefill=prefill,
            max_prompt_tokens=max_prompt_tokens,
            zero3_params=zero3_params,
            stats=decoding,
        )
        texts = policy.decode(completion_ids[: len(mine)])
    nfe = decoding.get("nfe", 0.0)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (texts, nfe))
        texts = [None] * len(examples)  # type: ignore[list-item]
        for r, (part, _) in enumerate(gathered):
            texts[r::world] = part
        nfe = float(np.mean([n for _, n in gathered]))  # every rank decoded the same number of rows
    metrics = task.metrics(texts, examples)
    # The training reward reads what the model wrote after the generation prompt, prefill included.
    rewards = [total_reward(p) for p in task.score([prefill + t for t in texts], examples, "evaluation example")]
    metrics["reward_mean"] = float(np.mean(rewards)) if rewards else 0.0
    metrics["nfe"] = float(nfe)
    records = [
        {"prompt": ex["eval_prompt"], "completion": t, "reward": r}
        for ex, t, r in zip(examples, texts, rewards, strict=True)
    ]
    return metrics, records


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


# Edges of the p(reference token) histogram of target_marginals.
MARGINAL_EDGES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)


def target_marginals(
    policy: Policy,
    task: Task,
    examples: Sequence[Mapping[str, Any]],
    completion_length: int,
    batch_size: int,
    zero3_params: str = "lockstep",
) -> dict[str, Any]:
    """How sure the model is of the reference answer before it decodes anything (compact tasks).

    One forward per micro-batch with the whole completion masked: at every completion position the
    reward reads (``Task.reward_blind_positions``; all of them when the task cannot say) the
    probability of the reference token (``Task.target``) and whether it is the argmax. Returned:
    ``positions``, ``argmax_acc``, ``mean_p_target``, ``histogram`` (share of positions per bin of
    p, edges ``MARGINAL_EDGES``) and ``argmax_wrong`` (where the argmax is wrong, the share with the
    reference token below 0.1, in [0.1, 0.3) and from 0.3 on: how far RL has to move those cells).
    Comparing a checkpoint with its base shows whether RL moved the answer or only the confidence
    (docs/RESULTS.md, "The testbed"). Chat tasks have no fixed answer position: ConfigError. Every rank
    runs the same forwards on the same examples (under ZeRO-3 every rank must call this; ``zero3_params``
    as in ``generate``).
    """
    if task.chat:
        raise ConfigError(
            "evaluate.marginals=true needs a compact-style task (task.prompt_style=compact): a chat "
            "completion has no fixed position for each answer token"
        )
    from dllm_rl.positions import position_ids_from_attention_mask

    probs: list[float] = []
    hits: list[bool] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        ids, attention = policy.encode_prompts([ex["eval_prompt"] for ex in chunk], prefill=task.eval_prefill)
        masked = torch.full((len(chunk), completion_length), policy.mask_id, dtype=ids.dtype, device=ids.device)
        full_ids = torch.cat([ids, masked], dim=1)
        full_attention = torch.cat([attention, torch.ones_like(masked)], dim=1)
        with zero3.rollout_params(policy, zero3_params), policy.scoring():
            logits = policy.logits(full_ids, full_attention, position_ids_from_attention_mask(full_attention))
        p = logits[:, -completion_length:].float().softmax(dim=-1)
        top = p.argmax(dim=-1)
        for row, ex in enumerate(chunk):
            target = policy.tokenizer(task.target(ex), add_special_tokens=False)["input_ids"][:completion_length]
            blind = task.reward_blind_positions(ex, completion_length) or [False] * completion_length
            for i, token in enumerate(target):
                if not blind[i]:
                    probs.append(float(p[row, i, token]))
                    hits.append(int(top[row, i]) == token)
    values, hit = np.asarray(probs), np.asarray(hits, dtype=bool)
    if values.size == 0:
        raise ConfigError("evaluate.marginals: no scored answer position in the evaluated examples")
    counts, _ = np.histogram(values, bins=MARGINAL_EDGES)
    wrong = values[~hit]

    def share(selected: np.ndarray) -> float:
        return float(selected.mean()) if wrong.size else 0.0

    return {
        "positions": int(values.size),
        "argmax_acc": float(hit.mean()),
        "mean_p_target": float(values.mean()),
        "histogram": {
            f"{a:g}-{b:g}": float(c) / values.size
            for a, b, c in zip(MARGINAL_EDGES[:-1], MARGINAL_EDGES[1:], counts, strict=True)
        },
        "argmax_wrong": {
            "positions": int(wrong.size),
            "p<0.1": share(wrong < 0.1),
            "0.1<=p<0.3": share((wrong >= 0.1) & (wrong < 0.3)),
            "p>=0.3": share(wrong >= 0.3),
        },
    }
