"""Mask schedules and likelihood surrogates (ELBO) shared by every objective."""

from dllm_rl.likelihood.bounds import elbo, masked_logp, token_logprobs
from dllm_rl.likelihood.masks import MaskDraw, mask_seed, sample_masks

__all__ = ["MaskDraw", "elbo", "mask_seed", "masked_logp", "sample_masks", "token_logprobs"]
