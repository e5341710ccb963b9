"""model.compile: build_training compiles the network in place, under the DeepSpeed engine, and a
training step through it gives the uncompiled step's loss and update.

Inductor needs minutes to build the tiny model's kernels on 2 CPU cores (and AOT autograd alone about
20 s), so the step here is captured by dynamo and its graphs run eagerly (backend eager): the same
graph capture with dynamic shapes, in-place compile and engine plumbing, without the code generation
(checked once through the CLI with inductor: the same losses and gradient norms as without compile)."""

from __future__ import annotations

import functools

import pytest
import torch

from dllm_rl.config import RunConfig
from dllm_rl.errors import DllmRlError

ALPHABET = "0123456789+-*/=() abcdefghij"


def compose(*overrides: str) -> RunConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    import dllm_rl  # noqa: F401  (registers the config schemas)
    from dllm_rl.config import run_config, validate

    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    OmegaConf.to_object(cfg)
    validate(cfg)
    return run_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def first_step(compiled: bool, monkeypatch, graphs: list) -> tuple[float, dict[str, torch.Tensor]]:
    """One SPG step (prepare, loss, backward, optimizer step) on a random tiny model and a fixed batch."""
    from types import SimpleNamespace

    import dllm_rl.build as build
    from dllm_rl.distributed import init_distributed
    from dllm_rl.objectives import RolloutBatch

    cfg = compose(
        "objective=spg",
        "task=sudoku",
        "model=tiny",
        "model.hidden_size=32",
        "model.num_layers=2",
        f"model.compile={str(compiled).lower()}",
        "warmstart.enabled=false",
        "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=2",
        "rollout.micro_batch=4",
        "train.micro_batch_per_gpu=4",
        "logging=none",
    )
    if compiled:

        def counting(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        monkeypatch.setattr(build, "compile_network", functools.partial(build.compile_network, backend=counting))
    init_distributed("gloo")
    policy, _ = build.build_policy(cfg, SimpleNamespace(alphabet=ALPHABET))
    _, objective, engine = build.build_training(cfg, policy, torch.device("cpu"))
    assert (getattr(policy.model, "_compiled_call_impl", None) is not None) is compiled
    g = torch.Generator().manual_seed(0)
    n, p, length = 4, 5, 8
    vocab = len(ALPHABET)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    batch = RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (n, p), generator=g),
        prompt_attention=torch.tensor([[1] * p, [0] + [1] * (p - 1)] * 2),
        completion_ids=torch.randint(0, vocab, (n, length), generator=g),
        completion_mask=torch.ones(n, length, dtype=torch.bool),
        group_index=torch.tensor([0, 0, 1, 1]),
        sample_uid=torch.arange(n),
        rewards=rewards,
        reward_parts={},
        advantages=objective.advantages(rewards, 2),
        round=0,
    )
    objective.prepare(batch, policy)
    engine.train(cfg.objective.loss_forward_dropout)
    loss, _ = objective.loss(batch, policy, 0)
    engine.backward(loss)
    engine.step()
    return float(loss.detach()), {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def test_compiled_network_trains_like_the_uncompiled_one(monkeypatch):
    graphs: list = []
    plain_loss, plain_weights = first_step(False, monkeypatch, graphs)
    assert not graphs
    try:
        compiled_loss, compiled_weights = first_step(True, monkeypatch, graphs)
    finally:
        torch._dynamo.reset()  # no compiled code left behind for later tests
    assert graphs, "the engine's forward did not go through torch.compile"
    assert compiled_loss == pytest.approx(plain_loss, rel=1e-4, abs=1e-6)
    assert plain_weights.keys() == compiled_weights.keys()
    for k, v in plain_weights.items():
        torch.testing.assert_close(compiled_weights[k], v, rtol=1e-4, atol=1e-6)


def test_a_missing_cpu_compiler_is_one_clear_error(monkeypatch):
    from torch._inductor import config as inductor_config

    from dllm_rl.build import compile_network

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("dllm-rl-no-such-compiler",))
    net = torch.nn.Linear(2, 2)
    with pytest.raises(DllmRlError, match="model.compile=true.*C\\+\\+ compiler.*model.compile=false"):
        compile_network(net, torch.device("cpu"))
    assert getattr(net, "_compiled_call_impl", None) is None
