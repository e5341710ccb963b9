"""Mask-sampling schedules (objectives.md §1).

A schedule draws, for each sequence n and Monte Carlo copy r, a completion mask, a prompt mask and
the copy's weight in ELBO-type sums. Every draw comes from a ``torch.Generator`` seeded from
(run seed, rollout round, inner step, sample uid), never from the global RNG, so a mask can be
regenerated on any rank and a resumed run replays the same masks.

``random`` (the schedule implemented here): t ~ U(t_min, t_max) per copy, then either
  * ``exact``: n = clamp(⌈t·L_n⌉, 1, L_n) of the L_n valid positions masked uniformly
    (for t ~ U(0, 1), n ~ U{1..L_n}: LLaDA's exact-count estimator), or
  * ``bernoulli``: each valid position masked independently with probability t.
Weights: ``inv_t_sampled`` = 1/t, ``inv_t_empirical`` = L_n / (masked count), ``none`` = 1; a copy
with nothing masked has weight 0 (0 · (1/0) := 0).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def mask_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class MaskDraw:
    """R masked copies of N sequences. Coupled schedules order copies as (base, complement) pairs."""

    completion: torch.Tensor  # [N, R, L] bool: completion positions replaced by the mask token
    prompt: torch.Tensor  # [N, R, P] bool: masked prompt positions
    weight: torch.Tensor  # [N, R] float32: weight of each copy in ELBO-type sums (0 if nothing is scored)
    t: torch.Tensor  # [N, R] float32: the copy's mask ratio
    scored: torch.Tensor | None = None  # [N, R, L] bool: positions whose log-prob is used (⊆ completion)

    def __post_init__(self) -> None:
        if self.scored is None:
            self.scored = self.completion


def _value(cfg: Mapping[str, Any], key: str) -> Any:
    value = cfg[key]
    return getattr(value, "value", value)  # Enum members from typed configs, plain strings otherwise


def sample_masks(
    cfg: Mapping[str, Any],
    completion_valid: torch.Tensor,
    prompt_valid: torch.Tensor,
    replicates: int,
    seeds: Sequence[int],
) -> MaskDraw:
    """Draw ``replicates`` masked copies of every sequence; row n uses a generator seeded by seeds[n].

    completion_valid [N, L] marks positions that may be masked and scored; prompt_valid [N, P] marks
    real (non-padding) prompt tokens.
    """
    kind = _value(cfg, "kind")
    if kind != "random":
        raise ValueError(f"objective.mask.kind={kind!r} is not implemented")
    count_mode, weight_kind = _value(cfg, "count_mode"), _value(cfg, "weight")
    t_min, t_max, p_prompt = float(cfg["t_min"]), float(cfg["t_max"]), float(cfg["prompt_mask_prob"])
    n_rows, length = completion_valid.shape
    prompt_len = prompt_valid.shape[1]
    completion = torch.zeros(n_rows, replicates, length, dtype=torch.bool)
    prompt = torch.zeros(n_rows, replicates, prompt_len, dtype=torch.bool)
    t_all = torch.zeros(n_rows, replicates)
    valid_cpu, prompt_valid_cpu = completion_valid.bool().cpu(), prompt_valid.bool().cpu()
    for n in range(n_rows):
        g = torch.Generator().manual_seed(int(seeds[n]))
        valid = valid_cpu[n]
        t = t_min + (t_max - t_min) * torch.rand(replicates, generator=g)
        scores = torch.rand(replicates, length, generator=g)
        if count_mode == "exact":
            n_valid = int(valid.sum())
            counts = torch.clamp(torch.ceil(t * n_valid), min=1, max=max(n_valid, 1)).long()
            # The `counts` lowest-scoring valid positions are a uniform subset of that size.
            scores = scores.masked_fill(~valid, math.inf)
            rank = scores.argsort(dim=1).argsort(dim=1)
            completion[n] = (rank < counts.unsqueeze(1)) & valid
        elif count_mode == "bernoulli":
            completion[n] = (scores < t.unsqueeze(1)) & valid
        else:
            raise ValueError(f"objective.mask.count_mode={count_mode!r} is not implemented")
        if p_prompt > 0:
            prompt[n] = (torch.rand(replicates, prompt_len, generator=g) < p_prompt) & prompt_valid_cpu[n]
        t_all[n] = t
    masked = completion.sum(dim=2).float()
    n_valid = valid_cpu.sum(dim=1, keepdim=True).float()
    if weight_kind == "inv_t_sampled":
        weight = 1.0 / t_all.clamp_min(1e-12)
    elif weight_kind == "inv_t_empirical":
        weight = n_valid / masked.clamp_min(1.0)
    elif weight_kind == "none":
        weight = torch.ones_like(masked)
    else:
        raise ValueError(f"objective.mask.weight={weight_kind!r} is not implemented")
    weight = torch.where(masked > 0, weight, torch.zeros_like(weight))
    device = completion_valid.device
    return MaskDraw(completion.to(device), prompt.to(device), weight.to(device), t_all.to(device))
