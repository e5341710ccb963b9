"""Mask-sampling schedules: marginals, weights, seeding (dllm_rl/likelihood/masks.py; docs/estimators.md)."""

from __future__ import annotations

import math

import pytest
import torch
from exact import cfg, exact_elbo, random_table, subset_index

from dllm_rl.errors import ConfigError
from dllm_rl.likelihood import mask_seed, sample_masks
from dllm_rl.likelihood.masks import Stratum


def test_exact_count_schedule_is_uniform_over_counts_and_subsets():
    # Rows: 4 valid positions as a prefix, all 6 valid, 3 scattered valid positions, no valid position.
    valid = torch.tensor(
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    n_draws = 30_000
    masks = sample_masks(cfg(), valid, torch.ones(4, 2, dtype=torch.bool), n_draws, [1, 2, 3, 4])
    assert masks.completion.shape == (4, n_draws, 6) and masks.completion.dtype == torch.bool
    assert masks.prompt.shape == (4, n_draws, 2) and not masks.prompt.any()
    assert not (masks.scored & ~valid[:, None]).any(), "invalid positions are never scored"
    assert bool((masks.completion | valid[:, None]).all()), "post-EOS padding is always masked in the input"
    assert torch.equal(masks.completion & valid[:, None], masks.scored)
    counts = masks.scored.sum(-1)
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
    idx = subset_index(masks.scored[0, :, :4])
    freq = torch.bincount(idx, minlength=16).double() / n_draws
    for s in range(1, 16):
        p = 0.25 / math.comb(4, bin(s).count("1"))
        assert abs(float(freq[s]) - p) < 5 * math.sqrt(p * (1 - p) / n_draws), (s, float(freq[s]), p)
    # No valid position: nothing masked and weight 0.
    assert not masks.scored[3].any() and bool((masks.weight[3] == 0).all())
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
    comp, t, w = masks.scored[0], masks.t[0], masks.weight[0]
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
    empty = masks.scored.sum(-1) == 0
    assert empty.any() and (~empty).any()
    assert bool((masks.weight[empty] == 0).all())
    assert bool((masks.weight[~empty] > 0).all())
    assert masks.weight.dtype == torch.float32 and masks.t.dtype == torch.float32
    if weight == "none":
        assert bool((masks.weight[~empty] == 1).all())
    if weight == "inv_t_empirical":
        n_valid = valid.sum(1, keepdim=True).float().expand_as(masks.weight)
        assert torch.allclose(masks.weight[~empty], (n_valid / masks.scored.sum(-1).float())[~empty])


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
    # The schedule is read through its schema (MaskCfg): a value outside an enum is a config error naming it.
    with pytest.raises(ConfigError, match=r"objective\.mask\.kind: Invalid value 'blockwise_typo'"):
        sample_masks(cfg(kind="blockwise_typo"), valid, pvalid, 2, [0])
    with pytest.raises(ConfigError, match=r"objective\.mask\.count_mode: Invalid value 'poisson'"):
        sample_masks(cfg(count_mode="poisson"), valid, pvalid, 2, [0])
    with pytest.raises(ConfigError, match=r"objective\.mask\.weight: Invalid value 'inv_t_squared'"):
        sample_masks(cfg(weight="inv_t_squared"), valid, pvalid, 2, [0])
    with pytest.raises(ConfigError, match=r"objective\.mask\.t_mn: Key 't_mn' not in 'MaskCfg'"):
        sample_masks({**cfg(), "t_mn": 0.2}, valid, pvalid, 2, [0])


# ------------------------------------------------------------------- coupled, stratified, blockwise, full


def strata(n_rows: int, size: int, seed: int = 0) -> list[Stratum]:
    return [Stratum(mask_seed("stratum", seed, j // size), j % size, size) for j in range(n_rows)]


def test_coupled_copies_are_complements_within_the_scope():
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pvalid = torch.ones(2, 3, dtype=torch.bool)
    for scope in ("valid", "all"):
        c = cfg(coupled=True, count_mode="bernoulli", weight="inv_t_sampled", scope=scope, prompt_mask_prob=0.3)
        m = sample_masks(c, valid, pvalid, 400, [1, 2])
        base, comp = m.scored[:, 0::2], m.scored[:, 1::2]
        in_scope = valid[:, None] if scope == "valid" else torch.ones_like(valid)[:, None]
        assert not (base & comp).any() and torch.equal(base | comp, in_scope.expand_as(base))
        torch.testing.assert_close(m.t[:, 1::2], 1 - m.t[:, 0::2])
        assert torch.equal(m.prompt[:, 0::2], m.prompt[:, 1::2]), "a pair shares its prompt mask"
        if scope == "valid":  # post-EOS padding is masked in the input of both members, never scored
            assert bool(m.completion[0, :, 5:].all()) and not m.scored[0, :, 5:].any()
        else:
            assert torch.equal(m.completion, m.scored)
    with pytest.raises(ValueError, match="even"):
        sample_masks(cfg(coupled=True), valid, pvalid, 3, [1, 2])
    with pytest.raises(ValueError, match="coupled"):
        sample_masks(cfg(kind="blockwise", coupled=True, block_len=2), valid, pvalid, 2, [1, 2])


def test_stratified_counts_are_evenly_spread_and_uniform_marginally():
    length, rows = 7, 8
    valid = torch.ones(rows, length, dtype=torch.bool)
    c = cfg(kind="stratified", coupled=True, weight="tlc", scope="all")
    m = sample_masks(c, valid, torch.ones(rows, 1, dtype=torch.bool), 2, list(range(rows)), strata(rows, rows))
    counts = m.scored[:, 0].sum(1)
    # One offset per stratum: the b = 8 counts sit one (L+1)/b = 1 apart on the circle {0..L}.
    assert sorted(counts.tolist()) == list(range(8))
    torch.testing.assert_close(m.t[:, 0], counts.float() / (length + 1))
    nonzero = counts > 0
    torch.testing.assert_close(m.weight[nonzero, 0], (length + 1) / counts[nonzero].float())
    assert bool((m.weight[~nonzero, 0] == 0).all()), "an empty set contributes nothing"
    # Marginally (over strata) every count in {0..L} is equally likely.
    n_strata = 3000
    seeds = list(range(n_strata * 2))
    draws = sample_masks(
        c,
        torch.ones(len(seeds), length, dtype=torch.bool),
        torch.ones(len(seeds), 1, dtype=torch.bool),
        2,
        seeds,
        strata(len(seeds), 2, seed=1),
    )
    freq = torch.bincount(draws.scored[:, 0].sum(1), minlength=length + 1).double() / len(seeds)
    p = 1 / (length + 1)
    assert float((freq - p).abs().max()) < 5 * math.sqrt(p * (1 - p) / len(seeds)), freq
    with pytest.raises(ValueError, match="Stratum"):
        sample_masks(c, valid, torch.ones(rows, 1, dtype=torch.bool), 2, list(range(rows)))


@pytest.mark.parametrize(
    "schedule",
    [
        {"coupled": True, "count_mode": "bernoulli", "weight": "inv_t_sampled"},
        {"kind": "stratified", "coupled": True, "weight": "tlc"},
    ],
    ids=["coupled", "stratified_tlc"],
)
def test_coupled_and_stratified_schedules_estimate_the_elbo_without_bias(schedule):
    length, n_rows = 4, 50_000
    table = random_table(length, torch.Generator().manual_seed(11))
    seeds = [mask_seed("coupled-elbo", j) for j in range(n_rows)]
    extra = strata(n_rows, 16, seed=2) if schedule.get("kind") == "stratified" else None
    m = sample_masks(
        cfg(**schedule),
        torch.ones(n_rows, length, dtype=torch.bool),
        torch.ones(n_rows, 1, dtype=torch.bool),
        2,
        seeds,
        extra,
    )
    sums = table.sum(1)[subset_index(m.scored)]  # [N, 2]: Σ_{i∈S} log f(x_i | z_S)
    per_row = 0.5 * (m.weight.double() * sums).sum(1)
    mean, se = float(per_row.mean()), float(per_row.std() / math.sqrt(n_rows))
    target = exact_elbo(table)
    assert abs(mean - target) < 4 * se, (mean, target, se)


def test_blockwise_structure():
    block, length = 4, 12
    # Row 0: all 12 valid (3 blocks); row 1: EOS at position 5 (valid 0..5: blocks 0 and 1 eligible).
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, 6:] = False
    pvalid = torch.ones(2, 3, dtype=torch.bool)
    c = cfg(kind="blockwise", block_len=block, prompt_mask_prob=0.0)
    m = sample_masks(c, valid, pvalid, 2, [3, 4])
    pos = torch.arange(length)
    for n in range(2):
        for r in range(2):
            masked, scored = m.completion[n, r], m.scored[n, r]
            partial = [b for b in range(3) if 0 < int(masked[b * block : (b + 1) * block].sum()) < block]
            chosen = partial[0] if partial else int(masked.float().argmax()) // block
            lo, hi = chosen * block, (chosen + 1) * block
            assert not masked[:lo].any(), "earlier blocks stay clean without prompt noise"
            assert bool(masked[hi:].all()), "later blocks are fully masked"
            assert bool(masked[lo:hi][valid[n, lo:hi]].any()), "at least one valid position of the block"
            assert torch.equal(scored, masked & valid[n]), "future_blocks=include scores masked valid positions"
            assert bool(masked[~valid[n]].all()), "post-EOS padding is always masked"
            n_scored = float(scored.sum())
            assert float(m.weight[n, r]) == pytest.approx(float(valid[n].sum()) / n_scored)
    # Distinct blocks across the copies of one sequence (uniform_distinct), uniformly over eligible blocks.
    n_rows = 3000
    many = sample_masks(c, valid[1:].expand(n_rows, -1), pvalid[:1].expand(n_rows, -1), 2, list(range(n_rows)))
    first_masked = (many.completion & (pos < 6)).float().argmax(-1) // block  # chosen block (0 or 1)
    assert bool((first_masked[:, 0] != first_masked[:, 1]).all())
    share = float((first_masked[:, 0] == 0).double().mean())
    assert abs(share - 0.5) < 5 * math.sqrt(0.25 / n_rows)
    # exclude: later blocks masked in the input only, t over the valid positions up to the block's end.
    ex = sample_masks({**c, "future_blocks": "exclude"}, valid[:1], pvalid[:1], 2, [7])
    for r in range(2):
        chosen = int((ex.scored[0, r].float() * (pos + 1)).argmax()) // block
        hi = (chosen + 1) * block
        assert not ex.scored[0, r, hi:].any() and bool(ex.completion[0, r, hi:].all())
        assert float(ex.weight[0, r]) == pytest.approx(hi / float(ex.scored[0, r].sum()))


def test_blockwise_prompt_noise_covers_prompt_and_earlier_blocks():
    block, length, n_rows, p = 4, 8, 4000, 0.3
    valid = torch.ones(n_rows, length, dtype=torch.bool)
    pvalid = torch.ones(n_rows, 5, dtype=torch.bool)
    m = sample_masks(cfg(kind="blockwise", block_len=block, prompt_mask_prob=p), valid, pvalid, 1, range(n_rows))
    chose_second = m.completion[:, 0, :block].float().mean(1) < 1.0  # block 1 chosen: block 0 only noised
    chose_second &= ~m.completion[:, 0, block:].all(1)
    se = math.sqrt(p * (1 - p) / int(chose_second.sum()) / block)
    rate = float(m.completion[chose_second, 0, :block].double().mean())
    assert abs(rate - p) < 5 * se, rate
    assert torch.equal(m.scored[chose_second, 0, :block], m.completion[chose_second, 0, :block])
    assert abs(float(m.prompt.double().mean()) - p) < 0.02


def test_reference_modulo_block_choice_is_the_documented_non_uniform_rule():
    # 8 blocks, 3 eligible: blocks 0 and 1 are picked with probability 3/8, block 2 with 2/8.
    block, length, n_rows = 2, 16, 8000
    valid = torch.zeros(n_rows, length, dtype=torch.bool)
    valid[:, :6] = True
    c = cfg(kind="blockwise", block_len=block, block_choice="reference_modulo")
    m = sample_masks(c, valid, torch.ones(n_rows, 1, dtype=torch.bool), 1, range(n_rows))
    in_block = m.scored[:, 0, :6].view(n_rows, 3, block).any(-1)
    chosen = torch.where(in_block.all(-1), torch.zeros(n_rows, dtype=torch.long), in_block.float().argmax(-1))
    # the chosen block is the first one with a masked position (later blocks are all masked)
    freq = torch.bincount(chosen, minlength=3).double() / n_rows
    for b, p in enumerate((3 / 8, 3 / 8, 2 / 8)):
        assert abs(float(freq[b]) - p) < 5 * math.sqrt(p * (1 - p) / n_rows), freq


def test_full_kind_masks_the_whole_completion_and_scores_the_valid_part():
    valid = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    m = sample_masks(
        cfg(kind="full", weight="none", prompt_mask_prob=0.5), valid, torch.ones(1, 6, dtype=torch.bool), 3, [1]
    )
    assert bool(m.completion.all()) and torch.equal(m.scored[0], valid.expand(3, -1))
    assert bool((m.weight == 1).all()) and bool((m.t == 1).all())
    assert m.prompt.any() and not m.prompt.all()
