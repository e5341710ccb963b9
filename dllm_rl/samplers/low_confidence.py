"""LLaDA's semi-autoregressive sampler, with Fast-dLLM's KV caches and threshold parallel decoding.

x starts as prompt ⊕ M^L. The completion is split into L/B blocks decoded left to right, each in
s = T/(L/B) steps. At step j of a block every masked position gets a proposal
x̂ = argmax_{v ≠ M}(z_v/τ + g_v), g ~ Gumbel(0, 1) (a sample from softmax(z/τ) with the mask token M
excluded; plain argmax over v ≠ M at τ = 0), and the n_j proposals with the highest confidence are
committed, where n_j = ⌊k/s⌋ + 1[j < k mod s] spreads the block's k masked positions over its s steps
(the linear schedule α_t = 1 − t). Committed tokens are never re-masked, positions outside the current
block are never committed, and the mask token is never proposed.

Confidence (``remasking``), all under the untempered distribution p that ``confidence`` names:
  low_confidence  p[x̂]                       (LLaDA)
  random          u ~ U(0, 1)                 (random order at the same per-step counts)
  entropy         −H(p)                       (Dream's ``entropy`` order)
  margin          p_top1 − p_top2             (Dream's ``topk_margin`` order)
and the threshold below compares p[x̂] with τ_thr.

``confidence`` (docs/RESULTS.md, "Sampler confidence", measures the two; full is the default):
  full            p = softmax(z) over the whole vocabulary, the mask token included, as LLaDA's
                  generate() and Fast-dLLM's samplers compute it: p[x̂] = e^{z_x̂} / Σ_v e^{z_v} (entropy
                  and margin also count p[M]). Given the same logits and noise this commits what LLaDA
                  commits, token for token, wherever the mask token does not win LLaDA's argmax. Where
                  it does (argmax over all v of z_v/τ + g_v, or of z_v at τ = 0, is M), LLaDA would
                  commit M itself, which leaves the position masked and uses up one of the step's n_j
                  commits; here x̂ is instead the best token other than M under the same noise, ranked
                  by its own full-softmax p[x̂].
  renormalized    p = softmax(z) with z_M = −∞, i.e. p[x] / (1 − p[M]) for x ≠ M: the mask token's mass
                  is spread over the other tokens before anything is measured. Equal to full when the
                  model gives M no mass; otherwise each p[x̂] is inflated by 1/(1 − p[M]) of its own
                  position, which reorders positions whose p[M] differ.

Speed-ups (Fast-dLLM; docs/samplers.md), independent of each other:
  cache: prefix   a full forward at each block start fills a key/value cache; the block's other steps
                  run only the positions from the block start to the end against the cached prefix
  cache: dual     the same, but only the current block is run (the suffix's keys/values cached too)
  threshold: τ    confidence-aware parallel decoding: every masked position of the block whose p[x̂] ≥ τ
                  is committed, and at least the most confident one (at most max_tokens_per_step), so
                  the number of steps per block is adaptive, between 1 and B

Caches are an approximation (the cached keys/values would change as the block is decoded; they are
refreshed once per block). With ``cache: none`` and no threshold the sampler is the reference: one
full forward over prompt + completion per step. Under torch.distributed, an adaptive (threshold)
sampler all-reduces "any position of this block still masked" after every step, so every rank runs
the same number of forwards (ZeRO-3 gathers parameters collectively in each forward).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from dllm_rl.kv_cache import WindowKVCache
from dllm_rl.lazy import lazy_import, no_grad
from dllm_rl.positions import position_ids_from_attention_mask
from dllm_rl.samplers.registry import register_sampler

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)

log = logging.getLogger(__name__)

# logits_fn(input_ids, attention_mask, position_ids) -> [B, T, V]; cached samplers also pass
# kv_cache= and window= (the signature of Policy.logits).
LogitsFn = Callable[..., "torch.Tensor"]


class Remasking(Enum):
    low_confidence = "low_confidence"
    random = "random"
    entropy = "entropy"
    margin = "margin"


class SamplerCache(Enum):
    none = "none"
    prefix = "prefix"
    dual = "dual"


class NoiseDtype(Enum):
    float64 = "float64"
    float32 = "float32"


class SamplerConfidence(Enum):
    """The distribution confidences are measured under (the module docstring)."""

    full = "full"
    renormalized = "renormalized"


@dataclass
class SamplerCfg:
    """The ``sampler`` section of ``sampler=low_confidence`` (and of its ``threshold`` preset): L tokens in
    blocks of B with T denoising steps, the rollout temperature, the remasking order, the Gumbel noise's
    dtype, the KV cache, threshold decoding with its per-step cap, and the confidence's distribution."""

    name: str = MISSING
    gen_length: int = MISSING
    block_length: int = MISSING
    steps: int = MISSING
    # rollout temperature of the Gumbel-max proposal (evaluation is always greedy)
    temperature: float = 1.0
    # which proposals are committed first: low_confidence (most probable), random, entropy (lowest entropy), margin
    # (top1 - top2)
    remasking: Remasking = Remasking.low_confidence
    # precision of the Gumbel noise
    noise_dtype: NoiseDtype = NoiseDtype.float64
    # key/value cache: none (the reference), prefix (Fast-dLLM PrefixCache), dual (DualCache); docs/samplers.md, "KV
    # caches"
    cache: SamplerCache = SamplerCache.none
    # confidence-threshold parallel decoding: commit every masked block position with p >= threshold (null: the fixed
    # schedule)
    threshold: float | None = None
    # with a threshold: at most this many tokens per step and row (null: no cap)
    max_tokens_per_step: int | None = None
    # what confidences are measured under: full (softmax over the whole vocabulary, mask token included: LLaDA's
    # generate) or renormalized (mask token excluded first: p(x) / (1 - p(mask))); docs/RESULTS.md
    confidence: SamplerConfidence = SamplerConfidence.full

    @classmethod
    def check(cls, s: Any, need: Callable[[bool, str], None]) -> None:
        """The section's rules: ``need(ok, message)`` for each (``s``: a DictConfig or a plain dict)."""
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
        if s.get("threshold") is not None:
            need(
                0 < s["threshold"] <= 1, f"sampler.threshold={s['threshold']} must be in (0, 1] (null: fixed schedule)"
            )
        if s.get("max_tokens_per_step") is not None:
            need(
                s["max_tokens_per_step"] >= 1,
                f"sampler.max_tokens_per_step={s['max_tokens_per_step']} must be >= 1",
            )


REMASKING = tuple(r.value for r in Remasking)
CACHES = tuple(c.value for c in SamplerCache)
CONFIDENCES = tuple(c.value for c in SamplerConfidence)


def commit_counts(masked_in_block: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, block] bool -> [B, steps] tokens to commit per step: ⌊k/s⌋ + 1[j < k mod s]."""
    k = masked_in_block.sum(dim=1, keepdim=True)
    base = k // steps
    extra = (torch.arange(steps, device=k.device).unsqueeze(0) < (k % steps)).long()
    return base + extra


def initial_canvas(
    prompt_ids: torch.Tensor, attention_mask: torch.Tensor, length: int, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ⊕ M^L, its attention mask, its RoPE positions) for a left-padded batch of prompts."""
    batch, device = prompt_ids.shape[0], prompt_ids.device
    x = torch.cat([prompt_ids, torch.full((batch, length), mask_id, dtype=prompt_ids.dtype, device=device)], 1)
    attn = torch.cat([attention_mask, torch.ones(batch, length, dtype=attention_mask.dtype, device=device)], 1)
    return x, attn, position_ids_from_attention_mask(attn)


@dataclass
class GenerationOutput:
    completion_ids: torch.Tensor  # [B, L]
    nfe: int  # forward passes of the model
    forward_tokens: int = 0  # positions run through the model, summed over forwards (per row)
    # Adaptive decoding: committed tokens per (row, step) while the row had masked positions, and the
    # number of steps per block (mean over blocks).
    stats: dict[str, float] = field(default_factory=dict)


def _rank_sync() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@register_sampler("low_confidence", config=SamplerCfg)
class LowConfidenceSampler:
    """Block-wise masked-diffusion decoding; see the module docstring."""

    def __init__(
        self,
        gen_length: int,
        block_length: int,
        steps: int,
        temperature: float = 1.0,
        remasking: str = "low_confidence",
        noise_dtype: str = "float64",
        cache: str = "none",
        threshold: float | None = None,
        max_tokens_per_step: int | None = None,
        confidence: str = "full",
        **_: object,
    ) -> None:
        remasking, cache = getattr(remasking, "value", remasking), getattr(cache, "value", cache)
        confidence = getattr(confidence, "value", confidence)
        if gen_length % block_length != 0:
            raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
        blocks = gen_length // block_length
        if steps % blocks != 0:
            raise ValueError(f"steps={steps} is not a multiple of the number of blocks ({blocks})")
        if remasking not in REMASKING:
            raise ValueError(f"remasking={remasking!r} must be one of {', '.join(REMASKING)}")
        if cache not in CACHES:
            raise ValueError(f"cache={cache!r} must be one of {', '.join(CACHES)}")
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence={confidence!r} must be one of {', '.join(CONFIDENCES)}")
        if threshold is not None and not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1] (or null for the fixed schedule)")
        if max_tokens_per_step is not None and int(max_tokens_per_step) < 1:
            raise ValueError(f"max_tokens_per_step={max_tokens_per_step} must be >= 1 (or null)")
        self.gen_length = gen_length
        self.block_length = block_length
        self.steps = steps
        self.temperature = float(temperature)
        self.remasking = remasking
        self.noise_dtype = getattr(torch, getattr(noise_dtype, "value", noise_dtype))
        self.cache = cache
        self.threshold = None if threshold is None else float(threshold)
        self.max_tokens_per_step = None if max_tokens_per_step is None else int(max_tokens_per_step)
        self.confidence = confidence

    @property
    def fixed_tokens_per_step(self) -> float:
        """Tokens per step of the fixed schedule, B / s (what adaptive decoding is compared with)."""
        return self.block_length / (self.steps // (self.gen_length // self.block_length))

    def _propose(
        self, logits: torch.Tensor, mask_id: int, tau: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂, p) of every position: the proposal [B, block] and the distribution p [B, block, V] that its
        confidence is measured under (``confidence``; the module docstring). Overwrites ``logits``."""
        if self.confidence == "renormalized":
            logits[..., mask_id] = -torch.inf
        probs = torch.softmax(logits, dim=-1)
        # Committing the mask token would leave the position open and the output incomplete.
        logits[..., mask_id] = -torch.inf
        if tau > 0:
            u = torch.rand(logits.shape, generator=generator, dtype=self.noise_dtype, device=logits.device)
            gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(self.noise_dtype).tiny)))
            return torch.argmax(logits / tau + gumbel, dim=-1), probs
        return torch.argmax(logits, dim=-1), probs

    def _confidence(
        self, probs: torch.Tensor, proposal: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ordering confidence, p[x̂]) of every proposal, both [B, block]."""
        p_proposal = probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
        if self.remasking == "low_confidence":
            return p_proposal, p_proposal
        if self.remasking == "random":
            u = torch.rand(proposal.shape, generator=generator, dtype=self.noise_dtype, device=proposal.device)
            return u, p_proposal
        if self.remasking == "entropy":
            return torch.special.xlogy(probs, probs).sum(dim=-1), p_proposal  # −H(p), with 0 log 0 = 0
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1], p_proposal

    @no_grad
    def generate(
        self,
        logits_fn: LogitsFn,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask_id: int,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
    ) -> GenerationOutput:
        """Decode gen_length tokens after each (left-padded) prompt.

        logits_fn(input_ids, attention_mask, position_ids) -> [B, T, V]; with a cache it is also called
        with ``kv_cache=`` and ``window=`` (Policy.logits). ``temperature`` overrides the configured one
        (evaluation passes 0 for greedy decoding).
        """
        tau = self.temperature if temperature is None else float(temperature)
        batch, prompt_len = prompt_ids.shape
        length, block = self.gen_length, self.block_length
        device = prompt_ids.device
        x, attn, positions = initial_canvas(prompt_ids, attention_mask, length, mask_id)
        total = prompt_len + length
        steps_per_block = self.steps // (length // block)
        adaptive = self.threshold is not None
        sync = adaptive and _rank_sync()
        nfe = forward_tokens = 0
        # Decoding statistics stay on the device until the end: reading them every step would
        # synchronise a GPU once per forward.
        committed_sum, active_rows, committed_max = (torch.zeros((), dtype=torch.long, device=device) for _ in "abc")
        for b in range(length // block):
            lo, hi = prompt_len + b * block, prompt_len + (b + 1) * block
            counts = commit_counts(x[:, lo:hi] == mask_id, steps_per_block)
            cache = WindowKVCache() if self.cache != "none" else None
            j = 0
            while True:
                masked = x[:, lo:hi] == mask_id
                if adaptive:
                    still = masked.any().to(torch.int32).reshape(1)
                    if sync:  # every rank keeps stepping (committing nothing) until all ranks are done
                        torch.distributed.all_reduce(still, op=torch.distributed.ReduceOp.MAX)
                    if not bool(still.item()):
                        break
                elif j == steps_per_block:
                    break
                # Only the current block can be committed, so only its logits are needed.
                if cache is None:
                    logits = logits_fn(x, attn, positions)[:, lo:hi]
                    forward_tokens += total
                elif j == 0:  # block start: a full forward refreshes the cache
                    logits = logits_fn(x, attn, positions, kv_cache=cache)[:, lo:hi]
                    forward_tokens += total
                else:
                    end = total if self.cache == "prefix" else hi
                    logits = logits_fn(x, attn, positions, kv_cache=cache, window=(lo, end))[:, :block]
                    forward_tokens += end - lo
                nfe += 1
                proposal, probs = self._propose(logits.to(self.noise_dtype), mask_id, tau, generator)
                confidence, p_proposal = self._confidence(probs, proposal, generator)
                if adaptive:
                    # Above the threshold, plus the most confident position of every row that has any.
                    best = torch.where(masked, confidence, torch.full_like(confidence, -torch.inf)).argmax(dim=1)
                    chosen = masked & (p_proposal >= self.threshold)
                    chosen[torch.arange(batch, device=device), best] |= masked.any(dim=1)
                    quota = chosen.sum(dim=1, keepdim=True)
                    if self.max_tokens_per_step is not None:
                        quota = quota.clamp_max(self.max_tokens_per_step)
                    keep = chosen
                else:
                    quota, keep = counts[:, j : j + 1], masked
                confidence = torch.where(keep, confidence, torch.full_like(confidence, -torch.inf))
                # Stable sort: equal confidences are committed left to right, so greedy runs are deterministic.
                order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
                rank = torch.empty_like(order).scatter_(1, order, torch.arange(block, device=device).expand(batch, -1))
                commit = (rank < quota) & keep
                x[:, lo:hi] = torch.where(commit, proposal.to(x.dtype), x[:, lo:hi])
                per_row = commit.sum(dim=1)
                rows = masked.any(dim=1)
                committed_sum += per_row.sum()  # rows with nothing masked commit nothing
                active_rows += rows.sum()
                committed_max = torch.maximum(committed_max, per_row.max())
                j += 1
        blocks = length // block
        stats = {
            "tokens_per_step_mean": int(committed_sum) / max(int(active_rows), 1),
            "tokens_per_step_max": float(committed_max),
            "steps_per_block": nfe / blocks,
        }
        if adaptive and stats["tokens_per_step_mean"] > 2 * self.fixed_tokens_per_step:
            log.warning(
                "threshold decoding committed %.1f tokens per step on average, over twice the fixed schedule's %.1f "
                "(sampler.threshold=%g): an over-confident policy commits too much at once (docs/samplers.md)",
                stats["tokens_per_step_mean"],
                self.fixed_tokens_per_step,
                self.threshold,
            )
        return GenerationOutput(completion_ids=x[:, prompt_len:], nfe=nfe, forward_tokens=forward_tokens, stats=stats)
