"""SPG, DMPO, GDSD, diffu-GRPO and wd1 against hand-derived values (each module's docstring states its loss).

Most checks use a factorised policy: its logits at completion position i are a learnable row θ_i,
whatever the input, so log f(x_i | any mask) = log softmax(θ_i)[x_i] =: ℓ_i and every surrogate's
gradient can be written down from the masks that were drawn.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dllm_rl.objectives import RolloutBatch, get_objective
from dllm_rl.objectives.dmpo import ess_coefficient, normalised_ess, signed_weights

VOCAB, MASK, L, P = 5, 4, 6, 3

BLOCKWISE = {
    "kind": "blockwise",
    "coupled": False,
    "count_mode": "exact",
    "t_min": 0.0,
    "t_max": 1.0,
    "scope": "valid",
    "weight": "inv_t_empirical",
    "prompt_mask_prob": 0.0,
    "block_len": 3,
    "block_choice": "uniform_distinct",
    "future_blocks": "include",
    "stratify_over": "microbatch",
}
COMMON = {"inner_iterations": 1, "forward_chunk": 0, "loss_forward_dropout": True, "max_nonfinite_frac": 0.5}


class TablePolicy:
    """Logits θ[i] at completion position i regardless of the input; π_ref is θ at construction."""

    mask_id = MASK

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(torch.randn(L, VOCAB, generator=g, dtype=torch.float64))
        self.theta_ref = self.theta.detach().clone()

    def _table(self, theta: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        return torch.cat([theta.new_zeros(b, t - L, VOCAB), theta.expand(b, L, VOCAB)], dim=1)

    def logits(self, input_ids, attention_mask, position_ids=None):
        return self._table(self.theta, input_ids)

    def reference_logits(self, input_ids, attention_mask, position_ids=None):
        return self._table(self.theta_ref, input_ids)

    @contextlib.contextmanager
    def scoring(self):
        with torch.no_grad():
            yield

    def token_logp(self) -> torch.Tensor:
        return torch.log_softmax(self.theta, dim=-1)  # [L, V]


def make_batch(objective, rewards, completions=None, group=None, round_index=0) -> RolloutBatch:
    n = len(rewards)
    g = torch.Generator().manual_seed(1)
    completion_ids = torch.randint(0, MASK, (n, L), generator=g) if completions is None else torch.tensor(completions)
    rewards = torch.tensor(rewards, dtype=torch.float32)
    group = group or n
    return RolloutBatch(
        prompt_ids=torch.randint(0, MASK, (n, P), generator=g),
        prompt_attention=torch.ones(n, P, dtype=torch.long),
        completion_ids=completion_ids,
        completion_mask=torch.ones(n, L, dtype=torch.bool),
        group_index=torch.arange(n) // group,
        sample_uid=torch.arange(n),
        rewards=rewards,
        reward_parts={},
        advantages=objective.advantages(rewards, group),
        round=round_index,
    )


def grad_of(loss: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, param)
    return g


def dlogp(policy: TablePolicy, x: torch.Tensor) -> torch.Tensor:
    """[L, L, V]: ∂ℓ_i/∂θ (row i: one-hot(x_i) − softmax(θ_i) in row i, zeros elsewhere)."""
    probs = torch.softmax(policy.theta.detach(), dim=-1)
    out = torch.zeros(L, L, VOCAB, dtype=torch.float64)
    for i in range(L):
        out[i, i] = -probs[i]
        out[i, i, int(x[i])] += 1.0
    return out


# ---------------------------------------------------------------------------------------------- SPG


@pytest.mark.parametrize("surrogate", ["eubo", "mix", "elbo", "zero"])
def test_spg_gradient_with_one_positive_and_one_negative_sample(surrogate):
    policy = TablePolicy()
    omega, beta = 0.25, 1.5
    cfg = {
        **COMMON,
        "name": "spg",
        "mc_samples": 2,
        "mask": BLOCKWISE,
        "loss_norm": "token_weighted",
        "negative_surrogate": surrogate,
        "beta": beta,
        "omega": omega,
    }
    objective = get_objective(cfg, seed=3, group_size=2, micro_batch=2)
    batch = make_batch(objective, [1.0, 0.0])  # A = (+0.5, −0.5)
    objective.prepare(batch, policy)
    loss, metrics = objective.loss(batch, policy, 0)
    got = grad_of(loss, policy.theta)

    # Hand derivation. With a mask-independent denoiser, for sample j and its copies τ:
    #   ∇ELBO_j = (1/m) Σ_τ w_τ Σ_{i∈S_τ} ∇ℓ_i,   and (1/β)·log P̄_i = ℓ_i + const, so
    #   ∇EUBO_j = (L_j/|S_j|) Σ_{i∈S_j} ∇ℓ_i, S_j = positions scored by some copy.
    masks = objective.draw_masks(batch, 0, 2)
    a = batch.advantages.double()
    expected = torch.zeros_like(policy.theta)
    for j in range(2):
        d = dlogp(policy, batch.completion_ids[j])
        g_elbo = sum(masks.weight[j, r] * d[masks.scored[j, r]].sum(0) for r in range(2)) / 2
        union = masks.scored[j].any(0)
        g_eubo = L / union.sum() * d[union].sum(0)
        if a[j] > 0 or surrogate == "elbo":
            g = g_elbo
        elif surrogate == "eubo":
            g = g_eubo
        elif surrogate == "mix":
            g = omega * g_eubo + (1 - omega) * g_elbo
        else:
            g = torch.zeros_like(g_elbo)
        expected += -a[j] * g / (2 * L)  # token-weighted: divide by Σ_j L_j
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert metrics["neg_adv_frac"] == 0.5 and metrics["nonfinite_seqs"] == 0
    if surrogate in ("eubo", "mix"):
        assert "eubo_elbo_gap_per_token" in metrics


def test_spg_per_sequence_norm_and_elbo_objective_match():
    policy = TablePolicy(1)
    base = {**COMMON, "mc_samples": 2, "mask": BLOCKWISE, "loss_norm": "per_sequence"}
    spg = get_objective(
        {**base, "name": "spg", "negative_surrogate": "elbo", "beta": 1.0, "omega": 0.5},
        seed=5,
        group_size=2,
        micro_batch=4,
    )
    elbo = get_objective({**base, "name": "elbo"}, seed=5, group_size=2, micro_batch=4)
    batch = make_batch(spg, [1.0, 0.0, 0.5, 0.5], group=2)
    for obj in (spg, elbo):
        obj.prepare(batch, policy)
    l1, _ = spg.loss(batch, policy, 0)
    l2, _ = elbo.loss(batch, policy, 0)
    torch.testing.assert_close(l1, l2)
    # per_sequence: (1/N) Σ_j −A_j V_j, groups with equal rewards contribute nothing.
    masks = spg.draw_masks(batch, 0, 2)
    logp = torch.log_softmax(policy.theta.detach(), -1)
    ell = logp[torch.arange(L)[None], batch.completion_ids]  # [N, L]
    v = torch.stack([(masks.weight[j, :, None] * masks.scored[j] * ell[j]).sum() / 2 for j in range(4)])
    torch.testing.assert_close(l1.detach(), (-batch.advantages.double() * v).mean())


def test_spg_eubo_stays_finite_when_probabilities_underflow():
    policy = TablePolicy()
    with torch.no_grad():
        policy.theta.mul_(0).add_(torch.eye(L, VOCAB, dtype=torch.float64) * 2000.0)  # true tokens get p ≈ e^-2000
    cfg = {
        **COMMON,
        "name": "spg",
        "mc_samples": 2,
        "mask": BLOCKWISE,
        "loss_norm": "token_weighted",
        "negative_surrogate": "eubo",
        "beta": 2.0,
        "omega": 0.5,
    }
    objective = get_objective(cfg, seed=0, group_size=2, micro_batch=2)
    batch = make_batch(objective, [0.0, 1.0], completions=[[4 - 1] * L, [3] * L])
    loss, metrics = objective.loss(batch, policy, 0)
    assert torch.isfinite(loss) and metrics["nonfinite_seqs"] == 0
    assert bool(torch.isfinite(grad_of(loss, policy.theta)).all())


# --------------------------------------------------------------------------------------------- DMPO


def test_dmpo_signed_weights_sum_to_zero_per_group_and_follow_rewards():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g)
    ell = 0.3 * torch.randn(12, generator=g)
    out = signed_weights(ell, rewards, 4, alpha=0.04, coeff=1.0, baseline="neg", strength=1.0)
    a = out["a"].view(3, 4)
    torch.testing.assert_close(a.sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["w_plus"].view(3, 4).sum(1), torch.ones(3))
    # Within a group, with ℓ = 0 the best sample gets the largest and the worst the smallest weight.
    flat = signed_weights(torch.zeros(12), rewards, 4, 0.04, 1.0, "neg", 1.0)["a"].view(3, 4)
    r = rewards.view(3, 4)
    assert torch.equal(flat.argmax(1), r.argmax(1)) and torch.equal(flat.argmin(1), r.argmin(1))
    # mean baseline: a = w⁺ − 1/G; none: a = w⁺.
    mean = signed_weights(ell, rewards, 4, 0.04, 1.0, "mean", 1.0)
    torch.testing.assert_close(mean["a"], mean["w_plus"] - 0.25)
    none = signed_weights(ell, rewards, 4, 0.04, 1.0, "none", 1.0)
    torch.testing.assert_close(none["a"], none["w_plus"])
    # Special temperatures: α = 0 → softmax(±c·r); α = −1 → raw rewards.
    zero = signed_weights(ell, rewards, 4, 0.0, 0.5, "neg", 1.0)
    torch.testing.assert_close(zero["w_plus"].view(3, 4), torch.softmax(0.5 * r, 1))
    raw = signed_weights(ell, rewards, 4, -1.0, 1.0, "neg", 1.0)
    torch.testing.assert_close(raw["a"], 2 * rewards)


def test_dmpo_weights_reduce_to_advantage_weighting_as_alpha_grows():
    # a_i = softmax(c(ℓ + r/α)) − softmax(c(ℓ − r/α)) ≈ (2c/α)·q_i·(r_i − Σ_j q_j r_j), q = softmax(cℓ).
    g = torch.Generator().manual_seed(2)
    rewards, ell, c = torch.rand(8, generator=g).double(), torch.randn(8, generator=g).double(), 0.7
    q = torch.softmax(c * ell.view(2, 4), 1)
    r = rewards.view(2, 4)
    limit = q * (r - (q * r).sum(1, keepdim=True))
    errors = []
    for alpha in (0.5, 2.0, 8.0):
        a = signed_weights(ell, rewards, 4, alpha, c, "neg", 1.0)["a"].view(2, 4).double()
        errors.append(float((a * alpha / (2 * c) - limit).abs().max()))
    assert errors[0] > 4 * errors[1] > 16 * errors[2] and errors[2] < 1e-3, errors


def test_dmpo_ess_coefficient_hits_target():
    z = torch.tensor([0.0, 3.0, 6.0, 9.0, 1.0, -2.0])
    for target in (0.3, 0.5, 0.8):
        c = ess_coefficient(z, target)
        assert 0.01 <= c <= 0.99
        assert abs(float(normalised_ess(torch.softmax(c * z, -1))) - target) < 0.01
    assert ess_coefficient(torch.zeros(6), 0.7) == 0.99  # uniform weights: ESS 1 for every c


def test_dmpo_loss_is_weighted_denoising_cross_entropy():
    policy = TablePolicy(4)
    with torch.no_grad():
        policy.theta.add_(0.5)  # π_θ ≠ π_ref so ℓ ≠ 0
        policy.theta_ref.sub_(0.2 * torch.arange(VOCAB, dtype=torch.float64))
    mask = {**BLOCKWISE, "kind": "random", "coupled": True, "count_mode": "bernoulli", "t_min": 0.1, "scope": "all"}
    cfg = {
        **COMMON,
        "name": "dmpo",
        "alpha": 0.5,
        "coeff": 1.0,
        "ada_coeff": False,
        "ess_target": 0.7,
        "baseline": "neg",
        "centering_strength": 1.0,
        "mc_samples": 4,
        "rollout_mc_samples": 4,
        "mask": {**mask, "weight": "inv_count"},
        "rollout_mask": {**mask, "weight": "inv_t_empirical"},
        "loss": "wdce",
        "loss_reduction": "sum",
        "wddo_alpha": 1.0,
        "wddo_beta": 1.0,
    }
    objective = get_objective(cfg, seed=1, group_size=4, micro_batch=4)
    assert objective.needs_reference
    batch = make_batch(objective, [1.0, 0.0, 0.5, 0.25])
    objective.prepare(batch, policy)
    a = batch.extras["a"].double()
    assert abs(float(a.sum())) < 1e-6 and 0 < objective.round_stats["ess"] <= 1
    loss, metrics = objective.loss(batch, policy, 0)
    masks = objective.draw_masks(batch, 0, 4)
    expected = torch.zeros_like(policy.theta)
    for j in range(4):
        d = dlogp(policy, batch.completion_ids[j])
        # (1/R) Σ_r (1/m_r) Σ_{l∈M_r} −∇ℓ_l
        g = sum(masks.weight[j, r] * d[masks.scored[j, r]].sum(0) for r in range(4)) / 4
        expected += a[j] * -g
    torch.testing.assert_close(grad_of(loss, policy.theta), expected, rtol=1e-5, atol=1e-9)
    assert metrics["nonfinite_seqs"] == 0
    # wddo runs on the same buffer and is finite.
    cfg["loss"] = "wddo"
    wddo = get_objective(cfg, seed=1, group_size=4, micro_batch=4)
    wddo.prepare(batch, policy)
    assert torch.isfinite(wddo.loss(batch, policy, 0)[0])


# --------------------------------------------------------------------------------------------- GDSD


@pytest.mark.parametrize("score", ["plain", "tlc"])
def test_gdsd_gradient_at_zero_log_ratio_is_advantage_weighted_score_gradient(score):
    policy = TablePolicy(2)
    mask = {**BLOCKWISE, "kind": "stratified", "coupled": True, "scope": "all", "weight": "none"}
    cfg = {
        **COMMON,
        "inner_iterations": 2,
        "loss_forward_dropout": False,
        "name": "gdsd",
        "psi": 2.0,
        "beta": 0.0,
        "epsilon": 4e-4,
        "clamp_on": "sum",
        "score": score,
        "mc_pairs": 2,
        "mc_reduction": "sum",
        "mask": mask,
    }
    objective = get_objective(cfg, seed=9, group_size=3, micro_batch=3)
    batch = make_batch(objective, [1.0, 0.0, 0.5])
    # RLOO: A_j = r_j − mean of the others.
    torch.testing.assert_close(batch.advantages, torch.tensor([0.75, -0.75, 0.0]))
    objective.prepare(batch, policy)
    loss, metrics = objective.loss(batch, policy, 0)
    assert metrics["clamp_frac"] == 0.0 and metrics["abs_log_ratio_per_token"] == 0.0
    # Expected: −(2ψ/(B·L)) Σ_i A_i Σ_m ∇S_θ^{(m)}(x_i), the scores on the replayed masks.
    masks = objective._masks(batch, 0)
    s = objective._scores(policy.logits, batch, masks, MASK)  # [B, M]
    surrogate = -(2 * 2.0 / (3 * L)) * (batch.advantages.double()[:, None] * s).sum()
    torch.testing.assert_close(grad_of(loss, policy.theta), grad_of(surrogate, policy.theta))
    # Masks of step k are the same in prepare (cached S_old) and in loss: S_θ − S_old = 0 exactly. Step 0's
    # S_old is the loss forward's own value (a NaN placeholder in the buffer); step 1's is cached.
    assert bool(batch.extras["s_old"][:, 0].isnan().all())
    s1 = objective._scores(policy.logits, batch, objective._masks(batch, 1), MASK)
    torch.testing.assert_close(s1.detach(), batch.extras["s_old"][:, 1])
    # Outside the trust band the hard clamp stops the gradient.
    with torch.no_grad():
        policy.theta.add_(torch.randn(L, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    moved, moved_metrics = objective.loss(batch, policy, 1)
    assert moved_metrics["clamp_frac"] == 1.0
    assert float(grad_of(moved, policy.theta).abs().max()) == 0.0


def test_gdsd_kl_term_and_clamp_options():
    policy = TablePolicy(3)
    mask = {**BLOCKWISE, "kind": "stratified", "coupled": True, "scope": "all", "weight": "none"}
    cfg = {
        **COMMON,
        "inner_iterations": 2,
        "loss_forward_dropout": False,
        "name": "gdsd",
        "psi": 1.0,
        "beta": 0.5,
        "epsilon": 0.1,
        "clamp_on": "none",
        "score": "plain",
        "mc_pairs": 1,
        "mc_reduction": "mean",
        "mask": mask,
    }
    objective = get_objective(cfg, seed=2, group_size=2, micro_batch=2)
    assert objective.needs_reference
    batch = make_batch(objective, [1.0, 0.0])
    objective.prepare(batch, policy)
    with torch.no_grad():
        policy.theta.add_(0.3)  # moves logits uniformly: softmax unchanged, so S_θ = S_ref
        policy.theta[:, 0].add_(0.2)
    # Inner step 1 (after the policy moved): S_old and S_ref both come from prepare.
    loss, _ = objective.loss(batch, policy, 1)
    masks = objective._masks(batch, 1)
    s = objective._scores(policy.logits, batch, masks, MASK)[:, 0]
    s_old = batch.extras["s_old"][:, 1, 0]
    a = batch.advantages.double()
    expected = ((s - s_old) / L - a) ** 2 + 0.5 * 0.5 * (s - batch.extras["s_ref"][:, 1, 0]) ** 2 / L
    torch.testing.assert_close(loss, expected.mean())


# ------------------------------------------------------------------------------- diffu-GRPO and wd1


def test_diffu_grpo_first_step_is_advantage_weighted_token_mean():
    policy = TablePolicy(5)
    full = {**BLOCKWISE, "kind": "full", "weight": "none", "prompt_mask_prob": 0.15}
    cfg = {**COMMON, "name": "diffu_grpo", "epsilon": 0.2, "beta": 0.0, "loss_norm": "token_weighted", "mask": full}
    objective = get_objective(cfg, seed=0, group_size=3, micro_batch=3)
    assert not objective.needs_reference
    batch = make_batch(objective, [1.0, 0.0, 0.2])
    objective.prepare(batch, policy)
    loss, metrics = objective.loss(batch, policy, 0)
    # ρ = 1 at the first step: ∇loss = −Σ_{i,t} A_i ∇φ_{i,t} / Σ v.
    expected = torch.zeros_like(policy.theta)
    for j in range(3):
        expected -= batch.advantages[j].double() * dlogp(policy, batch.completion_ids[j]).sum(0)
    torch.testing.assert_close(grad_of(loss, policy.theta), expected / (3 * L))
    assert metrics["clip_frac"] == 0.0
    # With β > 0 the k3 KL is 0 while π_θ = π_ref, and positive once they differ.
    kl = get_objective({**cfg, "beta": 0.04}, seed=0, group_size=3, micro_batch=3)
    kl.prepare(batch, policy)
    assert kl.loss(batch, policy, 0)[1]["kl_k3_per_token"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        policy.theta[:, 1].add_(1.0)
    assert kl.loss(batch, policy, 0)[1]["kl_k3_per_token"] > 0


def test_wd1_weights_and_zero_gradient_for_equal_rewards():
    policy = TablePolicy(6)
    full = {**BLOCKWISE, "kind": "full", "weight": "none", "prompt_mask_prob": 0.15}
    cfg = {**COMMON, "name": "wd1", "psi": 1.0, "variant": "both", "mask": full}
    objective = get_objective(cfg, seed=0, group_size=3, micro_batch=6)
    batch = make_batch(objective, [1.0, 0.0, 0.5, 0.3, 0.3, 0.3], group=3)
    objective.prepare(batch, policy)
    a = batch.advantages.view(2, 3)
    torch.testing.assert_close(batch.extras["w_plus"].view(2, 3), torch.softmax(a, 1))
    torch.testing.assert_close(batch.extras["w_minus"].view(2, 3), torch.softmax(-a, 1))
    loss, _ = objective.loss(batch, policy, 0)
    expected = torch.zeros_like(policy.theta)
    weight = batch.extras["w_minus"] - batch.extras["w_plus"]
    for j in range(6):
        expected += weight[j].double() * dlogp(policy, batch.completion_ids[j]).sum(0)
    torch.testing.assert_close(grad_of(loss, policy.theta), expected)
    # The second group has equal rewards: w⁺ = w⁻ and it contributes nothing.
    assert torch.equal(weight[3:], torch.zeros(3))
    assert math.isclose(float(weight[:3].sum()), 0.0, abs_tol=1e-6)


# ------------------------------------------------------------------ inner step 0 reuses the loss forward


class CountingPolicy(TablePolicy):
    """A TablePolicy that counts the rows its ``logits`` scores, with or without gradients."""

    def __init__(self, seed: int = 0, model: torch.nn.Module | None = None) -> None:
        super().__init__(seed)
        self.rows = {"scoring": 0, "grad": 0}
        self.scoring_calls = 0
        if model is not None:
            self.model = model

    def logits(self, input_ids, attention_mask, position_ids=None):
        self.rows["grad" if torch.is_grad_enabled() else "scoring"] += input_ids.shape[0]
        return super().logits(input_ids, attention_mask, position_ids)

    @contextlib.contextmanager
    def scoring(self):
        self.scoring_calls += 1
        with super().scoring():
            yield


def first_step_cfg(name: str, mu: int, beta: float) -> dict:
    if name == "diffu_grpo":
        full = {**BLOCKWISE, "kind": "full", "weight": "none", "prompt_mask_prob": 0.15}
        extra = {"epsilon": 0.2, "loss_norm": "token_weighted", "mask": full}
    else:
        mask = {**BLOCKWISE, "kind": "stratified", "coupled": True, "scope": "all", "weight": "none"}
        extra = {"psi": 2.0, "epsilon": 0.05, "clamp_on": "sum", "score": "tlc", "mc_pairs": 2, "mc_reduction": "sum"}
        extra["mask"] = mask
    return {**COMMON, "name": name, "inner_iterations": mu, "beta": beta, **extra}


@pytest.mark.parametrize("name", ["diffu_grpo", "gdsd"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_first_inner_step_reuses_the_gradient_forward(name, beta):
    """prepare scores only steps 1..μ−1 with π_old; step 0's loss and gradient are those of the old path."""
    mu, n = 3, 4
    cfg = first_step_cfg(name, mu, beta)
    runs = {}
    for path in ("new", "old"):
        policy = CountingPolicy(7)
        objective = get_objective(cfg, seed=4, group_size=2, micro_batch=2)
        if path == "old":  # what prepare did before: π_old scored for every step, step 0 included
            objective.reuses_first_forward = lambda policy: False
        batch = make_batch(objective, [1.0, 0.0, 0.3, 0.9], group=2)
        objective.prepare(batch, policy)
        prepared = dict(policy.rows)
        per_step = []
        for k in range(mu):
            losses, grads = [], []
            for lo in (0, 2):  # the trainer's micro-batches
                part = batch.select(slice(lo, lo + 2))
                loss, metrics = objective.loss(part, policy, k)
                losses.append(loss.detach())
                grads.append(grad_of(loss, policy.theta))
            per_step.append((torch.stack(losses), sum(grads)))
        runs[path] = (prepared, per_step, batch.extras, policy.scoring_calls)
    new, old = runs["new"], runs["old"]
    copies = 1 if name == "diffu_grpo" else 2 * int(cfg["mc_pairs"])  # rows per sample and step
    # π_old scores (μ−1)/μ of the rows it did; π_ref (another logits function) still scores every step.
    assert old[0]["scoring"] == n * mu * copies
    assert new[0]["scoring"] == n * (mu - 1) * copies
    assert new[0]["grad"] == old[0]["grad"] == 0
    key = "phi_old" if name == "diffu_grpo" else "s_old"
    assert bool(new[2][key][:, 0].isnan().all())
    assert torch.equal(new[2][key][:, 1:], old[2][key][:, 1:])
    if beta > 0:
        ref = "phi_ref" if name == "diffu_grpo" else "s_ref"
        assert torch.equal(new[2][ref], old[2][ref])
    # Step 0: same loss and gradient (the old path's ratio is 1 up to rounding); later steps identical.
    torch.testing.assert_close(new[1][0][0], old[1][0][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(new[1][0][1], old[1][0][1], rtol=1e-9, atol=1e-12)
    for k in range(1, mu):
        assert torch.equal(new[1][k][0], old[1][k][0]) and torch.equal(new[1][k][1], old[1][k][1])
    assert new[3] == old[3] == 1  # no extra scoring forward in loss


@pytest.mark.parametrize("name", ["diffu_grpo", "gdsd"])
def test_single_inner_step_needs_no_old_forward(name):
    policy = CountingPolicy(3)
    objective = get_objective(first_step_cfg(name, 1, 0.0), seed=0, group_size=2, micro_batch=2)
    batch = make_batch(objective, [1.0, 0.0])
    objective.prepare(batch, policy)
    assert policy.rows == {"scoring": 0, "grad": 0}
    loss, metrics = objective.loss(batch, policy, 0)
    assert torch.isfinite(loss) and metrics["abs_log_ratio_per_token"] == 0.0


@pytest.mark.parametrize("name", ["diffu_grpo", "gdsd"])
def test_dropout_in_the_gradient_forward_keeps_the_precomputed_old_scores(name):
    # loss_forward_dropout on and a network with dropout: prepare scores step 0 as before.
    cfg = {**first_step_cfg(name, 2, 0.0), "loss_forward_dropout": True}
    policy = CountingPolicy(3, model=torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    objective = get_objective(cfg, seed=0, group_size=2, micro_batch=2)
    batch = make_batch(objective, [1.0, 0.0])
    objective.prepare(batch, policy)
    key = "phi_old" if name == "diffu_grpo" else "s_old"
    assert not bool(batch.extras[key].isnan().any())
    # The same network with dropout off in the loss forward: step 0 comes from loss again.
    off = get_objective({**cfg, "loss_forward_dropout": False}, seed=0, group_size=2, micro_batch=2)
    again = make_batch(off, [1.0, 0.0])
    off.prepare(again, policy)
    assert bool(again.extras[key][:, 0].isnan().all())
    # Should loss nevertheless run with dropout active, it rescores step 0 without gradients.
    policy.model.train()
    calls = policy.scoring_calls
    loss, metrics = off.loss(again, policy, 0)
    assert policy.scoring_calls == calls + 1 and metrics["abs_log_ratio_per_token"] == 0.0
    policy.model.eval()
    off.loss(again, policy, 0)
    assert policy.scoring_calls == calls + 1


def test_dropout_active_finds_every_kind_of_dropout():
    from exact import make_model

    from dllm_rl.objectives.base import dropout_active

    tiny = make_model(0).train()
    assert not dropout_active(tiny) and not dropout_active(tiny, training=True)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    assert dropout_active(net.train()) and not dropout_active(net.eval())
    assert dropout_active(net, training=True) and not dropout_active(net.train(), training=False)
    assert not dropout_active(torch.nn.Sequential(torch.nn.Dropout(0.0)).train())

    class Attention(torch.nn.Module):
        def __init__(self, rate: float) -> None:
            super().__init__()
            self.attention_dropout = rate

    assert dropout_active(Attention(0.1).train()) and not dropout_active(Attention(0.1).eval())
    assert not dropout_active(Attention(0.0).train())
    with_config = make_model(0).train()
    with_config.config.hidden_dropout = 0.1
    assert dropout_active(with_config) and not dropout_active(with_config, training=False)
