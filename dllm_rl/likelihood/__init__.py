"""Mask schedules and the likelihood surrogates (ELBO, EUBO, coupled score, one-step) shared by every objective."""

from dllm_rl.likelihood.bounds import (
    coupled_score,
    elbo,
    eubo,
    masked_logp,
    mixture,
    one_step_logp,
    sequence_mean,
    sequence_sum,
    token_logprobs,
)
from dllm_rl.likelihood.masks import MaskDraw, mask_seed, sample_masks

__all__ = [
    "MaskDraw",
    "coupled_score",
    "elbo",
    "eubo",
    "mask_seed",
    "masked_logp",
    "mixture",
    "one_step_logp",
    "sample_masks",
    "sequence_mean",
    "sequence_sum",
    "token_logprobs",
]
