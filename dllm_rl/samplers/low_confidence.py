"""LLaDA's semi-autoregressive sampler with low-confidence (or random) remasking.

x starts as prompt ⊕ M^L. The completion is split into L/B blocks decoded left to right, each in
s = T/(L/B) steps. At step j of a block every masked position gets a proposal
x̂ = argmax(z/τ + g), g ~ Gumbel(0, 1) (a sample from softmax(z/τ); plain argmax at τ = 0), and the
n_j proposals with the highest confidence are committed, where n_j spreads the block's masked count
evenly over its steps (the linear schedule α_t = 1 − t). Confidence is the untempered probability
softmax(z)[x̂] (`low_confidence`) or uniform noise (`random`). Committed tokens are never re-masked,
and positions outside the current block are never committed. The mask token itself is never
proposed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dllm_rl.models.positions import position_ids_from_attention_mask
from dllm_rl.samplers.registry import register_sampler

LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def commit_counts(masked_in_block: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, block] bool -> [B, steps] tokens to commit per step: ⌊k/s⌋ + 1[j < k mod s]."""
    k = masked_in_block.sum(dim=1, keepdim=True)
    base = k // steps
    extra = (torch.arange(steps, device=k.device).unsqueeze(0) < (k % steps)).long()
    return base + extra


@dataclass
class GenerationOutput:
    completion_ids: torch.Tensor  # [B, L]
    nfe: int  # forward passes of the model


@register_sampler("low_confidence")
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
        **_: object,
    ) -> None:
        if gen_length % block_length != 0:
            raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
        blocks = gen_length // block_length
        if steps % blocks != 0:
            raise ValueError(f"steps={steps} is not a multiple of the number of blocks ({blocks})")
        if remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={remasking!r} must be 'low_confidence' or 'random'")
        self.gen_length = gen_length
        self.block_length = block_length
        self.steps = steps
        self.temperature = float(temperature)
        self.remasking = remasking
        self.noise_dtype = getattr(torch, noise_dtype)

    @torch.no_grad()
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

        logits_fn(input_ids, attention_mask, position_ids) -> [B, T, V]. ``temperature`` overrides
        the configured one (evaluation passes 0 for greedy decoding).
        """
        tau = self.temperature if temperature is None else float(temperature)
        batch, prompt_len = prompt_ids.shape
        length, block = self.gen_length, self.block_length
        device = prompt_ids.device
        x = torch.cat([prompt_ids, torch.full((batch, length), mask_id, dtype=prompt_ids.dtype, device=device)], 1)
        attn = torch.cat([attention_mask, torch.ones(batch, length, dtype=attention_mask.dtype, device=device)], 1)
        positions = position_ids_from_attention_mask(attn)
        steps_per_block = self.steps // (length // block)
        nfe = 0
        for b in range(length // block):
            lo, hi = prompt_len + b * block, prompt_len + (b + 1) * block
            counts = commit_counts(x[:, lo:hi] == mask_id, steps_per_block)
            for j in range(steps_per_block):
                # Only the current block can be committed, so only its logits are needed.
                logits = logits_fn(x, attn, positions)[:, lo:hi].to(self.noise_dtype)
                nfe += 1
                # Committing the mask token would leave the position open and the output incomplete.
                logits[..., mask_id] = -torch.inf
                if tau > 0:
                    u = torch.rand(logits.shape, generator=generator, dtype=self.noise_dtype, device=device)
                    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(self.noise_dtype).tiny)))
                    proposal = torch.argmax(logits / tau + gumbel, dim=-1)
                else:
                    proposal = torch.argmax(logits, dim=-1)
                if self.remasking == "low_confidence":
                    confidence = torch.softmax(logits, dim=-1).gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
                else:
                    confidence = torch.rand(proposal.shape, generator=generator, dtype=self.noise_dtype, device=device)
                masked = x[:, lo:hi] == mask_id
                confidence = torch.where(masked, confidence, torch.full_like(confidence, -torch.inf))
                # Stable sort: equal confidences are committed left to right, so greedy runs are deterministic.
                order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
                rank = torch.empty_like(order).scatter_(1, order, torch.arange(block, device=device).expand(batch, -1))
                commit = (rank < counts[:, j : j + 1]) & masked
                x[:, lo:hi] = torch.where(commit, proposal.to(x.dtype), x[:, lo:hi])
        return GenerationOutput(completion_ids=x[:, prompt_len:], nfe=nfe)
