"""REINFORCE on the ELBO with a leave-one-out baseline (``objective=rloo_elbo``).

The worked example of docs/ARCHITECTURE.md, "Adding an objective": the ELBO policy gradient
(``objective=elbo``) with each sample's baseline the mean reward of the other G − 1 samples of its
group (the RLOO estimator of Kool et al., 2019) instead of the whole group's mean:

    A_j  = r_j − (1/(G−1)) Σ_{k≠j} r_k  =  G/(G−1) · (r_j − mean_k r_k)
    loss = Σ_j (−A_j · ELBO(x_j)) / Σ_j L_j          (ELBO(x_j) estimated as in objective=elbo)

The baseline does not depend on r_j, so each A_j · ∇ELBO(x_j) is a REINFORCE term with a valid baseline
for the ELBO surrogate; the group mean of ``objective=elbo`` contains r_j and shrinks every advantage
by (G − 1)/G. Everything else (masks, copies, μ, loss normalisation) is objective=elbo's.
"""

from __future__ import annotations

from dllm_rl.lazy import lazy_import
from dllm_rl.objectives.base import leave_one_out_advantages, register_objective
from dllm_rl.objectives.spg import ELBOCfg, ELBOObjective

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


@register_objective("rloo_elbo", config=ELBOCfg)
class RLOOELBOObjective(ELBOObjective):
    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return leave_one_out_advantages(rewards, group_size)
