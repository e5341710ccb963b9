"""π_ref and dropout-free scoring (docs/ARCHITECTURE.md, "Decisions worth knowing"): a frozen copy for full fine-tuning,
the adapter switched off for LoRA (no second copy), and `Policy.scoring()`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from run_configs import composed

from dllm_rl.config import DeepSpeedCfg, ModelCfg, OptimCfg
from dllm_rl.models.policy import Policy, build_tiny

MODEL_CFG = ModelCfg(
    name="tiny", hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64, dtype="float32"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _inputs():
    ids = torch.randint(0, 10, (3, 8), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def _train_step(policy: Policy, lr: float = 1e-2) -> None:
    ids, attention = _inputs()
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=lr)
    policy.logits(ids, attention).logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _lora_policy(dropout: float = 0.0) -> tuple[Policy, torch.Tensor]:
    """A LoRA-wrapped tiny policy with non-zero lora_B, and the logits of its base weights."""
    policy = build_tiny(MODEL_CFG, "01234", seed=0)
    base = policy.model.eval()
    with torch.no_grad():
        base_logits = base(*_inputs()).logits
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return Policy(model, policy.tokenizer), base_logits


def _storage(model: torch.nn.Module) -> tuple[int, int, set[int]]:
    params = list(model.parameters())
    return len(params), sum(p.numel() for p in params), {p.data_ptr() for p in params}


def test_reference_logits_need_an_attached_reference():
    policy = build_tiny(MODEL_CFG, "01234", seed=0)
    assert not policy.has_reference
    with pytest.raises(RuntimeError, match="attach_reference"):
        policy.reference_logits(*_inputs())


def test_frozen_copy_stays_at_the_starting_weights():
    policy = build_tiny(MODEL_CFG, "01234", seed=0)
    ids, attention = _inputs()
    with policy.scoring():
        start = policy.logits(ids, attention)
    policy.attach_reference()
    copy = policy._reference_copy
    policy.attach_reference()
    assert policy._reference_copy is copy, "the reference was built twice"
    assert not copy.training and all(not p.requires_grad for p in copy.parameters())
    assert {p.data_ptr() for p in copy.parameters()}.isdisjoint(p.data_ptr() for p in policy.model.parameters())
    assert {(p.device, p.dtype) for p in copy.parameters()} == {(p.device, p.dtype) for p in policy.model.parameters()}

    policy.model.train()
    _train_step(policy)
    ref = policy.reference_logits(ids, attention)
    assert not ref.requires_grad
    torch.testing.assert_close(ref, start, rtol=0, atol=0)
    with policy.scoring():
        assert not torch.allclose(policy.logits(ids, attention), start)


def test_lora_reference_is_the_base_without_a_copy():
    policy, base_logits = _lora_policy()
    ids, attention = _inputs()
    before = _storage(policy.model)
    policy.attach_reference()
    assert _storage(policy.model) == before and policy._reference_copy is None
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    ref = policy.reference_logits(ids, attention)
    torch.testing.assert_close(ref, base_logits, rtol=0, atol=0)
    with policy.scoring():
        lora_logits = policy.logits(ids, attention)
    assert not torch.allclose(lora_logits, base_logits)
    # Switching the adapter off and on again leaves the policy and its trainable set as they were.
    assert {n for n, p in policy.model.named_parameters() if p.requires_grad} == trainable
    with policy.scoring():
        torch.testing.assert_close(policy.logits(ids, attention), lora_logits, rtol=0, atol=0)


def test_scoring_turns_dropout_off_and_restores_each_module_mode():
    policy, base_logits = _lora_policy(dropout=0.5)
    ids, attention = _inputs()
    policy.model.train()
    frozen = next(m for m in policy.model.modules() if isinstance(m, torch.nn.Dropout))
    frozen.eval()  # a mixed train/eval state must come back exactly as it was
    modes = {name: m.training for name, m in policy.model.named_modules()}
    # Outside scoring the LoRA dropout is live: two forwards differ.
    assert not torch.allclose(policy.logits(ids, attention), policy.logits(ids, attention))
    with policy.scoring():
        a, b = policy.logits(ids, attention), policy.logits(ids, attention)
        assert not policy.model.training
    assert not a.requires_grad
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {name: m.training for name, m in policy.model.named_modules()} == modes

    policy.attach_reference()
    torch.testing.assert_close(policy.reference_logits(ids, attention), base_logits, rtol=0, atol=0)
    assert {name: m.training for name, m in policy.model.named_modules()} == modes
    assert policy.logits(ids, attention).requires_grad


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_reference_through_a_deepspeed_engine(stage):
    """With the PeftModel inside a ZeRO engine (ZeRO-3: base weights partitioned), the reference still
    equals the base, training steps keep updating the adapter, and the base never moves."""
    import deepspeed

    from dllm_rl.build import deepspeed_config
    from dllm_rl.distributed import init_distributed

    init_distributed("gloo")
    policy, base_logits = _lora_policy()
    policy.attach_reference()
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    cfg = composed()
    cfg.cluster = dataclasses.replace(cfg.cluster, nproc=1, nodes=1)
    cfg.rollout = dataclasses.replace(cfg.rollout, prompts_per_step=1, samples_per_prompt=3)
    cfg.train.micro_batch_per_gpu = 3
    cfg.optim = OptimCfg(lr=1e-2, max_grad_norm=1.0)
    cfg.deepspeed = DeepSpeedCfg(zero_optimization=zero, bf16={"enabled": False})
    engine, *_ = deepspeed.initialize(
        model=policy.model,
        model_parameters=[p for p in policy.model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
    )
    policy.forward_module = engine
    ids, attention = _inputs()
    seen = []
    for _ in range(2):
        engine.train()
        engine.backward(policy.logits(ids, attention).logsumexp(-1).mean())
        engine.step()
        torch.testing.assert_close(policy.reference_logits(ids, attention), base_logits, rtol=0, atol=0)
        with policy.scoring():
            seen.append(policy.logits(ids, attention))
    assert engine.skipped_steps == 0
    assert not torch.allclose(seen[0], base_logits) and not torch.allclose(seen[1], seen[0])
