"""The SPG sandwich, measured: where the Monte Carlo ELBO and EUBO sit against log p (docs/estimators.md).

The denoiser is a fixed table of the mask pattern (exact.random_table: L ≤ 4 positions, a 3-token
vocabulary, one distribution per (masked set, position)), so log p, the exact ELBO and the exact
EUBO_β of SPG's eq. 7 are enumerable (exact.py). The estimators are the library's own (elbo, eubo)
applied to copies drawn by the shipped mask presets (conf/objective/mask/*.yaml) at SPG's defaults
(conf/objective/spg.yaml: β, m). Their expectations are computed exactly where the draw can be
enumerated: every tuple of copies with its probability (random, blockwise, stratified), a
quadrature over t for the coupled pair. A seeded sample with a z-score bound is used only for many
copies. ``python tests/test_sandwich.py`` prints the table that docs/estimators.md quotes.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy
import pytest
import torch
from exact import exact_elbo, exact_eubo, exact_logp, random_table, subset_index, subset_masks
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

import dllm_rl
from dllm_rl.config import validate
from dllm_rl.errors import ConfigError
from dllm_rl.likelihood import coupled_score, elbo, eubo, mask_seed, sample_masks
from dllm_rl.likelihood.masks import MaskCfg, Stratum
from dllm_rl.objectives import RolloutBatch, get_objective
from dllm_rl.objectives.base import metric_weight
from dllm_rl.objectives.spg import SPGCfg

CONF = Path(dllm_rl.__file__).parent / "conf" / "objective"


def _option(schema: type, *files: Path) -> DictConfig:
    """Option files as Hydra merges them: onto their schema, in order, without their defaults lists."""
    cfg = OmegaConf.structured(schema)
    for path in files:
        node = OmegaConf.load(path)
        node.pop("defaults", None)
        cfg = OmegaConf.merge(cfg, node)
    return cfg


SPG = _option(SPGCfg, CONF / "spg.yaml")
BETA, M = float(SPG.beta), int(SPG.mc_samples)  # SPG's defaults: β = 1.5, m = 2
PRESETS = ("random", "blockwise", "coupled", "stratified")
# The schedule's block length is the sampler's; these lengths give 2, 3 and 2 blocks.
BLOCK_LEN = {2: 1, 3: 1, 4: 2}
INSTANCES = 40  # random tables per length for the claims over many instances


def preset(name: str, length: int) -> dict:
    """The shipped objective/mask preset, with the block length of a completion of this length."""
    cfg = OmegaConf.to_container(_option(MaskCfg, CONF / "mask" / f"{name}.yaml"), resolve=False, enum_to_str=True)
    if cfg["kind"] == "blockwise":
        cfg["block_len"] = BLOCK_LEN[length]
    return cfg


def table(length: int, instance: int) -> torch.Tensor:
    return random_table(length, torch.Generator().manual_seed(100 * length + instance))


# ------------------------------------------------------------------------- the presets' laws, enumerated


class Law:
    """The draw of one sequence's copies as a finite distribution: prob [T], scored [T, R, L], weight [T, R]."""

    def __init__(self, prob: torch.Tensor, scored: torch.Tensor, weight: torch.Tensor) -> None:
        self.prob, self.scored, self.weight = prob, scored, weight

    def __mul__(self, other: Law) -> Law:
        """Two independent draws side by side (copies of self first)."""
        a, b = self.prob.shape[0], other.prob.shape[0]
        i, j = torch.arange(a).repeat_interleave(b), torch.arange(b).repeat(a)
        return Law(
            self.prob[i] * other.prob[j],
            torch.cat([self.scored[i], other.scored[j]], dim=1),
            torch.cat([self.weight[i], other.weight[j]], dim=1),
        )

    def mixture(self, others: list[Law]) -> Law:
        laws = [self, *others]
        return Law(*(torch.cat([getattr(x, f) for x in laws]) for f in ("prob", "scored", "weight")))

    def power(self, n: int) -> Law:
        out = self
        for _ in range(n - 1):
            out = out * self
        return out

    def sample(self, rows: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.multinomial(self.prob, rows, replacement=True, generator=g)
        return self.scored[index], self.weight[index]


def _subsets_of(positions: list[int], length: int) -> list[tuple[int, ...]]:
    return [c for k in range(1, len(positions) + 1) for c in itertools.combinations(positions, k)]


def random_law(cfg: dict, length: int) -> Law:
    """One copy of ``random`` with exact counts: n = clamp(⌈t·L⌉, 1, L), t ~ U(t_min, t_max), weight L/n."""
    assert cfg["count_mode"] == "exact" and cfg["weight"] == "inv_t_empirical" and not cfg.get("coupled")
    t_min, t_max = cfg["t_min"], cfg["t_max"]
    p_count = [
        max(0.0, min(t_max, n / length) - max(t_min, (n - 1) / length if n > 1 else -1.0)) / (t_max - t_min)
        for n in range(1, length + 1)
    ]
    rows = [(p_count[len(s) - 1] / math.comb(length, len(s)), s) for s in _subsets_of(list(range(length)), length)]
    scored = torch.zeros(len(rows), 1, length, dtype=torch.bool)
    for r, (_, s) in enumerate(rows):
        scored[r, 0, list(s)] = True
    prob = torch.tensor([p for p, _ in rows], dtype=torch.float64)
    return Law(prob, scored, length / scored.sum(2).double())


def blockwise_block_law(cfg: dict, length: int, block: int) -> Law:
    """One block-wise copy given its block (SPG's schedule, all positions valid): k ~ U{k_lo..k_hi} of the
    block's positions, every later position, and each earlier one with probability prompt_mask_prob."""
    assert cfg["weight"] == "inv_t_empirical" and cfg["future_blocks"] == "include"
    lo, hi = block * cfg["block_len"], min((block + 1) * cfg["block_len"], length)
    ell, p = hi - lo, cfg["prompt_mask_prob"]
    k_lo = max(1, math.floor(ell * cfg["t_min"]))
    k_hi = max(k_lo, min(math.floor(ell * cfg["t_max"]), ell))
    rows = []
    for k in range(k_lo, k_hi + 1):
        for chosen in itertools.combinations(range(lo, hi), k):
            for noise in itertools.product((False, True), repeat=lo):
                mask = torch.zeros(length, dtype=torch.bool)
                mask[list(chosen)] = True
                mask[hi:] = True
                mask[:lo] = torch.tensor(noise, dtype=torch.bool)
                prob = math.prod(p if z else 1 - p for z in noise) / ((k_hi - k_lo + 1) * math.comb(ell, k))
                rows.append((prob, mask))
    scored = torch.stack([m for _, m in rows])[:, None]
    return Law(torch.tensor([p for p, _ in rows], dtype=torch.float64), scored, length / scored.sum(2).double())


def blockwise_law(cfg: dict, length: int, copies: int) -> Law:
    """``copies`` block-wise copies: distinct blocks, uniformly, when there are enough (uniform_distinct)."""
    assert cfg["block_choice"] == "uniform_distinct"
    blocks = [blockwise_block_law(cfg, length, b) for b in range(math.ceil(length / cfg["block_len"]))]
    if copies <= len(blocks):
        choices = list(itertools.permutations(range(len(blocks)), copies))
    else:
        choices = list(itertools.product(range(len(blocks)), repeat=copies))
    parts = []
    for choice in choices:
        law = blocks[choice[0]]
        for b in choice[1:]:
            law = law * blocks[b]
        parts.append(Law(law.prob / len(choices), law.scored, law.weight))
    return parts[0].mixture(parts[1:])


def stratified_pair_law(cfg: dict, length: int) -> Law:
    """One stratified pair (a row's marginal): n ~ U{0..L}, S uniform of size n, plus S^c; TLC weights."""
    assert cfg["coupled"] and cfg["weight"] == "tlc"
    masks = subset_masks(length)
    n = masks.sum(1)
    prob = torch.tensor([1 / ((length + 1) * math.comb(length, int(k))) for k in n], dtype=torch.float64)
    scored = torch.stack([masks, ~masks], dim=1)
    counts = scored.sum(2).double()
    weight = torch.where(counts > 0, (length + 1) / counts.clamp_min(1), torch.zeros(()))
    return Law(prob, scored, weight)


def draw_law(name: str, length: int, copies: int, elbo_copies: int | None = None) -> Law:
    """The law of SPG's EUBO copies: the ELBO's ``elbo_copies`` (default all) plus the rest, drawn apart."""
    cfg = preset(name, length)
    first = copies if elbo_copies is None else elbo_copies
    if name == "blockwise":
        law = blockwise_law(cfg, length, first)
        return law * blockwise_law(cfg, length, copies - first) if copies > first else law
    unit = random_law(cfg, length) if name == "random" else stratified_pair_law(cfg, length)
    return unit.power(copies // unit.scored.shape[1])


# ------------------------------------------------------------------------ coupled pairs: t is continuous

QUADRATURE = 256  # Gauss-Legendre nodes in u, t = u²(3 − 2u): dt/du = 6u(1 − u) tames log t at both ends


def quadrature() -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes t in (0, 1) and weights (summing to 1) for E over t ~ U(0, 1)."""
    u, w = numpy.polynomial.legendre.leggauss(QUADRATURE)
    u, w = torch.from_numpy((u + 1) / 2), torch.from_numpy(w / 2)
    return u * u * (3 - 2 * u), w * 6 * u * (1 - u)


def coupled_pairs(length: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each t and base set S: P(S | t) = t^|S| (1−t)^(L−|S|), copies (S, S^c), weights 1/t, 1/(1−t)."""
    cfg = preset("coupled", length)
    assert cfg["coupled"] and cfg["count_mode"] == "bernoulli" and cfg["weight"] == "inv_t_sampled"
    assert (cfg["t_min"], cfg["t_max"]) == (0.0, 1.0)
    masks = subset_masks(length)
    n = masks.sum(1).double()
    prob = t[:, None] ** n * (1 - t[:, None]) ** (length - n)  # [Q, 2^L]
    scored = torch.stack([masks, ~masks], dim=1)  # [2^L, 2, L]
    weight = torch.stack([1 / t[:, None].expand_as(prob), 1 / (1 - t[:, None]).expand_as(prob)], dim=2)
    weight = torch.where(scored.any(2)[None], weight, torch.zeros(()))  # an empty copy weighs 0
    return prob, scored, weight


def coupled_sample(length: int, pairs: int, rows: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(rows, pairs, 1, generator=g, dtype=torch.float64)
    base = torch.rand(rows, pairs, length, generator=g, dtype=torch.float64) < t
    scored = torch.stack([base, ~base], dim=2).reshape(rows, 2 * pairs, length)
    weight = torch.cat([1 / t, 1 / (1 - t)], dim=2).reshape(rows, 2 * pairs)
    return scored, torch.where(scored.any(2), weight, torch.zeros(()))


# ------------------------------------------------------------------------------------------ estimators


def estimates(tab: torch.Tensor, scored: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(EUBO, ELBO) of every row of copies [T, R, L] for the table denoiser, with SPG's β."""
    length = tab.shape[1]
    logp = tab[subset_index(scored)]
    lengths = torch.full((scored.shape[0],), float(length), dtype=torch.float64)
    return eubo(logp, scored, weight, BETA, lengths), elbo(logp, scored, weight)


def expected(name: str, tab: torch.Tensor, copies: int, elbo_copies: int | None = None) -> dict[str, float]:
    """Exact E[EUBO], E[ELBO] (over the first ``elbo_copies``), P(EUBO < log p), P(EUBO < ELBO) and the
    standard deviation of EUBO − ELBO, over the preset's draws of ``copies`` copies."""
    length, logp = tab.shape[1], exact_logp(tab)
    first = copies if elbo_copies is None else elbo_copies
    if name == "coupled":
        assert copies == first == 2, "the coupled law is enumerated for one pair"
        t, dt = quadrature()
        prob, scored, weight = coupled_pairs(length, t)
        q, s = prob.shape
        upper, lower = estimates(tab, scored.expand(q, -1, -1, -1).reshape(q * s, 2, length), weight.reshape(q * s, 2))
        prob = (dt[:, None] * prob).reshape(-1)
    else:
        law = draw_law(name, length, copies, first)
        upper, _ = estimates(tab, law.scored, law.weight)
        _, lower = estimates(tab, law.scored[:, :first], law.weight[:, :first])
        prob = law.prob
    assert abs(float(prob.sum()) - 1) < 1e-9
    gap = float((prob * (upper - lower)).sum())
    return {
        "eubo": float((prob * upper).sum()),
        "elbo": float((prob * lower).sum()),
        "p_below_logp": float(prob[upper < logp].sum()),
        "p_below_elbo": float(prob[upper < lower].sum()),
        "gap_sd": math.sqrt(float((prob * (upper - lower - gap) ** 2).sum())),
    }


def blockwise_sample(cfg: dict, length: int, copies: int, rows: int, g: torch.Generator):
    """``rows`` seeded draws of ``copies`` block-wise copies by the same rule as blockwise_law."""
    blocks = [blockwise_block_law(cfg, length, b) for b in range(math.ceil(length / cfg["block_len"]))]
    if copies <= len(blocks):
        choice = torch.rand(rows, len(blocks), generator=g).argsort(1)[:, :copies]
    else:
        choice = torch.randint(len(blocks), (rows, copies), generator=g)
    scored = torch.zeros(rows, copies, length, dtype=torch.bool)
    weight = torch.zeros(rows, copies, dtype=torch.float64)
    for b, law in enumerate(blocks):
        s, w = law.sample(rows * copies, g)
        pick = choice == b
        scored[pick] = s.reshape(rows, copies, length)[pick]
        weight[pick] = w.reshape(rows, copies)[pick]
    return scored, weight


def sampled_eubo(name: str, tab: torch.Tensor, copies: int, rows: int, seed: int) -> tuple[float, float]:
    """(mean, standard error) of the EUBO estimate over ``rows`` seeded draws of SPG's copies (the ELBO's
    M and copies − M more)."""
    length, g = tab.shape[1], torch.Generator().manual_seed(seed)
    if name == "coupled":
        scored, weight = coupled_sample(length, copies // 2, rows, g)
    elif name == "blockwise":
        cfg = preset(name, length)
        parts = [blockwise_sample(cfg, length, n, rows, g) for n in (M, copies - M) if n]
        scored, weight = (torch.cat(x, dim=1) for x in zip(*parts, strict=True))
    else:
        cfg = preset(name, length)
        unit = random_law(cfg, length) if name == "random" else stratified_pair_law(cfg, length)
        per = unit.scored.shape[1]
        s, w = unit.sample(rows * (copies // per), g)
        scored, weight = s.reshape(rows, copies, length), w.reshape(rows, copies)
    upper, _ = estimates(tab, scored, weight)
    return float(upper.mean()), float(upper.std()) / math.sqrt(rows)


def blockwise_target(tab: torch.Tensor) -> float:
    """Where the block-wise EUBO goes as its copies grow: eq. 7 with the block-wise law of one copy in
    place of the ELBO's (Σ_i (1/β) log E[w·1(i∈S)·f^β] over a uniform block and its draw)."""
    length = tab.shape[1]
    law = blockwise_law(preset("blockwise", length), length, 1)
    logf = tab[subset_index(law.scored[:, 0])]
    inner = (law.prob[:, None] * law.weight * torch.where(law.scored[:, 0], torch.exp(BETA * logf), 0.0)).sum(0)
    return float(inner.log().sum() / BETA)


# ------------------------------------------------------------------- the other objectives' estimators


def one_step(tab: torch.Tensor) -> float:
    """d1 / diffu-GRPO / wd1: Σ_i log f(x_i | every position masked) (the prompt mask does not move a table)."""
    return float(tab[-1].sum())


def gdsd_plain(tab: torch.Tensor) -> float:
    """E of GDSD's plain coupled score: a stratified pair (gdsd.yaml), weight 1 per copy."""
    length = tab.shape[1]
    cfg = OmegaConf.to_container(_option(MaskCfg, CONF / "mask" / "gdsd.yaml"), enum_to_str=True)
    assert cfg["kind"] == "stratified" and cfg["coupled"] and cfg["weight"] == "none"
    law = stratified_pair_law({"coupled": True, "weight": "tlc"}, length)
    ones = (law.weight > 0).double()
    score = coupled_score(tab[subset_index(law.scored)], law.scored, ones)[:, 0]
    return float((law.prob * score).sum())


def dmpo_rollout_elbo(tab: torch.Tensor) -> float:
    """E of DMPO's rollout-time ELBO Ê (dmpo_rollout.yaml): λ ~ U(t_min, t_max), a Bernoulli(λ) copy and its
    complement, each weighted L/(masked count); the mean over copies has the mean of one pair's copies."""
    length = tab.shape[1]
    files = (CONF / "mask" / "dmpo_loss.yaml", CONF / "mask" / "dmpo_rollout.yaml")
    cfg = OmegaConf.to_container(_option(MaskCfg, *files), enum_to_str=True)
    assert cfg["count_mode"] == "bernoulli" and cfg["coupled"] and cfg["weight"] == "inv_t_empirical"
    u, w = numpy.polynomial.legendre.leggauss(QUADRATURE)
    lam = torch.from_numpy(cfg["t_min"] + (cfg["t_max"] - cfg["t_min"]) * (u + 1) / 2)
    masks = subset_masks(length)
    n = masks.sum(1).double()
    prob = (torch.from_numpy(w / 2)[:, None] * lam[:, None] ** n * (1 - lam[:, None]) ** (length - n)).reshape(-1)
    base = masks.expand(QUADRATURE, -1, -1).reshape(-1, length)
    scored = torch.stack([base, ~base], dim=1)
    counts = scored.sum(2).double()
    weight = torch.where(counts > 0, length / counts.clamp_min(1), torch.zeros(()))
    return float((prob * elbo(tab[subset_index(scored)], scored, weight)).sum())


def covered_sum(tab: torch.Tensor, scored: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ over the covered positions alone, uncovered ones scored 0: what the removed `sum` aggregation
    computed (the library's estimate with L_x = |U|)."""
    covered = (scored & (weight > 0)[..., None]).any(1).sum(1).double()
    logp = tab[subset_index(scored)]
    return eubo(logp, scored, weight, BETA, covered)


def report(instances: int = INSTANCES) -> None:
    """The tables of docs/estimators.md ("The sandwich, measured")."""
    print(f"SPG defaults: beta {BETA}, m {M}; instance 0 of each length (exact.random_table)")
    print(
        "| L | log p | ELBO | EUBO_β | preset | E[ELBO est] | E[EUBO est] − log p | − EUBO_β | P(est < log p) "
        "| P(EUBO est < ELBO est) | covered-only sum − EUBO_β |"
    )
    for length in (2, 3, 4):
        tab = table(length, 0)
        lp, lower, upper = exact_logp(tab), exact_elbo(tab), exact_eubo(tab, BETA)
        for name in PRESETS:
            e = expected(name, tab, M)
            if name == "coupled":
                old = float("nan")
            else:
                law = draw_law(name, length, M)
                old = float((law.prob * covered_sum(tab, law.scored, law.weight)).sum()) - upper
            print(
                f"| {length} | {lp:.3f} | {lower:.3f} | {upper:.3f} | {name} | {e['elbo']:.3f} | "
                f"{e['eubo'] - lp:+.3f} | {e['eubo'] - upper:+.3f} | {e['p_below_logp']:.2f} | "
                f"{e['p_below_elbo']:.2f} | {old:+.3f} |"
            )
    print(f"\nOver {instances} instances per length (m = {M}): counts of E[EUBO est] < log p, < EUBO_β, < E[ELBO est]")
    for length in (2, 3, 4):
        tabs = [table(length, i) for i in range(instances)]
        lps = [exact_logp(t) for t in tabs]
        ups = [exact_eubo(t, BETA) for t in tabs]
        line = [f"L={length}: EUBO_β < log p in {sum(u < p for u, p in zip(ups, lps, strict=True))}"]
        for name in PRESETS:
            es = [expected(name, t, M) for t in tabs]
            gaps = [e["eubo"] - p for e, p in zip(es, lps, strict=True)]
            line.append(
                f"{name}: {sum(g < 0 for g in gaps)}, {sum(e['eubo'] < u for e, u in zip(es, ups, strict=True))}, "
                f"{sum(e['eubo'] < e['elbo'] for e in es)} (E − log p from {min(gaps):+.2f} to {max(gaps):+.2f})"
            )
        print("; ".join(line))
    print("\nOther estimators, instance 0: one-step − log p, GDSD plain − ELBO, DMPO rollout Ê − ELBO, Ê − log p")
    for length in (2, 3, 4):
        tab = table(length, 0)
        lp, lower = exact_logp(tab), exact_elbo(tab)
        print(
            f"L={length}: {one_step(tab) - lp:+.3f} {gdsd_plain(tab) - lower:+.3f} "
            f"{dmpo_rollout_elbo(tab) - lower:+.3f} {dmpo_rollout_elbo(tab) - lp:+.3f}"
        )
    print(
        "\neubo_mc_samples m' (the ELBO keeps m = 2): E[EUBO est] − EUBO_β (blockwise: − its own limit), "
        "L = 4, instance 0"
    )
    tab = table(4, 0)
    upper, target = exact_eubo(tab, BETA), blockwise_target(tab)
    for name in PRESETS:
        ref = target if name == "blockwise" else upper
        cells = []
        for copies in (2, 4, 8, 32, 128):
            if copies == 2 or (copies == 4 and name != "coupled"):
                cells.append(f"{expected(name, tab, copies, M)['eubo'] - ref:+.3f}")
            else:
                mean, se = sampled_eubo(name, tab, copies, 20_000, copies)
                cells.append(f"{mean - ref:+.3f} ± {se:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nMean over 10 instances of L = 4: E[EUBO est] − EUBO_β / − log p (blockwise also − its own limit)")
    tabs = [table(4, i) for i in range(10)]
    refs = [(exact_eubo(t, BETA), exact_logp(t), blockwise_target(t)) for t in tabs]
    for name in PRESETS:
        cells = []
        for copies in (2, 8, 32):
            means = [
                expected(name, t, copies, M)["eubo"] if copies == 2 else sampled_eubo(name, t, copies, 5000, copies)[0]
                for t in tabs
            ]
            gaps = [(m - u, m - lp, m - b) for m, (u, lp, b) in zip(means, refs, strict=True)]
            avg = [sum(g[k] for g in gaps) / len(gaps) for k in range(3)]
            cells.append(f"{avg[0]:+.2f} / {avg[1]:+.2f}" + (f" ({avg[2]:+.2f})" if name == "blockwise" else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------------------------ tests


def library_draws(name: str, length: int, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` independent draws of M copies of one sequence by sample_masks and the shipped preset."""
    cfg = preset(name, length)
    ones = torch.ones(1, length, dtype=torch.bool)
    if name == "blockwise":  # copies of one row share a block rule: one row per draw
        seeds = [mask_seed("sandwich", j) for j in range(draws)]
        d = sample_masks(cfg, ones.expand(draws, -1), ones[:, :1].expand(draws, -1), M, seeds)
        return d.scored, d.weight.double()
    # The other presets draw the copies (or pairs) of a row independently: one row, draws·M copies.
    strata = [Stratum(mask_seed("sandwich-stratum"), 0, 1)] if cfg["kind"] == "stratified" else None
    d = sample_masks(cfg, ones, ones[:, :1], draws * M, [mask_seed("sandwich", name)], strata)
    return d.scored[0].reshape(draws, M, length), d.weight[0].double().reshape(draws, M)


@pytest.mark.parametrize("name", PRESETS)
def test_enumerated_laws_are_the_shipped_schedules(name):
    # The laws above are read off the mask code; its own draws must average to their expectations.
    length, draws = 3, 2000 if name == "blockwise" else 20_000
    tab = table(length, 1)
    scored, weight = library_draws(name, length, draws)
    upper, lower = estimates(tab, scored, weight)
    e = expected(name, tab, M)
    for got, want in ((upper, e["eubo"]), (lower, e["elbo"])):
        z = (float(got.mean()) - want) / (float(got.std()) / math.sqrt(draws))
        assert abs(z) < 4, (name, float(got.mean()), want, z)


# At SPG's defaults (β = 1.5, m = 2, the mean over covered positions times L): per length and preset, on
# instance 0, E[EUBO est] − log p, E[EUBO est] − EUBO_β, P(EUBO est < log p), P(EUBO est < ELBO est).
PINNED = {
    (2, "random"): (-0.166, -0.123, 0.69, 0.25),
    (2, "blockwise"): (0.159, 0.202, 0.15, 0.85),
    (2, "coupled"): (-0.460, -0.417, 0.89, 0.68),
    (2, "stratified"): (-0.278, -0.235, 1.00, 0.67),
    (3, "random"): (-0.068, -0.108, 0.64, 0.48),
    (3, "blockwise"): (-0.760, -0.800, 0.95, 0.58),
    (3, "coupled"): (-0.605, -0.645, 0.77, 0.65),
    (3, "stratified"): (-0.394, -0.434, 0.67, 0.50),
    (4, "random"): (-3.957, -4.485, 0.81, 0.21),
    (4, "blockwise"): (-3.753, -4.281, 0.93, 0.04),
    (4, "coupled"): (-5.428, -5.956, 1.00, 0.62),
    (4, "stratified"): (-5.197, -5.725, 1.00, 0.50),
}


@pytest.mark.parametrize("length", [2, 3, 4])
def test_the_sandwich_at_spg_defaults(length):
    tab = table(length, 0)
    logp, lower, upper = exact_logp(tab), exact_elbo(tab), exact_eubo(tab, BETA)
    assert lower < logp
    assert (upper < logp) == (length == 2)  # eq. 7 without its constant need not bound log p when β < L
    for name in PRESETS:
        e = expected(name, tab, M)
        got = (e["eubo"] - logp, e["eubo"] - upper, e["p_below_logp"], e["p_below_elbo"])
        want = PINNED[(length, name)]
        assert got == pytest.approx(want, abs=0.006 if name == "coupled" else 0.0051), (name, got)
        if name != "blockwise":  # unbiased ELBO estimators; the block-wise schedule estimates something else
            assert e["elbo"] == pytest.approx(lower, abs=1e-9), name
    # Block-wise masks: at L = 4 the ELBO estimate's expectation sits 2.5 nats below the ELBO (and at
    # L = 2 above log p): it is not the ELBO.
    blockwise = expected("blockwise", tab, M)["elbo"]
    assert blockwise - lower == pytest.approx({2: 0.483, 3: -0.423, 4: -2.472}[length], abs=0.001)


def test_the_sandwich_over_instances():
    # Ten random tables of length 4 at SPG's defaults: in expectation the Monte Carlo "upper bound" lies
    # below eq. 7 and below log p for every preset and instance, and with coupled or stratified pairs
    # below the ELBO estimate in most.
    instances, length = 10, 4
    counts = {name: [0, 0, 0] for name in PRESETS}
    for i in range(instances):
        tab = table(length, i)
        logp, upper = exact_logp(tab), exact_eubo(tab, BETA)
        for name in PRESETS:
            e = expected(name, tab, M)
            counts[name][0] += e["eubo"] < logp
            counts[name][1] += e["eubo"] < upper
            counts[name][2] += e["eubo"] < e["elbo"]
    assert counts == {
        "random": [10, 10, 0],
        "blockwise": [10, 10, 2],
        "coupled": [10, 10, 7],
        "stratified": [10, 10, 6],
    }


@pytest.mark.parametrize("name", PRESETS)
def test_more_eubo_copies_move_the_estimate_toward_eq7(name):
    # L = 4, instance 0; the ELBO keeps its m = 2 copies. Exact at 2 and 4 copies, sampled at 8 and 32.
    length, rows = 4, 5000
    tab = table(length, 0)
    limit = blockwise_target(tab) if name == "blockwise" else exact_eubo(tab, BETA)
    biases = []
    for copies in (2, 4, 8, 32):
        if copies == 2 or (copies == 4 and name != "coupled"):
            biases.append((expected(name, tab, copies, M)["eubo"] - limit, 0.0))
        else:
            mean, se = sampled_eubo(name, tab, copies, rows, seed=copies)
            biases.append((mean - limit, se))
    for (near, se_near), (far, se_far) in zip(biases[1:], biases[:-1], strict=True):
        assert far + 4 * math.hypot(se_near, se_far) < near < -4 * se_near, biases  # below, and closer each time
    assert biases[0][0] < -3 and biases[-1][0] > -0.6, biases
    if name == "random":  # with many copies the estimate converges to eq. 7
        mean, se = sampled_eubo(name, tab, 128, 2000, seed=128)
        assert -0.1 < mean - limit < 0, (mean - limit, se)


class MaskPatternPolicy:
    """A denoiser whose logits at completion position i are a fixed table of the completion's mask pattern.

    Tokens 0..2 are real; the mask token 3 has logit −inf, so log f(0 | z_S) = log_softmax(table[S, i])[0]."""

    mask_id = 3

    def __init__(self, length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        real = torch.randn(2**length, length, 3, generator=g, dtype=torch.float64) * 2
        self.table = torch.cat([real, torch.full((2**length, length, 1), -math.inf, dtype=torch.float64)], dim=2)
        self.length, self.rows = length, 0
        logf = torch.log_softmax(real, dim=-1)[..., 0]
        self.logf = torch.where(subset_masks(length), logf, torch.zeros(()))  # exact.py's table layout

    def logits(self, input_ids, attention_mask, position_ids=None):
        self.rows += input_ids.shape[0]
        pattern = subset_index(input_ids[:, -self.length :] == self.mask_id)
        out = torch.zeros(*input_ids.shape, 4, dtype=torch.float64)
        out[:, -self.length :] = self.table[pattern]
        return out


def test_spg_logs_the_sandwich_and_scores_the_eubo_on_more_copies():
    length, n = 4, 4000
    policy = MaskPatternPolicy(length, seed=3)
    cfg = {
        "name": "spg",
        "inner_iterations": 1,
        "forward_chunk": 0,
        "loss_forward_dropout": True,
        "max_nonfinite_frac": 0.5,
        "mc_samples": M,
        "mask": {**preset("random", length), "coupled": False, "block_len": 1},
        "loss_norm": "token_weighted",
        "negative_surrogate": "eubo",
        "beta": BETA,
        "omega": 0.5,
        "eubo_mc_samples": 4,
    }
    rewards = torch.tensor([0.0, 1.0]).repeat(n // 2)  # groups of 2: A = ∓0.5, half the samples negative
    batch = RolloutBatch(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long),
        prompt_attention=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.zeros(n, length, dtype=torch.long),
        completion_mask=torch.ones(n, length, dtype=torch.bool),
        group_index=torch.arange(n) // 2,
        sample_uid=torch.arange(n),
        rewards=rewards,
        reward_parts={},
        advantages=rewards - 0.5,
        round=0,
    )
    metrics = {}
    for copies in (None, 4):
        objective = get_objective({**cfg, "eubo_mc_samples": copies}, seed=1, group_size=2, micro_batch=n)
        policy.rows = 0
        _, metrics[copies] = objective.loss(batch, policy, 0)
        assert policy.rows == n * (copies or M)  # one forward over the ELBO's copies and the EUBO's extra ones
    # The ELBO's copies are the same with and without the extra ones.
    assert metrics[None]["elbo_per_token"] == metrics[4]["elbo_per_token"]
    got = metrics[4]
    assert got[metric_weight("eubo_below_elbo_frac")] == got[metric_weight("eubo_elbo_gap_per_token")] == n / 2
    # Both metrics average over the negative samples; compare with the enumerated law of 4 EUBO copies
    # of which the first 2 are the ELBO's.
    e = expected("random", policy.logf, 4, M)
    k = n / 2
    p = e["p_below_elbo"]
    assert abs(got["eubo_below_elbo_frac"] - p) < 4 * math.sqrt(p * (1 - p) / k), (got, e)
    gap = (e["eubo"] - e["elbo"]) / length
    assert abs(got["eubo_elbo_gap_per_token"] - gap) < 4 * e["gap_sd"] / length / math.sqrt(k), (got, e)


def test_other_estimators_on_the_same_instances():
    # What the other objectives' likelihood estimates average to on instance 0 (docs/estimators.md).
    pinned = {  # one-step − log p, GDSD plain score − ELBO, DMPO rollout Ê − ELBO
        2: (-0.009, 0.873, 0.516),
        3: (-0.065, 1.979, 0.906),
        4: (-3.851, 5.298, 1.692),
    }
    for length, want in pinned.items():
        tab = table(length, 0)
        logp, lower = exact_logp(tab), exact_elbo(tab)
        got = (one_step(tab) - logp, gdsd_plain(tab) - lower, dmpo_rollout_elbo(tab) - lower)
        assert got == pytest.approx(want, abs=0.0051), (length, got)


def _compose(*overrides: str):
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_eubo_mc_samples_config_rules():
    validate(_compose("objective=spg", "objective.eubo_mc_samples=8"))
    assert _compose("objective=spg").objective.eubo_mc_samples is None  # the paper: the ELBO's m copies
    for overrides, field in (
        (["objective.mc_samples=4", "objective.eubo_mc_samples=2"], "objective.eubo_mc_samples=2"),
        (["objective/mask=coupled", "objective.mc_samples=2", "objective.eubo_mc_samples=5"], "must be even"),
    ):
        with pytest.raises(ConfigError, match=field):
            validate(_compose("objective=spg", *overrides))


if __name__ == "__main__":
    report()
