"""Likelihood surrogates of masked diffusion models, as pure functions of tensors.

The primitive is log f_θ(x_i | c', z_S): the model's log-probability of the true token x_i at a
masked completion position i, given the (possibly noised) prompt c' and the completion with the
positions S masked (objectives.md §0.3). Everything else is a weighted sum of these.

ELBO (linear schedule α_t = 1 − t), Monte Carlo form over R masked copies:
    ELBO(x) ≈ (1/R) Σ_r w_r Σ_{i ∈ S_r} log f_θ(x_i | c'_r, z_{S_r}),
with w_r from the mask schedule (1/t, or L/|S_r| for the exact-count schedule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dllm_rl.likelihood.masks import MaskDraw
from dllm_rl.models.positions import position_ids_from_attention_mask

LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32, without materialising the full log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def masked_logp(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor,
    prompt_attention: torch.Tensor,
    completion_ids: torch.Tensor,
    masks: MaskDraw,
    mask_id: int,
) -> torch.Tensor:
    """log f_θ(x_i | row) at the scored positions of every copy: [N, R, L], 0 elsewhere.

    All N·R masked copies go through the model in one batched forward.
    """
    n, r, length = masks.completion.shape
    prompt = prompt_ids.unsqueeze(1).expand(n, r, -1)
    completion = completion_ids.unsqueeze(1).expand(n, r, -1)
    noisy_prompt = torch.where(masks.prompt, torch.full_like(prompt, mask_id), prompt)
    noisy_completion = torch.where(masks.completion, torch.full_like(completion, mask_id), completion)
    inputs = torch.cat([noisy_prompt, noisy_completion], dim=2).reshape(n * r, -1)
    attention = torch.cat([prompt_attention, torch.ones_like(completion_ids)], dim=1)
    attention = attention.unsqueeze(1).expand(n, r, -1).reshape(n * r, -1)
    positions = position_ids_from_attention_mask(attention)
    logits = logits_fn(inputs, attention, positions)[:, -length:]
    logp = token_logprobs(logits, completion.reshape(n * r, length)).reshape(n, r, length)
    return torch.where(masks.scored, logp, torch.zeros_like(logp))


def elbo(logp: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sequence ELBO estimate [N] from logp [N, R, L], masks [N, R, L] and copy weights [N, R]."""
    per_copy = (logp * masks).sum(dim=2)
    return (weights * per_copy).mean(dim=1)
