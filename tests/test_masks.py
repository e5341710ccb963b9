"""Mask-sampling schedules: marginals, weights, seeding (objectives.md §1)."""

from __future__ import annotations

import math

import pytest
import torch

from dllm_rl.likelihood import mask_seed, sample_masks

MASK_CFG = {
    "kind": "random",
    "count_mode": "exact",
    "weight": "inv_t_empirical",
    "t_min": 0.0,
    "t_max": 1.0,
    "prompt_mask_prob": 0.0,
}


def cfg(**kw) -> dict:
    return {**MASK_CFG, **kw}


def subset_index(masks: torch.Tensor) -> torch.Tensor:
    """Bit pattern of each mask row along the last dimension (bit i = position i masked)."""
    return (masks.long() << torch.arange(masks.shape[-1])).sum(-1)


def test_exact_count_schedule_is_uniform_over_counts_and_subsets():
    # Rows: 4 valid positions as a prefix, all 6 valid, 3 scattered valid positions, no valid position.
    valid = torch.tensor(
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    n_draws = 30_000
    masks = sample_masks(cfg(), valid, torch.ones(4, 2, dtype=torch.bool), n_draws, [1, 2, 3, 4])
    assert masks.completion.shape == (4, n_draws, 6) and masks.completion.dtype == torch.bool
    assert masks.prompt.shape == (4, n_draws, 2) and not masks.prompt.any()
    assert not (masks.completion & ~valid[:, None]).any(), "invalid positions are never masked"
    counts = masks.completion.sum(-1)
    for n in range(3):
        n_valid = int(valid[n].sum())
        freq = torch.bincount(counts[n], minlength=7).double() / n_draws
        p = 1 / n_valid
        assert float(freq[0]) == 0 and float(freq[n_valid + 1 :].sum()) == 0
        assert float((freq[1 : n_valid + 1] - p).abs().max()) < 5 * math.sqrt(p * (1 - p) / n_draws), freq
        # Weight L_n / n for every copy.
        assert torch.allclose(masks.weight[n], n_valid / counts[n].float())
    # Subsets of each size are uniform: row 0, every non-empty subset of the 4 valid positions has
    # probability (1/4) / C(4, |S|).
    idx = subset_index(masks.completion[0, :, :4])
    freq = torch.bincount(idx, minlength=16).double() / n_draws
    for s in range(1, 16):
        p = 0.25 / math.comb(4, bin(s).count("1"))
        assert abs(float(freq[s]) - p) < 5 * math.sqrt(p * (1 - p) / n_draws), (s, float(freq[s]), p)
    # No valid position: nothing masked and weight 0.
    assert not masks.completion[3].any() and bool((masks.weight[3] == 0).all())
    assert bool(((masks.t >= 0) & (masks.t < 1)).all())


def test_bernoulli_schedule_marginal_rate_and_weights():
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    n_draws = 40_000
    t_min, t_max = 0.2, 0.6
    masks = sample_masks(
        cfg(count_mode="bernoulli", weight="inv_t_sampled", t_min=t_min, t_max=t_max),
        valid,
        torch.ones(1, 3, dtype=torch.bool),
        n_draws,
        [mask_seed("bern")],
    )
    comp, t, w = masks.completion[0], masks.t[0], masks.weight[0]
    assert not comp[:, 5:].any()
    assert bool(((t >= t_min) & (t <= t_max)).all())
    assert abs(float(t.mean()) - (t_min + t_max) / 2) < 0.005
    rate = comp[:, :5].double().mean(0)  # per valid position
    se = math.sqrt(0.4 * 0.6 / n_draws)
    assert float((rate - (t_min + t_max) / 2).abs().max()) < 5 * se, rate
    # Given t, positions are masked independently with probability t: high-t copies mask more.
    high, low = t > 0.5, t < 0.3
    assert float(comp[high, :5].double().mean()) > 0.5 and float(comp[low, :5].double().mean()) < 0.3
    empty = comp.sum(1) == 0
    assert empty.any() and (~empty).any()
    assert bool((w[empty] == 0).all())
    assert torch.allclose(w[~empty], 1 / t[~empty])


@pytest.mark.parametrize("weight", ["none", "inv_t_empirical", "inv_t_sampled"])
def test_weights_are_zero_exactly_for_empty_copies(weight):
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    masks = sample_masks(
        cfg(count_mode="bernoulli", weight=weight), valid, torch.ones(2, 1, dtype=torch.bool), 4000, [5, 6]
    )
    empty = masks.completion.sum(-1) == 0
    assert empty.any() and (~empty).any()
    assert bool((masks.weight[empty] == 0).all())
    assert bool((masks.weight[~empty] > 0).all())
    assert masks.weight.dtype == torch.float32 and masks.t.dtype == torch.float32
    if weight == "none":
        assert bool((masks.weight[~empty] == 1).all())
    if weight == "inv_t_empirical":
        n_valid = valid.sum(1, keepdim=True).float().expand_as(masks.weight)
        assert torch.allclose(masks.weight[~empty], (n_valid / masks.completion.sum(-1).float())[~empty])


def test_prompt_masking_rate_and_padding():
    prompt_valid = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    n_draws, p = 20_000, 0.15
    masks = sample_masks(cfg(prompt_mask_prob=p), torch.ones(2, 3, dtype=torch.bool), prompt_valid, n_draws, [7, 8])
    assert not (masks.prompt & ~prompt_valid[:, None]).any(), "padding is never masked"
    rate = masks.prompt.double().mean(1)  # [2, P]
    se = math.sqrt(p * (1 - p) / n_draws)
    assert float((rate[prompt_valid] - p).abs().max()) < 5 * se, rate
    # Prompt masking does not change the completion masks or their weights.
    plain = sample_masks(cfg(), torch.ones(2, 3, dtype=torch.bool), prompt_valid, n_draws, [7, 8])
    assert torch.equal(plain.completion, masks.completion) and torch.equal(plain.weight, masks.weight)


def test_masks_are_reproducible_from_seeds_and_row_independent():
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1, 3:] = False
    pvalid = torch.ones(3, 4, dtype=torch.bool)
    c = cfg(count_mode="bernoulli", weight="inv_t_sampled", prompt_mask_prob=0.3)
    seeds = [mask_seed(0, 1, 2, "", u) for u in range(3)]
    a = sample_masks(c, valid, pvalid, 16, seeds)
    b = sample_masks(c, valid, pvalid, 16, seeds)
    for field in ("completion", "prompt", "weight", "t"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    other = sample_masks(c, valid, pvalid, 16, [mask_seed(0, 1, 3, "", u) for u in range(3)])
    for n in range(3):
        assert not torch.equal(a.completion[n], other.completion[n])
        assert not torch.equal(a.t[n], other.t[n])
    # Row n depends only on seeds[n] and its own validity row: a row drawn alone (or in another batch
    # composition) gets the same masks, so any rank can regenerate it.
    alone = sample_masks(c, valid[1:2], pvalid[1:2], 16, seeds[1:2])
    assert torch.equal(alone.completion[0], a.completion[1]) and torch.equal(alone.prompt[0], a.prompt[1])
    assert torch.equal(alone.weight[0], a.weight[1])
    swapped = sample_masks(c, valid[[2, 0]], pvalid[[2, 0]], 16, [seeds[2], seeds[0]])
    assert torch.equal(swapped.completion[0], a.completion[2]) and torch.equal(swapped.completion[1], a.completion[0])
    # Sampling masks neither uses nor disturbs the global RNG.
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    c_again = sample_masks(c, valid, pvalid, 16, seeds)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(c_again.completion, a.completion)


def test_mask_seed_is_stable_and_sensitive():
    base = (1234, 7, 2, "elbo", 42)
    s = mask_seed(*base)
    assert s == mask_seed(*base)
    assert isinstance(s, int) and 0 <= s < 2**63
    # Pinned value: the seed must not depend on the process (e.g. Python's salted str hash).
    assert s == 6432281570641428684
    for i in range(len(base)):
        changed = list(base)
        changed[i] = changed[i] + 1 if isinstance(changed[i], int) else changed[i] + "x"
        assert mask_seed(*changed) != s, i
    assert mask_seed(1, 23) != mask_seed(12, 3)
    assert mask_seed(1, 2) != mask_seed(2, 1)
    assert mask_seed(1, 2) != mask_seed(1, "2")
    assert mask_seed(1, 2) != mask_seed(1, 2, 0)
    assert len({mask_seed(0, 0, 0, "", u) for u in range(1000)}) == 1000


def test_unknown_schedule_settings_are_rejected():
    valid, pvalid = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="kind"):
        sample_masks(cfg(kind="blockwise_typo"), valid, pvalid, 2, [0])
    with pytest.raises(ValueError, match="count_mode"):
        sample_masks(cfg(count_mode="poisson"), valid, pvalid, 2, [0])
    with pytest.raises(ValueError, match="weight"):
        sample_masks(cfg(weight="inv_t_squared"), valid, pvalid, 2, [0])
