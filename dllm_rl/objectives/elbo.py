"""ELBO policy gradient ("SPG w/ ELBO"; objectives.md §2).

    J(θ) = E[ (1/G) Σ_j A_j · ELBO_θ(x_j | c) ],   A_j = r_j − mean_k r_k  (group-mean-centred, no std)

    ELBO_θ(x_j | c) ≈ V_j = (1/m) Σ_τ w_τ Σ_{i ∈ S_τ} log π_θ(x_j,i | c'_τ, z_{S_τ})

with m masked copies per sequence drawn by the mask schedule (fresh masks every inner step).
Loss, `token_weighted` (reference code):  Σ_j (−A_j · V_j) / Σ_j L_j ;
      `per_sequence` (paper's 1/G):        (1/N) Σ_j (−A_j · V_j).
For A_j < 0 this lowers a *lower* bound of log π, which guarantees nothing — the gap SPG closes.
"""

from __future__ import annotations

from typing import Any

import torch

from dllm_rl.likelihood.bounds import elbo, masked_logp
from dllm_rl.objectives.base import Objective, RolloutBatch, register_objective


def _norm(cfg: Any) -> str:
    value = cfg["loss_norm"]
    return getattr(value, "value", value)


@register_objective("elbo")
class ELBOObjective(Objective):
    def loss(self, batch: RolloutBatch, policy: Any, inner_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        m = int(self.cfg["mc_samples"])
        masks = self.draw_masks(batch, inner_step, m)
        logp = masked_logp(
            policy.logits,
            batch.prompt_ids,
            batch.prompt_attention,
            batch.completion_ids,
            masks,
            policy.mask_id,
        )
        v = elbo(logp, masks.scored, masks.weight)  # V_j, [N]
        a = batch.advantages.to(v.dtype)
        if _norm(self.cfg) == "per_sequence":
            loss = (-a * v).mean()
        else:
            loss = (-a * v).sum() / batch.completion_mask.sum().clamp_min(1)
        lengths = batch.completion_mask.sum(dim=1).clamp_min(1)
        metrics = {
            "elbo_per_token": float((v.detach() / lengths).mean()),
            "masked_frac": float(masks.completion.float().mean()),
        }
        return loss, metrics
