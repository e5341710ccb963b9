"""The RL loop: rollout rounds -> rewards -> advantages -> μ optimizer steps on the same rollouts.

for each round:
    Q prompts -> G completions each (sampler, no grad) -> rewards -> advantages
    objective.prepare(batch)                      (no grad, once per round)
    repeat μ times:                               (one optimizer step each, fresh masks)
        for each micro-batch: loss = objective.loss(...); engine.backward(loss); engine.step()
        a step with non-finite losses/surrogates/gradients is skipped; too many in a row abort the run
evaluate before, every N steps and at the end; checkpoint every K steps and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dllm_rl import checkpoint, evaluation
from dllm_rl.config import RunConfig
from dllm_rl.errors import DllmRlError, NonFiniteError
from dllm_rl.likelihood.masks import mask_seed
from dllm_rl.models.policy import Policy
from dllm_rl.objectives.base import METRIC_WEIGHT_SUFFIX, Objective, RolloutBatch, metric_weight
from dllm_rl.preemption import StopRequests
from dllm_rl.tasks.base import Task, total_reward
from dllm_rl.tracking import Tracker

log = logging.getLogger(__name__)

LAST_GOOD = "last_good"  # checkpoint tag written before aborting on repeated non-finite steps
BEST = "best"  # save_pretrained export of the weights with the best validation metric so far
EVAL_PREFIX = {"test": "eval", "validation": "val"}  # metric-name prefixes in metrics.jsonl and wandb


@dataclasses.dataclass
class ResumePoint:
    """A position in the run: ``step`` steps done, the next one is inner step ``next_inner`` of round
    ``next_round``; the prompt stream's state and this rank's state (Trainer.rank_state: RNGs, the
    objective's state, the round's rollouts while it is under way) at that point."""

    step: int
    next_round: int
    next_inner: int
    prompt_stream: dict[str, int]
    rank_state: dict[str, Any]


class PromptStream:
    """Seeded epoch-wise permutation of the training prompts; its state goes into checkpoints."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(mask_seed(self.seed, "prompts", self.epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def next(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(count - len(out), self.size - self.position)
            out += self._order[self.position : self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


def rollout_batch(
    policy: Policy,
    objective: Any,
    group: int,
    round_index: int,
    prompt_ids: torch.Tensor,
    attention: torch.Tensor,
    completion_ids: torch.Tensor,
    rewards: torch.Tensor,
    reward_parts: dict[str, torch.Tensor],
    first_uid: int = 0,
) -> RolloutBatch:
    """A scored rollout round as the objectives take it: G consecutive rows per prompt, validity masks,
    the objective's advantages. Rewards and advantages go to the policy's device, where the objectives
    combine them with log-probs; the reward parts stay on the CPU (they are only logged).
    ``first_uid``: the round-wide id of the first row (this rank's offset), which seeds its masks."""
    device = policy.device
    rewards = rewards.to(device)
    n = completion_ids.shape[0]
    uids = torch.arange(first_uid, first_uid + n, device=device)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_attention=attention,
        completion_ids=completion_ids,
        completion_mask=completion_validity(completion_ids, policy.eos_id),
        group_index=uids // group,
        sample_uid=uids,
        rewards=rewards,
        reward_parts=reward_parts,
        advantages=objective.advantages(rewards, group),
        round=round_index,
    )


def completion_validity(completion_ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """v_i: 1 up to and including the first EOS, 0 after it; all 1 without an EOS."""
    if eos_id is None:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    is_eos = completion_ids == eos_id
    after_first = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return ~after_first


def generate_round(
    policy: Policy,
    sampler: Any,
    prompts: list[str],
    group: int,
    micro_batch: int,
    seed: int,
    round_index: int,
    first_uid: int = 0,
    **generate_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A round's completions: each prompt ``group`` times in consecutive rows, decoded without gradients in
    micro-batches of ``micro_batch`` rows, each micro-batch with its own generator seeded by the round and
    the round-wide id of its first row (``first_uid`` + offset), so a row's sampler noise does not depend on
    how many processes share the round. Returns ``evaluation.generate``'s (prompt ids, attention, completion
    ids, NFE); ``generate_kwargs`` go to it (chat, prompt cap, ZeRO-3 parameters, stats)."""
    rows = [prompt for prompt in prompts for _ in range(group)]
    seeds = [mask_seed(seed, "rollout", round_index, first_uid + lo) for lo in range(0, len(rows), micro_batch)]
    return evaluation.generate(policy, sampler, rows, micro_batch, None, None, micro_seeds=seeds, **generate_kwargs)


def _no_phase(name: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def accumulate_step(
    engine: Any,
    objective: Objective,
    policy: Policy,
    batch: RolloutBatch,
    micro_batch: int,
    inner_step: int,
    dropout: bool,
    phase: Callable[[str], contextlib.AbstractContextManager[None]] = _no_phase,
    last_loss: Callable[[torch.Tensor, list[tuple[float, dict[str, float], int]]], torch.Tensor] | None = None,
) -> list[tuple[float, dict[str, float], int]]:
    """One optimizer step over ``batch``: for each micro-batch of ``micro_batch`` rows, ``objective.loss``,
    ``engine.backward`` and ``engine.step`` (DeepSpeed applies the update at the last one). ``dropout``:
    whether dropout is on in the gradient forward (``objective.loss_forward_dropout``, a per-objective
    choice; gradients flow either way).

    ``phase(name)`` wraps each call ("likelihood_forward", "backward", "optimizer_step"), so a benchmark
    can clock them; ``last_loss(loss, records)`` may replace the last micro-batch's loss before its
    backward (the trainer's non-finite guard). Returns (loss, metrics, rows) per micro-batch."""
    engine.train(dropout)
    starts = range(0, len(batch), micro_batch)
    records: list[tuple[float, dict[str, float], int]] = []
    for i, lo in enumerate(starts):
        part = batch.select(slice(lo, lo + micro_batch))
        with phase("likelihood_forward"):
            loss, metrics = objective.loss(part, policy, inner_step)
        records.append((float(loss.detach()), dict(metrics), len(part)))
        if i == len(starts) - 1 and last_loss is not None:
            loss = last_loss(loss, records)
        with phase("backward"):
            engine.backward(loss)
        with phase("optimizer_step"):
            engine.step()
    return records


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        policy: Policy,
        engine: Any,
        task: Task,
        sampler: Any,
        objective: Objective,
        tracker: Tracker,
        run_dir: Path,
        resume_from: Path | None = None,
        stop_requests: StopRequests | None = None,
    ) -> None:
        self.cfg, self.policy, self.engine, self.task = cfg, policy, engine, task
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.resume_from = resume_from
        self.stop_requests = stop_requests or StopRequests()
        self.sampler, self.objective, self.tracker, self.run_dir = sampler, objective, tracker, run_dir
        self.sampler_adaptive = getattr(sampler, "threshold", None) is not None
        self.seed = cfg.seed
        self.group = cfg.rollout.samples_per_prompt
        self.prompts_per_step = cfg.rollout.prompts_per_step
        self.mu = cfg.objective.inner_iterations
        # How rollouts and evaluations use ZeRO-3's sharded parameters (dllm_rl/zero3.py).
        self.zero3_params = cfg.rollout.zero3_params
        self.truncate_prompts_to = evaluation.truncation(task.cfg)
        self.dropped_prompts: dict[str, int] = {}
        self.train_examples = self._examples("train", "prompt", "", None)
        self.eval_examples: dict[str, list[dict[str, Any]]] = {}  # filled on a split's first evaluation
        self.stream = PromptStream(len(self.train_examples), self.seed)
        self.global_step = 0
        self.last_skip_reason: str | None = None
        self.skip_streak: list[str] = []  # reasons of the consecutive skipped steps up to now
        # Where the run stood after its last applied step: what checkpoints/last_good resumes from.
        self.last_applied: ResumePoint | None = None  # set by fit() and after every applied step
        self.best: dict[str, Any] | None = None  # the step with the best validation metric so far
        self.evals: list[dict[str, Any]] = []  # every evaluation of the run
        self.base: dict[str, float] | None = None  # the test metrics before RL
        self.rl_seconds = 0.0  # RL wall time of earlier sessions of a resumed run
        self._session_start = time.perf_counter()

    def _examples(self, split: str, column: str, prefill: str, cap: int | None) -> list[dict[str, Any]]:
        """A split's rows (the first ``cap`` of them), without prompts over task.max_prompt_tokens."""
        data = self.task.dataset(split)
        if cap is not None:
            data = data.select(range(min(int(cap), len(data))))
        examples, dropped = evaluation.fit_prompts(self.policy, self.task, data.to_list(), column, prefill, split)
        self.dropped_prompts[split] = dropped
        return examples

    def _eval_examples(self, split: str) -> list[dict[str, Any]]:
        if split not in self.eval_examples:
            cap = self.cfg.eval.num_examples
            self.eval_examples[split] = self._examples(split, "eval_prompt", self.task.eval_prefill, cap)
        return self.eval_examples[split]

    # ------------------------------------------------------------------ rollout
    def rollout(self, round_index: int) -> tuple[RolloutBatch, dict[str, float]]:
        """This rank's share of the round: prompts_per_step/world prompts x G completions, scored.

        Every rank draws the same Q prompts from the stream and keeps its contiguous slice, so rows
        have the same round-wide ids (and masks, and sampler noise per rollout micro-batch) however
        many processes share the round; the statistics are over the whole round.
        """
        start = time.perf_counter()
        indices = self.stream.next(self.prompts_per_step)
        share = self.prompts_per_step // self.world
        mine = indices[self.rank * share : (self.rank + 1) * share]
        first_uid = self.rank * share * self.group
        decoding: dict[str, float] = {}
        prompt_ids, attention, completion_ids, _ = generate_round(
            self.policy,
            self.sampler,
            [self.train_examples[i]["prompt"] for i in mine],
            self.group,
            self.cfg.rollout.micro_batch,
            self.seed,
            round_index,
            first_uid,
            chat=self.task.chat,
            max_prompt_tokens=self.truncate_prompts_to,
            zero3_params=self.zero3_params,
            stats=decoding,
        )
        examples = [self.train_examples[i] for i in mine for _ in range(self.group)]
        gen_seconds = time.perf_counter() - start
        texts = self.policy.decode(completion_ids)
        parts = self.task.score(texts, examples, f"round {round_index} rollout sample", first_uid)
        rewards = torch.tensor([total_reward(p) for p in parts], dtype=torch.float32)
        reward_parts = {k: torch.tensor([p[k] for p in parts], dtype=torch.float32) for k in parts[0]}
        batch = rollout_batch(
            self.policy,
            self.objective,
            self.group,
            round_index,
            prompt_ids,
            attention,
            completion_ids,
            rewards,
            reward_parts,
            first_uid=first_uid,
        )
        local = {
            "rewards": batch.rewards.cpu(),
            "valid_len": batch.completion_mask.sum(dim=1).float().cpu(),
            "parts": reward_parts,
            "tokens": completion_ids.numel(),
            "gen_seconds": gen_seconds,
            "nfe": decoding["nfe"],
            "decoding": decoding,
        }
        shares = self._gather(local)
        rewards = torch.cat([x["rewards"] for x in shares])
        grouped = rewards.view(-1, self.group)
        stats = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "frac_zero_std_groups": float((grouped.std(dim=1) < 1e-6).float().mean()),
            "rollout_seconds": time.perf_counter() - start,
            "gen_tokens_per_s": sum(x["tokens"] for x in shares) / max(max(x["gen_seconds"] for x in shares), 1e-9),
            # NFE as evaluation reports it: denoiser forwards per generated sequence (ranks decode as many rows)
            "rollout_nfe": float(np.mean([x["nfe"] for x in shares])),
            "completion_valid_len": float(torch.cat([x["valid_len"] for x in shares]).mean()),
            **{f"reward/{k}": float(torch.cat([x["parts"][k] for x in shares]).mean()) for k in reward_parts},
        }
        if self.sampler_adaptive:
            # Threshold decoding in rollouts: how many tokens each step commits (docs/samplers.md, "Safeguards").
            for key in ("tokens_per_step_mean", "steps_per_block"):
                stats[f"rollout_{key}"] = float(np.mean([x["decoding"].get(key, math.nan) for x in shares]))
            stats["rollout_tokens_per_step_max"] = max(x["decoding"].get("tokens_per_step_max", 0.0) for x in shares)
        return batch, stats

    def _gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (a one-element list for one process)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    # ------------------------------------------------------------------ update
    def optimize(self, batch: RolloutBatch, inner_step: int) -> dict[str, float]:
        """One optimizer step: gradient accumulation over the micro-batches of the rollout batch.

        The step is skipped (parameters, optimizer state and LR schedule untouched) when a micro-batch
        loss is non-finite, when more than objective.max_nonfinite_frac of the per-sequence surrogates
        were non-finite, or when DeepSpeed finds the gradient norm non-finite (docs/ARCHITECTURE.md,
        "Decisions worth knowing": non-finite guard).
        ``self.last_skip_reason`` says why, or is None for an applied step.
        """
        skipped_before = self.engine.skipped_steps
        lr = float(self.engine.get_lr()[0])  # the rate this step runs with (the schedule moves on after it)
        reason: str | None = None

        def counts(records: list[tuple[float, dict[str, float], int]]) -> tuple[int, int]:
            """Non-finite per-sequence surrogates and sequences over the micro-batches so far."""
            bad = sum(int(m.get("nonfinite_seqs", 0)) for _, m, _ in records)
            return bad, sum(int(m.get("num_seqs", rows)) for _, m, rows in records)

        def guard(loss: torch.Tensor, records: list[tuple[float, dict[str, float], int]]) -> torch.Tensor:
            # Before the last backward: a step to skip gets a NaN gradient, which ZeRO's overflow check discards.
            nonlocal reason
            reason = self._skip_reason([v for v, _, _ in records], *counts(records))
            return loss if reason is None else loss + self._nan_gradient()

        records = accumulate_step(
            self.engine,
            self.objective,
            self.policy,
            batch,
            self.cfg.train.micro_batch_per_gpu,
            inner_step,
            self.cfg.objective.loss_forward_dropout,
            last_loss=guard,
        )
        losses = [v for v, _, _ in records]
        nonfinite_seqs, num_seqs = counts(records)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for _, metrics, _ in records:
            # Counts add up over micro-batches (above); every other metric is averaged over the
            # micro-batches that report it, weighted as the objective says (objectives.base.metric_weight).
            for k, v in metrics.items():
                if k not in ("nonfinite_seqs", "num_seqs") and not k.endswith(METRIC_WEIGHT_SUFFIX):
                    w = float(metrics.get(metric_weight(k), 1.0))
                    sums[k] = sums.get(k, 0.0) + w * v
                    weights[k] = weights.get(k, 0.0) + w
        ds_skipped = self.engine.skipped_steps > skipped_before
        if reason is not None and not ds_skipped:
            raise RuntimeError(
                f"step {self.global_step + 1} had to be skipped ({reason}) but DeepSpeed applied it; "
                "the guard relies on ZeRO's overflow check (zero_optimization.stage 1, 2 or 3)"
            )
        if reason is None and ds_skipped:
            reason = "non-finite gradient norm"
        self.last_skip_reason = reason
        # Every rank's micro-batches count alike: the logged loss and metrics are over the whole batch.
        shares = self._gather((losses, sums, weights, nonfinite_seqs, num_seqs))
        losses = [v for share in shares for v in share[0]]
        parts = len(losses)
        means = {}
        for k in dict.fromkeys(k for share in shares for k in share[1]):
            total = sum(share[2].get(k, 0.0) for share in shares)
            if total > 0:
                means[k] = sum(share[1].get(k, 0.0) for share in shares) / total
        nonfinite_seqs, num_seqs = sum(share[3] for share in shares), sum(share[4] for share in shares)
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": sum(losses) / parts,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            **means,
            "skipped": int(reason is not None),
            "nonfinite_seqs": nonfinite_seqs,
            "num_seqs": num_seqs,
            "nonfinite_seq_frac": nonfinite_seqs / max(num_seqs, 1),
        }

    def _skip_reason(self, losses: list[float], nonfinite_seqs: int, num_seqs: int) -> str | None:
        bad, parts = sum(not math.isfinite(v) for v in losses), len(losses)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must reach the same verdict, and the fraction is over the global batch.
            counts = torch.tensor(
                [bad, parts, nonfinite_seqs, num_seqs], dtype=torch.float64, device=self.policy.device
            )
            dist.all_reduce(counts)
            bad, parts, nonfinite_seqs, num_seqs = (int(c) for c in counts.tolist())
        if bad:
            return f"non-finite loss in {bad} of {parts} micro-batches"
        limit = self.cfg.objective.max_nonfinite_frac
        if nonfinite_seqs / max(num_seqs, 1) > limit:
            return (
                f"{nonfinite_seqs} of {num_seqs} per-sequence surrogates non-finite "
                f"(objective.max_nonfinite_frac={limit:g})"
            )
        return None

    def _nan_gradient(self) -> torch.Tensor:
        """A term whose gradient is NaN, so DeepSpeed's own overflow check discards the whole step.

        Gradients accumulated over earlier micro-batches already sit in ZeRO's buffers; poisoning the
        last backward lets the optimizer's existing skip path clear them, instead of a second mechanism
        reaching into its internals. It goes through a one-token forward of the engine so that ZeRO-3
        gathers the (partitioned) weights as in any forward.
        """
        ids = torch.full((1, 1), self.policy.mask_id, dtype=torch.long, device=self.policy.device)
        return self.policy.logits(ids, torch.ones_like(ids)).sum() * float("nan")

    def train_step(self, batch: RolloutBatch, inner_step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """optimize() + bookkeeping: step counter, metrics record, skip warning and the abort rule."""
        step_start = time.perf_counter()
        metrics = self.optimize(batch, inner_step)
        self.global_step += 1
        record = {**(extra or {}), **metrics, "inner_step": inner_step}
        record["step_seconds"] = time.perf_counter() - step_start
        if inner_step == 0:  # the round's rollout is charged to its first step
            record["step_seconds"] += record.get("rollout_seconds", 0.0)
        self.tracker.log(self.global_step, record)
        self._guard(self.last_skip_reason, batch, inner_step, extra or {})
        return record

    def _guard(self, reason: str | None, batch: RolloutBatch, inner_step: int, stats: dict[str, Any]) -> None:
        """Count consecutive skipped steps; past train.max_skipped_steps save what is good and stop.

        After every applied step the position of the next one is remembered (with the round's rollouts
        while the round goes on): checkpoints/last_good resumes there, so a resumed run redoes exactly
        the skipped steps and ends at train.steps.
        """
        if reason is None:
            self.skip_streak = []
            mid_round = inner_step + 1 < self.mu
            self.last_applied = ResumePoint(
                self.global_step,
                batch.round if mid_round else batch.round + 1,
                inner_step + 1 if mid_round else 0,
                self.stream.state_dict(),
                self.rank_state((batch, stats) if mid_round else None),
            )
            return
        self.skip_streak.append(reason)
        limit = self.cfg.train.max_skipped_steps
        log.warning(
            "step %d skipped: %s (%d in a row%s)",
            self.global_step,
            reason,
            len(self.skip_streak),
            f", abort at {limit}" if limit > 0 else "",
        )
        if limit <= 0 or len(self.skip_streak) < limit:
            return
        # Skipped steps change nothing, so the current weights are those of the last applied step.
        good = self.last_applied
        if good is None:  # train_step() outside fit() with no step applied yet: the start of the run
            good = ResumePoint(0, 0, 0, PromptStream(self.stream.size, self.seed).state_dict(), self.rank_state(None))
        state = {
            **self.client_state(good.next_round, good.next_inner),
            "global_step": good.step,
            "prompt_stream": good.prompt_stream,
            "skip_streak": [],
            "evals": [e for e in self.evals if e["step"] <= good.step],
        }
        if self.best is not None and self.best["step"] > good.step:
            state["best"] = {**self.best, "step": good.step}  # evaluated during the streak: the same weights
        path = checkpoint.save(
            self.engine,
            self.policy,
            self.run_dir / "checkpoints",
            LAST_GOOD,
            state,
            self.cfg.checkpoint.keep_last,
            rank_state=good.rank_state,
        )
        causes = "; ".join(dict.fromkeys(self.skip_streak))
        raise NonFiniteError(
            f"{len(self.skip_streak)} optimizer steps in a row were skipped (train.max_skipped_steps={limit}), "
            f"steps {self.global_step - len(self.skip_streak) + 1}-{self.global_step}: {causes}; "
            f"the parameters of the last applied step (step {good.step}) are saved in {path}, "
            "and the same run directory resumes from there"
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, step: int) -> dict[str, float]:
        """Greedy evaluation of one split; generations go to eval/[validation_]step_<n>.jsonl."""
        start = time.perf_counter()
        metrics, records = evaluation.score(
            self.policy,
            self.sampler,
            self.task,
            self._eval_examples(split),
            self.cfg.eval.batch_size,
            self.truncate_prompts_to,
            shard=self.world > 1,
            zero3_params=self.zero3_params,
        )
        if self.cfg.eval.marginals:
            # how sure the model is of each answer with the completion masked (evaluate.marginals)
            marginals = evaluation.target_marginals(
                self.policy,
                self.task,
                self._eval_examples(split),
                self.cfg.task.completion_length,
                self.cfg.eval.batch_size,
                self.zero3_params,
            )
            metrics["marginal_argmax_acc"] = marginals["argmax_acc"]
            metrics["marginal_mean_p"] = marginals["mean_p_target"]
            metrics["marginal_p_below_0.05"] = marginals["histogram"]["0-0.05"]
            metrics["marginal_p_above_0.8"] = marginals["histogram"]["0.8-1"]
        metrics["seconds"] = time.perf_counter() - start
        name = f"step_{step}.jsonl" if split == "test" else f"{split}_step_{step}.jsonl"
        if self.rank == 0:
            evaluation.write_jsonl(self.run_dir / "eval" / name, records)
        self.tracker.log(step, {f"{EVAL_PREFIX[split]}/{k}": v for k, v in metrics.items()})
        return metrics

    # ------------------------------------------------------------------ checkpoint
    def client_state(self, next_round: int, next_inner: int) -> dict[str, Any]:
        """Run-wide state for DeepSpeed's client_state: where to continue and what was measured."""
        return {
            "global_step": self.global_step,
            # the first step after this checkpoint is inner step ``next_inner`` of round ``next_round``
            "next_round": next_round,
            "next_inner": next_inner,
            "prompt_stream": self.stream.state_dict(),
            "skip_streak": list(self.skip_streak),
            "best": self.best,
            "evals": self.evals,
            "base": self.base,
            "rl_seconds": self.rl_seconds + time.perf_counter() - self._session_start,
            "wandb_id": self.tracker.wandb_id,
            "world_size": self.world,
        }

    def rank_state(self, buffer: tuple[RolloutBatch, dict[str, float]] | None) -> dict[str, Any]:
        """This rank's RNG states and, inside a round, its rollout buffer (batch, extras, stats)."""
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "rng": {
                "python": random.getstate(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "objective": self.objective.state_dict(),
        }
        if buffer is not None:
            batch, stats = buffer
            state["buffer"] = {
                "batch": {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)},
                "stats": stats,
            }
        return state

    def save(self, tag: str, next_round: int, next_inner: int = 0, buffer: Any = None) -> Path:
        if next_inner == 0:
            buffer = None  # a round boundary: the next round draws fresh rollouts
        return checkpoint.save(
            self.engine,
            self.policy,
            self.run_dir / "checkpoints",
            tag,
            self.client_state(next_round, next_inner),
            self.cfg.checkpoint.keep_last,
            rank_state=self.rank_state(buffer),
        )

    def restore(self, path: Path) -> tuple[int, int, tuple[RolloutBatch, dict[str, float]] | None]:
        """Load checkpoint ``path`` (collective) -> (round, inner step to continue at, rollout buffer)."""
        frozen_base = any(not p.requires_grad for p in self.policy.model.parameters())
        loaded, state = self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=not frozen_base,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if loaded is None or state is None:
            raise DllmRlError(f"checkpoint {path}: DeepSpeed found no checkpoint to load there")
        if "next_round" not in state:
            raise DllmRlError(f"checkpoint {path} was written by an older dllm_rl and holds no resume position")
        if int(state.get("world_size", self.world)) != self.world:
            raise DllmRlError(
                f"checkpoint {path} was written by {state['world_size']} processes; resume it with the same "
                f"number (cluster.nodes*cluster.nproc), not {self.world}"
            )
        self.global_step = int(state["global_step"])
        self.stream.load_state_dict(state["prompt_stream"])
        self.skip_streak = list(state["skip_streak"])
        self.best, self.evals, self.base = state["best"], list(state["evals"]), state["base"]
        self.rl_seconds = float(state["rl_seconds"])
        mine = checkpoint.load_rank_state(path)
        buffer = None
        if mine is not None:
            rng = mine["rng"]
            random.setstate(_tuples(rng["python"]))
            name, keys, *rest = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self.objective.load_state_dict(mine.get("objective", {}))
            if "buffer" in mine:
                buffer = (RolloutBatch(**mine["buffer"]["batch"]), mine["buffer"]["stats"])
        next_round, next_inner = int(state["next_round"]), int(state["next_inner"])
        if next_inner and buffer is None:
            raise DllmRlError(f"checkpoint {path} stops inside rollout round {next_round} but holds no rollout buffer")
        at = next_round * self.mu + next_inner
        if self.global_step != at:
            # An older dllm_rl saved last_good at the next round's position with the step count of the
            # abort: the position decides, so that the run still ends at train.steps.
            log.warning(
                "checkpoint %s was saved after step %d but continues at round %d, inner step %d: counting on from "
                "step %d so that the run ends at train.steps",
                path,
                self.global_step,
                next_round,
                next_inner,
                at,
            )
            self.global_step = at
        bad = checkpoint.first_nonfinite(self.engine)
        if bad is not None:
            raise DllmRlError(
                f"checkpoint {path} holds non-finite weights (parameter {bad}); delete it to resume from an older one"
            )
        log.info("resumed from %s at step %d (round %d, inner step %d)", path, self.global_step, next_round, next_inner)
        return next_round, next_inner, buffer

    # ------------------------------------------------------------------ loop
    def evaluate_all(self, step: int) -> dict[str, dict[str, float]]:
        """Every split of eval.splits at this step; the validation metric picks checkpoints/best."""
        results = {}
        for split in self.cfg.eval.splits:
            results[split] = self.evaluate(split, step)
            self.evals.append({"step": step, "split": split, **results[split]})
            log.info("%s at step %d: %s", split, step, _fmt(results[split]))
        if "validation" in results:
            value = results["validation"][self.task.primary_metric]
            if self.best is None or value > self.best["validation"][self.task.primary_metric]:
                # Step 0 is the starting model itself: nothing to export.
                root = self.run_dir / "checkpoints"
                export = checkpoint.export(self.engine, self.policy, root, BEST) if step else None
                self.best = {
                    "step": step,
                    "validation": results["validation"],
                    "test": results.get("test"),
                    "export": export,
                }
        return results

    def fit(self) -> dict[str, Any]:
        steps = self.cfg.train.steps
        eval_every = self.cfg.eval.every_n_steps
        ckpt_every = self.cfg.checkpoint.every_n_steps
        log_every = max(1, self.cfg.log_every)
        primary = self.task.primary_metric
        self._session_start = time.perf_counter()
        first_round, first_inner, buffer = 0, 0, None
        if self.resume_from is not None:
            first_round, first_inner, buffer = self.restore(self.resume_from)
        elif self.cfg.eval.before_train:
            self.base = self.evaluate_all(0).get("test")
        self.last_applied = ResumePoint(
            self.global_step, first_round, first_inner, self.stream.state_dict(), self.rank_state(buffer)
        )

        bar = tqdm(
            total=steps,
            initial=self.global_step,
            desc="RL",
            unit="step",
            dynamic_ncols=True,
            leave=True,
            disable=self.rank != 0,
        )
        rounds = steps // self.mu
        for round_index in range(first_round, rounds):
            if buffer is not None:  # resumed inside this round: its rollouts and prepare() outputs
                batch, rollout_stats = buffer
                buffer = None
            else:
                batch, rollout_stats = self.rollout(round_index)
                self.objective.prepare(batch, self.policy)
            for k in range(first_inner if round_index == first_round else 0, self.mu):
                record = self.train_step(batch, k, rollout_stats)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{record['reward_mean']:.3f}",
                    loss=f"{record['loss']:.4f}",
                    gnorm=f"{record['grad_norm']:.3f}",
                )
                if self.global_step % log_every == 0:
                    log.info(
                        "step %d | %s",
                        self.global_step,
                        _fmt(
                            record,
                            keys=(
                                "reward_mean",
                                "reward_std",
                                "loss",
                                "grad_norm",
                                "step_seconds",
                                "gen_tokens_per_s",
                            ),
                        ),
                    )
                if eval_every and self.global_step % eval_every == 0 and self.global_step < steps:
                    self.evaluate_all(self.global_step)
                # Where the next step starts: the next inner step of this round, or the next round.
                position = (round_index, k + 1) if k + 1 < self.mu else (round_index + 1, 0)
                saved = None
                if ckpt_every and self.global_step % ckpt_every == 0 and self.global_step < steps:
                    saved = self.save(f"step_{self.global_step}", *position, buffer=(batch, rollout_stats))
                signum = self.stop_requests.requested(self.policy.device)
                if signum and self.global_step < steps:
                    saved = saved or self.save(f"step_{self.global_step}", *position, buffer=(batch, rollout_stats))
                    bar.close()
                    self.tracker.flush()
                    self.stop_requests.stop(
                        signum,
                        f"signal {signum} at step {self.global_step} of {steps}: checkpoint {saved}; the same run "
                        f"directory resumes from it (python -m dllm_rl.worker {self.run_dir / 'config.yaml'})",
                    )
        bar.close()

        results = self.evaluate_all(self.global_step)
        final = results.get("test", results.get("validation"))
        ckpt = self.save("final", rounds)
        wall = self.rl_seconds + time.perf_counter() - self._session_start
        return {
            "primary_metric": primary,
            "base": self.base,
            "final": final,
            "final_split": "test" if "test" in results else "validation",
            "best": self.best,
            "evals": self.evals,
            "dropped_prompts": self.dropped_prompts,
            "steps": self.global_step,
            "rl_wall_seconds": wall,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "checkpoint": str(ckpt),
            "model_export": str(ckpt / "hf"),
        }


def _tuples(value: Any) -> Any:
    """Lists back to tuples (random.setstate wants the nested tuples getstate gave)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _fmt(metrics: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    keys = keys or tuple(metrics)
    return " ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys if k in metrics
    )
