"""Masked log-probabilities, ELBO and mask schedules, checked by exact enumeration (docs/estimators.md)."""

from __future__ import annotations

import math

import pytest
import torch
from exact import (
    MASK,
    VOCAB,
    beta_weight,
    cfg,
    draw,
    exact_elbo,
    exact_logp,
    logf_table,
    logits_fn,
    make_model,
    model_case,
    random_table,
    subset_index,
    subset_masks,
)

from dllm_rl.likelihood import MaskDraw, elbo, mask_seed, masked_logp, sample_masks, token_logprobs
from dllm_rl.positions import position_ids_from_attention_mask

# ------------------------------------------------------------------------------------------- helpers


def library_exact_elbo(table: torch.Tensor) -> float:
    """Exact ELBO via the library's elbo(): every subset S ≠ ∅ as a copy, weight R·B(|S|, L−|S|+1)."""
    length = table.shape[1]
    masks = subset_masks(length)[1:]
    r = masks.shape[0]
    weights = torch.tensor([r * beta_weight(int(m.sum()), length) for m in masks], dtype=torch.float64)
    return float(elbo(table[1:][None], masks[None], weights[None])[0])


# ------------------------------------------------------------------------------------- masked_logp


def test_token_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    out = token_logprobs(logits, targets)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_masked_logp_matches_direct_forward():
    net, prompt, completion = model_case(0, 4, prompt_len=3)
    table = logf_table(logits_fn(net), prompt, torch.ones(3, dtype=torch.long), completion)
    s_masks = subset_masks(4)
    for s in (0b0101, 0b1111, 0b0010):
        masked = s_masks[s]
        x = torch.cat([prompt, torch.where(masked, torch.full_like(completion, MASK), completion)])[None]
        with torch.no_grad():
            logits = net(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, 3:].double()
        ref = torch.log_softmax(logits, -1).gather(-1, completion[:, None])[:, 0]
        assert torch.allclose(table[s][masked], ref[masked], atol=1e-5, rtol=0)
        assert bool((table[s][~masked] == 0).all())
    # f depends on the masked set (otherwise the enumeration tests below would be trivial).
    assert abs(float(table[0b0001, 0] - table[0b1111, 0])) > 1e-2


def test_masked_logp_prompt_masks_and_left_padding():
    net, prompt, completion = model_case(1, 3, prompt_len=3)
    fn = logits_fn(net)
    # Prompt masking: same as running the prompt with those positions replaced by the mask token.
    comp = torch.tensor([[[True, False, True], [False, True, False]]])
    pmask = torch.tensor([[[False, True, False], [True, True, True]]])
    masks = MaskDraw(comp, pmask, torch.ones(1, 2), torch.zeros(1, 2))
    ones = torch.ones(1, 3, dtype=torch.long)
    logp = masked_logp(fn, prompt[None], ones, completion[None], masks, MASK)
    for r in range(2):
        noisy_prompt = torch.where(pmask[0, r], torch.full_like(prompt, MASK), prompt)
        single = masked_logp(fn, noisy_prompt[None], ones, completion[None], draw(comp[:, r : r + 1], 3), MASK)
        assert torch.allclose(logp[0, r], single[0, 0], atol=1e-6, rtol=0)
    no_prompt_mask = masked_logp(fn, prompt[None], ones, completion[None], draw(comp, 3), MASK)
    assert not torch.allclose(no_prompt_mask, logp, atol=1e-3)
    # Left padding (any pad token) with an attention mask gives the unpadded values. RoPE alone is
    # blind to a uniform shift of the positions, so also add a bias per position id to the logits.
    bias = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def fn_pos(x, attn, pos):
        return fn(x, attn, pos) + bias[pos]

    for f in (fn, fn_pos):
        table = logf_table(f, prompt, torch.ones(3, dtype=torch.long), completion)
        for pad in (0, MASK):
            padded = torch.cat([torch.full((2,), pad), prompt])
            attn = torch.tensor([0, 0, 1, 1, 1])
            assert torch.allclose(logf_table(f, padded, attn, completion), table, atol=1e-5, rtol=0)


def test_masked_logp_trims_padding_to_the_batch_and_each_chunk():
    """Leading columns that are padding in every row never reach the model; the values do not change.

    A train micro-batch carries the left padding of the round's longest prompt: here 3 extra all-padding
    columns, and rows whose real prompts are 3, 1 and 2 tokens long (the real tokens right-aligned).
    """
    net = make_model(7)
    fn = logits_fn(net)
    widths: list[int] = []

    def counting(x, attn, pos):
        widths.append(x.shape[1])
        return fn(x, attn, pos)

    g = torch.Generator().manual_seed(3)
    n, r, length, extra = 3, 2, 4, 3
    prompt = torch.randint(0, MASK, (n, 3), generator=g)
    attn = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    prompt = torch.where(attn.bool(), prompt, torch.zeros_like(prompt))  # pad id 0
    completion = torch.randint(0, MASK, (n, length), generator=g)
    comp_mask = torch.rand(n, r, length, generator=g) < 0.5
    comp_mask[:, :, 0] = True
    prompt_mask = (torch.rand(n, r, 3, generator=g) < 0.4) & attn.bool()[:, None]
    masks = MaskDraw(comp_mask, prompt_mask, torch.ones(n, r), torch.full((n, r), 0.5))
    padded_prompt = torch.cat([torch.full((n, extra), MASK), prompt], dim=1)  # any pad id
    padded_attn = torch.cat([torch.zeros(n, extra, dtype=torch.long), attn], dim=1)
    padded_masks = MaskDraw(
        comp_mask, torch.cat([torch.ones(n, r, extra, dtype=torch.bool), prompt_mask], 2), masks.weight, masks.t
    )
    narrow = masked_logp(counting, prompt, attn, completion, masks, MASK)
    assert widths == [3 + length]
    widths.clear()
    wide = masked_logp(counting, padded_prompt, padded_attn, completion, padded_masks, MASK)
    assert widths == [3 + length], "the all-padding columns went through the model"
    assert torch.allclose(wide, narrow, atol=1e-6, rtol=0)
    # The reference: the padded batch as the model saw it before trimming (every column through the model).
    positions = position_ids_from_attention_mask(
        torch.cat([padded_attn, torch.ones_like(completion)], 1).repeat_interleave(r, 0)
    )
    untrimmed = []
    for i in range(n):
        for k in range(r):
            x = torch.cat([padded_prompt[i].masked_fill(padded_masks.prompt[i, k], MASK), completion[i]])
            x = torch.where(torch.cat([torch.zeros(3 + extra, dtype=torch.bool), comp_mask[i, k]]), MASK, x)
            a = torch.cat([padded_attn[i], torch.ones(length, dtype=torch.long)])
            logits = fn(x[None], a[None], positions[i * r + k][None])[0, -length:]
            untrimmed.append(token_logprobs(logits, completion[i]))
    untrimmed = torch.where(comp_mask, torch.stack(untrimmed).view(n, r, length), torch.zeros(()))
    assert torch.allclose(wide, untrimmed, atol=1e-6, rtol=0)
    # Chunks of 2 copies = one sample each: every chunk trims to its own row's prompt (3, 1, 2 tokens).
    widths.clear()
    chunked = masked_logp(counting, padded_prompt, padded_attn, completion, padded_masks, MASK, chunk_rows=2)
    assert widths == [3 + length, 1 + length, 2 + length]
    assert torch.allclose(chunked, narrow, atol=1e-6, rtol=0)
    # Chunks that straddle samples keep the widest of their rows.
    widths.clear()
    straddle = masked_logp(counting, padded_prompt, padded_attn, completion, padded_masks, MASK, chunk_rows=4)
    assert widths == [3 + length, 2 + length]
    assert torch.allclose(straddle, narrow, atol=1e-6, rtol=0)
    # A call with no real prompt token at all keeps its layout.
    widths.clear()
    none = torch.zeros_like(padded_attn)
    masked_logp(counting, padded_prompt, none, completion, padded_masks, MASK)
    assert widths == [3 + extra + length]


# -------------------------------------------------------------------------------- exact enumeration


def test_exact_oracles_on_factorised_denoiser():
    # If f(x_i | z_S) = q_i does not depend on S, then log p = ELBO = Σ log q_i (the B weights of the
    # subsets containing i sum to 1).
    g = torch.Generator().manual_seed(0)
    for length in (1, 2, 3, 4):
        q = torch.rand(length, generator=g, dtype=torch.float64).log()
        masks = subset_masks(length)
        table = torch.where(masks, q.expand_as(masks), torch.zeros(()))
        assert exact_logp(table) == pytest.approx(float(q.sum()), abs=1e-12)
        assert exact_elbo(table) == pytest.approx(float(q.sum()), abs=1e-12)
        assert library_exact_elbo(table) == pytest.approx(float(q.sum()), abs=1e-12)


def test_elbo_below_logp_random_tables():
    g = torch.Generator().manual_seed(1)
    gaps = []
    for case in range(200):
        length = (2, 3, 4)[case % 3]
        table = random_table(length, g)
        lower, logp = exact_elbo(table), exact_logp(table)
        assert library_exact_elbo(table) == pytest.approx(lower, abs=1e-10)
        assert lower <= logp + 1e-9, (case, lower, logp)
        gaps.append(logp - lower)
    assert max(gaps) > 1e-2  # the bound is not trivially tight on these tables


@pytest.mark.parametrize("length", [2, 3, 4])
def test_elbo_below_logp_tiny_network(length):
    for seed in range(4):
        net, prompt, completion = model_case(seed, length)
        table = logf_table(logits_fn(net), prompt, torch.ones(2, dtype=torch.long), completion)
        lower, logp = exact_elbo(table), exact_logp(table)
        assert library_exact_elbo(table) == pytest.approx(lower, abs=1e-9)
        assert lower <= logp + 1e-9, (seed, lower, logp)


# ----------------------------------------------------------------------------------- unbiasedness


@pytest.fixture(scope="module")
def network_table() -> torch.Tensor:
    net, prompt, completion = model_case(7, 4)
    return logf_table(logits_fn(net), prompt, torch.ones(2, dtype=torch.long), completion)


@pytest.mark.parametrize(
    "mode",
    [
        {"count_mode": "exact", "weight": "inv_t_empirical"},
        {"count_mode": "bernoulli", "weight": "inv_t_sampled"},
    ],
    ids=["exact-L_over_n", "bernoulli-inv_t"],
)
def test_mc_elbo_is_unbiased(network_table, mode):
    table, length, n_draws = network_table, 4, 100_000
    masks = sample_masks(
        cfg(**mode),
        torch.ones(1, length, dtype=torch.bool),
        torch.ones(1, 2, dtype=torch.bool),
        n_draws,
        [mask_seed("unbiased", mode["count_mode"])],
    )
    idx = subset_index(masks.completion[0])
    per_copy = masks.weight[0].double() * table.sum(1)[idx]
    assert bool((masks.weight[0][idx == 0] == 0).all())
    mean, se = float(per_copy.mean()), float(per_copy.std() / math.sqrt(n_draws))
    target = exact_elbo(table)
    assert abs(mean - target) < 4 * se, (mean, target, se)
    # Power: the unweighted mean of the same draws is far from the ELBO at this sample size.
    unweighted = float(table.sum(1)[idx].mean())
    assert abs(unweighted - target) > 20 * se


def test_batched_elbo_matches_table_for_same_masks():
    # Two rows with different prompts (one left-padded) and completions, 48 copies each, in one batch.
    length = 4
    net = make_model(3)
    fn = logits_fn(net)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, MASK, (2, 3), generator=g)
    prompts[1, 0] = 0
    attn = torch.tensor([[1, 1, 1], [0, 1, 1]])
    completions = torch.randint(0, MASK, (2, length), generator=g)
    tables = [logf_table(fn, prompts[n], attn[n], completions[n]) for n in range(2)]
    assert not torch.allclose(tables[0], tables[1], atol=1e-3)
    for mode in (
        {"count_mode": "exact", "weight": "inv_t_empirical"},
        {"count_mode": "bernoulli", "weight": "inv_t_sampled"},
    ):
        masks = sample_masks(cfg(**mode), torch.ones(2, length, dtype=torch.bool), attn.bool(), 48, [11, 12])
        logp = masked_logp(fn, prompts, attn, completions, masks, MASK)
        assert logp.shape == (2, 48, length)
        got = elbo(logp, masks.completion, masks.weight)
        assert got.shape == (2,)
        for n in range(2):
            idx = subset_index(masks.completion[n])
            assert torch.allclose(logp[n].double(), tables[n][idx], atol=1e-5, rtol=0)
            expected = float((masks.weight[n].double() * tables[n].sum(1)[idx]).mean())
            assert float(got[n]) == pytest.approx(expected, abs=1e-4)


def test_elbo_formula_and_empty_copies():
    logp = torch.tensor([[[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [-0.5, -0.5, -0.5]]])
    masks = torch.tensor([[[True, True, False], [False, False, False], [True, True, True]]])
    weights = torch.tensor([[3.0, 0.0, 1.0]])
    assert elbo(logp, masks, weights).tolist() == pytest.approx([(3 * -3.0 + 0.0 + 1 * -1.5) / 3])
    # Entries where the mask is 0 are never read as log-probabilities.
    garbage = torch.where(masks, logp, torch.full_like(logp, 1e6))
    assert torch.equal(elbo(garbage, masks, weights), elbo(logp, masks, weights))
