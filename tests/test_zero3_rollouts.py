"""Rollouts under ZeRO-3 with 2 CPU processes (gloo): every forward through the DeepSpeed engine
gathers the sharded parameters collectively, so the ranks decode in lockstep. Completions must equal
those of one process holding the whole network, token for token, also when the ranks have uneven
shares of the prompts."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from tests.test_model_families import ALPHABET, model_cfg

pytestmark = pytest.mark.slow

PROMPTS = ["12:3", "7+5", "abc", "hello", "x"]  # 5 prompts over 2 ranks: shares of 3 and 2


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


def _examples() -> list[dict]:
    return [{"eval_prompt": p} for p in PROMPTS]


def _worker(model: str, out: str) -> None:
    """One rank: ZeRO-3 engine around the policy, sharded rollouts, gathered results to rank 0."""
    import deepspeed
    import torch.distributed as dist

    from dllm_rl import evaluation
    from dllm_rl.worker import init_distributed

    torch.set_num_threads(1)
    init_distributed("gloo")
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
    # Rollouts the way the trainer makes them: each rank decodes its own prompts (3 and 2) in the same
    # number of sampler calls (one micro-batch each), every forward gathering the shards.
    mine = PROMPTS[rank::world]
    _, _, completion_ids, nfe = evaluation.generate(policy, _sampler(), mine, 4, 0.0, None)
    gathered = [None] * world
    dist.all_gather_object(gathered, (rank, completion_ids.tolist(), nfe))
    # Evaluation with micro-batches of 2: 3 prompts take 2 calls, so the rank with 2 prompts is padded
    # to 3 (without the padding it would make 1 call, and the ranks would wait on each other for ever).
    _, records = evaluation.score(policy, _sampler(), _Task(), _examples(), batch_size=2, shard=True)
    if rank == 0:
        Path(out).write_text(
            json.dumps({"sharded": sharded, "generate": gathered, "score": [r["completion"] for r in records]})
        )
    dist.barrier()


def _launch(model: str, out: Path) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from dllm_rl.worker import _free_port

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        run_id=uuid.uuid4().hex,
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
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

    single = _policy(model)
    _, _, expected, _ = evaluation.generate(single, _sampler(), PROMPTS, 2, 0.0, None)
    by_rank = {rank: ids for rank, ids, _ in result["generate"]}
    got = [None] * len(PROMPTS)
    for rank, ids in by_rank.items():
        got[rank::2] = ids
    assert got == expected.tolist()
    # one sampler call of 4 denoising steps on each rank
    assert [nfe for _, _, nfe in result["generate"]] == [4, 4]

    _, records = evaluation.score(single, _sampler(), _Task(), _examples(), batch_size=2)
    assert result["score"] == [r["completion"] for r in records]
