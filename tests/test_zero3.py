"""rollout.zero3_params without a ZeRO-3 engine: the config key, its validation, and the regime being a
no-op for anything that does not shard parameters. The 2-process ZeRO-3 runs of both modes are in
test_zero3_rollouts.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from run_configs import composed

import dllm_rl  # noqa: F401  (ConfigStore registration)
from dllm_rl import evaluation, zero3
from dllm_rl.config import ModelCfg, validate
from dllm_rl.errors import ConfigError
from dllm_rl.models.policy import build_tiny
from dllm_rl.samplers import get_sampler
from dllm_rl.tracking import Tracker
from dllm_rl.trainer import Trainer

MODEL_CFG = ModelCfg(
    name="tiny", hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=32, dtype="float32"
)


def _compose(*overrides: str):
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _policy():
    return build_tiny(MODEL_CFG, "01234", seed=0)


def _sampler():
    return get_sampler({"name": "low_confidence", "gen_length": 4, "block_length": 4, "steps": 2, "temperature": 0.0})


class _Unsharded:
    """Stands for a ZeRO-1/2 engine: DeepSpeed's own question answered no."""

    def __init__(self, module):
        self.module = module

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def test_default_is_lockstep_and_both_modes_validate():
    assert _compose().rollout.zero3_params == "lockstep"
    for mode in zero3.ZERO3_PARAMS:
        validate(_compose(f"rollout.zero3_params={mode}"))


def test_unknown_mode_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"rollout\.zero3_params='sideways' must be one of lockstep, gather"):
        validate(_compose("rollout.zero3_params=sideways"))


@pytest.mark.parametrize("wrap", [False, True], ids=["plain module", "unsharded engine"])
@pytest.mark.parametrize("mode", zero3.ZERO3_PARAMS)
def test_no_op_without_sharded_parameters(mode, wrap):
    policy = _policy()
    if wrap:
        policy.forward_module = _Unsharded(policy.model)
    before = policy.forward_module
    assert not zero3.partitions_weights(before)
    with zero3.rollout_params(policy, mode):
        assert policy.forward_module is before
    assert policy.forward_module is before
    # and the completions are those of the default
    _, _, ids, _ = evaluation.generate(policy, _sampler(), ["012", "3"], 2, 0.0, None, zero3_params=mode)
    _, _, default, _ = evaluation.generate(policy, _sampler(), ["012", "3"], 2, 0.0, None)
    assert ids.tolist() == default.tolist()


def test_a_bad_mode_fails_before_any_forward_even_without_deepspeed():
    """A typo must surface in a CPU run too, not first on the cluster that has ZeRO-3."""
    policy = _policy()
    calls = []
    inner = policy.logits
    policy.logits = lambda *a, **k: calls.append(1) or inner(*a, **k)
    with pytest.raises(ConfigError, match="rollout.zero3_params"):
        evaluation.generate(policy, _sampler(), ["012"], 1, 0.0, None, zero3_params="gathered")
    assert calls == []


class _Rows(list):
    def to_list(self):
        return list(self)


class _Task:
    cfg: dict = {}
    chat = False
    eval_prefill = ""

    def dataset(self, split):
        return _Rows([{"prompt": "012", "eval_prompt": "012"}] * 2)


def test_trainer_rollouts_and_evaluations_use_the_configured_mode(tmp_path: Path):
    """The trainer hands rollout.zero3_params to both of its generation paths (here: the bad value
    reaching zero3 from each of them)."""
    cfg = composed()  # logging=none
    cfg.seed = 0
    cfg.rollout = dataclasses.replace(
        cfg.rollout, prompts_per_step=1, samples_per_prompt=2, micro_batch=2, zero3_params="bogus"
    )
    cfg.objective.inner_iterations = 1
    cfg.eval = dataclasses.replace(cfg.eval, num_examples=None, batch_size=2)
    trainer = Trainer(cfg, _policy(), None, _Task(), _sampler(), None, Tracker(tmp_path, cfg.logging), tmp_path)
    with pytest.raises(ConfigError, match="rollout.zero3_params='bogus'"):
        trainer.rollout(0)
    with pytest.raises(ConfigError, match="rollout.zero3_params='bogus'"):
        trainer.evaluate("test", 0)
