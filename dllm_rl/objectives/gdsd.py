"""GDSD — Guided Denoiser Self-Distillation (arXiv:2605.29398), with the TLC variant.

The reverse-KL-regularised RL problem has the closed-form optimum
π*(x) ∝ π_old(x)^{1−β}·π_ref(x)^{β}·exp(ψ·A(x)); GDSD matches the denoiser of π_θ to that teacher on
the policy's own rollouts by regressing a normalisation-free log-ratio onto the scaled advantage
(the group-centred advantage absorbs log Z). No ELBO and no sampler likelihood: only masked-token
log-probabilities on masks replayed identically for θ, old and ref.

Denoiser score on a coupled pair (Ω, Ω^c) of stratified masks:
    S_q(x; Ω) = ½·[ Σ_{l∈Ω} w_Ω log q(x^l | c, x∖Ω) + Σ_{l∉Ω} w_Ω^c log q(x^l | c, x∖Ω^c) ]
    plain: w = 1;   tlc: w_Ω = 1/t, w_Ω^c = 1/(L/(L+1) − t), t = |Ω|/(L+1)   (ESPO's coupled ELBO)

Loss at inner step k over a micro-batch of B sequences, M pairs m, A_i leave-one-out (RLOO):
    Δ_{i,m} = clamp(S_θ^{(k,m)}(x_i) − S_old^{(k,m)}(x_i), log(1−ε), log(1+ε))     (clamp_on: sum)
    L = (1/B) Σ_i Σ_m (Δ_{i,m}/L − ψ·A_i)²  +  β·(1/(B·M·L)) Σ_i Σ_m ½·(S_θ^{(k,m)} − S_ref^{(k,m)})²
``clamp_on: per_token`` clamps Δ/L instead; ``none`` does not clamp; ``mc_reduction: mean`` averages
the first term over the M pairs. S_old and S_ref are computed for every (k, m) once per rollout,
without gradients and with dropout off; S_old of step 0 is the gradient forward's own detached value
when that forward applies no dropout (the policy has not moved yet: Objective.reuses_first_forward).
The hard clamp has zero gradient outside the band: with the reference ε = 4e-4 on the summed ratio,
most of the signal comes from the first inner step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.likelihood.bounds import coupled_score
from dllm_rl.likelihood.masks import MaskDraw, MaskWeight, concat_draws
from dllm_rl.objectives.base import (
    Objective,
    ObjectiveCfg,
    RolloutBatch,
    finite_or_zero,
    leave_one_out_advantages,
    register_objective,
    with_step_zero_placeholder,
)
from dllm_rl.schema import option

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


class GDSDScore(Enum):
    plain = "plain"
    tlc = "tlc"


class ClampOn(Enum):
    sum = "sum"
    per_token = "per_token"
    none = "none"


class MCReduction(Enum):
    sum = "sum"
    mean = "mean"


@dataclass
class GDSDCfg(ObjectiveCfg):
    """``objective=gdsd``: ψ, β and the clamp ε of the regression, the score (plain or tlc), and
    ``mc_pairs`` coupled mask pairs per sequence."""

    # registry name
    name: str = "gdsd"
    # psi: scale of the leave-one-out advantage the log-ratio is regressed onto
    psi: float = 1.0
    # beta: weight of the k2 KL to the reference policy
    beta: float = 1e-3
    # epsilon: trust band [log(1-eps), log(1+eps)] of the log-ratio clamp
    epsilon: float = 4e-4
    # sum: clamp the summed log-ratio (reference) | per_token: clamp it divided by L | none
    clamp_on: ClampOn = ClampOn.sum
    # plain: unweighted coupled score | tlc: 1/t and 1/(L/(L+1)-t) weights (ESPO's coupled ELBO)
    score: GDSDScore = GDSDScore.plain
    # M: coupled mask pairs per sequence per step
    mc_pairs: int = 1
    # sum (reference) or mean of the regression term over the M pairs
    mc_reduction: MCReduction = MCReduction.sum

    @classmethod
    def mask_copies(cls, o: Any) -> int | None:
        return 2 * o["mc_pairs"]

    @classmethod
    def check(cls, o: Any, sampler: Any, need: Callable[[bool, str], None]) -> None:
        need(o["mc_pairs"] >= 1, f"objective.mc_pairs={o['mc_pairs']} must be >= 1")
        need(
            option(o["mask"], "kind") == "stratified" and bool(o["mask"]["coupled"]),
            "objective=gdsd scores coupled stratified masks: objective.mask.kind must be stratified and "
            "objective.mask.coupled true",
        )
        need(
            option(o["mask"], "weight") == "none",
            "objective=gdsd sets the copy weights from objective.score (plain or tlc): "
            "leave objective.mask.weight=none",
        )
        need(0.0 < o["epsilon"] < 1.0, f"objective.epsilon={o['epsilon']} must be in (0, 1)")
        super().check(o, sampler, need)


@register_objective("gdsd", config=GDSDCfg)
class GDSDObjective(Objective):
    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta > 0

    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return leave_one_out_advantages(rewards, group_size)

    def _masks(self, batch: RolloutBatch, inner_step: int) -> MaskDraw:
        """The M coupled pairs of step k, seeded per (k, slot m); identical in prepare and in loss."""
        weight = MaskWeight.tlc if self.cfg.score.value == "tlc" else MaskWeight.none
        mask_cfg = dataclasses.replace(self.cfg.mask, weight=weight)
        pairs = self.cfg.mc_pairs
        return concat_draws([self.draw_masks(batch, inner_step, 2, slot=m, mask_cfg=mask_cfg) for m in range(pairs)])

    def _scores(self, logits_fn: Any, batch: RolloutBatch, masks: MaskDraw, mask_id: int) -> torch.Tensor:
        return coupled_score(self.logp(logits_fn, batch, masks, mask_id), masks.scored, masks.weight)  # [N, M]

    def prepare(self, batch: RolloutBatch, policy: Any) -> None:
        mu, pairs = self.cfg.inner_iterations, self.cfg.mc_pairs
        draws = [self._masks(batch, k) for k in range(mu)]
        masks = concat_draws(draws)  # all μ·M pairs in one forward
        with policy.scoring():
            if self.reuses_first_forward(policy):
                later = None
                if mu > 1:
                    later = self._scores(policy.logits, batch, concat_draws(draws[1:]), policy.mask_id)
                    later = later.view(-1, mu - 1, pairs)
                like = torch.empty(len(batch), 1, pairs, device=batch.completion_ids.device)
                batch.extras["s_old"] = with_step_zero_placeholder(later, like)
            else:
                batch.extras["s_old"] = self._scores(policy.logits, batch, masks, policy.mask_id).view(-1, mu, pairs)
            if self.needs_reference:
                s_ref = self._scores(policy.reference_logits, batch, masks, policy.mask_id)
                batch.extras["s_ref"] = s_ref.view(-1, mu, pairs)

    def loss(self, batch: RolloutBatch, policy: Any, inner_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        masks = self._masks(batch, inner_step)
        s_theta = self._scores(policy.logits, batch, masks, policy.mask_id)  # [B, M]
        s_old = self.old_scores(
            batch.extras["s_old"],
            inner_step,
            s_theta,
            policy,
            lambda: self._scores(policy.logits, batch, masks, policy.mask_id),
        )
        length = batch.completion_ids.shape[1]
        psi, beta, eps = self.cfg.psi, self.cfg.beta, self.cfg.epsilon
        lo, hi = math.log(1 - eps), math.log(1 + eps)
        a = batch.advantages.to(s_theta.dtype)[:, None]
        log_ratio = s_theta - s_old
        clamp_on = self.cfg.clamp_on.value
        if clamp_on == "sum":
            delta = log_ratio.clamp(lo, hi) / length
            at_bound = (log_ratio <= lo) | (log_ratio >= hi)
        elif clamp_on == "per_token":
            delta = (log_ratio / length).clamp(lo, hi)
            at_bound = (log_ratio / length <= lo) | (log_ratio / length >= hi)
        else:
            delta = log_ratio / length
            at_bound = torch.zeros_like(log_ratio, dtype=torch.bool)
        regression = (delta - psi * a) ** 2
        regression = regression.mean(dim=1) if self.cfg.mc_reduction.value == "mean" else regression.sum(dim=1)
        per_seq = regression
        metrics: dict[str, Any] = {}
        if beta > 0:
            k2 = 0.5 * (s_theta - batch.extras["s_ref"][:, inner_step].to(s_theta.dtype)) ** 2
            per_seq = per_seq + beta * k2.sum(dim=1) / (k2.shape[1] * length)
            metrics["kl_k2_per_token"] = float(k2.detach().mean() / length)
        per_seq, bad = finite_or_zero(per_seq)
        loss = per_seq.mean()
        metrics.update(
            {
                "clamp_frac": float(at_bound.float().mean()),
                "abs_log_ratio_per_token": float((log_ratio.detach().abs() / length).mean()),
                "score_per_token": float((s_theta.detach() / length).mean()),
                "nonfinite_seqs": bad,
                "num_seqs": len(batch),
            }
        )
        return loss, metrics
