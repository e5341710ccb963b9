"""Likelihood surrogates of masked diffusion models, as pure functions of tensors.

The primitive is log f_θ(x_i | c', z_S): the model's log-probability of the true token x_i at a
masked completion position i, given the (possibly noised) prompt c' and the completion with the
positions S masked (README, "Objectives"). Every estimator below is a reduction of these values over
R masked copies r = 1..R of a sequence, copy r scoring the positions S_r with weight w_r (the
schedule's 1/t_r, L/|S_r|, … ; a copy that scores nothing contributes 0, i.e. 0 · (1/0) := 0).
Write ℓ_{r,i} = log f_θ(x_i | c'_r, z_{S_r}).

ELBO (linear schedule α_t = 1 − t):
    ELBO(x) ≈ (1/R) Σ_r w_r Σ_{i ∈ S_r} ℓ_{r,i}.

EUBO (SPG eq. 7: EUBO_β = Σ_{i=1}^{L_x} (1/β)·log E[w·1(i∈S)·f(x_i | z_S)^β]), in log space so that
f^β never underflows:
    log P̄_i = logsumexp_{r : i ∈ S_r} (β·ℓ_{r,i} + log w_r) − log R     (= log (1/R) Σ_r w_r 1(i∈S_r) f^β)
    U = {i : i ∈ S_r for some r}
    EUBO(x) ≈ Σ_{i ∈ U} (1/β)·log P̄_i + (L_x − |U|)·(mean over U) = L_x · (1/|U|) Σ_{i ∈ U} (1/β)·log P̄_i
A position no copy scores has P̄_i = 0 (log −∞): the draw holds no estimate of its term, so it takes
the mean term of the covered positions, which is SPG's reference code (0 when U = ∅). The log of
an average is biased low (Jensen), by less as R grows; docs/estimators.md has the measured bias.

Mixture (SPG eq. 8, applied to the per-sequence values):
    Mix = ω·EUBO + (1 − ω)·ELBO.

Coupled (denoiser) score over complement pairs (2j, 2j+1) (GDSD):
    S_j(x) = ½·( w_{2j} Σ_{i ∈ S_{2j}} ℓ_{2j,i} + w_{2j+1} Σ_{i ∈ S_{2j+1}} ℓ_{2j+1,i} ),
the plain GDSD score with w ≡ 1, ESPO's coupled ELBO (GDSD-TLC) with w = 1/t, 1/(L/(L+1) − t).

One-step mean-field estimate (d1): every completion position masked, prompt masked by c',
    φ_θ(x_k | c') = log softmax(f_θ(c' ⊕ M^L))_{P+k}[x_k],   log π_θ(x | c) ≈ Σ_k v_k·φ_θ(x_k | c').
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from dllm_rl.lazy import lazy_import
from dllm_rl.likelihood.masks import MaskDraw
from dllm_rl.positions import position_ids_from_attention_mask

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)

LogitsFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in at least float32, without materialising the full log-softmax."""
    # Half-precision logits are upcast; float64 ones (exact tests) keep their precision.
    if logits.dtype != torch.float64:
        logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def leading_padding(prompt_attention: torch.Tensor) -> int:
    """How many leading prompt columns hold no real token in any row (0 when no row has one at all)."""
    real = prompt_attention.bool().any(dim=0)
    if not bool(real.any()):
        return 0  # nothing real to align to: keep the layout as it is
    return int(real.int().argmax())


def masked_logp(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor,
    prompt_attention: torch.Tensor,
    completion_ids: torch.Tensor,
    masks: MaskDraw,
    mask_id: int,
    chunk_rows: int = 0,
    position_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """log f_θ(x_i | row) at the scored positions of every copy: [N, R, L], 0 elsewhere.

    The N·R masked copies go through the model in one batched forward, or, with chunk_rows > 0, in
    forwards of at most chunk_rows rows each (same values; bounds the activation memory).

    Padding is kept to these rows' own longest prompt: a micro-batch sliced out of a rollout batch
    carries the left padding of the whole round's longest prompt, and the leading columns that are
    padding in every row (of the call, and again of each chunk) are dropped before the forward. The
    values do not change: padding keys are masked out and the position ids count real tokens only.

    ``position_weight`` [N, L] (None: 1 everywhere) scales the gradient that flows back through each
    completion position's log-prob, never its value: w·ℓ + (1 − w)·stop_grad(ℓ). Every loss built on
    these values is unchanged, and for a 0/1 weight and its complement the two gradients add up to the
    unweighted one (the chain rule is linear in the upstream gradients). The gradient-noise instrument
    (dllm_rl/variance.py) uses it to split a gradient into the positions a reward can and cannot see.
    """
    n, r, length = masks.completion.shape
    lead = leading_padding(prompt_attention)
    if lead:
        prompt_ids, prompt_attention = prompt_ids[:, lead:], prompt_attention[:, lead:]
        masks = dataclasses.replace(masks, prompt=masks.prompt[:, :, lead:])
    width = prompt_ids.shape[1]
    prompt = prompt_ids.unsqueeze(1).expand(n, r, -1)
    completion = completion_ids.unsqueeze(1).expand(n, r, -1)
    noisy_prompt = torch.where(masks.prompt, torch.full_like(prompt, mask_id), prompt)
    noisy_completion = torch.where(masks.completion, torch.full_like(completion, mask_id), completion)
    inputs = torch.cat([noisy_prompt, noisy_completion], dim=2).reshape(n * r, -1)
    attention = torch.cat([prompt_attention, torch.ones_like(completion_ids)], dim=1)
    attention = attention.unsqueeze(1).expand(n, r, -1).reshape(n * r, -1)
    positions = position_ids_from_attention_mask(attention)
    targets = completion.reshape(n * r, length)
    step = chunk_rows if 0 < chunk_rows < n * r else max(1, n * r)
    pieces = []
    for start in range(0, n * r, step):
        rows = slice(start, start + step)
        ids, attn, pos = inputs[rows], attention[rows], positions[rows]
        # A chunk may have shorter prompts than the whole call; the cut columns are padding in each
        # of its rows, so the position ids computed over the full width stay right.
        cut = leading_padding(attn[:, :width]) if step < n * r else 0
        if cut:
            ids, attn, pos = ids[:, cut:].contiguous(), attn[:, cut:].contiguous(), pos[:, cut:].contiguous()
        # Slice the completion logits before token_logprobs so only they are upcast to float32.
        logits = logits_fn(ids, attn, pos)[:, -length:]
        pieces.append(token_logprobs(logits, targets[rows]))
    logp = torch.cat(pieces, dim=0).reshape(n, r, length)
    if position_weight is not None:
        w = position_weight.to(device=logp.device, dtype=logp.dtype).unsqueeze(1)
        logp = w * logp + (1.0 - w) * logp.detach()
    return torch.where(masks.scored, logp, torch.zeros_like(logp))


def one_step_logp(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor,
    prompt_attention: torch.Tensor,
    completion_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    mask_id: int,
) -> torch.Tensor:
    """d1's φ_θ(x_k | c', M^L) at every completion position: [N, L] (the caller applies validity).

    prompt_mask [N, P] bool marks the prompt positions replaced by the mask token. This is one masked
    copy with the whole completion masked, so it shares masked_logp's code path.
    """
    n, length = completion_ids.shape
    everything = torch.ones(n, 1, length, dtype=torch.bool, device=completion_ids.device)
    ones = torch.ones(n, 1, device=completion_ids.device)
    draw = MaskDraw(everything, prompt_mask.bool().unsqueeze(1), ones, ones)
    return masked_logp(logits_fn, prompt_ids, prompt_attention, completion_ids, draw, mask_id)[:, 0]


def _copy_sums(logp: torch.Tensor, scored: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w_r Σ_{i ∈ S_r} ℓ_{r,i}: [N, R]; a copy scoring nothing gives 0 whatever its weight (even inf)."""
    # where (not multiplication) keeps garbage in unscored entries, and inf weights of empty copies,
    # out of both the value and the gradient.
    per_copy = torch.where(scored, logp, torch.zeros_like(logp)).sum(dim=2)
    weight = torch.where(scored.any(dim=2), weight, torch.zeros_like(weight))
    return weight * per_copy


def elbo(logp: torch.Tensor, scored: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sequence ELBO estimate [N] from logp [N, R, L], scored [N, R, L] and copy weights [N, R]."""
    return _copy_sums(logp, scored, weight).mean(dim=1)


def eubo(
    logp: torch.Tensor,
    scored: torch.Tensor,
    weight: torch.Tensor,
    beta: float,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Per-sequence EUBO estimate [N]: L_x times the mean of (1/β)·log P̄_i over the covered positions U.

    lengths [N] is L_x, the number of positions eq. 7 sums over. Eq. 7 has one term per position; a
    position that no copy scores has the estimate P̄_i = 0 of its inner expectation, whose log is
    −∞, so it takes the mean term of the covered positions instead (this is SPG's reference code,
    which averages over the tokens masked at least once and multiplies by the length). Scoring it 0,
    as a sum over U alone does, puts in the largest value a term can take (E[w·1(i∈S)] = 1 under
    an ELBO schedule and f ≤ 1, so every exact term is ≤ 0) and biases the estimate upward, by more
    the fewer positions the copies cover. A copy with weight 0 contributes nothing to any position,
    like an unscored one. Value and gradient stay finite whenever the log-probabilities of the
    contributing entries are finite; 0 when no position is covered.
    """
    if beta <= 0:
        raise ValueError(f"eubo needs beta > 0, got {beta}")
    n_copies = logp.shape[1]
    live = weight > 0
    contributes = scored & live.unsqueeze(2)  # [N, R, L]
    covered = contributes.any(dim=1)  # [N, L]: the set U of the docstring
    # Zero weights become 1 before the log: log(0) would send inf·0 = NaN back through the where below.
    log_w = torch.log(torch.where(live, weight, torch.ones_like(weight))).to(logp.dtype)
    terms = beta * logp + log_w.unsqueeze(2)
    terms = torch.where(contributes, terms, torch.full_like(terms, -math.inf))
    # A position no copy scores would be a logsumexp over −inf only: −inf value and NaN gradient.
    # Feed it zeros instead and drop it after the reduction.
    terms = torch.where(covered.unsqueeze(1), terms, torch.zeros_like(terms))
    log_pbar = torch.logsumexp(terms, dim=1) - math.log(n_copies)  # [N, L]
    per_position = torch.where(covered, log_pbar / beta, torch.zeros_like(log_pbar))
    count = covered.sum(dim=1).clamp_min(1).to(per_position.dtype)
    return lengths.to(per_position.dtype) * per_position.sum(dim=1) / count


def mixture(v_eubo: torch.Tensor, v_elbo: torch.Tensor, omega: float) -> torch.Tensor:
    """ω·EUBO + (1 − ω)·ELBO on per-sequence values (SPG's mixture for negative samples)."""
    return omega * v_eubo + (1.0 - omega) * v_elbo


def coupled_score(logp: torch.Tensor, scored: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Score of every (base, complement) pair: [N, R/2]; copies 2j and 2j+1 form pair j."""
    n, r, _ = logp.shape
    if r % 2:
        raise ValueError(f"coupled_score needs (base, complement) pairs, got an odd number of copies R={r}")
    return _copy_sums(logp, scored, weight).reshape(n, r // 2, 2).mean(dim=2)


def sequence_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_i mask_i·per_token_i over the last dimension: [N]. Unmasked entries are never read."""
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(dim=-1)


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over the masked entries: [N]; 0 for a sequence with none."""
    count = mask.bool().sum(dim=-1).clamp_min(1)
    return sequence_sum(per_token, mask) / count.to(per_token.dtype)
