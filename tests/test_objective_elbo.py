"""The ELBO policy-gradient objective: its loss formula, the direction of its update, and that the
DeepSpeed engine applies exactly the AdamW step plain PyTorch would."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from run_configs import composed

from dllm_rl.config import DeepSpeedCfg, ModelCfg, OptimCfg
from dllm_rl.likelihood.bounds import elbo, masked_logp
from dllm_rl.models.policy import build_tiny
from dllm_rl.objectives import RolloutBatch, get_objective, group_mean_advantages

MASK_CFG = {
    "kind": "random",
    "count_mode": "exact",
    "t_min": 0.0,
    "t_max": 1.0,
    "weight": "inv_t_empirical",
    "prompt_mask_prob": 0.0,
}
MODEL_CFG = ModelCfg(
    name="tiny", hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64, dtype="float32"
)


def _objective(loss_norm="token_weighted", mc=2):
    return get_objective(
        {"name": "elbo", "inner_iterations": 1, "mc_samples": mc, "mask": MASK_CFG, "loss_norm": loss_norm},
        seed=7,
        group_size=2,
        micro_batch=8,
    )


def _batch(policy, rewards, group=2):
    g = torch.Generator().manual_seed(0)
    n = len(rewards)
    prompts = ["0234341221434321"] * n
    prompt_ids, attention = policy.encode_prompts(prompts)
    completion = torch.randint(5, 10, (n, 16), generator=g)
    r = torch.tensor(rewards)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_attention=attention,
        completion_ids=completion,
        completion_mask=torch.ones(n, 16, dtype=torch.bool),
        group_index=torch.arange(n) // group,
        sample_uid=torch.arange(n),
        rewards=r,
        reward_parts={"r": r},
        advantages=group_mean_advantages(r, group),
        round=3,
    )


def test_group_mean_advantages():
    a = group_mean_advantages(torch.tensor([1.0, 0.0, 0.5, 0.6, 0.2, 0.4]), 3)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, 0.0, 0.2, -0.2, 0.0]), atol=1e-6, rtol=0)
    assert torch.allclose(a.view(2, 3).sum(dim=1), torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize("loss_norm", ["token_weighted", "per_sequence"])
def test_loss_is_minus_advantage_weighted_elbo(loss_norm):
    policy = build_tiny(MODEL_CFG, "01234", seed=0)
    batch = _batch(policy, [1.0, 0.0, 0.25, 0.75])
    objective = _objective(loss_norm)
    loss, metrics = objective.loss(batch, policy, inner_step=0)
    masks = objective.draw_masks(batch, 0, 2)
    v = elbo(
        masked_logp(
            policy.logits, batch.prompt_ids, batch.prompt_attention, batch.completion_ids, masks, policy.mask_id
        ),
        masks.completion,
        masks.weight,
    )
    expected = -(batch.advantages * v).sum() / (64 if loss_norm == "token_weighted" else 4)
    torch.testing.assert_close(loss, expected)
    assert metrics["elbo_per_token"] < 0


def test_masks_are_replayable_and_fresh_per_inner_step():
    policy = build_tiny(MODEL_CFG, "01234", seed=0)
    batch = _batch(policy, [1.0, 0.0])
    objective = _objective()
    a, b = objective.draw_masks(batch, 0, 2), objective.draw_masks(batch, 0, 2)
    c = objective.draw_masks(batch, 1, 2)
    assert torch.equal(a.completion, b.completion)
    assert not torch.equal(a.completion, c.completion)
    # A micro-batch holding only sample 1 draws the same mask for it as the full batch did.
    alone = objective.draw_masks(batch.select(slice(1, 2)), 0, 2)
    assert torch.equal(alone.completion[0], a.completion[1])


def test_a_small_step_widens_the_gap_between_positive_and_negative_samples():
    """To first order the step changes V_1 - V_2 by lr·A·|∇V_1 - ∇V_2|²/L >= 0 (either ELBO alone may
    move either way: pushing a negative sample down can drag a similar positive one with it)."""
    policy = build_tiny(MODEL_CFG, "01234", seed=0)
    batch = _batch(policy, [1.0, 0.0])
    objective = _objective(mc=8)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=1e-2)

    def per_sample_elbo():
        with torch.no_grad():
            masks = objective.draw_masks(batch, 0, 8)
            return elbo(
                masked_logp(
                    policy.logits, batch.prompt_ids, batch.prompt_attention, batch.completion_ids, masks, policy.mask_id
                ),
                masks.completion,
                masks.weight,
            )

    before = per_sample_elbo()
    loss, _ = objective.loss(batch, policy, inner_step=0)
    loss.backward()
    optimizer.step()
    after = per_sample_elbo()
    assert after[0] - after[1] > before[0] - before[1]


def test_deepspeed_engine_step_equals_plain_adamw():
    import deepspeed

    from dllm_rl.build import deepspeed_config
    from dllm_rl.distributed import init_distributed

    init_distributed("gloo")
    policy = build_tiny(MODEL_CFG, "01234", seed=0)
    reference = copy.deepcopy(policy.model)
    batch = _batch(policy, [1.0, 0.0, 0.25, 0.75])
    objective = _objective()
    cfg = composed()
    cfg.cluster = dataclasses.replace(cfg.cluster, nproc=1, nodes=1)
    cfg.rollout = dataclasses.replace(cfg.rollout, prompts_per_step=2, samples_per_prompt=2)
    cfg.train.micro_batch_per_gpu = 4
    cfg.optim = OptimCfg(lr=1e-2, max_grad_norm=100.0)
    cfg.deepspeed = DeepSpeedCfg(zero_optimization={"stage": 2}, bf16={"enabled": False})
    engine, *_ = deepspeed.initialize(
        model=policy.model, model_parameters=list(policy.model.parameters()), config=deepspeed_config(cfg)
    )
    policy.forward_module = engine
    loss, _ = objective.loss(batch, policy, 0)
    engine.backward(loss)
    engine.step()

    from dllm_rl.models.policy import Policy

    plain = Policy(reference, policy.tokenizer)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    loss_ref, _ = objective.loss(batch, plain, 0)
    loss_ref.backward()
    optimizer.step()
    torch.testing.assert_close(loss.detach(), loss_ref.detach())
    for (name, p), q in zip(engine.module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5, msg=name)
