"""Rotary position ids for left-padded batches (shared by models, samplers and estimators)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over real tokens only, so left padding does not shift RoPE phases."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
