"""Exact-enumeration oracles for the likelihood tests (docs/estimators.md), shared by the test files.

A "table" is a [2^L, L] float64 tensor of log f(x_i | z_S): row S (a bit set, see subset_masks) holds
the denoiser's log-probability of the true token at every masked position i ∈ S and 0 elsewhere.
Everything here is plain enumeration over subsets, orders and mask-schedule outcomes; nothing samples.
"""

from __future__ import annotations

import itertools
import math

import torch

from dllm_rl.likelihood import MaskDraw, masked_logp
from dllm_rl.models.tiny import TinyMDLM, TinyMDLMConfig

VOCAB, MASK = 6, 5  # the mask id lies inside the vocabulary, as for LLaDA


# ------------------------------------------------------------------------------------ tiny networks


def make_model(seed: int, scale: float = 4.0) -> TinyMDLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyMDLM(TinyMDLMConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, mask_token_id=MASK))
    with torch.no_grad():  # spread the probabilities so that f really depends on the masked set
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return net.double().eval()


def logits_fn(net: TinyMDLM, grad: bool = False):
    def fn(x: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return net(input_ids=x, attention_mask=attn, position_ids=pos).logits

    return fn


def model_case(seed: int, length: int, prompt_len: int = 2):
    g = torch.Generator().manual_seed(1000 + seed)
    net = make_model(seed)
    prompt = torch.randint(0, MASK, (prompt_len,), generator=g)
    completion = torch.randint(0, MASK, (length,), generator=g)
    return net, prompt, completion


# ---------------------------------------------------------------------------------- subsets, tables


def subset_masks(length: int) -> torch.Tensor:
    """[2^L, L] bool: row S has position i masked iff bit i of S is set (row 0 is the empty set)."""
    s = torch.arange(2**length).unsqueeze(1)
    return (s >> torch.arange(length)) & 1 == 1


def subset_index(masks: torch.Tensor) -> torch.Tensor:
    """Inverse of subset_masks along the last dimension."""
    return (masks.long() << torch.arange(masks.shape[-1])).sum(-1)


def draw(completion: torch.Tensor, prompt_len: int, weight: torch.Tensor | None = None) -> MaskDraw:
    """A MaskDraw with the given completion masks [N, R, L], no prompt masking."""
    n, r, _ = completion.shape
    w = torch.ones(n, r) if weight is None else weight
    return MaskDraw(completion, torch.zeros(n, r, prompt_len, dtype=torch.bool), w, torch.zeros(n, r))


def logf_table(
    fn, prompt: torch.Tensor, prompt_attn: torch.Tensor, completion: torch.Tensor, check: bool = True
) -> torch.Tensor:
    """[2^L, L] float64: log f(x_i | z_S) for i ∈ S via masked_logp (one copy per subset), else 0.

    Differentiable when fn is (the empty set goes through the model too and scores nothing).
    """
    length = completion.shape[0]
    subsets = subset_masks(length)
    logp = masked_logp(
        fn, prompt[None], prompt_attn[None], completion[None], draw(subsets[None], prompt.shape[0]), MASK
    )[0]
    if check:
        assert logp.shape == subsets.shape
        assert bool((logp[~subsets] == 0).all()) and bool((logp[subsets] < 0).all())
    return logp.double()


def random_table(length: int, g: torch.Generator) -> torch.Tensor:
    """log f for a random denoiser over a 3-token vocabulary: one distribution per (S, i), true token 0."""
    logits = torch.randn(2**length, length, 3, generator=g, dtype=torch.float64) * (
        0.5 + 3 * torch.rand(1, generator=g)
    )
    logf = torch.log_softmax(logits, -1)[..., 0]
    return torch.where(subset_masks(length), logf, torch.zeros_like(logf))


# ----------------------------------------------------------------------------------- exact values


def beta_weight(n: int, length: int) -> float:
    """B(n, L − n + 1) = (n−1)!(L−n)!/L! = 1/(n·C(L, n))."""
    return 1.0 / (n * math.comb(length, n))


def subset_beta_weights(length: int) -> torch.Tensor:
    """[2^L] float64: B(|S|, L − |S| + 1) per subset, 0 for the empty set."""
    sizes = subset_masks(length).sum(1).tolist()
    return torch.tensor([beta_weight(n, length) if n else 0.0 for n in sizes], dtype=torch.float64)


def exact_elbo(table: torch.Tensor) -> float:
    """Σ_{S ≠ ∅} B(|S|, L − |S| + 1)·Σ_{i∈S} log f(x_i | z_S)."""
    return float((subset_beta_weights(table.shape[1]) * table.sum(1)).sum())


def exact_logp(table: torch.Tensor) -> float:
    """log (1/L!) Σ_σ Π_k f(x_{σ_k} | z_{S_k}), S_k = {σ_k..σ_L}."""
    length = table.shape[1]
    terms = []
    for order in itertools.permutations(range(length)):
        s, total = 2**length - 1, 0.0
        for pos in order:
            total += float(table[s, pos])
            s &= ~(1 << pos)
        terms.append(total)
    return float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0)) - math.lgamma(length + 1)


def exact_eubo_terms(table: torch.Tensor, beta: float) -> torch.Tensor:
    """[L]: log Σ_{S ∋ i} B(|S|, L − |S| + 1)·f(x_i | z_S)^β, computed in log space."""
    masks = subset_masks(table.shape[1])
    log_b = subset_beta_weights(table.shape[1]).clamp_min(1e-300).log()
    terms = torch.where(masks, beta * table + log_b[:, None], torch.full_like(table, -math.inf))
    return torch.logsumexp(terms, dim=0)


def exact_eubo(table: torch.Tensor, beta: float) -> float:
    """SPG eq. 7 without its constant: Σ_i (1/β)·log Σ_{S ∋ i} B(|S|, L − |S| + 1)·f(x_i | z_S)^β."""
    return float(exact_eubo_terms(table, beta).sum() / beta)


# ------------------------------------------------------------------ mask-schedule distributions


def exact_count_law(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-count schedule over the subsets of subset_masks: n ~ U{1..L}, S uniform of size n.

    Returns (probability [2^L], weight L/n [2^L]); the empty set has probability and weight 0.
    """
    sizes = subset_masks(length).sum(1)
    prob = torch.zeros(2**length, dtype=torch.float64)
    weight = torch.zeros(2**length, dtype=torch.float64)
    for s, n in enumerate(sizes.tolist()):
        if n:
            prob[s] = 1.0 / (length * math.comb(length, n))
            weight[s] = length / n
    return prob, weight


def tlc_pair_law(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified exact-count pairs (GDSD-TLC / ESPO): n ~ U{0..L}, S uniform of size n, plus S^c.

    Returns, indexed by the base set S: probability [2^L], base weight (L+1)/n and complement weight
    (L+1)/(L−n), both inf where their set is empty (the estimator must score those as 0).
    """
    sizes = subset_masks(length).sum(1).double()
    prob = torch.tensor([1.0 / ((length + 1) * math.comb(length, int(n))) for n in sizes], dtype=torch.float64)
    return prob, (length + 1) / sizes, (length + 1) / (length - sizes)


def complement_index(length: int) -> torch.Tensor:
    """[2^L] long: index of S^c for every subset index S."""
    return (2**length - 1) - torch.arange(2**length)


# A plain random exact-count schedule: L/n weights, no prompt masking; cfg(**changes) varies it.
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
