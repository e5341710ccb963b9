"""``sampler.confidence`` (dllm_rl/samplers/low_confidence.py): ``full`` is LLaDA's generate(), token for
token, checked against a plain transcription of LLaDA's loop written here; ``renormalized`` measures every
confidence with the mask token excluded first, which reorders positions only where the model gives the
mask token mass.

The reference follows LLaDA's generate() (ML-GSAI/LLaDA, generate.py): a full forward over the whole
sequence per step; x0 = argmax of exp(z) / (−log u)^τ (float64; u ~ U(0, 1), no noise at τ = 0);
confidence p(x0) under the softmax of the un-noised logits over the whole vocabulary; −∞ at positions
after the current block and at unmasked ones; per row, the num_transfer_tokens[j, i] positions of highest
confidence committed by torch.topk. Three things are the sampler's by design and are written here the
same way: where the mask token wins that argmax, x0 is the best other token (LLaDA would commit the mask
id); the Gumbel noise is drawn for the current block only, from the caller's generator (LLaDA draws it
for the whole sequence from the global RNG, which only changes which random numbers are used); and a
left-padded batch is run with its padding mask and RoPE positions counted from each row's first real
token (LLaDA's loop passes the model neither)."""

from __future__ import annotations

import math

import pytest
import torch
from test_fast_samplers import ALPHABET, tiny_policy

from dllm_rl.models.policy import Policy
from dllm_rl.samplers import get_sampler
from dllm_rl.samplers.low_confidence import LowConfidenceSampler

# ------------------------------------------------------------------ LLaDA's generate(), written out plainly


def num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's get_num_transfer_tokens: ⌊k/s⌋ per step, plus one for the first k mod s steps."""
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    counts = torch.zeros(mask_num.shape[0], steps, dtype=torch.long) + mask_num // steps
    for row in range(mask_num.shape[0]):
        counts[row, : int(mask_num[row, 0] % steps)] += 1
    return counts


def llada_generate(
    logits_fn,
    prompt: torch.Tensor,
    prompt_attention: torch.Tensor,
    mask_id: int,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    confidence: str = "full",
    threshold: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int, int]:
    """(completion ids, forwards, positions where the mask token won LLaDA's argmax).

    ``confidence="renormalized"`` puts z_M = −∞ before the confidence's softmax. ``threshold`` is
    Fast-dLLM's get_transfer_index: every masked position of the block is ranked, the first is always
    committed and the others when their confidence reaches the threshold, until the block is decoded.
    ``remasking`` entropy and margin (−H(p), p_top1 − p_top2) are the sampler's Dream orders under the same p.
    """
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt
    attention = torch.cat([prompt_attention, torch.ones(batch, gen_length, dtype=torch.long)], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp_min(0)  # RoPE positions counted from the first real token
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    forwards = mask_wins = 0
    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        end = start + block_length
        counts = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        i = 0
        while (x[:, start:end] == mask_id).any() if threshold is not None else i < steps_per_block:
            mask_index = x == mask_id
            logits = logits_fn(x, attention, positions).to(torch.float64)
            forwards += 1
            scores = logits.exp()
            if temperature > 0:
                u = torch.rand((batch, block_length, logits.shape[-1]), generator=generator, dtype=torch.float64)
                scores[:, start:end] = scores[:, start:end] / (-torch.log(u)) ** temperature
            mask_wins += int(((scores.argmax(dim=-1) == mask_id) & mask_index)[:, start:end].sum())
            scores[..., mask_id] = -math.inf
            x0 = scores.argmax(dim=-1)
            z = logits.clone()
            if confidence == "renormalized":
                z[..., mask_id] = -math.inf
            p = torch.softmax(z, dim=-1)
            if remasking == "low_confidence":
                x0_p = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            elif remasking == "entropy":  # not in LLaDA's loop: Dream's orders, under the same p
                x0_p = torch.special.xlogy(p, p).sum(dim=-1)
            elif remasking == "margin":
                top2 = p.topk(2, dim=-1).values
                x0_p = top2[..., 0] - top2[..., 1]
            else:
                x0_p = torch.zeros(x.shape, dtype=torch.float64)
                x0_p[:, start:end] = torch.rand((batch, block_length), generator=generator, dtype=torch.float64)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.full_like(x0_p, -math.inf))
            for j in range(batch):
                k = int(counts[j, i]) if threshold is None else int(mask_index[j, start:end].sum())
                values, select = torch.topk(conf[j], k=k)
                if threshold is not None:
                    select = select[(values >= threshold) | (torch.arange(k) == 0)]
                x[j, select] = x0[j, select]
            i += 1
    return x[:, prompt_len:], forwards, mask_wins


# ------------------------------------------------------------------ models


def mask_biased(policy: Policy, low: float = -1.0, high: float = 4.0, seed: int = 0):
    """logits_fn of the policy with a per-position bias on the mask token's logit: p(mask) from about 0.01
    to about 0.6 depending on the position, so the two confidences order positions differently and the
    mask token sometimes wins the argmax. Takes the sampler's cache arguments as Policy.logits does."""
    bias = torch.empty(128).uniform_(low, high, generator=torch.Generator().manual_seed(seed))

    def fn(x, attention, positions, **cache_args):
        with torch.no_grad():
            z = policy.logits(x, attention, positions, **cache_args).clone()
        window = cache_args.get("window")
        where = positions if window is None else positions[:, window[0] : window[1]]
        z[..., policy.mask_id] += bias[where]
        return z

    return fn


def left_padded(policy: Policy, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of characters of the alphabet (never the mask token, which LLaDA's loop would
    treat as a position to decode)."""
    g = torch.Generator().manual_seed(seed)
    characters = torch.tensor(policy.tokenizer.convert_tokens_to_ids(list(ALPHABET)))
    width = max(lengths)
    ids = torch.full((len(lengths), width), policy.pad_id)
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = characters[torch.randint(0, len(ALPHABET), (n,), generator=g)]
        attention[row, width - n :] = 1
    return ids, attention


LENGTHS = [5, 2, 7, 3, 6, 4, 1, 7]  # left-padded prompts of different lengths
SHAPE = {"gen_length": 12, "block_length": 4, "steps": 9}  # 3 blocks, 3 steps each: 2, 1, 1 commits


def decode(fn, ids, attention, mask_id, seed=0, **settings):
    sampler = LowConfidenceSampler(**{**SHAPE, **settings})
    return sampler.generate(fn, ids, attention, mask_id, generator=torch.Generator().manual_seed(seed))


def reference(fn, ids, attention, mask_id, seed=0, **settings):
    settings = {**SHAPE, **settings}
    settings.pop("cache", None)  # the reference has no cache: a full forward every step
    return llada_generate(fn, ids, attention, mask_id, generator=torch.Generator().manual_seed(seed), **settings)


# ------------------------------------------------------------------ the sampler against the reference


@pytest.mark.parametrize(
    "remasking,temperature",
    [("low_confidence", 0.0), ("low_confidence", 0.5), ("random", 0.5), ("entropy", 0.0), ("margin", 0.0)],
)
def test_sampler_equals_llada_reference_token_for_token(remasking, temperature):
    policy = tiny_policy()
    fn = mask_biased(policy)
    ids, attention = left_padded(policy, LENGTHS)
    outputs = {}
    for confidence in ("full", "renormalized"):
        settings = {"temperature": temperature, "remasking": remasking, "confidence": confidence}
        expected, forwards, mask_wins = reference(fn, ids, attention, policy.mask_id, **settings)
        out = decode(fn, ids, attention, policy.mask_id, **settings)
        assert out.nfe == forwards == SHAPE["steps"]
        assert torch.equal(out.completion_ids, expected), confidence
        assert not (out.completion_ids == policy.mask_id).any()
        outputs[confidence] = out.completion_ids
        if confidence == "full":
            assert mask_wins > 0, "the mask token never won the argmax: the rule for it went untested"
    differ = int((outputs["full"] != outputs["renormalized"]).any(dim=1).sum())
    if remasking == "random":  # the order is random: the confidence plays no part
        assert differ == 0
    else:  # the comparison can tell the two apart
        assert differ >= len(LENGTHS) // 2, differ


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_samplers_follow_the_confidence_setting(cache):
    """In a one-layer network a position's cached keys and values depend on its own token only, and the
    tokens outside the current block do not change while it is decoded, so both caches are exact there:
    a cached sampler must then equal the reference for either confidence."""
    policy = tiny_policy(layers=1)
    fn = mask_biased(policy)
    ids, attention = left_padded(policy, LENGTHS)
    outputs = {}
    for confidence in ("full", "renormalized"):
        settings = {"temperature": 0.5, "confidence": confidence, "cache": cache}
        expected, _, _ = reference(fn, ids, attention, policy.mask_id, **settings)
        outputs[confidence] = decode(fn, ids, attention, policy.mask_id, **settings).completion_ids
        assert torch.equal(outputs[confidence], expected), confidence
    assert not torch.equal(outputs["full"], outputs["renormalized"])


def test_threshold_decoding_follows_the_confidence_setting():
    """Threshold decoding compares p(x̂) with the threshold: Fast-dLLM's rule under either p."""
    policy = tiny_policy()
    fn = mask_biased(policy)
    ids, attention = left_padded(policy, LENGTHS)
    per_step = {}
    for confidence in ("full", "renormalized"):
        settings = {"temperature": 0.0, "confidence": confidence, "threshold": 0.1}  # p(x̂) is 0.05-0.2 here
        expected, forwards, _ = reference(fn, ids, attention, policy.mask_id, **settings)
        out = decode(fn, ids, attention, policy.mask_id, **settings)
        assert torch.equal(out.completion_ids, expected) and out.nfe == forwards, confidence
        per_step[confidence] = out.stats["tokens_per_step_mean"]
    # Renormalising inflates every p(x̂) by 1/(1 − p(mask)): more positions pass at each step.
    assert per_step["renormalized"] > 1.5 * per_step["full"], per_step


# ------------------------------------------------------------------ where the two settings differ


VOCAB, MASK = 6, 5


def table_fn(probs: list[list[float]]):
    """logits_fn giving every call the same logits log(probs) on the last len(probs) positions."""
    table = torch.tensor(probs, dtype=torch.float64).log()

    def fn(x, attention, positions):
        out = torch.zeros(x.shape[0], x.shape[1], VOCAB, dtype=torch.float64)
        out[:, -table.shape[0] :] = table
        return out

    return fn


def commit_order(probs: list[list[float]], confidence: str) -> tuple[list[int], list[int]]:
    """(the completion, the step at which each position was committed): one block, one token a step."""
    length = len(probs)
    fn, seen = table_fn(probs), []

    def recording(x, attention, positions):
        seen.append(x[0, -length:].clone())
        return fn(x, attention, positions)

    sampler = LowConfidenceSampler(length, length, length, temperature=0.0, confidence=confidence)
    out = sampler.generate(recording, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), MASK)
    seen.append(out.completion_ids[0])
    steps = (torch.stack(seen) == MASK).sum(dim=0) - 1
    return out.completion_ids[0].tolist(), steps.tolist()


def test_renormalized_reorders_where_the_mask_token_is_likely():
    probs = [
        [0.50, 0.10, 0.10, 0.15, 0.15, 0.00],  # p(x̂ = 0) = 0.50, no mask mass
        [0.02, 0.40, 0.03, 0.02, 0.03, 0.50],  # p(x̂ = 1) = 0.40, renormalised 0.40 / 0.50 = 0.80
        [0.02, 0.03, 0.30, 0.03, 0.02, 0.60],  # the mask token wins: x̂ = 2, p 0.30, renormalised 0.75
    ]
    assert commit_order(probs, "full") == ([0, 1, 2], [0, 1, 2])
    assert commit_order(probs, "renormalized") == ([0, 1, 2], [2, 0, 1])
    # (LLaDA's generate would commit the mask id at position 2 first, with confidence 0.60: the
    # position stays masked and that step commits nothing.)
    no_mask = [[p / (1 - row[MASK]) for p in row[:MASK]] + [0.0] for row in probs]
    assert commit_order(no_mask, "full") == commit_order(no_mask, "renormalized") == ([0, 1, 2], [2, 0, 1])


@pytest.mark.parametrize("remasking", ["low_confidence", "entropy", "margin"])
def test_the_settings_agree_when_the_mask_logit_is_minus_infinity(remasking):
    policy = tiny_policy()

    def fn(x, attention, positions, **cache_args):
        with torch.no_grad():
            z = policy.logits(x, attention, positions, **cache_args).clone()
        z[..., policy.mask_id] = -math.inf
        return z

    ids, attention = left_padded(policy, LENGTHS)
    for settings in ({"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.0, "threshold": 0.2}):
        runs = [
            decode(fn, ids, attention, policy.mask_id, remasking=remasking, confidence=c, **settings)
            for c in ("full", "renormalized")
        ]
        assert torch.equal(runs[0].completion_ids, runs[1].completion_ids) and runs[0].nfe == runs[1].nfe


# ------------------------------------------------------------------ configuration


def test_config_selects_the_confidence_and_full_is_the_default():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from dllm_rl.config import validate

    def composed(*overrides: str) -> dict:
        with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        validate(cfg)
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)["sampler"]

    assert composed()["confidence"] == "full"
    assert composed("sampler=threshold")["confidence"] == "full"
    assert get_sampler(composed("sampler.confidence=renormalized")).confidence == "renormalized"
    assert composed("sampler=entropy")["confidence"] == "renormalized"  # Dream's sampler: its only one
    with pytest.raises(ValueError, match="confidence"):
        LowConfidenceSampler(8, 4, 4, confidence="softmax")
    with pytest.raises(ValueError, match="renormalized only"):
        get_sampler({**composed("sampler=entropy"), "confidence": "full"})
