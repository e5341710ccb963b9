"""The fast samplers (docs/samplers.md): KV caches per model family, cached and threshold decoding, entropy
and margin orders, and the plain sampler against a straightforward step-by-step implementation."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dllm_rl.config import FamilyName, ModelCfg
from dllm_rl.kv_cache import WindowKVCache
from dllm_rl.models.policy import Policy, build_tiny
from dllm_rl.positions import position_ids_from_attention_mask
from dllm_rl.samplers.dream import DreamSampler, filter_logits, reveal_counts
from dllm_rl.samplers.low_confidence import LowConfidenceSampler

ALPHABET = "0123456789abcdef"


def tiny_policy(family: str = "llada", scale: float = 4.0, seed: int = 0, layers: int = 2) -> Policy:
    """A random policy whose weights are scaled so that predictions are input dependent and peaked."""
    cfg = ModelCfg(
        name="tiny",
        family=FamilyName(family),
        hidden_size=32,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2 if family != "tiny" else None,
        max_position_embeddings=128,
        dtype="float32",
    )
    policy = build_tiny(cfg, ALPHABET, seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    policy.model.eval()
    return policy


def left_padded_prompts(policy: Policy, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), policy.pad_id)
    attn = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(0, len(ALPHABET), (n,), generator=g)
        attn[i, width - n :] = 1
    return ids, attn


def other_token(policy: Policy) -> int:
    """A token id that is not the mask."""
    return 1 if policy.mask_id != 1 else 2


# ------------------------------------------------------------------ the reference, written out plainly


def reference_greedy(
    policy: Policy,
    prompt: list[int],
    gen: int,
    block: int,
    steps: int,
    remasking: str,
    counts: list[int] | None = None,
    confidence: str = "full",
) -> list[int]:
    """Greedy LLaDA decoding of one unpadded prompt, one position at a time, straight from LLaDA's loop
    (``counts``: the tokens revealed per step of a block, LLaDA's even split by default; ``confidence``:
    p over the whole vocabulary, or with the mask token excluded first)."""
    mask = policy.mask_id
    x = list(prompt) + [mask] * gen
    per_block = steps // (gen // block)
    if counts is None:
        k = block  # every position of the block is masked when it starts
        counts = [k // per_block + (1 if j < k % per_block else 0) for j in range(per_block)]
    for b in range(gen // block):
        lo = len(prompt) + b * block
        for j in range(per_block):
            ids = torch.tensor([x])
            with torch.no_grad():
                logits = policy.logits(ids, torch.ones_like(ids))[0].double()
            candidates = []
            for i in range(lo, lo + block):
                if x[i] != mask:
                    continue
                z = logits[i].clone()
                if confidence == "renormalized":
                    z[mask] = -math.inf
                p = torch.softmax(z, dim=0)
                z[mask] = -math.inf  # never proposed
                token = int(torch.argmax(z))
                if remasking == "low_confidence":
                    c = float(p[token])
                elif remasking == "entropy":
                    c = float(sum(float(q) * math.log(float(q)) for q in p if q > 0))
                else:
                    top = sorted(p.tolist(), reverse=True)
                    c = top[0] - top[1]
                candidates.append((-c, i, token))  # most confident first, ties to the left
            for _, i, token in sorted(candidates)[: counts[j]]:
                x[i] = token
    return x[len(prompt) :]


@pytest.mark.parametrize("remasking", ["low_confidence", "entropy", "margin"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_plain_greedy_equals_step_by_step_reference(family, remasking):
    policy = tiny_policy(family)
    ids, attn = left_padded_prompts(policy, [5, 3, 7])
    # 2 blocks of 4 in 3 steps each: commit counts 2, 1, 1.
    sampler = LowConfidenceSampler(gen_length=8, block_length=4, steps=6, temperature=0.0, remasking=remasking)
    out = sampler.generate(policy.logits, ids, attn, policy.mask_id)
    assert out.nfe == 6
    for row in range(ids.shape[0]):
        prompt = ids[row][attn[row].bool()].tolist()
        expected = reference_greedy(policy, prompt, 8, 4, 6, remasking)
        assert out.completion_ids[row].tolist() == expected, row


# ------------------------------------------------------------------ Dream's sampler


def test_dream_time_grid_reveal_counts():
    # t = linspace(1, 0.001, 5): ⌊8·(1 − .75025)⌋ = 1, ⌊7·(1 − .5005/.75025)⌋ = 2, ⌊5·0.499⌋ = 2, the rest 3.
    assert reveal_counts(8, 4, 1e-3) == [1, 2, 2, 3]
    assert all(sum(reveal_counts(n, s, 1e-3)) == n for n in range(1, 20) for s in range(1, n + 1))


def test_top_p_and_top_k_filters():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(filter_logits(logits, 0.8, None)) == [True, True, False, False]
    assert kept(filter_logits(logits, 0.85, None)) == [True, True, True, False]
    assert kept(filter_logits(logits, 0.1, None)) == [True, False, False, False]  # the top token always stays
    assert kept(filter_logits(logits, None, 1)) == [True, False, False, False]
    assert kept(filter_logits(logits, 1.0, None)) == [True] * 4


@pytest.mark.parametrize("alg,remasking", [("entropy", "entropy"), ("maskgit_plus", "low_confidence")])
def test_dream_greedy_equals_step_by_step_reference(alg, remasking):
    policy = tiny_policy("dream")
    ids, attn = left_padded_prompts(policy, [4, 6])
    sampler = DreamSampler(gen_length=8, block_length=8, steps=4, temperature=0.0, alg=alg, top_p=None)
    out = sampler.generate(policy.logits, ids, attn, policy.mask_id)
    assert out.nfe == 4
    for row in range(2):
        prompt = ids[row][attn[row].bool()].tolist()
        expected = reference_greedy(
            policy, prompt, 8, 8, 4, remasking, counts=reveal_counts(8, 4, 1e-3), confidence="renormalized"
        )
        assert out.completion_ids[row].tolist() == expected


@pytest.mark.parametrize("alg", ["origin", "entropy", "topk_margin"])
def test_dream_sampling_is_complete_and_reproducible(alg):
    policy = tiny_policy("dream")
    ids, attn = left_padded_prompts(policy, [5, 5, 3])
    sampler = DreamSampler(gen_length=8, block_length=4, steps=4, temperature=0.8, alg=alg, alg_temp=0.5)
    runs = [sampler.generate(policy.logits, ids, attn, policy.mask_id, torch.Generator().manual_seed(7)) for _ in "ab"]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert not (runs[0].completion_ids == policy.mask_id).any() and runs[0].nfe == 4


# ------------------------------------------------------------------ the KV cache inside each model family


@pytest.mark.parametrize("family", ["tiny", "llada", "dream"])
def test_cached_window_forward_equals_full_forward(family):
    policy = tiny_policy(family, scale=1.0)
    ids, attn = left_padded_prompts(policy, [9, 4, 12], seed=1)
    ids = torch.cat([ids, torch.full((3, 8), policy.mask_id)], dim=1)
    attn = torch.cat([attn, torch.ones(3, 8, dtype=torch.long)], dim=1)
    pos = position_ids_from_attention_mask(attn)
    total = ids.shape[1]
    with torch.no_grad():
        full = policy.logits(ids, attn, pos)
        cache = WindowKVCache()
        refill = policy.logits(ids, attn, pos, kv_cache=cache)
        torch.testing.assert_close(refill, full)
        assert cache.length == total and len(cache.keys) == 2
        for window in [(12, 16), (12, total), (total - 1, total)]:  # dual, prefix, last position
            part = policy.logits(ids, attn, pos, kv_cache=cache, window=window)
            assert part.shape[1] == window[1] - window[0]
            torch.testing.assert_close(part, full[:, window[0] : window[1]], rtol=1e-5, atol=1e-5)
        # ...while the cached positions' keys/values are those of the sequence the cache was filled with.
        outside = ids.clone()
        outside[:, 17] = other_token(policy)
        stale = policy.logits(outside, attn, pos, kv_cache=cache, window=(12, 16))
        torch.testing.assert_close(stale, full[:, 12:16], rtol=1e-5, atol=1e-5)
        assert cache.window is None  # restored after every windowed call


@pytest.mark.parametrize("family", ["tiny", "llada", "dream"])
def test_window_tokens_are_recomputed(family):
    """In a one-layer model the cached keys depend on their own tokens only, so a window whose tokens
    changed since the refill is computed exactly; with more layers that is the caches' approximation."""
    policy = tiny_policy(family, scale=4.0, layers=1)
    ids, attn = left_padded_prompts(policy, [6, 6], seed=2)
    ids = torch.cat([ids, torch.full((2, 8), policy.mask_id)], dim=1)
    attn = torch.cat([attn, torch.ones(2, 8, dtype=torch.long)], dim=1)
    pos = position_ids_from_attention_mask(attn)
    cache = WindowKVCache()
    with torch.no_grad():
        before = policy.logits(ids, attn, pos, kv_cache=cache)
        changed = ids.clone()
        changed[:, 7:9] = other_token(policy)  # inside the window [6, 10)
        expected = policy.logits(changed, attn, pos)
        part = policy.logits(changed, attn, pos, kv_cache=cache, window=(6, 10))
    torch.testing.assert_close(part, expected[:, 6:10], rtol=1e-5, atol=1e-5)
    assert (part - before[:, 6:10]).abs().max() > 1e-3


def test_window_needs_a_filled_cache():
    policy = tiny_policy("tiny")
    ids = torch.full((1, 6), policy.mask_id)
    with pytest.raises(ValueError, match="outside the cached"):
        policy.logits(ids, torch.ones_like(ids), kv_cache=WindowKVCache(), window=(2, 4))


# ------------------------------------------------------------------ cached decoding


def decode(policy, ids, attn, temperature=0.0, seed=None, **kw):
    sampler = LowConfidenceSampler(temperature=temperature, **kw)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return sampler.generate(policy.logits, ids, attn, policy.mask_id, generator=g)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_step_per_block_makes_every_cache_exact(family):
    """With one step per block every forward is a block-start refill, so the caches change nothing."""
    policy = tiny_policy(family)
    ids, attn = left_padded_prompts(policy, [6, 4])
    runs = {c: decode(policy, ids, attn, 1.0, 0, gen_length=12, block_length=4, steps=3, cache=c) for c in CACHES}
    for c in ("prefix", "dual"):
        assert torch.equal(runs[c].completion_ids, runs["none"].completion_ids), c
        assert runs[c].nfe == runs["none"].nfe == 3


CACHES = ("none", "prefix", "dual")


def test_cached_decoding_keeps_the_forward_count_and_runs_fewer_positions():
    policy = tiny_policy("llada")
    ids, attn = left_padded_prompts(policy, [6, 6])
    prompt, gen, block, steps = ids.shape[1], 16, 4, 8
    runs = {
        c: decode(policy, ids, attn, 1.0, 3, gen_length=gen, block_length=block, steps=steps, cache=c) for c in CACHES
    }
    total, per_block = prompt + gen, steps // (gen // block)
    assert all(r.nfe == steps for r in runs.values())  # same number of forwards (rank lockstep)
    assert runs["none"].forward_tokens == steps * total
    # One full forward per block, then (s - 1) over the block and everything after it / over the block.
    prefix = sum(total + (per_block - 1) * (gen - b * block) for b in range(gen // block))
    dual = (gen // block) * (total + (per_block - 1) * block)
    assert runs["prefix"].forward_tokens == prefix and runs["dual"].forward_tokens == dual
    for r in runs.values():
        assert not (r.completion_ids == policy.mask_id).any()
    # An approximation, but of the same decoding: most tokens agree with the reference.
    for c in ("prefix", "dual"):
        agree = (runs[c].completion_ids == runs["none"].completion_ids).float().mean()
        assert agree >= 0.5, (c, float(agree))


# ------------------------------------------------------------------ threshold (parallel) decoding


def test_threshold_bounds_steps_between_one_and_block_per_block():
    policy = tiny_policy("llada")
    ids, attn = left_padded_prompts(policy, [5, 5, 5])
    gen, block = 16, 8
    # A threshold nothing reaches: the top-1 rule alone, one token per step, B steps per block.
    strict = decode(policy, ids, attn, gen_length=gen, block_length=block, steps=4, threshold=1.0)
    assert strict.nfe == gen and strict.stats["tokens_per_step_mean"] == 1.0
    # A threshold everything reaches: the whole block in one step.
    loose = decode(policy, ids, attn, gen_length=gen, block_length=block, steps=4, threshold=1e-12)
    assert loose.nfe == gen // block and loose.stats["tokens_per_step_max"] == block
    # The per-step cap.
    capped = decode(
        policy, ids, attn, gen_length=gen, block_length=block, steps=4, threshold=1e-12, max_tokens_per_step=3
    )
    assert capped.nfe == (gen // block) * math.ceil(block / 3) and capped.stats["tokens_per_step_max"] == 3
    for r in (strict, loose, capped):
        assert not (r.completion_ids == policy.mask_id).any()
    # Committing the most confident proposal one at a time is greedy decoding with one token per step.
    one_by_one = decode(policy, ids, attn, gen_length=gen, block_length=block, steps=gen)
    assert torch.equal(strict.completion_ids, one_by_one.completion_ids)


def test_threshold_commits_exactly_the_confident_positions():
    # Fixed logits over a 4-token block: probabilities 0.97, 0.5, 0.95, 0.3 for the proposals.
    vocab, mask = 6, 5
    probs = torch.tensor([0.97, 0.5, 0.95, 0.3])
    logits = torch.full((4, vocab), -30.0)
    for i, p in enumerate(probs):
        logits[i, :5] = math.log((1 - p) / 4)  # the rest spread over the other four tokens
        logits[i, i] = math.log(p)
    calls = []

    def fn(x, attn, pos):
        calls.append(x[:, -4:].clone())
        out = torch.zeros(x.shape[0], x.shape[1], vocab)
        out[:, -4:] = logits
        return out

    sampler = LowConfidenceSampler(gen_length=4, block_length=4, steps=4, temperature=0.0, threshold=0.9)
    out = sampler.generate(fn, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), mask)
    # Step 1 commits positions 0 and 2 (>= 0.9); then position 1 (top-1 rule), then position 3.
    assert out.completion_ids.tolist() == [[0, 1, 2, 3]] and out.nfe == 3
    assert calls[1].tolist() == [[0, mask, 2, mask]] and calls[2].tolist() == [[0, 1, 2, mask]]


# ------------------------------------------------------------------ entropy and margin orders


def test_entropy_and_margin_orders_differ_from_low_confidence():
    vocab, mask = 6, 5
    rows = [
        [0.50, 0.49, 0.01, 0.0, 0.0],  # position 0: top-1 0.50, tiny margin, low entropy
        [0.45, 0.14, 0.14, 0.14, 0.13],  # position 1: top-1 0.45, large margin, high entropy
        [0.40, 0.30, 0.30, 0.0, 0.0],  # position 2: top-1 0.40
    ]
    logits = torch.full((3, vocab), -60.0)
    for i, r in enumerate(rows):
        for t, p in enumerate(r):
            if p > 0:
                logits[i, t] = math.log(p)

    def fn(x, attn, pos):
        out = torch.zeros(x.shape[0], x.shape[1], vocab)
        out[:, -3:] = logits
        return out

    first = {}
    for remasking in ("low_confidence", "entropy", "margin"):
        sampler = LowConfidenceSampler(gen_length=3, block_length=3, steps=3, temperature=0.0, remasking=remasking)
        seen = []

        def recording(x, attn, pos, seen=seen):
            seen.append((x[0, -3:] != mask).tolist())
            return fn(x, attn, pos)

        sampler.generate(recording, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), mask)
        first[remasking] = seen[1].index(True)  # the position committed at the first step
    assert first == {"low_confidence": 0, "entropy": 0, "margin": 1}
    # Entropy: position 2 (H = 1.09) comes before position 1 (H = 1.49).
    sampler = LowConfidenceSampler(gen_length=3, block_length=3, steps=3, temperature=0.0, remasking="entropy")
    order = []

    def track(x, attn, pos):
        order.append((x[0, -3:] != mask).tolist())
        return fn(x, attn, pos)

    sampler.generate(track, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), mask)
    assert order[2] == [True, False, True]


# ------------------------------------------------------------------ ranks stay in lockstep


SEEDS = (10, 15)  # prompts of rank 0 and rank 1


def _lockstep_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        policy = tiny_policy("llada", scale=10.0)
        ids, attn = left_padded_prompts(policy, [5, 5], seed=SEEDS[rank])
        calls = []

        def counted(*args, **kw):
            calls.append(1)
            return policy.logits(*args, **kw)

        sampler = LowConfidenceSampler(gen_length=16, block_length=8, steps=4, temperature=0.0, threshold=0.3)
        out = sampler.generate(counted, ids, attn, policy.mask_id)
        results[rank] = (len(calls), out.completion_ids.tolist())
    finally:
        dist.destroy_process_group()


def test_threshold_decoding_keeps_ranks_in_lockstep():
    """Each rank alone would need a different number of forwards; synced, both run the larger one and
    decode exactly what they decode alone (the extra steps commit nothing)."""
    alone = {}
    for rank in (0, 1):
        policy = tiny_policy("llada", scale=10.0)
        ids, attn = left_padded_prompts(policy, [5, 5], seed=SEEDS[rank])
        sampler = LowConfidenceSampler(gen_length=16, block_length=8, steps=4, temperature=0.0, threshold=0.3)
        out = sampler.generate(policy.logits, ids, attn, policy.mask_id)
        alone[rank] = (out.nfe, out.completion_ids.tolist())
    assert alone[0][0] != alone[1][0], "pick prompts whose solo forward counts differ"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    # spawn, not fork: a child forked from a process that already ran threads and DeepSpeed can crash.
    mp.spawn(_lockstep_worker, args=(port, results), nprocs=2, join=True)
    assert results[0][0] == results[1][0] >= max(alone[0][0], alone[1][0])
    for rank in (0, 1):
        assert results[rank][1] == alone[rank][1]
