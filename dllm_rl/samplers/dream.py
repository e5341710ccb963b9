"""Dream's sampler (``diffusion_generate``; docs/samplers.md): a time grid instead of blocks, position orders
computed under the filtered, tempered distribution, categorical token sampling.

Steps i = 0..T−1 walk the grid t_i = linspace(1, ε, T+1). At step i (t → s) every masked position gets
a token drawn from softmax(z/τ) restricted by top-p and top-k (argmax at τ = 0), and

  alg = origin         each masked position is revealed independently with probability 1 − s/t
                       (all of them at the last step): random-order ancestral sampling;
  alg = maskgit_plus   the ⌊M_t·(1 − s/t)⌋ positions whose drawn token is most probable are revealed
  alg = topk_margin    ... whose p_top1 − p_top2 is largest
  alg = entropy        ... whose predictive distribution has the lowest entropy

where M_t is the number of masked positions (every row has the same, as every row reveals the same
count); the last step reveals all that remain. ``alg_temp > 0`` draws the revealed positions from
softmax(confidence/alg_temp) instead of taking the top ones. Confidence uses the same filtered,
tempered distribution the token is drawn from (LLaDA's sampler uses the untempered one), with the mask
token excluded before the filters: ``confidence: renormalized`` of the LLaDA sampler, the only one this
sampler implements (Dream's own code leaves the mask token in).

``block_length < gen_length`` is the block variant (Fast-dLLM / dLLM-RL): blocks left to right, each
with T/(L/B) steps of its own grid. The number of forwards is always T, so ranks stay in lockstep.
Dream's shifted outputs are already aligned by ``Policy.logits``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dllm_rl.lazy import lazy_import, no_grad
from dllm_rl.samplers.low_confidence import (
    GenerationOutput,
    LogitsFn,
    SamplerCache,
    SamplerCfg,
    SamplerConfidence,
    initial_canvas,
)
from dllm_rl.samplers.registry import register_sampler

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


class DreamAlg(Enum):
    origin = "origin"
    maskgit_plus = "maskgit_plus"
    topk_margin = "topk_margin"
    entropy = "entropy"


@dataclass
class DreamSamplerCfg(SamplerCfg):
    """Dream's time-grid sampler (docs/samplers.md); the cache/threshold fields do not apply to it, and its
    confidences exclude the mask token (``renormalized`` only)."""

    # position order: origin (random, ancestral), maskgit_plus (top-1 probability), topk_margin, entropy
    alg: DreamAlg = DreamAlg.entropy
    # > 0: draw the revealed positions from softmax(confidence / alg_temp) instead of taking the top ones
    alg_temp: float = 0.0
    # nucleus filter of the token distribution (null: none)
    top_p: float | None = 0.95
    # top-k filter of the token distribution (null: none)
    top_k: int | None = None
    # end of the time grid
    eps: float = 1e-3
    # confidences exclude the mask token (renormalized, the only choice of this sampler)
    confidence: SamplerConfidence = SamplerConfidence.renormalized

    @classmethod
    def check(cls, s: Any, need: Callable[[bool, str], None]) -> None:
        super().check(s, need)
        need(
            s.get("cache", "none") in ("none", SamplerCache.none) and s.get("threshold") is None,
            "sampler.cache / sampler.threshold: the dream sampler runs without a cache or threshold "
            "(use sampler=low_confidence with sampler.remasking=entropy for those)",
        )
        need(
            s.get("confidence", "renormalized") in ("renormalized", SamplerConfidence.renormalized),
            "sampler.confidence=full: the dream sampler measures confidence with the mask token excluded "
            "(renormalized) only "
            "(sampler=low_confidence with sampler.remasking=entropy offers full)",
        )
        if s.get("top_p") is not None:
            need(0 < s["top_p"] <= 1, f"sampler.top_p={s['top_p']} must be in (0, 1] (null: no nucleus filter)")
        need(0 < s.get("eps", 1e-3) < 1, f"sampler.eps={s.get('eps')} must be in (0, 1)")


ALGS = tuple(a.value for a in DreamAlg)


def filter_logits(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Logits with everything outside the top-k and outside the top-p nucleus set to −inf."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already reach top_p (the most probable always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def reveal_counts(masked: int, steps: int, eps: float) -> list[int]:
    """Positions revealed at each step of the grid for a canvas of ``masked`` masked positions."""
    grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64).tolist()
    counts, left = [], masked
    for i in range(steps):
        n = left if i == steps - 1 else int(left * (1 - grid[i + 1] / grid[i]))
        counts.append(n)
        left -= n
    return counts


@register_sampler("dream", config=DreamSamplerCfg)
class DreamSampler:
    """Dream's time-grid sampler; see the module docstring."""

    def __init__(
        self,
        gen_length: int,
        block_length: int,
        steps: int,
        temperature: float = 0.2,
        alg: str = "entropy",
        alg_temp: float = 0.0,
        top_p: float | None = 0.95,
        top_k: int | None = None,
        eps: float = 1e-3,
        noise_dtype: str = "float64",
        confidence: str = "renormalized",
        **_: object,
    ) -> None:
        alg = getattr(alg, "value", alg)
        if getattr(confidence, "value", confidence) != "renormalized":
            raise ValueError(f"confidence={confidence!r}: the dream sampler implements renormalized only")
        if gen_length % block_length != 0:
            raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
        if steps % (gen_length // block_length) != 0:
            raise ValueError(f"steps={steps} is not a multiple of the number of blocks ({gen_length // block_length})")
        if alg not in ALGS:
            raise ValueError(f"alg={alg!r} must be one of {', '.join(ALGS)}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (or null)")
        if not 0 < eps < 1:
            raise ValueError(f"eps={eps} must be in (0, 1)")
        self.gen_length, self.block_length, self.steps = gen_length, block_length, steps
        self.temperature = float(temperature)
        self.alg, self.alg_temp = alg, float(alg_temp or 0.0)
        self.top_p, self.top_k, self.eps = top_p, top_k, float(eps)
        self.noise_dtype = getattr(torch, getattr(noise_dtype, "value", noise_dtype))

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
        """Decode gen_length tokens after each (left-padded) prompt; the arguments are LowConfidenceSampler's."""
        tau = self.temperature if temperature is None else float(temperature)
        batch, prompt_len = prompt_ids.shape
        length, block = self.gen_length, self.block_length
        device = prompt_ids.device
        x, attn, positions = initial_canvas(prompt_ids, attention_mask, length, mask_id)
        per_block = self.steps // (length // block)
        grid = torch.linspace(1.0, self.eps, per_block + 1, dtype=torch.float64).tolist()
        nfe = 0
        for b in range(length // block):
            lo, hi = prompt_len + b * block, prompt_len + (b + 1) * block
            counts = reveal_counts(block, per_block, self.eps)
            for i in range(per_block):
                masked = x[:, lo:hi] == mask_id
                logits = logits_fn(x, attn, positions)[:, lo:hi].to(self.noise_dtype)
                nfe += 1
                logits[..., mask_id] = -torch.inf
                # As Dream: temperature first (when > 0), then the filters, whatever the temperature.
                logits = filter_logits(logits / tau if tau > 0 else logits, self.top_p, self.top_k)
                probs = torch.softmax(logits, dim=-1)
                if tau > 0:
                    flat = probs.reshape(-1, probs.shape[-1])
                    proposal = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
                else:
                    proposal = probs.argmax(dim=-1)
                if self.alg == "origin":
                    p_reveal = 1.0 if i == per_block - 1 else 1 - grid[i + 1] / grid[i]
                    u = torch.rand(masked.shape, generator=generator, dtype=self.noise_dtype, device=device)
                    commit = masked & (u < p_reveal)
                else:
                    confidence = self._confidence(probs, proposal)
                    confidence = torch.where(masked, confidence, torch.full_like(confidence, -torch.inf))
                    commit = self._select(confidence, masked, counts[i], generator)
                x[:, lo:hi] = torch.where(commit, proposal.to(x.dtype), x[:, lo:hi])
        return GenerationOutput(
            completion_ids=x[:, prompt_len:],
            nfe=nfe,
            forward_tokens=nfe * (prompt_len + length),
            stats={"tokens_per_step_mean": length / self.steps, "steps_per_block": float(per_block)},
        )

    def _confidence(self, probs: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
        if self.alg == "maskgit_plus":
            return probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
        if self.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            return top2[..., 0] - top2[..., 1]
        plogp = torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs))
        return plogp.sum(dim=-1)  # negative entropy: higher is more certain

    def _select(
        self, confidence: torch.Tensor, masked: torch.Tensor, count: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """[B, block] bool: the ``count`` positions to reveal in each row (never more than it has masked)."""
        commit = torch.zeros_like(masked)
        if count <= 0:
            return commit
        for row in range(masked.shape[0]):
            n = min(count, int(masked[row].sum()))
            if n == 0:
                continue
            if self.alg_temp > 0:
                weights = torch.softmax(confidence[row] / self.alg_temp, dim=-1)
                chosen = torch.multinomial(weights, n, replacement=False, generator=generator)
            else:
                # Stable: equal confidences are revealed left to right.
                chosen = torch.sort(confidence[row], descending=True, stable=True).indices[:n]
            commit[row, chosen] = True
        return commit
