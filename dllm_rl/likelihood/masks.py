"""Mask-sampling schedules (README, "Objectives"): one family shared by every estimator.

A schedule draws R masked copies of each sequence. Per copy it gives the completion positions
replaced by the mask token, the positions whose log-probability is *scored* (a subset), a prompt
mask, the copy's mask ratio t and its weight in ELBO-type sums. Every draw comes from a
``torch.Generator`` seeded from (run seed, rollout round, inner step, MC slot, sample uid), never
from the global RNG: the same seed regenerates the same mask on any rank, so the current, old and
reference policies can be scored on identical masks and a resumed run replays them.

Scope. ``valid``: only positions up to and including the first EOS may be masked and scored; the
post-EOS padding is always masked in the input and never scored. ``all``: every completion position.
Below, E is the set of positions in scope and D = |E|.

Kinds (per copy):
  * ``full``       every completion position masked, E scored, t = 1 (d1 / wd1 one-step estimator).
  * ``random``     t ~ U(t_min, t_max); ``exact``: n = clamp(⌈t·D⌉, 1, D) positions of E chosen
                   uniformly (t ~ U(0,1) gives n ~ U{1..D}, LLaDA's exact-count form); ``bernoulli``:
                   each position of E masked independently with probability t.
  * ``stratified`` over a stratum of b rows (a micro-batch or a prompt group) one offset u ~ U[0,1)
                   is shared; row j masks n_j = ⌊((u + j/b) mod 1)·(D+1)⌋ ∈ {0..D} uniformly chosen
                   positions, t = n_j/(D+1). Each n_j is uniform on {0..D}; together they cover the
                   ratio axis evenly (low discrepancy).
  * ``blockwise``  (SPG) the completion is cut into blocks of ``block_len``; a block b containing a
                   valid position is chosen per copy (``uniform_distinct``: distinct blocks across the
                   copies, uniformly; ``reference_modulo``: SPG's permutation-modulo rule); every later
                   block is masked, k ~ U{max(1,⌊ℓ·t_min⌋)..min(⌊ℓ·t_max⌋,ℓ)} of the ℓ valid positions
                   of block b are masked, and every earlier position (prompt and earlier blocks) is
                   masked with probability ``prompt_mask_prob`` (earlier completion positions masked
                   this way are scored). ``future_blocks: include`` scores the masked later blocks
                   (SPG's code); ``exclude`` masks them in the input only. Not an unbiased ELBO
                   estimator under any choice: a rollout-matched surrogate.
``coupled`` (random, stratified): copies come in pairs (base, complement); the complement masks and
scores exactly the positions of E that the base left clean, with the same prompt mask and ratio 1 − t
(random) or (D − n)/(D + 1) (stratified).

Weights, with n the copy's scored count (0 when n = 0, i.e. 0·(1/0) := 0):
  ``none`` 1 · ``inv_t_sampled`` 1/t · ``inv_t_empirical`` D/n (blockwise ``exclude``: D counts the
  valid positions up to the end of the chosen block) · ``inv_count`` 1/n · ``tlc`` (D+1)/n, i.e. 1/t
  and 1/(D/(D+1) − t) for a stratified coupled pair (GDSD-TLC / ESPO).
Unbiased ELBO estimators (README, "Objectives"): random+bernoulli+inv_t_sampled with t ~ U(0,1);
random+exact+inv_t_empirical; the same two coupled; stratified+coupled+tlc.

The schedule's schema, ``MaskCfg`` (``objective.mask``, and DMPO's ``objective.rollout_mask``), and its
rules, ``check_mask``, are declared here, beside ``sample_masks`` that reads it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.schema import option, typed

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


# ------------------------------------------------------------------------------------------ schema


class MaskKind(Enum):
    full = "full"
    random = "random"
    blockwise = "blockwise"
    stratified = "stratified"


class CountMode(Enum):
    bernoulli = "bernoulli"
    exact = "exact"


class MaskWeight(Enum):
    none = "none"
    inv_t_sampled = "inv_t_sampled"
    inv_t_empirical = "inv_t_empirical"
    inv_count = "inv_count"
    tlc = "tlc"


class MaskScope(Enum):
    valid = "valid"
    all = "all"


class BlockChoice(Enum):
    uniform_distinct = "uniform_distinct"
    reference_modulo = "reference_modulo"


class FutureBlocks(Enum):
    include = "include"
    exclude = "exclude"


class StratifyOver(Enum):
    microbatch = "microbatch"
    group = "group"


@dataclass
class MaskCfg:
    # mask-sampling schedule
    kind: MaskKind = MaskKind.random
    coupled: bool = False
    # exact: n = ceil(t*L) positions chosen uniformly; bernoulli: each position with probability t
    count_mode: CountMode = CountMode.exact
    # t ~ U(t_min, t_max)
    t_min: float = 0.0
    # upper end of the mask ratio
    t_max: float = 1.0
    # only positions up to the first EOS are scored
    scope: MaskScope = MaskScope.valid
    # L / (masked count)
    weight: MaskWeight = MaskWeight.inv_t_empirical
    # probability of masking each prompt (and clean earlier-block) position; 0 = the prompt is never masked
    prompt_mask_prob: float = 0.0
    block_len: int = 32
    # uniform_distinct: copies take distinct blocks uniformly; reference_modulo: SPG code's permutation rule
    block_choice: BlockChoice = BlockChoice.uniform_distinct
    # include: later (fully masked) blocks are scored too, as in SPG's code; exclude: masked, not scored
    future_blocks: FutureBlocks = FutureBlocks.include
    # rows of one stratum: microbatch (reference) | group
    stratify_over: StratifyOver = StratifyOver.microbatch


def check_mask(m: Any, where: str, copies: int | None, need: Callable[[bool, str], None]) -> None:
    """Rules of one mask schedule; ``copies`` is the number of masked copies drawn per sequence."""
    kind = option(m, "kind")
    need(
        0.0 <= m["t_min"] < m["t_max"] <= 1.0,
        f"{where}.t_min={m['t_min']} and {where}.t_max={m['t_max']} need 0 <= t_min < t_max <= 1",
    )
    need(0.0 <= m["prompt_mask_prob"] < 1.0, f"{where}.prompt_mask_prob={m['prompt_mask_prob']} must be in [0, 1)")
    need(m["block_len"] >= 1, f"{where}.block_len={m['block_len']} must be >= 1")
    if m["coupled"]:
        need(
            kind in ("random", "stratified"),
            f"{where}.coupled=true needs {where}.kind random or stratified (not {kind})",
        )
        if copies is not None:
            need(copies % 2 == 0, f"{where}.coupled=true draws pairs: the number of copies ({copies}) must be even")


# ------------------------------------------------------------------------------------------- draws


def mask_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class MaskDraw:
    """R masked copies of N sequences. Coupled schedules order copies as (base, complement) pairs."""

    completion: torch.Tensor  # [N, R, L] bool: completion positions replaced by the mask token
    prompt: torch.Tensor  # [N, R, P] bool: masked prompt positions
    weight: torch.Tensor  # [N, R] float32: weight of each copy in ELBO-type sums (0 if nothing is scored)
    t: torch.Tensor  # [N, R] float32: the copy's mask ratio
    scored: torch.Tensor | None = None  # [N, R, L] bool: positions whose log-prob is used (⊆ completion)

    def __post_init__(self) -> None:
        if self.scored is None:
            self.scored = self.completion


def concat_draws(draws: Sequence[MaskDraw]) -> MaskDraw:
    """Several draws of the same rows as one, copies side by side, so that one forward scores them all."""
    return MaskDraw(
        torch.cat([d.completion for d in draws], dim=1),
        torch.cat([d.prompt for d in draws], dim=1),
        torch.cat([d.weight for d in draws], dim=1),
        torch.cat([d.t for d in draws], dim=1),
        torch.cat([d.scored for d in draws], dim=1),  # type: ignore[misc]
    )


@dataclass(frozen=True)
class Stratum:
    """Where a row sits in its stratum: rows sharing ``seed`` share the offset u; row ``index`` of ``size``."""

    seed: int
    index: int
    size: int


def _choose(scores: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[C, L] bool: for copy c, ``counts[c]`` positions of ``eligible`` chosen uniformly (lowest scores)."""
    ranked = scores.masked_fill(~eligible, math.inf).argsort(dim=1).argsort(dim=1)
    return (ranked < counts.unsqueeze(1)) & eligible


def _random_copies(cfg: MaskCfg, g: torch.Generator, scope: torch.Tensor, copies: int):
    """(scored [C, L], t [C]) for the ``random`` kind."""
    t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(copies, generator=g)
    scores = torch.rand(copies, scope.numel(), generator=g)
    if cfg.count_mode is CountMode.exact:
        d = int(scope.sum())
        counts = torch.clamp(torch.ceil(t * d), min=1, max=max(d, 1)).long()
        return _choose(scores, scope.expand(copies, -1), counts), t
    return (scores < t.unsqueeze(1)) & scope, t  # CountMode.bernoulli


def _stratified_copies(g: torch.Generator, scope: torch.Tensor, copies: int, stratum: Stratum, offsets: torch.Tensor):
    d = int(scope.sum())
    s = torch.remainder(offsets + stratum.index / stratum.size, 1.0)
    counts = torch.clamp(torch.floor(s * (d + 1)), max=d).long()
    scores = torch.rand(copies, scope.numel(), generator=g)
    return _choose(scores, scope.expand(copies, -1), counts), counts.float() / (d + 1)


def _pick_blocks(cfg: MaskCfg, g: torch.Generator, eligible: list[int], n_blocks: int, copies: int):
    if cfg.block_choice is BlockChoice.uniform_distinct:
        if len(eligible) >= copies:
            order = torch.randperm(len(eligible), generator=g)[:copies]
        else:
            order = torch.randint(len(eligible), (copies,), generator=g)
        return [eligible[int(i)] for i in order]
    perm = torch.randperm(n_blocks, generator=g)  # BlockChoice.reference_modulo
    return [eligible[int(perm[c % n_blocks]) % len(eligible)] for c in range(copies)]


def _blockwise_copies(cfg: MaskCfg, g: torch.Generator, valid: torch.Tensor, copies: int, p_prompt: float):
    """(input [C, L], scored [C, L], denominators [C], earlier-than-block [C, L] for prompt noise)."""
    length = valid.numel()
    block_len = cfg.block_len
    n_blocks = math.ceil(length / block_len)
    eligible = [b for b in range(n_blocks) if bool(valid[b * block_len : (b + 1) * block_len].any())]
    masked = torch.zeros(copies, length, dtype=torch.bool)
    scored = torch.zeros(copies, length, dtype=torch.bool)
    denominators = torch.zeros(copies)
    if not eligible:
        return masked, scored, denominators
    include = cfg.future_blocks is FutureBlocks.include
    t_min, t_max = cfg.t_min, cfg.t_max
    position = torch.arange(length)
    for c, b in enumerate(_pick_blocks(cfg, g, eligible, n_blocks, copies)):
        lo, hi = b * block_len, min((b + 1) * block_len, length)
        in_block = (position >= lo) & (position < hi) & valid
        ell = int(in_block.sum())
        k_lo, k_hi = max(1, math.floor(ell * t_min)), min(math.floor(ell * t_max), ell)
        k_hi = max(k_hi, k_lo)
        k = int(torch.randint(k_lo, k_hi + 1, (1,), generator=g))
        chosen = _choose(torch.rand(1, length, generator=g), in_block.unsqueeze(0), torch.tensor([k]))[0]
        later = position >= hi
        earlier = (position < lo) & valid
        noise = (torch.rand(length, generator=g) < p_prompt) & earlier if p_prompt > 0 else torch.zeros_like(earlier)
        masked[c] = chosen | later | noise | ~valid
        scored[c] = chosen | noise | (later & valid if include else torch.zeros_like(later))
        denominators[c] = valid.sum() if include else (valid & (position < hi)).sum()
    return masked, scored, denominators


def sample_masks(
    cfg: MaskCfg | Mapping[str, Any],
    completion_valid: torch.Tensor,
    prompt_valid: torch.Tensor,
    replicates: int,
    seeds: Sequence[int],
    strata: Sequence[Stratum] | None = None,
) -> MaskDraw:
    """Draw ``replicates`` masked copies of every sequence; row n uses a generator seeded by seeds[n].

    completion_valid [N, L] marks valid positions v_i (up to and including the first EOS);
    prompt_valid [N, P] marks real (non-padding) prompt tokens. ``strata`` (one per row) is needed by
    the ``stratified`` kind. ``cfg`` is the schedule (a MaskCfg, or a mapping of its keys, absent ones taking
    the schema's defaults).
    """
    cfg = typed(MaskCfg, cfg, "objective.mask")
    kind, weight_kind, coupled = cfg.kind, cfg.weight, cfg.coupled
    if coupled and kind not in (MaskKind.random, MaskKind.stratified):
        raise ValueError(f"objective.mask.coupled=true needs kind random or stratified, not {kind.value!r}")
    if coupled and replicates % 2:
        raise ValueError(f"coupled masks come in pairs: the number of copies ({replicates}) must be even")
    if kind is MaskKind.stratified and (strata is None or len(strata) != len(seeds)):
        raise ValueError("objective.mask.kind=stratified needs one Stratum per row")
    scope_all = cfg.scope is MaskScope.all
    p_prompt = cfg.prompt_mask_prob
    base = replicates // 2 if coupled else replicates

    n_rows, length = completion_valid.shape
    prompt_len = prompt_valid.shape[1]
    completion = torch.zeros(n_rows, replicates, length, dtype=torch.bool)
    scored = torch.zeros(n_rows, replicates, length, dtype=torch.bool)
    prompt = torch.zeros(n_rows, replicates, prompt_len, dtype=torch.bool)
    t_all = torch.zeros(n_rows, replicates)
    denominators = torch.zeros(n_rows, replicates)
    valid_cpu, prompt_valid_cpu = completion_valid.bool().cpu(), prompt_valid.bool().cpu()
    offsets: dict[int, torch.Tensor] = {}
    for n in range(n_rows):
        g = torch.Generator().manual_seed(int(seeds[n]))
        valid = valid_cpu[n]
        scope = torch.ones_like(valid) if scope_all else valid
        d = float(scope.sum())
        if kind is MaskKind.blockwise:
            masked_n, scored_n, denominators[n] = _blockwise_copies(cfg, g, valid, base, p_prompt)
            t_all[n] = scored_n.sum(dim=1) / denominators[n].clamp_min(1.0)
        else:
            if kind is MaskKind.full:
                scored_n, t = scope.expand(base, -1).clone(), torch.ones(base)
            elif kind is MaskKind.random:
                scored_n, t = _random_copies(cfg, g, scope, base)
            else:
                stratum = strata[n]  # type: ignore[index]
                if stratum.seed not in offsets:
                    offsets[stratum.seed] = torch.rand(base, generator=torch.Generator().manual_seed(stratum.seed))
                scored_n, t = _stratified_copies(g, scope, base, stratum, offsets[stratum.seed])
            if coupled:
                complement = scope & ~scored_n
                scored_n = torch.stack([scored_n, complement], dim=1).reshape(replicates, length)
                t_comp = 1.0 - t if kind is MaskKind.random else complement.sum(dim=1).float() / (d + 1)
                t = torch.stack([t, t_comp], dim=1).reshape(replicates)
            if kind is MaskKind.full:
                masked_n = torch.ones_like(scored_n)
            else:  # out-of-scope (post-EOS) positions are masked in the input, never scored
                masked_n = scored_n | ~scope
            t_all[n] = t
            denominators[n] = d
        completion[n], scored[n] = masked_n, scored_n
        if p_prompt > 0:
            noise = (torch.rand(base, prompt_len, generator=g) < p_prompt) & prompt_valid_cpu[n]
            prompt[n] = noise.repeat_interleave(2, dim=0) if coupled else noise

    counts = scored.sum(dim=2).float()
    if weight_kind is MaskWeight.inv_t_sampled:
        weight = 1.0 / t_all.clamp_min(1e-12)
    elif weight_kind is MaskWeight.inv_t_empirical:
        weight = denominators / counts.clamp_min(1.0)
    elif weight_kind is MaskWeight.inv_count:
        weight = 1.0 / counts.clamp_min(1.0)
    elif weight_kind is MaskWeight.tlc:
        weight = (denominators + 1.0) / counts.clamp_min(1.0)
    else:  # MaskWeight.none
        weight = torch.ones_like(counts)
    weight = torch.where(counts > 0, weight, torch.zeros_like(weight))
    device = completion_valid.device
    return MaskDraw(completion.to(device), prompt.to(device), weight.to(device), t_all.to(device), scored.to(device))
