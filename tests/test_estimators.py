"""ELBO, EUBO, mixture, coupled score and one-step estimators against exact enumeration (docs/estimators.md)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from exact import (
    MASK,
    complement_index,
    draw,
    exact_count_law,
    exact_elbo,
    exact_eubo,
    exact_eubo_terms,
    exact_logp,
    logf_table,
    logits_fn,
    make_model,
    model_case,
    random_table,
    subset_beta_weights,
    subset_masks,
    tlc_pair_law,
)

from dllm_rl.likelihood import (
    MaskDraw,
    coupled_score,
    elbo,
    eubo,
    masked_logp,
    mixture,
    one_step_logp,
    sequence_mean,
    sequence_sum,
)
from dllm_rl.models.tiny import TinyMDLMRMSNorm
from dllm_rl.positions import position_ids_from_attention_mask


def eubo_linear(logp, scored, weight, beta, lengths):
    """The EUBO as SPG's reference computes it, in linear space: p^β, mean over copies, then log."""
    contributes = scored & (weight > 0).unsqueeze(2)
    terms = torch.where(contributes, weight.unsqueeze(2) * torch.exp(logp) ** beta, torch.zeros_like(logp))
    covered = contributes.any(dim=1)
    per_position = torch.where(covered, torch.log(terms.mean(dim=1)) / beta, torch.zeros_like(logp[:, 0]))
    return lengths * per_position.sum(dim=1) / covered.sum(dim=1).clamp_min(1)


def exact_count_outcomes(length: int):
    """Every outcome of the exact-count schedule, enumerated from its definition (n ~ U{1..L}, subset
    uniform among those of size n): a list of (probability, mask [L] bool, weight L/n)."""
    out = []
    for n in range(1, length + 1):
        for chosen in itertools.combinations(range(length), n):
            mask = torch.zeros(length, dtype=torch.bool)
            mask[list(chosen)] = True
            out.append((1.0 / (length * math.comb(length, n)), mask, length / n))
    return out


@pytest.fixture(scope="module")
def table4() -> torch.Tensor:
    net, prompt, completion = model_case(7, 4)
    return logf_table(logits_fn(net), prompt, torch.ones(2, dtype=torch.long), completion)


# --------------------------------------------------------------------------------- formulas, edges


def test_eubo_formula_on_a_hand_example():
    logp = torch.tensor([[[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-9.0, -9.0, -9.0]]], dtype=torch.float64)
    scored = torch.tensor([[[True, True, False], [True, False, False], [True, True, True]]])
    weight = torch.tensor([[2.0, 4.0, 0.0]], dtype=torch.float64)  # the third copy has weight 0: ignored
    beta, r = 2.0, 3
    log_p0 = math.log((2 * math.exp(-2.0) + 4 * math.exp(-1.0)) / r)
    log_p1 = math.log(2 * math.exp(-4.0) / r)
    total = (log_p0 + log_p1) / beta  # position 2 is scored only by the weight-0 copy, so it is not in U
    lengths = torch.tensor([5.0], dtype=torch.float64)
    # L_x = 5 terms: the two covered ones, and three uncovered ones that each take their mean.
    assert float(eubo(logp, scored, weight, beta, lengths)[0]) == pytest.approx(total + 3 * total / 2, abs=1e-12)
    nothing = torch.zeros_like(scored)
    assert eubo(logp, nothing, weight, beta, lengths).tolist() == [0.0]
    with pytest.raises(ValueError):
        eubo(logp, scored, weight, 0.0, lengths)


def test_estimators_never_read_unscored_entries():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(2, 4, 5, generator=g, dtype=torch.float64) * 3
    scored = torch.rand(2, 4, 5, generator=g) < 0.5
    scored[0, 1] = False  # an empty copy with an infinite weight scores 0, as 0·(1/0) := 0
    weight = 1 + torch.rand(2, 4, generator=g, dtype=torch.float64)
    weight[0, 1] = math.inf
    lengths = torch.tensor([5.0, 4.0], dtype=torch.float64)
    for garbage in (math.inf, -math.inf, math.nan, 1e6):
        dirty = torch.where(scored, logp, torch.full_like(logp, garbage)).requires_grad_()
        values = [
            elbo(dirty, scored, weight),
            eubo(dirty, scored, weight, 1.5, lengths),
            coupled_score(dirty, scored, weight).sum(1),
        ]
        clean = [
            elbo(logp, scored, weight),
            eubo(logp, scored, weight, 1.5, lengths),
            coupled_score(logp, scored, weight).sum(1),
        ]
        for got, ref in zip(values, clean, strict=True):
            assert torch.equal(got, ref)
            (grad,) = torch.autograd.grad(got.sum(), dirty)
            assert bool(torch.isfinite(grad).all()) and bool((grad[~scored] == 0).all())


def test_coupled_score_formula_and_odd_copies():
    logp = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]])
    scored = torch.tensor([[[True, False, False], [False, True, True], [True, True, True], [False, False, False]]])
    weight = torch.tensor([[3.0, 1.5, 1.0, math.inf]])  # the last copy is the empty complement of a full mask
    got = coupled_score(logp, scored, weight)
    assert got.shape == (1, 2)
    assert got[0].tolist() == pytest.approx([0.5 * (3 * -1.0 + 1.5 * -5.0), 0.5 * -3.0])
    assert coupled_score(logp, scored, torch.ones(1, 4))[0].tolist() == pytest.approx([-3.0, -1.5])  # plain GDSD
    with pytest.raises(ValueError, match="odd"):
        coupled_score(logp[:, :3], scored[:, :3], weight[:, :3])


def test_mixture_and_sequence_reductions():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 5.0])
    assert mixture(a, b, 0.25).tolist() == pytest.approx([0.25 * 1 + 0.75 * 3, 0.25 * -2 + 0.75 * 5])
    assert torch.equal(mixture(a, b, 1.0), a) and torch.equal(mixture(a, b, 0.0), b)
    per_token = torch.tensor([[-1.0, -2.0, math.nan], [-4.0, math.inf, -6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert sequence_sum(per_token, mask).tolist() == [-3.0, 0.0]
    assert sequence_mean(per_token, mask).tolist() == [-1.5, 0.0]
    assert sequence_sum(per_token, mask.long()).tolist() == [-3.0, 0.0]


# -------------------------------------------------------------------------- log space vs linear space


def test_eubo_log_space_matches_linear_space():
    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        logp = (-torch.rand(6, 3, 7, generator=g, dtype=torch.float64) * 4).to(dtype)
        scored = torch.rand(6, 3, 7, generator=g) < 0.4
        scored[0] = False
        weight = (1 + 3 * torch.rand(6, 3, generator=g, dtype=torch.float64)).to(dtype)
        weight[1, 0] = 0.0
        lengths = torch.randint(1, 8, (6,), generator=g).to(dtype)
        for beta in (1.0, 1.5, 2.0, 7.0):
            got = eubo(logp, scored, weight, beta, lengths)
            ref = eubo_linear(logp, scored, weight, beta, lengths)
            assert got.dtype == dtype and got[0] == 0
            torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eubo_stays_finite_where_linear_space_underflows(dtype):
    # β·log p = −2e4: p^β is 0 even in float64, so the linear form takes log 0.
    logp = torch.full((1, 2, 3), -1e4, dtype=dtype)
    logp[0, 1, 0] = -1e4 + 3.0
    scored = torch.tensor([[[True, True, False], [True, False, False]]])
    weight = torch.tensor([[2.0, 4.0]], dtype=dtype)
    beta, lengths = 2.0, torch.tensor([2.0], dtype=dtype)  # L_x = |U| = 2: the plain sum of the two terms
    assert not bool(torch.isfinite(eubo_linear(logp, scored, weight, beta, lengths)).all())
    logp.requires_grad_()
    got = eubo(logp, scored, weight, beta, lengths)
    # Position 0: (1/β)·(logsumexp_r(β·logp_r + log w_r) − log R); position 1: one copy; position 2: none.
    a, b = beta * -1e4 + math.log(2.0), beta * (-1e4 + 3.0) + math.log(4.0)
    pos0 = (b + math.log1p(math.exp(a - b)) - math.log(2)) / beta
    pos1 = -1e4 + (math.log(2.0) - math.log(2)) / beta
    assert float(got.detach()[0]) == pytest.approx(pos0 + pos1, rel=1e-7)
    (grad,) = torch.autograd.grad(got.sum(), logp)
    assert bool(torch.isfinite(grad).all())
    # d/dlogp_r of (1/β)·logsumexp(β·logp + log w) is the softmax weight of copy r; 1 for a lone copy.
    share = 1 / (1 + math.exp(a - b))
    expected = torch.tensor([[[1 - share, 1.0, 0.0], [share, 0.0, 0.0]]], dtype=dtype)
    # float32 resolves 2e4 only to ~2e-3, and the shares inherit that error.
    torch.testing.assert_close(grad, expected, atol=1e-12 if dtype == torch.float64 else 5e-3, rtol=0)


# ------------------------------------------------------------------------------- exact enumeration


def test_exact_eubo_on_factorised_denoiser():
    # f(x_i | z_S) = q_i for every S: the B weights of the sets containing i sum to 1, so EUBO_β = log p.
    g = torch.Generator().manual_seed(2)
    for length in (1, 2, 3, 4):
        q = torch.rand(length, generator=g, dtype=torch.float64).log()
        masks = subset_masks(length)
        table = torch.where(masks, q.expand_as(masks), torch.zeros(()))
        for beta in (0.5, 1.0, 3.0):
            assert exact_eubo(table, beta) == pytest.approx(float(q.sum()), abs=1e-12)


def test_library_eubo_with_every_subset_as_a_copy_is_exact():
    # With every S ≠ ∅ as a copy of weight R·B(|S|, L−|S|+1), P̄_i is the exact inner expectation of eq. 7.
    g = torch.Generator().manual_seed(3)
    for case in range(12):
        length = (2, 3, 4)[case % 3]
        table = random_table(length, g)
        masks = subset_masks(length)[1:]
        weight = masks.shape[0] * subset_beta_weights(length)[1:]
        lengths = torch.tensor([float(length)], dtype=torch.float64)
        for beta in (1.0, 2.5):
            exact = exact_eubo(table, beta)
            got = eubo(table[1:][None], masks[None], weight[None], beta, lengths)
            assert float(got[0]) == pytest.approx(exact, abs=1e-10)


def test_bounds_on_random_tables():
    g = torch.Generator().manual_seed(4)
    upper_gaps = []
    for case in range(240):
        length = (2, 3, 4)[case % 3]
        table = random_table(length, g)
        lower, logp = exact_elbo(table), exact_logp(table)
        assert lower <= logp + 1e-9, (case, lower, logp)
        for beta in (length, length + 1):  # the C(T) = 0 regime of SPG's Theorem 1
            upper = exact_eubo(table, beta)
            assert logp <= upper + 1e-9, (case, beta, logp, upper)
            upper_gaps.append(upper - logp)
    assert max(upper_gaps) > 1e-2  # not trivially tight


@pytest.mark.parametrize("length", [2, 3, 4])
def test_bounds_on_tiny_networks(length):
    for seed in range(4):
        net, prompt, completion = model_case(seed, length)
        table = logf_table(logits_fn(net), prompt, torch.ones(2, dtype=torch.long), completion)
        lower, logp = exact_elbo(table), exact_logp(table)
        assert lower <= logp + 1e-9, (seed, lower, logp)
        for beta in (length, length + 1):
            assert logp <= exact_eubo(table, beta) + 1e-9, (seed, beta)


# --------------------------------------------------------------------- EUBO under a mask schedule


def test_eubo_inner_expectation_of_exact_count_schedule(table4):
    # E[w·1(i∈S)·f(x_i|z_S)^β] over n ~ U{1..L}, S uniform of size n, w = L/n, is eq. 7's inner sum.
    length = 4
    outcomes = exact_count_outcomes(length)
    assert sum(p for p, _, _ in outcomes) == pytest.approx(1.0, abs=1e-15)
    masks = subset_masks(length)
    for beta in (1.0, 1.5, 2.0, 5.0):
        expectation = torch.zeros(length, dtype=torch.float64)
        for p, mask, w in outcomes:
            row = table4[int((mask.long() << torch.arange(length)).sum())]
            expectation += p * w * torch.where(mask, torch.exp(beta * row), torch.zeros(()))
        exact = torch.stack(
            [(subset_beta_weights(length) * masks[:, i] * torch.exp(beta * table4[:, i])).sum() for i in range(length)]
        )
        torch.testing.assert_close(expectation, exact, atol=0, rtol=1e-12)
        torch.testing.assert_close(expectation.log(), exact_eubo_terms(table4, beta), atol=1e-12, rtol=0)


def test_eubo_inner_expectation_monte_carlo(table4):
    length, n_draws, beta = 4, 100_000, 1.5
    g = torch.Generator().manual_seed(5)
    counts = torch.randint(1, length + 1, (n_draws,), generator=g)
    rank = torch.rand(n_draws, length, generator=g).argsort(1).argsort(1)
    masks = rank < counts[:, None]  # the `counts` lowest-ranked positions: a uniform subset of that size
    index = (masks.long() << torch.arange(length)).sum(1)
    values = (length / counts)[:, None] * torch.where(masks, torch.exp(beta * table4[index]), torch.zeros(()))
    mean, se = values.mean(0), values.std(0) / math.sqrt(n_draws)
    exact = exact_eubo_terms(table4, beta).exp()
    assert bool(((mean - exact).abs() < 4 * se).all()), (mean, exact, se)
    # Power: dropping the weight moves the mean far outside that band.
    unweighted = torch.where(masks, torch.exp(beta * table4[index]), torch.zeros(())).mean(0)
    assert bool(((unweighted - exact).abs() > 20 * se).all())


def _lengths(rows: int, length: int) -> torch.Tensor:
    return torch.full((rows,), float(length), dtype=torch.float64)


def _pair_copies(base: torch.Tensor, length: int):
    """Copies (S_k, S_k^c) for base subset indices [K, m]: logp index, weights with 0 for empty sets."""
    prob, w_base, w_comp = tlc_pair_law(length)
    w_base, w_comp = (torch.nan_to_num(w, posinf=0.0) for w in (w_base, w_comp))
    k, m = base.shape
    index = torch.stack([base, complement_index(length)[base]], dim=2).reshape(k, 2 * m)
    weight = torch.stack([w_base[base], w_comp[base]], dim=2).reshape(k, 2 * m)
    return index, weight, prob


def test_eubo_mc_is_jensen_below_eq7_and_tightens_with_more_copies(table4):
    # Complement pairs with TLC weights score every position in every draw, so P̄_i > 0 always and
    # E[log P̄_i] ≤ log E[P̄_i] is plain Jensen. (With independent copies a position may go unscored and
    # is then dropped from U; see the next test.)
    length, beta = 4, 1.5
    masks = subset_masks(length)
    exact = exact_eubo(table4, beta)

    def values(base):
        index, weight, _ = _pair_copies(base, length)
        return eubo(table4[index], masks[index], weight, beta, _lengths(base.shape[0], length))

    prob = tlc_pair_law(length)[0]
    gaps = []
    one = torch.arange(2**length)[:, None]
    gaps.append((exact - float((prob * values(one)).sum()), 0.0))
    two = torch.cartesian_prod(torch.arange(2**length), torch.arange(2**length))
    gaps.append((exact - float((prob[two[:, 0]] * prob[two[:, 1]] * values(two)).sum()), 0.0))
    g = torch.Generator().manual_seed(6)
    for m in (8, 32):
        base = torch.multinomial(prob, 20_000 * m, replacement=True, generator=g).reshape(20_000, m)
        v = values(base)
        gaps.append((exact - float(v.mean()), float(v.std()) / math.sqrt(v.numel())))
    for gap, se in gaps:
        assert gap > -4 * se, gaps
    assert gaps[0][0] > gaps[1][0] > gaps[2][0] + 4 * gaps[2][1]
    assert gaps[2][0] - gaps[3][0] > 4 * math.hypot(gaps[2][1], gaps[3][1]), gaps
    assert gaps[3][0] < gaps[0][0] / 8, gaps


def test_eubo_mc_with_independent_copies_converges(table4):
    # Independent exact-count copies: with one or two copies the few covered positions carry large
    # weights L/n and the estimate sits above eq. 7; from m = 8 on the log of the average pulls it below
    # (Jensen), and it converges as m grows.
    length, beta = 4, 1.5
    masks = subset_masks(length)
    prob, weight = exact_count_law(length)
    exact = exact_eubo(table4, beta)

    def values(index):
        return eubo(table4[index], masks[index], weight[index], beta, _lengths(index.shape[0], length))

    one = torch.arange(2**length)[:, None]
    gap1 = exact - float((prob * values(one)).sum())
    two = torch.cartesian_prod(torch.arange(2**length), torch.arange(2**length))
    gap2 = exact - float((prob[two[:, 0]] * prob[two[:, 1]] * values(two)).sum())
    g = torch.Generator().manual_seed(7)
    sampled = []
    for m in (8, 32):
        v = values(torch.multinomial(prob, 20_000 * m, replacement=True, generator=g).reshape(20_000, m))
        sampled.append((exact - float(v.mean()), float(v.std()) / math.sqrt(v.numel())))
    (gap8, se8), (gap32, se32) = sampled
    assert gap1 < gap2 < 0 < gap8 - 4 * se8, (gap1, gap2, gap8, se8)
    assert 0 < gap32 - 4 * se32 and gap32 + 4 * se32 < gap8 / 3, (gap8, gap32, se32)


# ------------------------------------------------------------------------------ coupled ELBO


def test_coupled_score_bernoulli_pairs_are_unbiased(table4):
    # t ~ U(0,1), S ~ Bernoulli(t) per position, paired with S^c; weights 1/t and 1/(1−t).
    length, n_pairs = 4, 100_000
    g = torch.Generator().manual_seed(8)
    t = torch.rand(n_pairs, generator=g, dtype=torch.float64)
    base = torch.rand(n_pairs, length, generator=g, dtype=torch.float64) < t[:, None]
    masks = torch.stack([base, ~base], dim=1)  # [K, 2, L]
    index = (masks.long() << torch.arange(length)).sum(2)
    weight = torch.stack([1 / t, 1 / (1 - t)], dim=1)
    per_pair = coupled_score(
        table4[index].reshape(1, 2 * n_pairs, length), masks.reshape(1, -1, length), weight.reshape(1, -1)
    )[0]
    target = exact_elbo(table4)
    mean, se = float(per_pair.mean()), float(per_pair.std()) / math.sqrt(n_pairs)
    assert abs(mean - target) < 4 * se, (mean, target, se)
    plain = coupled_score(
        table4[index].reshape(1, -1, length), masks.reshape(1, -1, length), torch.ones(1, 2 * n_pairs)
    )
    assert abs(float(plain.mean()) - target) > 20 * se  # power: the unweighted score is another quantity


def test_coupled_score_tlc_weights_are_exactly_the_elbo():
    # n ~ U{0..L}, S uniform of size n, weights (L+1)/n and (L+1)/(L−n): E = exact ELBO, empty sets
    # (n = 0 or n = L) included with infinite or zero weight alike.
    g = torch.Generator().manual_seed(9)
    for case in range(9):
        length = (2, 3, 4)[case % 3]
        table = random_table(length, g)
        masks = subset_masks(length)
        prob, w_base, w_comp = tlc_pair_law(length)
        assert float(prob.sum()) == pytest.approx(1.0, abs=1e-15)
        comp = complement_index(length)
        index = torch.stack([torch.arange(2**length), comp], dim=1).reshape(1, -1)
        for weight in (torch.stack([w_base, w_comp], 1), torch.nan_to_num(torch.stack([w_base, w_comp], 1), posinf=0)):
            per_pair = coupled_score(table[index], masks[index], weight.reshape(1, -1))[0]
            assert bool(torch.isfinite(per_pair).all())
            assert float((prob * per_pair).sum()) == pytest.approx(exact_elbo(table), abs=1e-12)


# ------------------------------------------------------------------------------------- gradients


GRAD_LENGTH = 3


def _enumerated_expectations(table: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each surrogate's exact expectation over its schedule, as a differentiable function of the table."""
    length = GRAD_LENGTH
    masks = subset_masks(length)
    prob, weight = exact_count_law(length)
    one = torch.arange(1, 2**length)[:, None]
    two = torch.cartesian_prod(one[:, 0], one[:, 0])
    p_two = prob[two[:, 0]] * prob[two[:, 1]]
    out = {
        "elbo": (prob[one[:, 0]] * elbo(table[one], masks[one], weight[one])).sum(),
        # (One copy would add nothing: EUBO is then linear in log f and its gradient is the ELBO's.)
        "eubo_m2": (p_two * eubo(table[two], masks[two], weight[two], 1.5, _lengths(two.shape[0], length))).sum(),
    }
    index, pair_weight, pair_prob = _pair_copies(torch.arange(2**length)[:, None], length)
    out["coupled_tlc"] = (pair_prob * coupled_score(table[index], masks[index], pair_weight)[:, 0]).sum()
    return out


def _rms_norm_in_float64(self, x: torch.Tensor) -> torch.Tensor:
    # The tiny model normalises in float32 even for float64 inputs, which leaves ~1e-7 relative noise:
    # enough to swamp a central difference with h = 1e-5. Same formula, kept in float64.
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def test_gradients_of_enumerated_expectations_match_finite_differences(monkeypatch):
    monkeypatch.setattr(TinyMDLMRMSNorm, "forward", _rms_norm_in_float64)
    net, prompt, completion = model_case(11, GRAD_LENGTH)
    fn = logits_fn(net, grad=True)
    attn = torch.ones(2, dtype=torch.long)
    probe = [
        (net.model.embed_tokens.weight, (int(completion[0]), 3)),
        (net.model.layers[0].self_attn.q_proj.weight, (1, 5)),
        (net.model.layers[1].mlp.down_proj.weight, (7, 30)),
        (net.lm_head.weight, (0, 9)),
    ]
    table = logf_table(fn, prompt, attn, completion, check=False)
    expectations = _enumerated_expectations(table)
    # The enumerated ELBO is the exact ELBO (and so carries its gradient).
    assert float(expectations["elbo"].detach()) == pytest.approx(exact_elbo(table.detach()), abs=1e-12)
    assert float(expectations["coupled_tlc"].detach()) == pytest.approx(exact_elbo(table.detach()), abs=1e-12)
    params = [p for p, _ in probe]
    autograd = {name: torch.autograd.grad(value, params, retain_graph=True) for name, value in expectations.items()}
    for name, grads in autograd.items():  # every probe moves every value, so no comparison below is 0 = 0
        assert all(abs(float(g[at])) > 1e-4 for g, (_, at) in zip(grads, probe, strict=True)), name

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            table = logf_table(fn, prompt, attn, completion, check=False)
            return {name: float(value) for name, value in _enumerated_expectations(table).items()}

    h = 1e-5
    for k, (param, at) in enumerate(probe):
        saved = float(param.detach()[at])
        with torch.no_grad():
            param[at] = saved + h
        up = evaluate()
        with torch.no_grad():
            param[at] = saved - h
        down = evaluate()
        with torch.no_grad():
            param[at] = saved
        for name, grads in autograd.items():
            fd = (up[name] - down[name]) / (2 * h)
            assert float(grads[k][at]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, at, float(grads[k][at]), fd)


# ------------------------------------------------------------------------- forwards: chunks, one step


def _two_rows(length: int = 4):
    net = make_model(3)
    g = torch.Generator().manual_seed(12)
    prompts = torch.randint(0, MASK, (2, 3), generator=g)
    attn = torch.tensor([[1, 1, 1], [0, 1, 1]])  # the second row is left-padded
    completions = torch.randint(0, MASK, (2, length), generator=g)
    return net, prompts, attn, completions


def test_masked_logp_chunks_match_one_forward():
    net, prompts, attn, completions = _two_rows()
    g = torch.Generator().manual_seed(13)
    comp = torch.rand(2, 3, 4, generator=g) < 0.5
    comp[:, :, 0] = True
    masks = MaskDraw(comp, torch.rand(2, 3, 3, generator=g) < 0.3, torch.ones(2, 3), torch.zeros(2, 3))
    calls = []
    fn = logits_fn(net, grad=True)

    def counting(x, a, p):
        calls.append(x.shape[0])
        return fn(x, a, p)

    whole = masked_logp(counting, prompts, attn, completions, masks, MASK)
    (grad_whole,) = torch.autograd.grad(whole.sum(), net.lm_head.weight)
    assert calls == [6]
    for chunk, sizes in ((1, [1] * 6), (3, [3, 3]), (4, [4, 2]), (100, [6])):
        calls.clear()
        got = masked_logp(counting, prompts, attn, completions, masks, MASK, chunk_rows=chunk)
        assert calls == sizes
        torch.testing.assert_close(got, whole, atol=1e-12, rtol=0)
        (grad,) = torch.autograd.grad(got.sum(), net.lm_head.weight)
        torch.testing.assert_close(grad, grad_whole, atol=1e-12, rtol=1e-10)


def test_one_step_logp_matches_direct_forward():
    net, prompts, attn, completions = _two_rows()
    prompt_mask = torch.tensor([[False, True, False], [False, False, True]])
    got = one_step_logp(logits_fn(net), prompts, attn, completions, prompt_mask, MASK)
    assert got.shape == (2, 4)
    noisy_prompt = torch.where(prompt_mask, torch.full_like(prompts, MASK), prompts)
    x = torch.cat([noisy_prompt, torch.full_like(completions, MASK)], dim=1)
    full_attn = torch.cat([attn, torch.ones_like(completions)], dim=1)
    with torch.no_grad():
        logits = net(input_ids=x, attention_mask=full_attn, position_ids=position_ids_from_attention_mask(full_attn))
    ref = torch.log_softmax(logits.logits[:, 3:].double(), -1).gather(-1, completions[..., None])[..., 0]
    torch.testing.assert_close(got.double(), ref, atol=1e-10, rtol=0)
    # The prompt mask is applied: without it the values change.
    plain = one_step_logp(logits_fn(net), prompts, attn, completions, torch.zeros_like(prompt_mask), MASK)
    assert not torch.allclose(plain, got, atol=1e-4)
    # Same as masked_logp with one fully masked copy.
    copy = draw(torch.ones(2, 1, 4, dtype=torch.bool), 3)
    copy.prompt = prompt_mask[:, None]
    torch.testing.assert_close(got, masked_logp(logits_fn(net), prompts, attn, completions, copy, MASK)[:, 0])
