"""wd1 (arXiv:2507.08838): likelihood weighted by the group's softmax of advantages, no ratio.

Fitting π_θ by forward KL to the optimum of max E[A] − λ·KL(π‖π_old) − β·KL(π‖π_ref) gives weights
∝ exp(ψ·A), ψ = 1/(λ+β). Per group, with Â_i = r_i − mean_j r_j:

    w⁺_i = softmax_i(ψ·Â),   w⁻_i = softmax_i(−ψ·Â)
    L = Σ_i (−w⁺_i + w⁻_i)·ℓ_i,   ℓ_i = Σ_t v_{i,t}·φ_θ(x_{i,t} | c'_k ⊕ M^L)   (summed over the micro-batch)

with d1's one-step estimator on a fresh prompt mask every inner step. No old or reference
log-probs; a group with equal rewards has w⁺ = w⁻ and contributes exactly zero gradient.
``variant: pos_only`` (wd1-P) keeps only the w⁺ term.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.objectives.base import Objective, OneStepCfg, RolloutBatch, finite_or_zero, register_objective

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


class WD1Variant(Enum):
    both = "both"
    pos_only = "pos_only"


@dataclass
class WD1Cfg(OneStepCfg):
    """``objective=wd1``: the weights' temperature ψ and which weights the loss uses."""

    # registry name
    name: str = "wd1"
    # psi = 1/(lambda + beta): temperature of the advantage weights
    psi: float = 1.0
    # both: w+ and w- terms | pos_only: wd1-P, the w+ term alone
    variant: WD1Variant = WD1Variant.both


@register_objective("wd1", config=WD1Cfg)
class WD1Objective(Objective):
    def prepare(self, batch: RolloutBatch, policy: Any) -> None:
        psi = self.cfg.psi
        a = batch.advantages.float().view(-1, self.group_size)
        batch.extras["w_plus"] = torch.softmax(psi * a, dim=1).reshape(-1)
        batch.extras["w_minus"] = torch.softmax(-psi * a, dim=1).reshape(-1)

    def loss(self, batch: RolloutBatch, policy: Any, inner_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        masks = self.draw_masks(batch, inner_step, 1)
        phi = self.logp(policy.logits, batch, masks, policy.mask_id)[:, 0]  # 0 past the first EOS
        ell, bad = finite_or_zero(phi.sum(dim=1))
        w_plus = batch.extras["w_plus"].to(ell.dtype)
        w_minus = batch.extras["w_minus"].to(ell.dtype)
        weight = -w_plus if self.cfg.variant.value == "pos_only" else w_minus - w_plus
        loss = (weight * ell).sum()
        lengths = masks.scored[:, 0].sum(dim=1).clamp_min(1)
        metrics = {
            "logp_per_token": float((ell.detach() / lengths).mean()),
            "weight_abs_mean": float(weight.abs().mean()),
            "nonfinite_seqs": bad,
            "num_seqs": len(batch),
        }
        return loss, metrics
