"""Rollouts under ZeRO-3 with 2 CPU processes (gloo), in both rollout.zero3_params modes: lockstep (every
forward through the DeepSpeed engine gathers the sharded parameters collectively, so the ranks decode in
lockstep) and gather (the whole network gathered once per generation, forwards on the plain module).
Completions must equal those of one process holding the whole network, token for token, also when the
ranks have uneven shares of the prompts."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.test_model_families import ALPHABET, model_cfg

pytestmark = pytest.mark.slow

PROMPTS = ["12:3", "7+5", "abc", "hello", "x"]  # 5 prompts over 2 ranks: shares of 3 and 2
MODES = ("lockstep", "gather")


def _policy(model: str):
    from dllm_rl.models.policy import build_tiny

    policy = build_tiny(model_cfg(model, max_position_embeddings=64), ALPHABET, seed=3)
    policy.model.eval()
    return policy


def _sampler():
    from dllm_rl.samplers import get_sampler

    return get_sampler({"name": "low_confidence", "gen_length": 8, "block_length": 4, "steps": 4, "temperature": 0.0})


class _Task:
    """The few Task members ``score`` reads; the texts themselves are what the test compares."""

    chat = False
    eval_prefill = ""

    def metrics(self, texts, examples):
        return {"n": float(len(texts))}

    def reward(self, text, example):
        return {"len": float(len(text))}

    def score(self, texts, examples, what, first_index=0):
        return [self.reward(text, example) for text, example in zip(texts, examples, strict=True)]


def _examples() -> list[dict]:
    return [{"eval_prompt": p} for p in PROMPTS]


def _count_collectives() -> dict[str, int]:
    """A running count of DeepSpeed's collectives: ZeRO-3's gathers and checks all go through the one
    backend object of deepspeed.comm, so wrapping its methods sees every one of them."""
    from deepspeed.comm import comm

    count = {"n": 0}
    for name in (
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_base",
        "all_gather_coalesced",
        "all_reduce",
        "all_reduce_coalesced",
        "broadcast",
        "reduce",
        "reduce_scatter_tensor",
        "barrier",
    ):
        inner = getattr(comm.cdb, name)

        def counted(*args, _inner=inner, **kwargs):
            count["n"] += 1
            return _inner(*args, **kwargs)

        setattr(comm.cdb, name, counted)
    return count


def _record_forwards(policy, engine, count: dict[str, int]) -> list[list]:
    """Per forward of policy.logits: [went through the engine, collectives it issued]."""
    forwards: list[list] = []
    inner = policy.logits

    def logits(*args, **kwargs):
        before = count["n"]
        out = inner(*args, **kwargs)
        forwards.append([policy.forward_module is engine, count["n"] - before])
        return out

    policy.logits = logits  # generate looks the method up on every sampler call
    return forwards


def _worker(model: str, out: str) -> None:
    """One rank: ZeRO-3 engine around the policy, sharded rollouts in both modes, results to rank 0."""
    import deepspeed
    import torch.distributed as dist

    from dllm_rl import evaluation, zero3

    torch.set_num_threads(1)
    # A rank left waiting in a collective fails the test after this long instead of hanging it.
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=timedelta(seconds=120))
    policy = _policy(model)
    engine, *_ = deepspeed.initialize(
        model=policy.model,
        model_parameters=[p for p in policy.model.parameters() if p.requires_grad],
        config={
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        },
    )
    policy.forward_module = engine
    # Really sharded: every rank holds an empty local tensor and a partition of the whole.
    sharded = all(p.numel() == 0 and p.ds_numel > 0 for p in policy.model.parameters())
    rank, world = dist.get_rank(), dist.get_world_size()
    forwards = _record_forwards(policy, engine, _count_collectives())
    # Rollouts the way the trainer makes them: each rank decodes its own prompts (3 and 2) in the same
    # number of sampler calls (one micro-batch each).
    mine = PROMPTS[rank::world]
    generated = {}
    for mode in MODES:
        forwards.clear()
        _, _, completion_ids, nfe = evaluation.generate(policy, _sampler(), mine, 4, 0.0, None, zero3_params=mode)
        generated[mode] = {"ids": completion_ids.tolist(), "nfe": nfe, "forwards": list(forwards)}
    # A generation that raises inside gather mode leaves the engine as it found it: forwards through the
    # engine, shards released after each forward. Without DeepSpeed's hooks back, a forward would still
    # work but gather every parameter on first use and keep it, silently ending the sharding.
    try:
        with zero3.rollout_params(policy, "gather"):
            assert policy.forward_module is engine.module
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    with torch.no_grad():
        policy.logits(*policy.encode_prompts(mine))
    restored = policy.forward_module is engine and all(p.numel() == 0 for p in policy.model.parameters())
    # Evaluation with micro-batches of 2: 3 prompts take 2 calls, so the rank with 2 prompts is padded
    # to 3 (without the padding it would make 1 call, and the ranks would wait on each other until the
    # timeout above). Lockstep first: its engine forwards need the hooks the failed gather put back.
    scores = {}
    for mode in MODES:
        _, records = evaluation.score(policy, _sampler(), _Task(), _examples(), 2, shard=True, zero3_params=mode)
        scores[mode] = [r["completion"] for r in records]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "generate": generated, "restored": restored})
    if rank == 0:
        Path(out).write_text(json.dumps({"sharded": sharded, "ranks": gathered, "score": scores}))
    dist.barrier()


def _launch(model: str, out: Path) -> dict:
    from torch.distributed.launcher.api import elastic_launch

    from dllm_rl.distributed import local_launch_config

    config = local_launch_config(2)
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in dist_vars if k in os.environ}
    try:
        elastic_launch(config, entrypoint=_worker)(model, str(out))
    finally:
        os.environ.update(saved)
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["tiny_llada", "tiny_dream"])
def test_zero3_rollouts_on_two_processes_equal_one_unsharded_process(model, tmp_path):
    from dllm_rl import evaluation

    result = _launch(model, tmp_path / "out.json")
    assert result["sharded"]
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    assert all(r["restored"] for r in ranks)

    single = _policy(model)
    _, _, expected, _ = evaluation.generate(single, _sampler(), PROMPTS, 2, 0.0, None)
    _, records = evaluation.score(single, _sampler(), _Task(), _examples(), batch_size=2)
    for mode in MODES:
        got = [None] * len(PROMPTS)
        for r in ranks:
            got[r["rank"] :: 2] = r["generate"][mode]["ids"]
        assert got == expected.tolist(), mode
        # one sampler call of 4 denoising steps on each rank
        assert [r["generate"][mode]["nfe"] for r in ranks] == [4, 4], mode
        assert result["score"][mode] == [r["completion"] for r in records], mode

    for r in ranks:
        lockstep, gather = r["generate"]["lockstep"]["forwards"], r["generate"]["gather"]["forwards"]
        # lockstep: through the engine, and every forward gathers the shards
        assert [through_engine for through_engine, _ in lockstep] == [True] * 4
        assert all(collectives > 0 for _, collectives in lockstep)
        # gather: the local module, and the forwards need the other rank for nothing (DeepSpeed's module
        # trace is complete after the lockstep forwards; its first two forwards after a trace reset run a
        # small consistency broadcast, see dllm_rl/zero3.py)
        assert gather == [[False, 0]] * 4
