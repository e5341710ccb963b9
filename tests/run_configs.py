"""Typed run configs for the tests that hand one to a component (Trainer, build.deepspeed_config,
build.build_policy, evaluate.resolve_checkpoint ...): the composed config, typed by config.run_config as a
run reads it, for the test to set the fields it is about."""

from __future__ import annotations

import functools

import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import dllm_rl  # noqa: F401  (ConfigStore registration)
from dllm_rl.config import RunConfig, run_config


@functools.cache
def _resolved(overrides: tuple[str, ...]) -> str:
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        return OmegaConf.to_yaml(compose(config_name="config", overrides=list(overrides)), resolve=True)


def composed(*overrides: str) -> RunConfig:
    """The config ``python -m dllm_rl <overrides>`` composes (logging=none unless overridden), typed; a
    fresh copy every call, so that a test may change its fields (composed once per set of overrides)."""
    return run_config(yaml.safe_load(_resolved(("logging=none", *overrides))))
