"""SPG — Sandwiched Policy Gradient (arXiv:2510.09541), and its one-sided baseline, ELBO-PG.

    J_SPG(θ) = E[ (1/G) Σ_j ( 1[A_j > 0]·A_j·ELBO_θ(x_j) + 1[A_j ≤ 0]·A_j·V⁻_θ(x_j) ) ],  A_j = r_j − mean_k r_k

Since ELBO ≤ log π ≤ EUBO, pushing a positive sample up through its lower bound and a negative one
down through its upper bound maximises a lower bound of the group objective. Per sequence, with m
masked copies τ (block-wise by default), w_τ = 1/t_τ and the scored positions S_τ:

    V⁺_j   = (1/m) Σ_τ w_τ Σ_{i∈S_τ} log π_θ(x_i | c'_τ, z_τ)                          (ELBO, sequence scale)
    log P̄_i = log[(1/m') Σ_{τ: i∈S_τ} w_τ π_θ(x_i | ·)^β]      (computed with logsumexp: no underflow)
    V^EUBO_j = L_j · mean_{i∈S_j} (1/β) log P̄_i     (S_j: positions some copy scores; the rest take the mean)
    V⁻_j   = eubo: V^EUBO_j | mix: ω·V^EUBO_j + (1−ω)·V⁺_j | elbo: V⁺_j | zero: 0

    loss = Σ_j (−A_j·V_j) / Σ_j L_j   (token_weighted, reference code)   or   (1/N) Σ_j (−A_j·V_j)   (per_sequence)

The EUBO averages over m' = ``eubo_mc_samples`` copies (default m, the paper): the ELBO's m copies
and m' − m more drawn under their own seeds, all in one forward. The log of an m'-copy average is
biased low, so at m' = 2 the "upper" bound sits below log π on average (docs/estimators.md measures
by how much per mask schedule); more copies move it toward eq. 7 (itself an upper bound of log π
only for β ≥ L). Logged per step over the negative-advantage samples: ``eubo_below_elbo_frac``
(V^EUBO_j < V⁺_j, the sandwich inverted) and ``eubo_elbo_gap_per_token`` (mean of (V^EUBO_j − V⁺_j)/L_j).

``objective=elbo`` is the same loss with V⁻ = V⁺: for A_j < 0 it lowers a *lower* bound of log π,
which guarantees nothing about log π — the gap SPG closes. No ratio, clip, KL or reference model;
the rollouts are reused μ times with fresh masks and no off-policy correction (the drift of the
per-token ELBO between the first and the last inner step is logged to show what that costs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.likelihood.bounds import elbo, eubo, mixture
from dllm_rl.likelihood.masks import concat_draws
from dllm_rl.objectives.base import (
    LossNorm,
    Objective,
    ObjectiveCfg,
    RolloutBatch,
    finite_or_zero,
    metric_weight,
    register_objective,
)

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


@dataclass
class ELBOCfg(ObjectiveCfg):
    """``objective=elbo``: m = ``mc_samples`` masked copies per sequence."""

    # registry name
    name: str = "elbo"
    # m: Monte Carlo masked copies per sequence per step
    mc_samples: int = 2
    # token_weighted: sum_j(-A_j V_j) / sum_j L_j (reference code); per_sequence: mean_j(-A_j V_j) (paper)
    loss_norm: LossNorm = LossNorm.token_weighted


class NegativeSurrogate(Enum):
    eubo = "eubo"
    mix = "mix"
    elbo = "elbo"
    zero = "zero"


@dataclass
class SPGCfg(ELBOCfg):
    """``objective=spg``: V⁻ = ``negative_surrogate``, the EUBO's Rényi power β and copies m', the mixture's ω."""

    # registry name
    name: str = "spg"
    # surrogate of log pi for negative-advantage samples: eubo | mix | elbo | zero
    negative_surrogate: NegativeSurrogate = NegativeSurrogate.mix
    # beta: Renyi power of the EUBO (paper: 1.0 for Sudoku, 1.5 otherwise; objective_task/ sets per task)
    beta: float = 1.5
    # omega: mixture weight, omega*EUBO + (1-omega)*ELBO
    omega: float = 0.5
    # masked copies for the EUBO of negative samples: the m copies of the ELBO plus eubo_mc_samples - m more in the same
    # forward (null: m, the paper); fewer copies bias the EUBO low (docs/estimators.md)
    eubo_mc_samples: int | None = None

    @classmethod
    def check(cls, o: Any, sampler: Any, need: Callable[[bool, str], None]) -> None:
        super().check(o, sampler, need)
        need(o["beta"] > 0, f"objective.beta={o['beta']} must be > 0 (the EUBO's Rényi power)")
        need(0.0 <= o["omega"] <= 1.0, f"objective.omega={o['omega']} must be in [0, 1]")
        eubo_copies, copies = o["eubo_mc_samples"], cls.mask_copies(o)
        if eubo_copies is not None:
            need(
                eubo_copies >= copies,
                f"objective.eubo_mc_samples={eubo_copies} must be >= objective.mc_samples={copies} "
                "(the EUBO reuses the ELBO's copies and adds its own)",
            )
            need(
                not o["mask"]["coupled"] or eubo_copies % 2 == 0,
                f"objective.mask.coupled=true draws pairs: objective.eubo_mc_samples={eubo_copies} must be even",
            )


@register_objective("spg", config=SPGCfg)
class SPGObjective(Objective):
    def negative_surrogate(self) -> str:
        return self.cfg.negative_surrogate.value

    def prepare(self, batch: RolloutBatch, policy: Any) -> None:
        self._first_elbo: dict[int, float] = {}

    def state_dict(self) -> dict[str, Any]:
        # inner step 1's ELBOs of this round, for the drift metric at step mu
        return {"first_elbo": dict(getattr(self, "_first_elbo", {}))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._first_elbo = {int(k): float(v) for k, v in state.get("first_elbo", {}).items()}

    def loss(self, batch: RolloutBatch, policy: Any, inner_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.cfg.mc_samples
        masks = self.draw_masks(batch, inner_step, m)
        surrogate = self.negative_surrogate()
        needs_eubo = surrogate in ("eubo", "mix")
        eubo_copies = (self.cfg.eubo_mc_samples or m) if needs_eubo else m  # ELBOCfg has no EUBO keys
        # The EUBO's extra copies come from their own slot, so the ELBO's m copies are those drawn
        # without them (block-wise copies stay on distinct blocks).
        every = masks
        if needs_eubo and eubo_copies > m:
            every = concat_draws([masks, self.draw_masks(batch, inner_step, eubo_copies - m, slot="eubo")])
        logp = self.logp(policy.logits, batch, every, policy.mask_id)
        lengths = batch.completion_mask.sum(dim=1).clamp_min(1).to(logp.dtype)
        a = batch.advantages.to(logp.dtype)
        v_pos = elbo(logp[:, :m], masks.scored, masks.weight)
        v_eubo = None
        if needs_eubo:
            v_eubo = eubo(logp, every.scored, every.weight, self.cfg.beta, lengths)
        if surrogate == "eubo":
            v_neg = v_eubo
        elif surrogate == "mix":
            v_neg = mixture(v_eubo, v_pos, self.cfg.omega)
        elif surrogate == "elbo":
            v_neg = v_pos
        else:
            v_neg = torch.zeros_like(v_pos)
        v, bad = finite_or_zero(torch.where(a > 0, v_pos, v_neg))
        if self.cfg.loss_norm.value == "per_sequence":
            loss = (-a * v).mean()
        else:
            loss = (-a * v).sum() / lengths.sum()

        negative = a < 0
        per_token = (v_pos.detach() / lengths).nan_to_num()
        metrics = {
            "elbo_per_token": float(per_token.mean()),
            "neg_adv_frac": float(negative.float().mean()),
            "scored_frac": float(masks.scored.float().mean()),
            "nonfinite_seqs": bad,
            "num_seqs": len(batch),
        }
        if v_eubo is not None and bool(negative.any()):
            upper, lower = v_eubo.detach()[negative], v_pos.detach()[negative]
            n_negative = float(negative.sum())
            # Means over this micro-batch's negative samples, weighted by their count across micro-batches.
            metrics["eubo_elbo_gap_per_token"] = float(((upper - lower) / lengths[negative]).nan_to_num().mean())
            metrics[metric_weight("eubo_elbo_gap_per_token")] = n_negative
            metrics["eubo_below_elbo_frac"] = float((upper < lower).float().mean())
            metrics[metric_weight("eubo_below_elbo_frac")] = n_negative
        self._track_drift(batch, per_token, inner_step, metrics)
        return loss, metrics

    def _track_drift(self, batch: RolloutBatch, per_token: torch.Tensor, inner_step: int, metrics: dict) -> None:
        """Per-token ELBO change of the same samples between inner steps 1 and μ (fresh masks each time)."""
        mu = self.cfg.inner_iterations
        if mu < 2:
            return
        uids = batch.sample_uid.tolist()
        if inner_step == 0:
            self._first_elbo.update(zip(uids, per_token.tolist(), strict=True))
        elif inner_step == mu - 1 and self._first_elbo:
            first = torch.tensor([self._first_elbo.get(u, float("nan")) for u in uids])
            metrics["elbo_drift_per_token"] = float((per_token.cpu() - first).nanmean())


@register_objective("elbo", config=ELBOCfg)
class ELBOObjective(SPGObjective):
    """ELBO-PG ("SPG w/ ELBO"): the ELBO for every sample, whatever the sign of its advantage."""

    def negative_surrogate(self) -> str:
        return "elbo"
