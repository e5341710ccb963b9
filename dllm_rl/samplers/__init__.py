"""Samplers decode completions from a masked-diffusion policy (rollouts and evaluation)."""

from dllm_rl.samplers import dream, low_confidence  # noqa: F401  (registers the samplers)
from dllm_rl.samplers.registry import SAMPLERS, get_sampler, register_sampler

__all__ = ["SAMPLERS", "get_sampler", "register_sampler"]
