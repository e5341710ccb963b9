"""Rollouts under DeepSpeed ZeRO-3, where every rank holds only a shard of each parameter.

A forward through the ZeRO-3 engine all-gathers the layers' shards as it reaches them, which is a
collective: all ranks have to run the same forwards, or the one that runs an extra forward waits for the
others until the process group times out. ``rollout.zero3_params`` chooses how rollouts live with that:

- ``lockstep`` (default): forwards go through the engine, gathering shards in every forward. Callers keep
  every rank at the same number of sampler calls (``evaluation.score(shard=True)`` pads a short share);
  only the layers in use are held whole, which is what ZeRO-3 is used for.
- ``gather``: the whole network is gathered once when a generation starts, the forwards run on the plain
  module with DeepSpeed's per-layer hooks taken off, and the shards are restored when it ends. Faster for
  the many small forwards of a diffusion sampler; each rank holds the full weights for the duration.
  The forwards need no parameter collectives, but the first two forwards after DeepSpeed's module trace
  was reset (before any engine forward, and after every gather, whose exit re-registers the hooks) still
  run its small cross-rank trace check from the root module's pre-forward hook.

Either way every rank must enter a generation (the gather is itself a collective), and ranks are still
kept at equal sampler calls, so that the choice never changes which ranks meet in which collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from dllm_rl.errors import ConfigError

ZERO3_PARAMS = ("lockstep", "gather")


def partitions_weights(module: Any) -> bool:
    """Whether ``module`` is a DeepSpeed engine that shards the parameters (ZeRO stage 3)."""
    check = getattr(module, "zero_optimization_partition_weights", None)
    return bool(check()) if callable(check) else False


@contextlib.contextmanager
def rollout_params(policy: Any, mode: str = "lockstep") -> Iterator[None]:
    """The parameter regime of one generation under ZeRO-3 (see the module docstring).

    A no-op without a ZeRO-3 engine behind ``policy.forward_module`` (a plain module, ZeRO 1 or 2), in
    lockstep mode, and when nested inside a gather (the forward module is then already the plain
    module). In gather mode ``policy.logits`` forwards the engine's local module for the duration;
    ``policy.forward_module`` and DeepSpeed's hooks are put back also when the generation raises.
    Neither entering nor leaving needs the other ranks apart from the gather itself, so an exception
    on one rank does not leave the others waiting in an extra collective.
    """
    if mode not in ZERO3_PARAMS:
        raise ConfigError(f"rollout.zero3_params={mode!r} must be one of {', '.join(ZERO3_PARAMS)}")
    engine = policy.forward_module
    if mode == "lockstep" or not partitions_weights(engine):
        yield
        return
    import deepspeed

    unwrap = getattr(deepspeed.zero, "unwrap_model_for_generation", None)
    if unwrap is None:
        raise ConfigError(
            f"rollout.zero3_params=gather needs deepspeed.zero.unwrap_model_for_generation, which DeepSpeed "
            f"{deepspeed.__version__} lacks; use rollout.zero3_params=lockstep or a newer DeepSpeed"
        )
    # DeepSpeed's own helper: gather every parameter (modifier_rank=None: read-only, no broadcast on
    # exit) and take off the per-layer fetch/release hooks, which would otherwise release the gathered
    # weights after each layer and gather them again in the next forward.
    gathered = unwrap(engine)
    gathered.__enter__()
    policy.forward_module = engine.module
    try:
        yield
    finally:
        policy.forward_module = engine
        # Always leave the helper as on a normal exit: it re-registers the hooks after its yield, with no
        # try/finally, so an exception passed in would leave the engine without them, and its next
        # forward would gather every parameter on first use and keep it (sharding silently gone).
        gathered.__exit__(None, None, None)
