"""LLaDA low-confidence sampler (docs/samplers.md): shapes, commit schedule, blocks, determinism, padding,
confidence ordering and Gumbel-max sampling."""

from __future__ import annotations

import math

import pytest
import torch

from dllm_rl.errors import ConfigError
from dllm_rl.models.tiny import TinyMDLM, TinyMDLMConfig
from dllm_rl.positions import position_ids_from_attention_mask
from dllm_rl.samplers import SAMPLERS, get_sampler
from dllm_rl.samplers.low_confidence import LowConfidenceSampler, commit_counts

VOCAB, MASK = 12, 11


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model() -> TinyMDLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = TinyMDLM(TinyMDLMConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, mask_token_id=MASK))
    # Default init gives near-uniform logits (confidences all ~1/V, ties up to rounding); scale the weights
    # so that outputs are strongly input dependent and confidence gaps are far above float noise.
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    return net.eval()


def net_fn(net: TinyMDLM, suppress_mask: bool = True):
    """logits_fn of the network; by default the mask token gets logit −∞ (trained models never propose it)."""

    def fn(x: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = net(input_ids=x, attention_mask=attn, position_ids=pos).logits
        if suppress_mask:
            logits = logits.clone()
            logits[..., MASK] = -math.inf
        return logits

    return fn


def fixed_fn(logits: torch.Tensor):
    """logits_fn returning fixed logits for any input: [V] at every position, or [L, V] on the last L."""

    def fn(x: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        batch, total = x.shape
        out = torch.zeros(batch, total, logits.shape[-1], dtype=torch.float32)
        out[:, total - (logits.shape[0] if logits.dim() == 2 else total) :] = logits
        return out

    return fn


class Recorder:
    """Wraps a logits_fn and keeps a copy of every input it is called with."""

    def __init__(self, fn):
        self.fn = fn
        self.inputs: list[torch.Tensor] = []
        self.attn: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []

    def __call__(self, x, attn, pos):
        self.inputs.append(x.clone())
        self.attn.append(attn.clone())
        self.pos.append(pos.clone())
        return self.fn(x, attn, pos)


def prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MASK, (batch, length), generator=g)


def run(sampler, fn, prompt, attn=None, **kw):
    attn = torch.ones_like(prompt) if attn is None else attn
    return sampler.generate(fn, prompt, attn, MASK, **kw)


def commit_steps(states: list[torch.Tensor], prompt_len: int) -> torch.Tensor:
    """[B, L] index of the call after which each completion position first became non-mask."""
    comp = torch.stack([s[:, prompt_len:] for s in states])  # [C+1, B, L]
    unmasked = comp != MASK
    assert not unmasked[0].any()
    return (~unmasked).sum(dim=0) - 1  # number of states in which it was still masked, minus the first


# ----------------------------------------------------------------------------------- commit_counts


def test_commit_counts_formula():
    for k in range(0, 10):
        for s in range(1, 6):
            masked = torch.zeros(1, 10, dtype=torch.bool)
            masked[0, :k] = True
            counts = commit_counts(masked, s)[0]
            expected = [k // s + (1 if j < k % s else 0) for j in range(s)]
            assert counts.tolist() == expected
            assert int(counts.sum()) == k
    # Per row, and independent of where the masks are.
    masked = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert commit_counts(masked, 3).tolist() == [[2, 1, 1], [1, 1, 0], [0, 0, 0]]


def test_position_ids_from_attention_mask():
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_attention_mask(attn).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# ------------------------------------------------------------------------------------- construction


def test_constructor_validation():
    with pytest.raises(ValueError, match="multiple of block_length"):
        LowConfidenceSampler(gen_length=10, block_length=4, steps=4)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        LowConfidenceSampler(gen_length=8, block_length=4, steps=3)
    with pytest.raises(ValueError, match="remasking"):
        LowConfidenceSampler(gen_length=8, block_length=4, steps=4, remasking="confident")
    LowConfidenceSampler(gen_length=8, block_length=4, steps=2)  # one step per block is fine
    LowConfidenceSampler(gen_length=8, block_length=8, steps=3)  # one block: any step count


def test_registry_builds_sampler():
    assert SAMPLERS["low_confidence"] is LowConfidenceSampler
    cfg = {
        "name": "low_confidence",
        "gen_length": 8,
        "block_length": 4,
        "steps": 4,
        "temperature": 0.5,
        "remasking": "random",
        "noise_dtype": "float32",
    }
    s = get_sampler(cfg)
    assert isinstance(s, LowConfidenceSampler)
    assert (s.gen_length, s.block_length, s.steps, s.temperature, s.remasking) == (8, 4, 4, 0.5, "random")
    assert s.noise_dtype is torch.float32
    with pytest.raises(ConfigError, match="unknown"):
        get_sampler({"name": "nope"})


# ----------------------------------------------------------------------------------- basic contract


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("gen_length,block_length,steps", [(8, 4, 4), (8, 4, 8), (6, 6, 2), (8, 2, 8)])
def test_output_shape_no_mask_and_nfe(model, temperature, remasking, gen_length, block_length, steps):
    sampler = LowConfidenceSampler(gen_length, block_length, steps, temperature=temperature, remasking=remasking)
    rec = Recorder(net_fn(model))
    prompt = prompts(5, 3)
    out = run(sampler, rec, prompt, generator=torch.Generator().manual_seed(1))
    assert out.completion_ids.shape == (5, gen_length)
    assert out.completion_ids.dtype == prompt.dtype
    assert not (out.completion_ids == MASK).any()
    assert out.nfe == steps == len(rec.inputs)
    # Every call sees the full sequence: prompt unchanged, all-ones attention, positions 0..P+L−1.
    for x, attn, pos in zip(rec.inputs, rec.attn, rec.pos, strict=True):
        assert x.shape == (5, 3 + gen_length)
        assert torch.equal(x[:, :3], prompt)
        assert bool((attn == 1).all())
        assert torch.equal(pos, torch.arange(3 + gen_length).expand(5, -1))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_committed_tokens_never_change(model, temperature, remasking):
    sampler = LowConfidenceSampler(12, 4, 6, temperature=temperature, remasking=remasking)
    rec = Recorder(net_fn(model))
    prompt = prompts(6, 4, seed=3)
    out = run(sampler, rec, prompt, generator=torch.Generator().manual_seed(2))
    states = [x[:, 4:] for x in rec.inputs] + [out.completion_ids]
    assert (states[0] == MASK).all()
    for before, after in zip(states[:-1], states[1:], strict=True):
        committed = before != MASK
        assert torch.equal(after[committed], before[committed])
        # Progress: every step commits at least one token per row here (2 tokens per block step).
        assert ((after != MASK).sum(1) > committed.sum(1)).all()


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_only_current_block_and_commit_counts(model, remasking):
    # 2 blocks of 4, 3 steps per block: commit counts 2, 1, 1 in each block.
    length, block, steps, plen = 8, 4, 6, 3
    sampler = LowConfidenceSampler(length, block, steps, temperature=1.0, remasking=remasking)
    rec = Recorder(net_fn(model))
    out = run(sampler, rec, prompts(7, plen, seed=4), generator=torch.Generator().manual_seed(5))
    per_block = steps // (length // block)
    expected = commit_counts(torch.ones(1, block, dtype=torch.bool), per_block)[0].tolist()
    assert expected == [2, 1, 1]
    states = [x[:, plen:] for x in rec.inputs] + [out.completion_ids]
    for call in range(steps):
        b, j = divmod(call, per_block)
        lo, hi = b * block, (b + 1) * block
        state, nxt = states[call], states[call + 1]
        assert (state[:, hi:] == MASK).all(), "later blocks must still be fully masked"
        assert (state[:, :lo] != MASK).all(), "earlier blocks must be complete"
        assert ((state[:, lo:hi] != MASK).sum(1) == sum(expected[:j])).all()
        new = (state == MASK) & (nxt != MASK)
        assert not new[:, :lo].any() and not new[:, hi:].any(), "only the current block is committed"
        assert (new[:, lo:hi].sum(1) == expected[j]).all()


def test_uneven_commit_counts_follow_schedule(model):
    # 5 tokens in 3 steps: 2, 2, 1.
    sampler = LowConfidenceSampler(5, 5, 3, temperature=0.0)
    rec = Recorder(net_fn(model))
    out = run(sampler, rec, prompts(4, 2, seed=6))
    states = [x[:, 2:] for x in rec.inputs] + [out.completion_ids]
    committed = [int((s != MASK).sum(1).unique().item()) for s in states]
    assert committed == [0, 2, 4, 5]


# ------------------------------------------------------------------------------------- randomness


def test_greedy_is_deterministic_and_does_not_consume_generator(model):
    sampler = LowConfidenceSampler(8, 4, 8, temperature=0.0)
    prompt = prompts(6, 3, seed=7)
    g = torch.Generator().manual_seed(123)
    state = g.get_state().clone()
    a = run(sampler, net_fn(model), prompt, generator=g).completion_ids
    assert torch.equal(g.get_state(), state), "greedy low_confidence decoding must not draw random numbers"
    b = run(sampler, net_fn(model), prompt, generator=None).completion_ids
    assert torch.equal(a, b)
    # temperature=0 passed to generate() overrides a sampling sampler.
    hot = LowConfidenceSampler(8, 4, 8, temperature=1.0)
    c = run(hot, net_fn(model), prompt, generator=g, temperature=0.0).completion_ids
    assert torch.equal(a, c)
    assert torch.equal(g.get_state(), state)
    # ... and sampling differs from greedy on this batch.
    d = run(hot, net_fn(model), prompt, generator=torch.Generator().manual_seed(0)).completion_ids
    assert not torch.equal(a, d)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_sampling_reproducible_from_generator(model, remasking):
    sampler = LowConfidenceSampler(8, 4, 4, temperature=1.0, remasking=remasking)
    prompt = prompts(16, 3, seed=8)

    def sample(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return run(sampler, net_fn(model), prompt, generator=g).completion_ids

    a, b, c = sample(11), sample(11), sample(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # 16 rows x 8 tokens: the two seeds disagree in many places, not just one.
    assert (a != c).sum() > 10
    # Explicit generators only: the global RNG neither drives nor is touched by the sampler.
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    sample(11)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_random_remasking_consumes_generator_even_when_greedy(model):
    # Random remasking at τ = 0: proposals are argmax, but the commit order is random.
    sampler = LowConfidenceSampler(8, 8, 8, temperature=0.0, remasking="random")
    prompt = prompts(16, 3, seed=9)
    orders = []
    for seed in (1, 2):
        rec = Recorder(net_fn(model))
        out = run(sampler, rec, prompt, generator=torch.Generator().manual_seed(seed))
        orders.append(commit_steps(rec.inputs + [torch.cat([prompt, out.completion_ids], 1)], 3))
    for order in orders:  # one token per step: each row's commit steps are a permutation of 0..7
        assert torch.equal(order.sort(1).values, torch.arange(8).expand(16, -1))
    assert not torch.equal(orders[0], orders[1])


# ---------------------------------------------------------------------------------- confidence order


def peaked_logits(tokens: list[int], peaks: list[float], floors: list[float]) -> torch.Tensor:
    """[L, V]: position i has logit peaks[i] on tokens[i] and floors[i] elsewhere (mask token −∞)."""
    out = torch.tensor(floors, dtype=torch.float32).unsqueeze(1).repeat(1, VOCAB)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = torch.tensor(peaks)
    out[:, MASK] = -math.inf
    return out


def test_greedy_commits_highest_confidence_first_ties_left_to_right():
    # Confidences: pos0 e^1, pos1 e^3, pos2 e^2, pos3 e^3 (same row as pos1, an exact tie), pos4 e^0.5
    # over the same floor, so the greedy order is 1, 3 (tie: left first), 2, 0, 4.
    tokens = [3, 7, 1, 7, 9]
    logits = peaked_logits(tokens, [1.0, 3.0, 2.0, 3.0, 0.5], [0.0] * 5)
    sampler = LowConfidenceSampler(5, 5, 5, temperature=0.0)
    rec = Recorder(fixed_fn(logits))
    prompt = prompts(2, 2)
    out = run(sampler, rec, prompt)
    assert out.completion_ids.tolist() == [tokens, tokens]
    step = commit_steps(rec.inputs + [torch.cat([prompt, out.completion_ids], 1)], 2)
    assert step.tolist() == [[3, 0, 2, 1, 4]] * 2


def test_equal_confidences_commit_left_to_right_in_long_block():
    # 64 positions with identical logits (exact ties), 8 steps: step j commits positions 8j..8j+7.
    # (torch's unstable sort permutes ties in rows this long, so this needs the stable sort.)
    logits = torch.tensor([0.0, 2.0, 1.0] + [-math.inf] * (VOCAB - 3))
    sampler = LowConfidenceSampler(64, 64, 8, temperature=0.0)
    rec = Recorder(fixed_fn(logits))
    prompt = prompts(3, 2)
    out = run(sampler, rec, prompt)
    assert bool((out.completion_ids == 1).all())
    step = commit_steps(rec.inputs + [torch.cat([prompt, out.completion_ids], 1)], 2)
    assert step.tolist() == [[i // 8 for i in range(64)]] * 3


def test_confidence_is_untempered_probability():
    # At τ = 0.01 the tempered probabilities of the argmax are all 1.0 in float64 (a tie that would be
    # broken left to right), while the untempered ones order the positions 1, 2, 0, 3.
    tokens = [2, 5, 0, 8]
    logits = peaked_logits(tokens, [3.0, 2.0, 4.0, 1.0], [0.0, -5.0, 0.0, -1.0])
    probs = torch.softmax(logits.double(), -1).max(-1).values
    assert probs.argsort(descending=True).tolist() == [1, 2, 0, 3]
    sampler = LowConfidenceSampler(4, 4, 4, temperature=0.01)
    rec = Recorder(fixed_fn(logits))
    prompt = prompts(8, 2)
    out = run(sampler, rec, prompt, generator=torch.Generator().manual_seed(0))
    assert out.completion_ids.tolist() == [tokens] * 8  # gaps of ≥ 1 logit / 0.01: proposals are argmax
    step = commit_steps(rec.inputs + [torch.cat([prompt, out.completion_ids], 1)], 2)
    assert step.tolist() == [[2, 0, 1, 3]] * 8


def test_random_remasking_order_ignores_confidence():
    # Same strongly ordered confidences; with random remasking the first committed position is uniform.
    logits = peaked_logits([2, 5, 0, 8], [3.0, 2.0, 4.0, 1.0], [0.0, -5.0, 0.0, -1.0])
    sampler = LowConfidenceSampler(4, 4, 4, temperature=0.0, remasking="random")
    rec = Recorder(fixed_fn(logits))
    n = 4000
    prompt = torch.zeros(n, 1, dtype=torch.long)
    out = run(sampler, rec, prompt, generator=torch.Generator().manual_seed(0))
    first = (rec.inputs[1][:, 1:] != MASK).float().argmax(1)
    freq = torch.bincount(first, minlength=4).double() / n
    se = math.sqrt(0.25 * 0.75 / n)
    assert (freq - 0.25).abs().max() < 5 * se, freq
    assert not (out.completion_ids == MASK).any()


# ---------------------------------------------------------------------------------------- padding


def test_left_padding_matches_unpadded_prompts(model):
    # The masked positions of a block see the same inputs and differ only through RoPE, so the tiny
    # network's confidences there are nearly tied (gaps ~1e-6, i.e. float noise). A fixed bias per
    # (position id, token) separates them, and also makes the outputs depend on the absolute positions.
    bias = torch.randn(32, VOCAB, generator=torch.Generator().manual_seed(0)) * 4.0
    base = net_fn(model)

    def fn(x, attn, pos):
        return base(x, attn, pos) + bias[pos]

    margins = []

    def fn_with_margins(x, attn, pos):
        logits = fn(x, attn, pos)
        z = logits[:, -8:].double().sort(-1, descending=True).values
        log_1m_conf = torch.logsumexp(z[..., 1:], -1) - torch.logsumexp(z, -1)  # log(1 − confidence)
        masked = x[:, -8:] == MASK
        for row in range(x.shape[0]):
            v = log_1m_conf[row][masked[row]].sort().values
            margins.extend((v[1:] - v[:-1]).tolist())
            margins.extend((z[row, :, 0] - z[row, :, 1])[masked[row]].tolist())
        return logits

    sampler = LowConfidenceSampler(8, 4, 8, temperature=0.0)
    raw = [prompts(1, n, seed=20 + n)[0] for n in (2, 5, 3, 1)]
    alone = [run(sampler, fn_with_margins, p.unsqueeze(0)).completion_ids[0] for p in raw]
    # Precondition: no decision of the reference runs is within float noise of a tie.
    assert min(margins) > 1e-3, min(margins)
    width = max(len(p) for p in raw)
    results = {}
    for pad in (0, 4):  # the pad token value must not matter either
        ids = torch.full((len(raw), width), pad, dtype=torch.long)
        attn = torch.zeros(len(raw), width, dtype=torch.long)
        for i, p in enumerate(raw):
            ids[i, width - len(p) :] = p
            attn[i, width - len(p) :] = 1
        rec = Recorder(fn)
        results[pad] = run(sampler, rec, ids, attn).completion_ids
        # The sampler passes the padding mask and RoPE positions counted from the first real token.
        assert torch.equal(rec.attn[0][:, :width], attn)
        assert bool((rec.attn[0][:, width:] == 1).all())
        assert rec.pos[0][2].tolist()[width - 3 :] == list(range(3 + 8))
    assert torch.equal(results[0], results[4])
    for i in range(len(raw)):
        assert torch.equal(results[0][i], alone[i]), i
    # Sanity: the completions actually depend on the prompt.
    assert len({tuple(r.tolist()) for r in results[0]}) > 1


# ------------------------------------------------------------------------------ sampling distribution

Z = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -0.5, 1.5, -2.0, 0.0, 0.3, -0.3, -math.inf])  # mask id: never


def assert_frequencies(tokens: torch.Tensor, probs: torch.Tensor, z: float = 5.0) -> None:
    n = tokens.numel()
    freq = torch.bincount(tokens.flatten(), minlength=VOCAB).double() / n
    se = (probs * (1 - probs) / n).sqrt().clamp_min(1e-12)
    dev = (freq - probs).abs() / se
    assert float(dev.max()) < z, (freq, probs)
    chi2 = float((((freq - probs) ** 2) / probs.clamp_min(1e-300))[probs > 0].sum() * n)
    dof = int((probs > 0).sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), chi2  # ~6 sd above the chi-square mean


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_gumbel_max_samples_softmax_one_step_per_block(tau):
    # One step per block commits every proposal of the block: each token is an independent draw.
    sampler = LowConfidenceSampler(8, 4, 2, temperature=tau)
    prompt = torch.zeros(3000, 1, dtype=torch.long)
    out = run(sampler, fixed_fn(Z), prompt, generator=torch.Generator().manual_seed(int(tau * 10)))
    probs = torch.softmax(Z.double() / tau, -1)
    assert_frequencies(out.completion_ids, probs)
    # Per position as well (no position is special).
    for i in (0, 7):
        assert_frequencies(out.completion_ids[:, i], probs)


def test_gumbel_max_samples_softmax_random_remasking():
    # Random remasking picks positions independently of the proposals, so every committed token is a
    # fresh softmax draw even when one token is committed per step.
    sampler = LowConfidenceSampler(4, 4, 4, temperature=1.0, remasking="random")
    prompt = torch.zeros(5000, 1, dtype=torch.long)
    out = run(sampler, fixed_fn(Z), prompt, generator=torch.Generator().manual_seed(3))
    assert_frequencies(out.completion_ids, torch.softmax(Z.double(), -1))


def test_low_confidence_one_token_per_step_commits_best_of_proposals():
    # With 2 positions and 2 steps, step 0 commits the more probable of two fresh proposals and step 1
    # a fresh draw. Token a's share over both positions: (P[best of 2 = a] + p_a) / 2, where
    # P[best of 2 = a] = p_a² + 2 p_a Σ_{b: p_b < p_a} p_b. (Not softmax: low-confidence remasking biases
    # sampling towards likely tokens.)
    z = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5] + [-math.inf] * (VOCAB - 5))
    p = torch.softmax(z.double(), -1)
    lower = torch.stack([(p * (p < pa)).sum() for pa in p])
    expected = (p**2 + 2 * p * lower + p) / 2
    sampler = LowConfidenceSampler(2, 2, 2, temperature=1.0)
    prompt = torch.zeros(20000, 1, dtype=torch.long)
    out = run(sampler, fixed_fn(z), prompt, generator=torch.Generator().manual_seed(4))
    assert_frequencies(out.completion_ids, expected)
    # ... and it is measurably not plain softmax sampling.
    freq = torch.bincount(out.completion_ids.flatten(), minlength=VOCAB).double() / out.completion_ids.numel()
    assert float(freq[3] - p[3]) > 0.05


# ---------------------------------------------------------------------------- mask token proposals


def test_mask_token_is_never_proposed():
    # A model that gives the mask token any probability (uniform logits here; a random TinyMDLM too).
    sampler = LowConfidenceSampler(8, 4, 4, temperature=1.0)
    out = run(
        sampler,
        fixed_fn(torch.zeros(VOCAB)),
        torch.zeros(64, 2, dtype=torch.long),
        generator=torch.Generator().manual_seed(0),
    )
    assert not (out.completion_ids == MASK).any()
