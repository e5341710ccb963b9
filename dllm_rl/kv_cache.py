"""Key/value caching for bidirectional masked-diffusion models (Fast-dLLM's prefix and dual caches).

An autoregressive cache only ever appends. A diffusion sampler instead rewrites the tokens of one block
while everything else stays put, so the cache here works on a *window*:

* a full forward (``cache.window is None``) runs over the whole sequence and every attention layer
  stores the keys and values it computed (after RoPE, before any head repetition);
* a windowed forward runs the model only over the positions [start, end): each layer computes the
  window's own keys and values and attends to those, spliced between the cached ones of the positions
  before and after the window.

With end = the sequence length this is the prefix cache (the block and everything after it recomputed,
the prefix read from the cache); with [start, end) = the current block it is the dual cache. Either is
an approximation for a bidirectional model, because the cached positions' keys would change as the
window's tokens change; samplers therefore refill the cache with a full forward at every block start.

Every attention implementation of the project (tiny, LLaDA, Dream through transformers' Qwen2 layers)
calls ``update(key, value, layer_idx)`` with the keys and values of the positions it was given, which
is also the signature transformers' own ``Cache.update`` has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dllm_rl.lazy import lazy_import

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


class WindowKVCache:
    """Per-layer keys and values of the last full forward; see the module docstring."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.window: tuple[int, int] | None = None  # None: the next forward is a full one and refills

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, Q, D] keys/values of the positions being run -> the keys/values to attend to."""
        if self.window is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
            return key, value
        if layer_idx not in self.keys:
            raise RuntimeError("WindowKVCache: a windowed forward needs a full forward first (window=None)")
        start, end = self.window
        cached_k, cached_v = self.keys[layer_idx], self.values[layer_idx]
        if key.shape[2] != end - start:
            raise RuntimeError(f"WindowKVCache: window [{start}, {end}) but {key.shape[2]} positions were run")
        return (
            torch.cat([cached_k[:, :, :start], key, cached_k[:, :, end:]], dim=2),
            torch.cat([cached_v[:, :, :start], value, cached_v[:, :, end:]], dim=2),
        )

    @property
    def length(self) -> int:
        """Number of positions the cache covers (that of the last full forward)."""
        return next(iter(self.keys.values())).shape[2] if self.keys else 0


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, K] padding mask (1 = real token) -> a boolean [B, 1, 1, K] SDPA mask over the keys.

    A row without any real key would softmax over nothing (NaN in some kernels); such rows attend
    everywhere instead, as the models do for full forwards.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


def windowed_logits(
    forward: Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: WindowKVCache,
    window: tuple[int, int] | None,
    shift: int = 0,
) -> torch.Tensor:
    """Logits through a cache, position i predicting token i, for the whole sequence or a window.

    ``forward(input_ids, attention_mask, position_ids, kv_cache)`` returns the network's raw logits for
    the positions it is given; ``attention_mask`` always covers the whole sequence (the keys).
    ``shift`` is 1 for a family whose output at i − 1 predicts token i (Dream): the window is then run
    from one position earlier, so that the window's first token gets a prediction and every token whose
    value can have changed is recomputed. Returns [B, T, V] for window=None (the cache refilled; the
    caller aligns these like any full forward) and the aligned [B, end − start, V] for a window.
    """
    if window is None:
        cache.window = None
        return forward(input_ids, attention_mask, position_ids, cache)
    start, end = window
    if not 0 <= start - shift < end <= cache.length:
        raise ValueError(f"window [{start}, {end}) with shift {shift} is outside the cached {cache.length} positions")
    lo = start - shift
    cache.window = (lo, end)
    try:
        raw = forward(input_ids[:, lo:end], attention_mask, position_ids[:, lo:end], cache)
    finally:
        cache.window = None
    return raw[:, : end - start]
