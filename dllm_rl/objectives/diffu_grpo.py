"""diffu-GRPO (d1, arXiv:2504.12216): GRPO on d1's one-step mean-field likelihood estimate.

For inner step k, a fresh seed masks each prompt token with probability 0.15 (c'_k) and the whole
completion; one forward gives per-token log-probs φ_θ(x_i | c'_k ⊕ M^L). With A_i = r_i − mean_j r_j,
ρ_{i,t} = exp(φ_θ − φ_old) and the k3 estimator of KL(π_θ‖π_ref):

    ℓ_{i,t} = −min(ρ_{i,t}·A_i, clip(ρ_{i,t}, 1−ε, 1+ε)·A_i) + β·[exp(φ_ref − φ_θ) − (φ_ref − φ_θ) − 1]
    loss = Σ_{i,t} v_{i,t}·ℓ_{i,t} / Σ_{i,t} v_{i,t}   (token_weighted, reference)
           or (1/N) Σ_i (1/|o_i|) Σ_t v_{i,t}·ℓ_{i,t}   (per_sequence, paper)

φ_old and φ_ref are computed once per rollout for every step's seed (same masked prompt), without
gradients and with dropout off; with μ = 1, φ_old equals φ_θ's value and ρ = 1. At inner step 0 the
policy is still π_old, so when the gradient forward applies no dropout φ_old is that forward's own
detached value and prepare scores only steps 1..μ−1 (Objective.reuses_first_forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.likelihood.masks import concat_draws
from dllm_rl.objectives.base import (
    LossNorm,
    Objective,
    OneStepCfg,
    RolloutBatch,
    finite_or_zero,
    register_objective,
    with_step_zero_placeholder,
)

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


@dataclass
class DiffuGRPOCfg(OneStepCfg):
    """``objective=diffu_grpo``: the clip ε, the KL coefficient β and the loss normalisation."""

    # registry name
    name: str = "diffu_grpo"
    # epsilon: ratio clip range [1-eps, 1+eps]
    epsilon: float = 0.5
    # beta: weight of the k3 KL estimator to the reference policy
    beta: float = 0.04
    # token_weighted: token mean over the micro-batch (reference code); per_sequence: the paper's 1/|o_i|
    loss_norm: LossNorm = LossNorm.token_weighted

    @classmethod
    def check(cls, o: Any, sampler: Any, need: Callable[[bool, str], None]) -> None:
        super().check(o, sampler, need)
        need(o["epsilon"] > 0, f"objective.epsilon={o['epsilon']} must be > 0")
        need(o["beta"] >= 0, f"objective.beta={o['beta']} must be >= 0")


@register_objective("diffu_grpo", config=DiffuGRPOCfg)
class DiffuGRPOObjective(Objective):
    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta > 0

    def prepare(self, batch: RolloutBatch, policy: Any) -> None:
        mu = self.cfg.inner_iterations
        draws = [self.draw_masks(batch, k, 1) for k in range(mu)]  # one copy per step
        masks = concat_draws(draws)  # [N, μ, L]
        with policy.scoring():
            if self.reuses_first_forward(policy):
                later = self.logp(policy.logits, batch, concat_draws(draws[1:]), policy.mask_id) if mu > 1 else None
                batch.extras["phi_old"] = with_step_zero_placeholder(later, draws[0].completion)
            else:
                batch.extras["phi_old"] = self.logp(policy.logits, batch, masks, policy.mask_id)
            if self.needs_reference:
                batch.extras["phi_ref"] = self.logp(policy.reference_logits, batch, masks, policy.mask_id)

    def loss(self, batch: RolloutBatch, policy: Any, inner_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        masks = self.draw_masks(batch, inner_step, 1)
        phi = self.logp(policy.logits, batch, masks, policy.mask_id)[:, 0]  # [N, L], 0 past the first EOS
        v = masks.scored[:, 0].to(phi.dtype)
        phi_old = self.old_scores(
            batch.extras["phi_old"],
            inner_step,
            phi,
            policy,
            lambda: self.logp(policy.logits, batch, masks, policy.mask_id)[:, 0],
        )
        eps, beta = self.cfg.epsilon, self.cfg.beta
        a = batch.advantages.to(phi.dtype)[:, None]
        ratio = torch.exp(phi - phi_old)
        surrogate = torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        per_token = -surrogate
        metrics: dict[str, Any] = {}
        if beta > 0:
            diff = batch.extras["phi_ref"][:, inner_step].to(phi.dtype) - phi
            kl = torch.exp(diff) - diff - 1
            per_token = per_token + beta * kl
            metrics["kl_k3_per_token"] = float((kl.detach() * v).sum() / v.sum().clamp_min(1))
        seq_sum, bad = finite_or_zero((per_token * v).sum(dim=1))
        lengths = v.sum(dim=1).clamp_min(1)
        if self.cfg.loss_norm.value == "per_sequence":
            loss = (seq_sum / lengths).mean()
        else:
            loss = seq_sum.sum() / lengths.sum()
        clipped = ((ratio < 1 - eps) | (ratio > 1 + eps)).to(phi.dtype)
        metrics.update(
            {
                "clip_frac": float((clipped.detach() * v).sum() / v.sum().clamp_min(1)),
                "abs_log_ratio_per_token": float(((phi - phi_old).detach().abs() * v).sum() / v.sum().clamp_min(1)),
                "logp_per_token": float((phi.detach() * v).sum() / v.sum().clamp_min(1)),
                "nonfinite_seqs": bad,
                "num_seqs": len(batch),
            }
        )
        return loss, metrics
