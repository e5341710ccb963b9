"""DMPO — Distribution Matching Policy Optimization (arXiv:2510.08233).

Fit π_θ to the reward-tilted optimum p*(x|c) ∝ p_ref(x|c)·exp(r(x,c)/α) by forward KL, i.e. minimise
the cross-entropy −E_{p*}[log π_θ], bounded by the denoising cross-entropy (negative ELBO). p* is
reached from the rollouts by self-normalised importance weights, computed once per rollout (no grad):

    ℓ_i  = Ê_ref(x_i) − Ê_cur(x_i)              (K shared antithetic masks, ELBOs in eval mode)
    w⁺_i = softmax_{j∈group}( c·(ℓ_j + r_j/α) )_i      w⁻_i = softmax_{j∈group}( c·(ℓ_j − r_j/α) )_i
    a_i  = w⁺_i − s·b_i,   b = w⁻ (neg) | 1/G (mean) | 0 (none)          (neg: Σ_group a = 0)

and every optimizer step, with R fresh antithetic masks M_{i,r} of m_{i,r} positions:

    wdce:  L = (1/R) Σ_i a_i Σ_r (1/m_{i,r}) Σ_{l∈M_{i,r}} −log π_θ(x_i^l | c_i, x_i with M_{i,r} masked)
    wddo:  L = −mean_i[ w⁺_i·log σ(β_d·Δ¹_i) ] − α_d·mean_i[ log σ(−β_d·Δ²_i) ],  Δʰ_i = Êʰ_θ(x_i) − Ê_cur(x_i)

(Δ¹, Δ² from the two halves of the R copies). The target is fixed, so reusing the rollouts for μ
steps is a well-posed regression: no ratio, clip or KL. α = 0 uses softmax(±c·r); α = −1 uses the
raw rewards ±r as weights. ``ada_coeff`` picks c per group by bisection so that the normalised
effective sample size 1/(G·Σ w⁺²) hits ``ess_target``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.likelihood.bounds import elbo
from dllm_rl.likelihood.masks import MaskCfg, check_mask
from dllm_rl.objectives.base import Objective, ObjectiveCfg, RolloutBatch, finite_or_zero, register_objective
from dllm_rl.schema import option

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


def normalised_ess(weights: torch.Tensor) -> torch.Tensor:
    """1/(G·Σ w²) per group of normalised weights [Q, G]: 1 for uniform weights, 1/G for one-hot."""
    return 1.0 / (weights.shape[-1] * (weights**2).sum(dim=-1))


def ess_coefficient(z: torch.Tensor, target: float, lo: float = 0.01, hi: float = 0.99, iters: int = 30) -> float:
    """c ∈ [lo, hi] with ESS(softmax(c·z)) ≈ target for one group's logits z [G], by bisection (ESS falls with c)."""
    ess = lambda c: float(normalised_ess(torch.softmax(c * z, dim=-1)))  # noqa: E731
    if ess(hi) >= target:
        return hi
    if ess(lo) <= target:
        return lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if ess(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-3:
            break
    return 0.5 * (lo + hi)


def signed_weights(
    ell: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    alpha: float,
    coeff: float,
    baseline: str,
    strength: float,
    ess_target: float | None = None,
) -> dict[str, torch.Tensor]:
    """w⁺, w⁻, the signed weights a and the coefficient c per group; ``ess_target`` turns on ada_coeff."""
    ell = ell.float().view(-1, group_size)
    r = rewards.float().view(-1, group_size)
    if alpha == -1:
        z_pos, z_neg = None, None
        w_pos, w_neg = r, -r
        c = torch.full((r.shape[0],), float("nan"))
    else:
        tilt = r if alpha == 0 else r / alpha
        z_pos, z_neg = (tilt, -tilt) if alpha == 0 else (ell + tilt, ell - tilt)
        if ess_target is not None:
            c = torch.tensor([ess_coefficient(z, ess_target) for z in z_pos])
        else:
            c = torch.full((r.shape[0],), coeff)
        w_pos = torch.softmax(c[:, None] * z_pos, dim=-1)  # max-subtracted inside softmax: r/α spans ~100 nats
        w_neg = torch.softmax(c[:, None] * z_neg, dim=-1)
    if baseline == "neg":
        b = w_neg
    elif baseline == "mean":
        b = w_pos.mean(dim=-1, keepdim=True).expand_as(w_pos)
    else:
        b = torch.zeros_like(w_pos)
    a = w_pos - strength * b
    return {"w_plus": w_pos.reshape(-1), "w_minus": w_neg.reshape(-1), "a": a.reshape(-1), "coeff": c}


class DMPOBaseline(Enum):
    neg = "neg"
    mean = "mean"
    none = "none"


class DMPOLoss(Enum):
    wdce = "wdce"
    wddo = "wddo"


class DMPOReduction(Enum):
    sum = "sum"
    mean_over_groups = "mean_over_groups"


@dataclass
class DMPOCfg(ObjectiveCfg):
    """``objective=dmpo``: the tilt α, the weights' coefficient and ESS target, the weight baseline, the
    copies of the loss (``mc_samples``) and of the rollout-time scores (``rollout_mc_samples``,
    ``rollout_mask``), the loss (WDCE or WDDO) and its reduction."""

    # registry name
    name: str = "dmpo"
    # alpha: KL temperature of the target p* ∝ p_ref exp(r/alpha) (0: softmax(c r); -1: raw rewards)
    alpha: float = 0.04
    # c: proximal step toward the target (1 = jump to p*)
    coeff: float = 1.0
    # choose c per group by bisection so the weights' normalised ESS hits ess_target
    ada_coeff: bool = False
    # target normalised effective sample size for ada_coeff
    ess_target: float = 0.7
    # weight baseline b in a = w+ - s*b: neg (SNIS weights of p_ref exp(-r/alpha)) | mean | none
    baseline: DMPOBaseline = DMPOBaseline.neg
    # s: baseline strength
    centering_strength: float = 1.0
    # R: masked copies per sequence per step (antithetic pairs, both members counted)
    mc_samples: int = 4
    # K: masked copies for the rollout-time ELBOs of p_cur and p_ref (shared masks)
    rollout_mc_samples: int = 4
    rollout_mask: MaskCfg = field(default_factory=MaskCfg)
    # wdce: weighted denoising cross-entropy; wddo: the public code's logistic alternative
    loss: DMPOLoss = DMPOLoss.wdce
    # sum over the micro-batch (reference) | mean_over_groups
    loss_reduction: DMPOReduction = DMPOReduction.sum
    # alpha_d of wddo (weight of the negative half)
    wddo_alpha: float = 1.0
    # beta_d of wddo (logistic scale)
    wddo_beta: float = 1.0

    @classmethod
    def check(cls, o: Any, sampler: Any, need: Callable[[bool, str], None]) -> None:
        super().check(o, sampler, need)
        check_mask(o["rollout_mask"], "objective.rollout_mask", o["rollout_mc_samples"], need)
        need(o["rollout_mc_samples"] >= 1, f"objective.rollout_mc_samples={o['rollout_mc_samples']} must be >= 1")
        need(o["alpha"] >= 0 or o["alpha"] == -1, f"objective.alpha={o['alpha']} must be >= 0 (or -1: raw rewards)")
        need(0.0 < o["coeff"] <= 1.0, f"objective.coeff={o['coeff']} must be in (0, 1]")
        need(0.0 < o["ess_target"] <= 1.0, f"objective.ess_target={o['ess_target']} must be in (0, 1]")
        if option(o, "loss") == "wddo":
            copies = o["mc_samples"]
            need(copies >= 2 and copies % 2 == 0, "objective.loss=wddo needs an even mc_samples")


@register_objective("dmpo", config=DMPOCfg)
class DMPOObjective(Objective):
    @property
    def needs_reference(self) -> bool:
        return True

    def prepare(self, batch: RolloutBatch, policy: Any) -> None:
        masks = self.draw_masks(batch, -1, self.cfg.rollout_mc_samples, slot="rollout", mask_cfg=self.cfg.rollout_mask)
        with policy.scoring():
            e_cur = elbo(self.logp(policy.logits, batch, masks, policy.mask_id), masks.scored, masks.weight)
            e_ref = elbo(self.logp(policy.reference_logits, batch, masks, policy.mask_id), masks.scored, masks.weight)
        ell = (e_ref - e_cur).float().cpu()
        alpha = self.cfg.alpha
        out = signed_weights(
            ell,
            batch.rewards,
            self.group_size,
            alpha,
            self.cfg.coeff,
            self.cfg.baseline.value,
            self.cfg.centering_strength,
            self.cfg.ess_target if self.cfg.ada_coeff else None,
        )
        device = batch.completion_ids.device
        batch.extras.update({k: out[k].to(device) for k in ("a", "w_plus", "w_minus")})
        batch.extras["e_cur"] = e_cur.float()
        ess = normalised_ess(out["w_plus"].view(-1, self.group_size)) if alpha != -1 else torch.tensor([math.nan])
        self.round_stats = {
            "ess": float(ess.mean()),
            "ell_std": float(ell.view(-1, self.group_size).std(dim=1).mean()),
            "ell_mean": float(ell.mean()),
            "coeff": float(out["coeff"].mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        # The round's weight diagnostics, logged with every inner step of the round.
        return {"round_stats": dict(getattr(self, "round_stats", {}))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round_stats = dict(state.get("round_stats", {}))

    def loss(self, batch: RolloutBatch, policy: Any, inner_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        copies = self.cfg.mc_samples
        masks = self.draw_masks(batch, inner_step, copies)
        logp = self.logp(policy.logits, batch, masks, policy.mask_id)
        a = batch.extras["a"].to(logp.dtype)
        metrics: dict[str, Any] = {**self.round_stats, "num_seqs": len(batch)}
        if self.cfg.loss.value == "wdce":
            dce, bad = finite_or_zero(-elbo(logp, masks.scored, masks.weight))  # (1/R) Σ_r (1/m) Σ_l CE
            per_seq = a * dce
            if self.cfg.loss_reduction.value == "mean_over_groups":
                loss = per_seq.sum() / max(1.0, len(batch) / self.group_size)
            else:
                loss = per_seq.sum()
            metrics["loss_pos_part"] = float(per_seq.detach()[a > 0].sum())
            metrics["loss_neg_part"] = float(per_seq.detach()[a < 0].sum())
            metrics["dce_per_token"] = float((dce.detach() / batch.completion_mask.shape[1]).mean())
        else:
            half = copies // 2
            scale = self._elbo_scale(batch, masks.scored)
            e1 = elbo(logp[:, :half], masks.scored[:, :half], scale[:, :half])
            e2 = elbo(logp[:, half:], masks.scored[:, half:], scale[:, half:])
            e_cur = batch.extras["e_cur"].to(logp.dtype)
            d1, bad1 = finite_or_zero(e1 - e_cur)
            d2, bad2 = finite_or_zero(e2 - e_cur)
            bad = max(bad1, bad2)
            beta_d, alpha_d = self.cfg.wddo_beta, self.cfg.wddo_alpha
            w_plus = batch.extras["w_plus"].to(logp.dtype)
            loss = (
                -(w_plus * torch.nn.functional.logsigmoid(beta_d * d1)).mean()
                - alpha_d * torch.nn.functional.logsigmoid(-beta_d * d2).mean()
            )
            metrics["elbo_gain_per_token"] = float((d1.detach() / batch.completion_mask.shape[1]).mean())
        metrics["nonfinite_seqs"] = bad
        return loss, metrics

    def _elbo_scale(self, batch: RolloutBatch, scored: torch.Tensor) -> torch.Tensor:
        """Copy weights D/(scored count): the wddo halves need ELBOs on the rollout-time Ê_cur's scale."""
        if self.cfg.mask.scope.value == "all":
            d = torch.full((len(batch),), float(scored.shape[-1]), device=scored.device)
        else:
            d = batch.completion_mask.sum(dim=1).float()
        counts = scored.sum(dim=-1).float()
        return torch.where(counts > 0, d[:, None] / counts.clamp_min(1.0), torch.zeros_like(counts))
