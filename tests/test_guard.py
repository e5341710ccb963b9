"""The non-finite guard (docs/ARCHITECTURE.md, "Decisions worth knowing") on real DeepSpeed engines,
ZeRO-2 and ZeRO-3: which steps are skipped, that a skipped step changes nothing, and the abort with a
last good checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from run_configs import composed

from dllm_rl.config import DeepSpeedCfg, ModelCfg, OptimCfg, RunConfig
from dllm_rl.errors import DllmRlError, NonFiniteError
from dllm_rl.models.policy import build_tiny, load_pretrained
from dllm_rl.objectives import RolloutBatch, group_mean_advantages
from dllm_rl.objectives.base import Objective, finite_or_zero
from dllm_rl.tracking import Tracker
from dllm_rl.trainer import LAST_GOOD, Trainer

MODEL_CFG = ModelCfg(
    name="tiny", hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64, dtype="float32"
)
N, MICRO, LIMIT = 4, 2, 3  # 4 sequences in 2 micro-batches; abort at the 3rd skipped step in a row


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _Probe(Objective):
    """A per-sequence surrogate (mean log-probability of the completion, all tokens visible) with a
    switchable fault: ``nan_uids`` get a NaN surrogate, ``fault`` = "loss" returns a NaN loss and
    "grad" a finite loss with a NaN gradient."""

    def __init__(self) -> None:
        super().__init__({}, seed=0, group_size=2, micro_batch=MICRO)
        self.nan_uids: set[int] = set()
        self.fault = ""
        self.modes: list[bool] = []

    def loss(self, batch: RolloutBatch, policy, inner_step: int):
        self.modes.append(policy.model.training)
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        attention = torch.cat([batch.prompt_attention, torch.ones_like(batch.completion_ids)], dim=1)
        logp = policy.logits(ids, attention)[:, batch.prompt_ids.shape[1] :].log_softmax(-1)
        v = logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1).mean(dim=1)
        if self.fault == "grad":
            v = _NaNGrad.apply(v)
        # A constant NaN branch, so the bad rows' gradient is a clean 0 once finite_or_zero drops them.
        bad = torch.tensor([int(u) in self.nan_uids for u in batch.sample_uid])
        v = torch.where(bad, torch.full_like(v, float("nan")), v)
        v, nonfinite = finite_or_zero(v)
        loss = -(torch.arange(1.0, len(v) + 1) * v).mean()
        if self.fault == "loss":
            loss = loss * float("nan")
        return loss, {"probe": 1.0, "nonfinite_seqs": nonfinite, "num_seqs": len(v)}


class _Task:
    cfg: dict = {}
    chat = False

    def dataset(self, split):
        return _Rows()


class _Rows(list):
    def to_list(self):
        return [{"prompt": "01234"}] * 4


def _cfg(stage: int, loss_forward_dropout: bool = True) -> RunConfig:
    zero = {"stage": stage}
    if stage == 3:
        # Tiny tensors are otherwise kept whole ("persistent"); force real partitioning.
        zero["stage3_param_persistence_threshold"] = 0
    cfg = composed()  # logging=none
    cfg.seed = 0
    cfg.cluster = dataclasses.replace(cfg.cluster, nproc=1, nodes=1)
    cfg.rollout = dataclasses.replace(cfg.rollout, prompts_per_step=N // 2, samples_per_prompt=2)
    cfg.objective = dataclasses.replace(
        cfg.objective, inner_iterations=1, loss_forward_dropout=loss_forward_dropout, max_nonfinite_frac=0.5
    )
    cfg.train = dataclasses.replace(cfg.train, micro_batch_per_gpu=MICRO, max_skipped_steps=LIMIT)
    cfg.optim = OptimCfg(lr=1e-2, max_grad_norm=1.0)
    cfg.deepspeed = DeepSpeedCfg(zero_optimization=zero, bf16={"enabled": False})
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, keep_last=2)
    return cfg


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def setup(request):
    """One engine per ZeRO stage, shared by the tests (each builds its own Trainer)."""
    import deepspeed

    from dllm_rl.build import deepspeed_config
    from dllm_rl.distributed import init_distributed

    init_distributed("gloo")
    policy = build_tiny(MODEL_CFG, "01234", seed=0)
    cfg = _cfg(request.param)
    engine, *_ = deepspeed.initialize(
        model=policy.model, model_parameters=list(policy.model.parameters()), config=deepspeed_config(cfg)
    )
    policy.forward_module = engine
    return cfg, policy, engine


def _trainer(setup, tmp_path: Path, **cfg_changes) -> tuple[Trainer, _Probe]:
    cfg, policy, engine = setup
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, **cfg_changes))
    objective = _Probe()
    tracker = Tracker(tmp_path, cfg.logging)
    return Trainer(cfg, policy, engine, _Task(), None, objective, tracker, tmp_path), objective


def _batch(policy) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    prompt_ids, attention = policy.encode_prompts(["0123"] * N)
    completion = torch.randint(5, 10, (N, 6), generator=g)
    r = torch.tensor([1.0, 0.0, 0.5, 0.25])
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_attention=attention,
        completion_ids=completion,
        completion_mask=torch.ones(N, 6, dtype=torch.bool),
        group_index=torch.arange(N) // 2,
        sample_uid=torch.arange(N),
        rewards=r,
        reward_parts={"r": r},
        advantages=group_mean_advantages(r, 2),
        round=0,
    )


def _params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: p.detach().clone() for k, p in params.items()}


def _optimizer_state(engine) -> list[torch.Tensor]:
    state = engine.optimizer.optimizer.state
    return [torch.as_tensor(v).clone() for s in state.values() for _, v in sorted(s.items())]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a.values() if isinstance(a, dict) else a, b.values() if isinstance(b, dict) else b, strict=True):
        assert torch.equal(x, y)


def test_all_surrogates_nan_skips_every_step_then_aborts_with_a_last_good_checkpoint(setup, tmp_path, caplog):
    trainer, probe = _trainer(setup, tmp_path)
    engine, batch = trainer.engine, _batch(trainer.policy)
    assert trainer.train_step(batch, 0)["skipped"] == 0  # one applied step, so there is optimizer state
    params, state = _params(engine), _optimizer_state(engine)
    assert state, "no optimizer state after an applied step"
    probe.nan_uids = set(range(N))
    with caplog.at_level(logging.WARNING, logger="dllm_rl.trainer"):
        for _ in range(LIMIT - 1):
            record = trainer.train_step(batch, 0)
            assert record["skipped"] == 1 and record["nonfinite_seq_frac"] == 1.0
            assert record["nonfinite_seqs"] == N and record["num_seqs"] == N
            _assert_same(_params(engine), params)
            _assert_same(_optimizer_state(engine), state)
        with pytest.raises(NonFiniteError) as err:
            trainer.train_step(batch, 0)
    message = str(err.value)
    assert f"{LIMIT} optimizer steps in a row" in message
    assert f"{N} of {N} per-sequence surrogates non-finite" in message
    last_good = tmp_path / "checkpoints" / LAST_GOOD
    assert str(last_good) in message and isinstance(err.value, DllmRlError)
    assert "4 of 4 per-sequence surrogates non-finite" in caplog.text
    _assert_same(_params(engine), params)
    _assert_same(_optimizer_state(engine), state)
    # The export in the last good checkpoint holds the parameters of the last applied step.
    _assert_same(dict(load_pretrained(last_good / "hf").model.named_parameters()), params)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == LAST_GOOD


def test_non_finite_loss_is_skipped_and_named(setup, tmp_path, caplog):
    trainer, probe = _trainer(setup, tmp_path)
    engine, batch = trainer.engine, _batch(trainer.policy)
    params = _params(engine)
    probe.fault = "loss"
    with caplog.at_level(logging.WARNING, logger="dllm_rl.trainer"):
        record = trainer.train_step(batch, 0)
    assert record["skipped"] == 1
    assert trainer.last_skip_reason == "non-finite loss in 2 of 2 micro-batches"
    assert "non-finite loss" in caplog.text
    _assert_same(_params(engine), params)


def test_a_minority_of_nan_surrogates_is_zeroed_and_the_step_applied(setup, tmp_path):
    trainer, probe = _trainer(setup, tmp_path)
    engine, batch = trainer.engine, _batch(trainer.policy)
    params = _params(engine)
    probe.nan_uids = {1}
    record = trainer.train_step(batch, 0)
    assert record["skipped"] == 0 and trainer.last_skip_reason is None
    assert record["nonfinite_seqs"] == 1 and record["num_seqs"] == N and record["nonfinite_seq_frac"] == 0.25
    assert record["probe"] == 1.0  # ordinary metrics are still averaged over micro-batches
    assert torch.isfinite(torch.tensor(record["grad_norm"])) and torch.isfinite(torch.tensor(record["loss"]))
    after = _params(engine)
    assert any(not torch.equal(after[k], params[k]) for k in params)


def test_a_nan_gradient_with_a_finite_loss_is_skipped_by_deepspeed(setup, tmp_path, caplog):
    trainer, probe = _trainer(setup, tmp_path)
    engine, batch = trainer.engine, _batch(trainer.policy)
    params, skipped = _params(engine), engine.skipped_steps
    probe.fault = "grad"
    with caplog.at_level(logging.WARNING, logger="dllm_rl.trainer"):
        record = trainer.train_step(batch, 0)
    assert torch.isfinite(torch.tensor(record["loss"]))
    assert record["skipped"] == 1 and record["nonfinite_seq_frac"] == 0.0
    assert trainer.last_skip_reason == "non-finite gradient norm" and trainer.skip_streak == [
        "non-finite gradient norm"
    ]
    assert engine.skipped_steps == skipped + 1
    assert "non-finite gradient" in caplog.text
    _assert_same(_params(engine), params)


def test_an_applied_step_resets_the_consecutive_count(setup, tmp_path):
    trainer, probe = _trainer(setup, tmp_path)
    batch = _batch(trainer.policy)
    streaks = []
    for fault in ("grad", "grad", "", "grad", "grad"):  # four skips, never LIMIT of them in a row
        probe.fault = fault
        trainer.train_step(batch, 0)
        streaks.append(len(trainer.skip_streak))
    assert streaks == [1, 2, 0, 1, 2] and trainer.global_step == 5
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("dropout", [True, False])
def test_gradient_forward_mode_follows_loss_forward_dropout(setup, tmp_path, dropout):
    trainer, probe = _trainer(setup, tmp_path, loss_forward_dropout=dropout)
    trainer.train_step(_batch(trainer.policy), 0)
    assert probe.modes == [dropout, dropout]


def test_bf16_runs_check_gradient_overflow():
    from dllm_rl.build import deepspeed_config

    cfg = _cfg(2)
    cfg.deepspeed = DeepSpeedCfg(zero_optimization={"stage": 2}, bf16={"enabled": True})
    assert deepspeed_config(cfg)["bf16"]["check_grad_overflow"] is True
    assert "check_grad_overflow" not in deepspeed_config(_cfg(2))["bf16"]
