"""The RL loop: rollout rounds -> rewards -> advantages -> μ optimizer steps on the same rollouts.

for each round:
    Q prompts -> G completions each (sampler, no grad) -> rewards -> advantages
    objective.prepare(batch)                      (no grad, once per round)
    repeat μ times:                               (one optimizer step each, fresh masks)
        for each micro-batch: loss = objective.loss(...); engine.backward(loss); engine.step()
evaluate before, every N steps and at the end; checkpoint every K steps and at the end.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dllm_rl import checkpoint
from dllm_rl.likelihood.masks import mask_seed
from dllm_rl.models.policy import Policy
from dllm_rl.objectives.base import Objective, RolloutBatch
from dllm_rl.tasks.base import Task, total_reward
from dllm_rl.tracking import Tracker

log = logging.getLogger(__name__)


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


def completion_validity(completion_ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """v_i: 1 up to and including the first EOS, 0 after it; all 1 without an EOS."""
    if eos_id is None:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    is_eos = completion_ids == eos_id
    after_first = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return ~after_first


class Trainer:
    def __init__(
        self,
        cfg: dict[str, Any],
        policy: Policy,
        engine: Any,
        task: Task,
        sampler: Any,
        objective: Objective,
        tracker: Tracker,
        run_dir: Path,
    ) -> None:
        self.cfg, self.policy, self.engine, self.task = cfg, policy, engine, task
        self.sampler, self.objective, self.tracker, self.run_dir = sampler, objective, tracker, run_dir
        self.seed = int(cfg["seed"])
        self.group = int(cfg["rollout"]["samples_per_prompt"])
        self.prompts_per_step = int(cfg["rollout"]["prompts_per_step"])
        self.mu = int(cfg["objective"]["inner_iterations"])
        self.train_examples = task.dataset("train").to_list()
        self.stream = PromptStream(len(self.train_examples), self.seed)
        self.global_step = 0

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        micro_batch: int,
        temperature: float | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Prompt ids, attention, completion ids and forward passes for a list of prompts."""
        self.policy.model.eval()
        prompt_ids, attention = self.policy.encode_prompts(prompts)
        outputs, nfe = [], 0
        for lo in range(0, len(prompts), micro_batch):
            out = self.sampler.generate(
                self.policy.logits,
                prompt_ids[lo : lo + micro_batch],
                attention[lo : lo + micro_batch],
                self.policy.mask_id,
                generator=generator,
                temperature=temperature,
            )
            outputs.append(out.completion_ids)
            nfe += out.nfe
        return prompt_ids, attention, torch.cat(outputs), nfe

    def rollout(self, round_index: int) -> tuple[RolloutBatch, dict[str, float]]:
        start = time.perf_counter()
        indices = self.stream.next(self.prompts_per_step)
        examples = [self.train_examples[i] for i in indices for _ in range(self.group)]
        generator = torch.Generator(device=self.policy.device).manual_seed(mask_seed(self.seed, "rollout", round_index))
        prompt_ids, attention, completion_ids, nfe = self.generate(
            [ex["prompt"] for ex in examples], int(self.cfg["rollout"]["micro_batch"]), None, generator
        )
        gen_seconds = time.perf_counter() - start
        texts = self.policy.decode(completion_ids)
        parts = [self.task.reward(text, ex) for text, ex in zip(texts, examples, strict=True)]
        rewards = torch.tensor([total_reward(p) for p in parts], dtype=torch.float32)
        reward_parts = {k: torch.tensor([p[k] for p in parts], dtype=torch.float32) for k in parts[0]}
        n = len(examples)
        batch = RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_attention=attention,
            completion_ids=completion_ids,
            completion_mask=completion_validity(completion_ids, self.policy.eos_id),
            group_index=torch.arange(n) // self.group,
            sample_uid=torch.arange(n),
            rewards=rewards,
            reward_parts=reward_parts,
            advantages=self.objective.advantages(rewards, self.group),
            round=round_index,
        )
        grouped = rewards.view(-1, self.group)
        stats = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "frac_zero_std_groups": float((grouped.std(dim=1) < 1e-6).float().mean()),
            "rollout_seconds": time.perf_counter() - start,
            "gen_tokens_per_s": completion_ids.numel() / max(gen_seconds, 1e-9),
            "rollout_nfe": float(nfe),
            "completion_valid_len": float(batch.completion_mask.sum(dim=1).float().mean()),
            **{f"reward/{k}": float(v.mean()) for k, v in reward_parts.items()},
        }
        return batch, stats

    # ------------------------------------------------------------------ update
    def optimize(self, batch: RolloutBatch, inner_step: int) -> dict[str, float]:
        """One optimizer step: gradient accumulation over the micro-batches of the rollout batch."""
        self.engine.train()
        micro = int(self.cfg["train"]["micro_batch_per_gpu"])
        losses: list[float] = []
        sums: dict[str, float] = {}
        for lo in range(0, len(batch), micro):
            loss, metrics = self.objective.loss(batch.select(slice(lo, lo + micro)), self.policy, inner_step)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        parts = len(losses)
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": sum(losses) / parts,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.engine.get_lr()[0]),
            **{k: v / parts for k, v in sums.items()},
        }

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, tag: str) -> dict[str, float]:
        ecfg = self.cfg["eval"]
        data = self.task.dataset(ecfg["split"])
        if ecfg["num_examples"] is not None:
            data = data.select(range(min(int(ecfg["num_examples"]), len(data))))
        examples = data.to_list()
        start = time.perf_counter()
        _, _, completion_ids, _ = self.generate([ex["prompt"] for ex in examples], int(ecfg["batch_size"]), 0.0, None)
        texts = self.policy.decode(completion_ids)
        metrics = self.task.metrics(texts, examples)
        rewards = [total_reward(self.task.reward(t, ex)) for t, ex in zip(texts, examples, strict=True)]
        metrics["reward_mean"] = float(np.mean(rewards))
        metrics["seconds"] = time.perf_counter() - start
        out_dir = self.run_dir / "eval"
        out_dir.mkdir(exist_ok=True)
        with (out_dir / f"{tag}.jsonl").open("w") as f:
            for ex, text, r in zip(examples, texts, rewards, strict=True):
                f.write(json.dumps({"prompt": ex["prompt"], "completion": text, "reward": r}) + "\n")
        return metrics

    # ------------------------------------------------------------------ checkpoint
    def client_state(self, round_index: int) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "round": round_index,
            "prompt_stream": self.stream.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
            "wandb_id": self.tracker.wandb_id,
        }

    def save(self, tag: str, round_index: int) -> Path:
        return checkpoint.save(
            self.engine,
            self.policy,
            self.run_dir / "checkpoints",
            tag,
            self.client_state(round_index),
            int(self.cfg["checkpoint"]["keep_last"]),
        )

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        steps = int(self.cfg["train"]["steps"])
        eval_every = int(self.cfg["eval"]["every_n_steps"])
        ckpt_every = int(self.cfg["checkpoint"]["every_n_steps"])
        log_every = max(1, int(self.cfg["log_every"]))
        primary = self.task.primary_metric
        start = time.perf_counter()

        base = self.evaluate("step_0") if self.cfg["eval"]["before_train"] else None
        if base is not None:
            self.tracker.log(0, {f"eval/{k}": v for k, v in base.items()})
            log.info("base: %s", _fmt(base))
        evals: list[dict[str, Any]] = [{"step": 0, **base}] if base else []

        bar = tqdm(total=steps, desc="RL", unit="step", dynamic_ncols=True, leave=True)
        rounds = steps // self.mu
        for round_index in range(rounds):
            batch, rollout_stats = self.rollout(round_index)
            self.objective.prepare(batch, self.policy)
            for k in range(self.mu):
                step_start = time.perf_counter()
                metrics = self.optimize(batch, k)
                self.global_step += 1
                record = {
                    **rollout_stats,
                    **metrics,
                    "inner_step": k,
                    "step_seconds": time.perf_counter()
                    - step_start
                    + (rollout_stats["rollout_seconds"] if k == 0 else 0.0),
                }
                if not math.isfinite(record["loss"]):
                    log.warning("step %d: non-finite loss %s", self.global_step, record["loss"])
                self.tracker.log(self.global_step, record)
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
                    result = self.evaluate(f"step_{self.global_step}")
                    self.tracker.log(self.global_step, {f"eval/{k}": v for k, v in result.items()})
                    evals.append({"step": self.global_step, **result})
                    log.info("eval at step %d: %s", self.global_step, _fmt(result))
                if ckpt_every and self.global_step % ckpt_every == 0 and self.global_step < steps:
                    self.save(f"step_{self.global_step}", round_index)
        bar.close()

        final = self.evaluate(f"step_{self.global_step}")
        self.tracker.log(self.global_step, {f"eval/{k}": v for k, v in final.items()})
        evals.append({"step": self.global_step, **final})
        ckpt = self.save("final", rounds)
        wall = time.perf_counter() - start
        return {
            "primary_metric": primary,
            "base": base,
            "final": final,
            "evals": evals,
            "steps": self.global_step,
            "rl_wall_seconds": wall,
            "checkpoint": str(ckpt),
            "model_export": str(ckpt / "hf"),
        }


def _fmt(metrics: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    keys = keys or tuple(metrics)
    return " ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys if k in metrics
    )
