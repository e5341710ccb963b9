"""`python -m dllm_rl.variance [overrides]`: how much of one round's policy gradient is signal, and where
the noise comes from. `python -m dllm_rl.variance --report <dir> [--page FILE]`: a table and a plot.

The same config tree as training (any objective, objective/mask, task, model, sampler, seed) plus the
``variance`` section (conf/variance.yaml). Nothing is trained: from the starting policy (model.path, or
the cached warm-started base) it draws K independent rollout rounds exactly as the trainer does
(Trainer.rollout: round k's prompts from the seeded stream, completions, rewards, advantages), and for
each round R independent mask draws. For every (round k, draw r) it computes the objective's gradient
over the whole round, the one the trainer's first optimizer step of the round would apply before
clipping: objective.prepare, then objective.loss at inner step 0 over the train micro-batches, each
backward scaled by 1/(micro-batches) as DeepSpeed's gradient accumulation does, no optimizer step,
the same parameters every time. Draw r = 0 uses the run's own mask seed (the trainer's masks of that
step); draw r > 0 reseeds the objective's masks (and whatever prepare draws with them, e.g. DMPO's
rollout-time ELBOs). Inner step 0 is the on-policy step, so the objective is built with μ = 1:
prepare then scores no later steps, which the step-0 gradient never reads.

With g_kr the gradient of (round k, draw r), ḡ_k = (1/R) Σ_r g_kr, and the model
g_kr = μ + a_k + e_kr (a: rollout/reward noise, e: mask noise, both mean zero):

    E|g|²      ≈ (1/KR) Σ_kr |g_kr|²                                        (unbiased)
    |μ|²       ≈ (1/K(K−1)) Σ_{k≠k'} <ḡ_k, ḡ_k'>                          (unbiased: rounds independent)
    signal share = |μ|² / E|g|²  (a ratio of the two unbiased estimates; 1 = noise-free, ~0 = noise only)
    cosine     = mean over pairs from different rounds of cos(g_kr, g_k'r')
    σ²_mask    ≈ (1/K) Σ_k (1/(R−1)) Σ_r |g_kr − ḡ_k|²                     (within-round variance)
    σ²_rollout ≈ (1/(K−1)) Σ_k |ḡ_k − ḡ|² − σ²_mask / R                    (between-round, less mask noise)

σ²_mask + σ²_rollout = E|g|² − |μ|² exactly (law of total variance); the shares reported are each
part over their sum. A small K can make the rollout estimate negative: it is reported as measured.

Positions the reward cannot see (Task.reward_blind_positions; Sudoku: the copies of given cells) are
split off by a second backward with the gradient through the log-probs of those positions only
(RolloutBatch.position_weight: values unchanged, so g = g_blind + g_visible exactly):

    blind share         = Σ_kr <g_blind,kr, g_kr> / Σ_kr |g_kr|²     (with the visible share it sums to 1)
    blind energy share  = Σ |g_blind|² / (Σ |g_blind|² + Σ |g_visible|²)
    blind signal share  = <E g_blind, μ> / |μ|²                     (pairs from different rounds)

Prompt positions: masked_logp scores completion positions only (a masked prompt token is conditioned
on, never scored), so no objective here has a prompt-position term: that share is 0 by construction.
Every statistic is also given per parameter group (embeddings, attention, mlp, norms, output_head,
other; grouped by parameter name). Writes variance.json into the run directory and prints one line.
docs/RESULTS.md ("Gradient noise per estimator") has the sweep (+sweep=variance) and what it shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import dllm_rl  # noqa: F401  (registers the config schemas)
from dllm_rl.__main__ import _preflight_output_dir
from dllm_rl.cli_help import exit_with_help_if_asked
from dllm_rl.config import RunConfig, check_writable, run_config, validate
from dllm_rl.console import say, say_error
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.lazy import lazy_import

# loads at the first tensor, so that --help and config errors answer first (dllm_rl/lazy.py)
torch = lazy_import("torch")
log = logging.getLogger("dllm_rl")

GROUPS = ("embeddings", "attention", "mlp", "norms", "output_head", "other")
# (group, name fragments) in the order tried; names of the tiny, LLaDA (OLMo) and Dream (Qwen2) networks
_GROUP_RULES = (
    ("norms", ("norm", "ln_f", ".ln_")),
    ("embeddings", ("embed", "wte", "wpe")),
    ("output_head", ("lm_head", "transformer.ff_out", "output_layer")),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", ("mlp", "ff_proj", "ff_out", "up_proj", "gate_proj", "down_proj", "feed_forward")),
)
# the section of a shared page (--page) this tool owns, and the command its marker names
PAGE_SECTION, PAGE_COMMAND = "variance", "python -m dllm_rl.variance --report --page"


# ------------------------------------------------------------------------------------------- pure math
def parameter_group(name: str) -> str:
    """The group of a parameter by its name (LoRA adapters count with the layer they adapt)."""
    lowered = name.lower()
    for group, fragments in _GROUP_RULES:
        if any(f in lowered for f in fragments):
            return group
    return "other"


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and math.isfinite(den) else math.nan


def noise_statistics(gram: torch.Tensor) -> dict[str, float]:
    """Signal and noise of one-draw gradients from their Gram matrix ``gram`` [K, R, K, R] (float64),
    gram[k, r, k', r'] = <g_kr, g_k'r'> over K independent rounds and R mask draws per round (the module
    docstring has the estimators). Needs K >= 2 and R >= 2."""
    k, r = gram.shape[0], gram.shape[1]
    if k < 2 or r < 2 or gram.shape != (k, r, k, r):
        raise ValueError(f"noise_statistics needs a [K, R, K, R] Gram matrix with K, R >= 2, got {tuple(gram.shape)}")
    gram = gram.double()
    sq = torch.einsum("krkr->kr", gram)  # |g_kr|²
    means = gram.mean(dim=(1, 3))  # <ḡ_k, ḡ_k'>
    mean_sq = float(sq.mean())
    signal = float((means.sum() - means.trace()) / (k * (k - 1)))
    within = (sq.sum(dim=1) - r * torch.diagonal(means)) / (r - 1)  # per round: Σ_r |g_kr − ḡ_k|² / (R−1)
    mask_var = float(within.mean())
    between = float((means.trace() - means.sum() / k) / (k - 1))  # Σ_k |ḡ_k − ḡ|² / (K−1)
    rollout_var = between - mask_var / r
    total_var = mask_var + rollout_var
    norms = sq.sqrt()
    cosines = gram / (norms[:, :, None, None] * norms[None, None, :, :])
    other_round = ~torch.eye(k, dtype=torch.bool)[:, None, :, None].expand(k, r, k, r)
    pairs = cosines[other_round]
    pairs = pairs[torch.isfinite(pairs)]
    return {
        "mean_sq_norm": mean_sq,
        "signal_sq_norm": signal,
        "mask_variance": mask_var,
        "rollout_variance": rollout_var,
        "total_variance": total_var,
        "signal_share": _ratio(signal, mean_sq),
        "cosine": float(pairs.mean()) if pairs.numel() else math.nan,
        "mask_share": _ratio(mask_var, total_var),
        "rollout_share": _ratio(rollout_var, total_var),
        # what averaging over all R draws of a round would give, and the ceiling of infinitely many draws
        "signal_share_mask_averaged": _ratio(signal, signal + rollout_var + mask_var / r),
        "signal_share_without_mask_noise": _ratio(signal, signal + rollout_var),
    }


def jackknife_errors(gram: torch.Tensor, keys: tuple[str, ...] = ("signal_share", "cosine", "mask_share")) -> dict:
    """Leave-one-round-out jackknife standard errors of noise_statistics' ``keys`` (K >= 3; else NaN):
    sqrt((K−1)/K · Σ_k (θ_−k − mean θ_−)²), with θ_−k computed from the other K − 1 rounds."""
    k = gram.shape[0]
    if k < 3:
        return {f"{key}_se": math.nan for key in keys}
    values: dict[str, list[float]] = {key: [] for key in keys}
    for drop in range(k):
        keep = [i for i in range(k) if i != drop]
        stats = noise_statistics(gram[keep][:, :, keep])
        for key in keys:
            values[key].append(stats[key])
    out = {}
    for key, vs in values.items():
        mean = sum(vs) / k
        out[f"{key}_se"] = math.sqrt((k - 1) / k * sum((v - mean) ** 2 for v in vs))
    return out


def position_statistics(cross: torch.Tensor, blind_sq: torch.Tensor, gram: torch.Tensor) -> dict[str, float]:
    """The reward-blind positions' part of the gradients: ``cross`` [K, R, K, R] = <g_blind,kr, g_k'r'>,
    ``blind_sq`` [K, R] = |g_blind,kr|², ``gram`` the Gram matrix of the full gradients g = g_blind + g_visible."""
    k = gram.shape[0]
    cross, blind_sq, gram = cross.double(), blind_sq.double(), gram.double()
    sq = torch.einsum("krkr->kr", gram)
    own = torch.einsum("krkr->kr", cross)  # <g_blind, g> of the same draw
    visible_sq = sq - 2 * own + blind_sq  # |g − g_blind|²
    means = gram.mean(dim=(1, 3))
    signal = float((means.sum() - means.trace()) / (k * (k - 1))) if k > 1 else math.nan
    cross_means = cross.mean(dim=(1, 3))
    blind_signal = float((cross_means.sum() - cross_means.trace()) / (k * (k - 1))) if k > 1 else math.nan
    return {
        "blind_share": _ratio(float(own.sum()), float(sq.sum())),
        "visible_share": _ratio(float((sq - own).sum()), float(sq.sum())),
        "blind_energy_share": _ratio(float(blind_sq.sum()), float(blind_sq.sum() + visible_sq.sum())),
        "blind_signal_share": _ratio(blind_signal, signal),
    }


def gram_matrices(
    full: torch.Tensor, blind: torch.Tensor | None, slices: dict[str, list[slice]], k: int, r: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Per group (and "total"): the Gram matrix of ``full`` [K·R, P] and, with ``blind`` [K·R, P], the cross
    Gram <blind_i, full_j> and |blind_i|², each reshaped to [K, R, K, R] / [K, R]."""
    out = {}
    for group, parts in {"total": [slice(None)], **slices}.items():
        x = torch.cat([full[:, s] for s in parts], dim=1).double()
        entry = {"gram": (x @ x.T).reshape(k, r, k, r)}
        if blind is not None:
            b = torch.cat([blind[:, s] for s in parts], dim=1).double()
            entry["cross"] = (b @ x.T).reshape(k, r, k, r)
            entry["blind_sq"] = (b * b).sum(dim=1).reshape(k, r)
        out[group] = entry
    return out


def statistics(grams: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """noise_statistics (+ position_statistics where blind gradients exist) per group; each group also
    gets its share of E|g|² (the groups' shares add up to 1)."""
    total_sq = float(torch.einsum("krkr->kr", grams["total"]["gram"].double()).mean())
    out = {}
    for group, entry in grams.items():
        stats = noise_statistics(entry["gram"])
        stats.update(jackknife_errors(entry["gram"]))
        if "cross" in entry:
            stats.update(position_statistics(entry["cross"], entry["blind_sq"], entry["gram"]))
        stats["share_of_sq_norm"] = _ratio(stats["mean_sq_norm"], total_sq)
        out[group] = stats
    return out


# ----------------------------------------------------------------------------------------- measuring
def check(cfg: dict[str, Any]) -> None:
    """The rules of a variance config beyond those of a training config, as one ConfigError."""
    v, errors = cfg["variance"], []
    if int(v["rounds"]) < 2:
        errors.append(f"variance.rounds={v['rounds']} must be >= 2 (the signal comes from pairs of rounds)")
    if int(v["mask_draws"]) < 2:
        errors.append(f"variance.mask_draws={v['mask_draws']} must be >= 2 (the mask noise comes from repeats)")
    if float(v["max_gradient_gib"]) <= 0:
        errors.append(f"variance.max_gradient_gib={v['max_gradient_gib']} must be positive")
    if int(cfg["cluster"]["nproc"]) != 1 or int(cfg["cluster"].get("nodes", 1)) != 1:
        errors.append("cluster.nproc / cluster.nodes: the instrument runs in one process (leave both at 1)")
    if errors:
        raise ConfigError("invalid variance configuration:\n  - " + "\n  - ".join(errors))


def group_slices(params: list[tuple[str, torch.Tensor]]) -> dict[str, list[slice]]:
    """Where each group's parameters sit in the flattened gradient (parameters in named_parameters order)."""
    out: dict[str, list[slice]] = {}
    start = 0
    for name, p in params:
        out.setdefault(parameter_group(name), []).append(slice(start, start + p.numel()))
        start += p.numel()
    return {g: out[g] for g in GROUPS if g in out}


def blind_mask(task: Any, examples: list[dict[str, Any]], length: int) -> torch.Tensor | None:
    """[N, L] bool: the reward-blind completion positions of each row, or None when the task names none."""
    rows = [task.reward_blind_positions(ex, length) for ex in examples]
    if all(row is None for row in rows):
        return None
    mask = torch.tensor([row if row is not None else [False] * length for row in rows], dtype=torch.bool)
    return mask if bool(mask.any()) else None


def round_gradient(
    objective: Any, policy: Any, batch: Any, micro_batch: int, params: list[torch.Tensor]
) -> torch.Tensor:
    """The round's gradient at inner step 0, flattened (float32, CPU): Trainer.optimize's micro-batch loop,
    each loss scaled by 1/(micro-batches) as DeepSpeed's gradient accumulation does, no optimizer step."""
    for p in params:
        p.grad = None
    starts = range(0, len(batch), micro_batch)
    for lo in starts:
        loss, _ = objective.loss(batch.select(slice(lo, lo + micro_batch)), policy, 0)
        if loss.requires_grad:
            (loss / len(starts)).backward()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return flat.detach().float().cpu()


def _round_examples(trainer: Any, stream_state: dict[str, int]) -> list[dict[str, Any]]:
    """The rows Trainer.rollout used for its round (one process): its prompt stream replayed from the state
    it had before the round, each prompt repeated G times."""
    from dllm_rl.trainer import PromptStream

    replay = PromptStream(trainer.stream.size, trainer.stream.seed)
    replay.load_state_dict(stream_state)
    return [trainer.train_examples[i] for i in replay.next(trainer.prompts_per_step) for _ in range(trainer.group)]


def _setting(cfg: RunConfig, choices: dict[str, str]) -> dict[str, Any]:
    """What distinguishes this measurement in a sweep table."""
    o = cfg.objective
    mc_key = next((key for key in ("mc_samples", "mc_pairs") if hasattr(o, key)), None)
    spg = o.name == "spg"
    return {
        "objective": o.name,
        "mask": choices.get("objective/mask") or o.mask.kind.value,
        "mask_kind": o.mask.kind.value,
        "mc": getattr(o, mc_key) if mc_key else None,
        "mc_key": mc_key,
        "prompt_mask_prob": o.mask.prompt_mask_prob,
        "omega": o.omega if spg and o.negative_surrogate.value == "mix" else None,
        "negative_surrogate": o.negative_surrogate.value if spg else None,
        "task": cfg.task.name,
        "seed": cfg.seed,
    }


def run(resolved: dict[str, Any], choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure (module docstring) and write <run_dir>/variance.json; returns what it wrote. ``resolved`` is
    the plain config (config.yaml); the measurement reads it typed (config.run_config)."""
    from dllm_rl.build import build_policy, compile_network, quiet_libraries
    from dllm_rl.likelihood.masks import mask_seed
    from dllm_rl.objectives import get_objective
    from dllm_rl.samplers import get_sampler
    from dllm_rl.tasks import get_task
    from dllm_rl.trainer import Trainer

    start = time.perf_counter()
    check(resolved)
    cfg = run_config(resolved)
    quiet_libraries()
    if cfg.cluster.threads:
        torch.set_num_threads(cfg.cluster.threads)
    run_dir = Path(cfg.run_dir)
    vcfg = cfg.variance
    k_rounds, r_draws = vcfg.rounds, vcfg.mask_draws
    seed = cfg.seed
    device = torch.device(cfg.cluster.device)

    task = get_task(cfg.task.name, cfg.task, Path(cfg.cache_dir).expanduser())
    policy, base_info = build_policy(cfg, task)  # model.path, or the cached warm-started base
    if cfg.model.gradient_checkpointing:
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy.model.to(device)
    if cfg.model.compile:
        compile_network(policy.model, device)
    sampler = get_sampler(cfg.sampler)
    micro = cfg.train.micro_batch_per_gpu
    group = cfg.rollout.samples_per_prompt
    # μ = 1: the step-0 gradient is all that is measured, and prepare then scores no later steps.
    section = dataclasses.replace(cfg.objective, inner_iterations=1)
    objective = get_objective(section, seed, group_size=group, micro_batch=micro)
    if objective.needs_reference:
        policy.attach_reference()
    named = [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    size = sum(p.numel() for p in params)
    split = vcfg.split_positions
    stored_gib = (2 if split else 1) * k_rounds * r_draws * size * 4 / 2**30
    if stored_gib > vcfg.max_gradient_gib:
        raise ConfigError(
            f"variance: {k_rounds}x{r_draws} gradients of {size} parameters take {stored_gib:.1f} GiB "
            f"> variance.max_gradient_gib={vcfg.max_gradient_gib} (fewer rounds or draws, or LoRA)"
        )
    trainer = Trainer(cfg, policy, None, task, sampler, objective, None, run_dir)
    setup_seconds = time.perf_counter() - start

    full = torch.zeros(k_rounds * r_draws, size)
    blind = torch.zeros(k_rounds * r_draws, size) if split else None
    any_blind = False
    blind_per_row: list[float] = []
    rounds: list[dict[str, float]] = []
    rollout_seconds = gradient_seconds = 0.0
    dropout = cfg.objective.loss_forward_dropout
    for k in range(k_rounds):
        t0 = time.perf_counter()
        state = trainer.stream.state_dict()
        batch, stats = trainer.rollout(k)
        mask = blind_mask(task, _round_examples(trainer, state), batch.completion_ids.shape[1]) if split else None
        rollout_seconds += time.perf_counter() - t0
        rounds.append({key: stats[key] for key in ("reward_mean", "reward_std", "frac_zero_std_groups")})
        if mask is not None:
            any_blind = True
            mask = mask.to(batch.completion_ids.device) & batch.completion_mask
            blind_per_row.append(float(mask.sum(dim=1).float().mean()))
        t0 = time.perf_counter()
        for r in range(r_draws):
            # draw 0: the run's own masks (the trainer's step); later draws: fresh mask seeds
            objective.seed = seed if r == 0 else mask_seed(seed, "variance_masks", r)
            objective.prepare(batch, policy)
            policy.model.train(dropout)
            i = k * r_draws + r
            if mask is None:
                full[i] = round_gradient(objective, policy, batch, micro, params)
            else:
                weight = mask.float()
                g_blind = round_gradient(
                    objective, policy, dataclasses.replace(batch, position_weight=weight), micro, params
                )
                g_visible = round_gradient(
                    objective, policy, dataclasses.replace(batch, position_weight=1.0 - weight), micro, params
                )
                full[i] = g_blind + g_visible
                blind[i] = g_blind  # type: ignore[index]
            if not bool(torch.isfinite(full[i]).all()):
                raise DllmRlError(f"variance: the gradient of round {k}, mask draw {r} is not finite")
        gradient_seconds += time.perf_counter() - t0

    grams = gram_matrices(full, blind if any_blind else None, group_slices(named), k_rounds, r_draws)
    stats = statistics(grams)
    total = stats.pop("total")
    positions = {
        "prompt_share": 0.0,
        "prompt_positions_scored": False,
        "blind_positions_source": f"{task.name}.reward_blind_positions" if any_blind else None,
        "blind_positions_per_completion": sum(blind_per_row) / len(blind_per_row) if blind_per_row else 0.0,
    }
    for key in ("blind_share", "visible_share", "blind_energy_share", "blind_signal_share"):
        positions[key] = total.pop(key, 0.0 if not any_blind else math.nan)
    result = {
        **_setting(cfg, choices or {}),
        "rounds": k_rounds,
        "mask_draws": r_draws,
        "completions_per_round": len(batch),
        "micro_batch": micro,
        "parameters": size,
        "base_model": base_info,
        "total": total,
        "positions": positions,
        "groups": {
            g: {"parameters": sum(s.stop - s.start for s in sl), **stats[g]} for g, sl in group_slices(named).items()
        },
        "per_round": rounds,
        "seconds": {"setup": setup_seconds, "rollout": rollout_seconds, "gradient": gradient_seconds},
        "wall_seconds": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
    (run_dir / "variance.json").write_text(json.dumps(result, indent=2))
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def _se(stats: dict[str, Any], key: str = "signal_share") -> str:
    se = stats.get(f"{key}_se")
    return "" if se is None or not math.isfinite(se) else f" ± {se:.3f}"


def summary_line(result: dict[str, Any]) -> str:
    t, p = result["total"], result["positions"]
    blind = (
        f"blind positions {_pct(p['blind_share'])} of |g|^2"
        if p["blind_positions_source"]
        else "no reward-blind positions named by the task"
    )
    return (
        f"{result['objective']} on {result['task']}: signal share {t['signal_share']:.3f}{_se(t)} "
        f"(cos {t['cosine']:.3f}) | "
        f"mask {_pct(t['mask_share'])} / rollout {_pct(t['rollout_share'])} of variance | {blind} | "
        f"K={result['rounds']} R={result['mask_draws']} | {result['wall_seconds']:.0f} s | run dir {result['run_dir']}"
    )


# -------------------------------------------------------------------------------------------- report
def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_results(root: Path) -> list[dict[str, Any]]:
    """Every variance.json under root (sweep job order), each with its directory relative to root."""
    out = []
    for path in sorted(root.rglob("variance.json"), key=_natural_key):
        result = json.loads(path.read_text())
        result["path"] = str(path.parent.relative_to(root))
        out.append(result)
    return out


def setting_label(result: dict[str, Any]) -> str:
    """objective · mask preset · m · prompt p (· ω for SPG's mixture)."""
    parts = [result["objective"]]
    if result.get("negative_surrogate") not in (None, "mix"):
        parts[0] += f" ({result['negative_surrogate']})"
    parts.append(result["mask"])
    if result.get("mc") is not None:
        parts.append(f"{'pairs' if result.get('mc_key') == 'mc_pairs' else 'm'}={result['mc']}")
    parts.append(f"p={result['prompt_mask_prob']:g}")
    if result.get("omega") is not None:
        parts.append(f"ω={result['omega']:g}")
    return " · ".join(parts)


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None or not math.isfinite(x) else fmt.format(x)


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for res in results:
        t, p = res["total"], res["positions"]
        rows.append(
            [
                setting_label(res),
                _num(t["signal_share"]) + _se(t),
                _num(t["cosine"]),
                _pct(t["mask_share"]),
                _pct(t["rollout_share"]),
                _num(t["signal_share_without_mask_noise"]),
                _pct(p["blind_share"]) if p["blind_positions_source"] else "-",
                f"{res['rounds']}x{res['mask_draws']}",
                f"{res['wall_seconds']:.0f}",
            ]
        )
    return rows


HEADER = [
    "setting",
    "signal share ± se",
    "cosine",
    "mask share",
    "rollout share",
    "signal share, no mask noise",
    "blind share",
    "K x R",
    "wall s",
]


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    """Per setting, E|g|² split into signal, rollout variance and mask variance (stacked, shares of E|g|²),
    and the reward-blind positions' share of |g|²."""
    from matplotlib.figure import Figure  # the object API, as experiments/report.py: no pyplot state

    labels = [setting_label(r) for r in results]
    parts = {"signal |E g|²": [], "rollout variance": [], "mask variance": []}
    for res in results:
        t = res["total"]
        mean_sq = t["mean_sq_norm"] or math.nan
        for key, value in zip(parts, (t["signal_sq_norm"], t["rollout_variance"], t["mask_variance"]), strict=True):
            parts[key].append(max(0.0, _ratio(value, mean_sq)) if math.isfinite(_ratio(value, mean_sq)) else 0.0)
    blind = [r["positions"]["blind_share"] if r["positions"]["blind_positions_source"] else math.nan for r in results]
    height = 0.28 * len(results) + 1.6
    fig = Figure(figsize=(11, height), layout="constrained")
    ax, bx = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1])
    y = list(range(len(results)))
    left = [0.0] * len(results)
    for (name, values), color in zip(parts.items(), ("tab:green", "tab:orange", "tab:blue"), strict=True):
        ax.barh(y, values, left=left, color=color, label=name, height=0.7)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(y, labels, fontsize="small")
    ax.invert_yaxis()
    ax.set(xlabel="share of E|g|² (one round, one mask draw)", xlim=(0, 1.0))
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    bx.barh(y, [0.0 if math.isnan(b) else b for b in blind], color="tab:red", height=0.7)
    bx.set(xlabel="reward-blind share of |g|²", xlim=(0, 1.0))
    bx.grid(axis="x", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def render(results: list[dict[str, Any]], image: str) -> str:
    """The markdown section: the table, the plot and how to read them."""
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    tasks = sorted({r["task"] for r in results})
    return "\n".join(
        [
            f"{len(results)} measurement(s) on {', '.join(tasks)} (`python -m dllm_rl.variance`, module docstring of "
            "dllm_rl/variance.py for the estimators). Signal share: |E g|² / E|g|² of one round's gradient with one "
            "mask draw; cosine: mean cosine between gradients of independent rounds; mask / rollout share: the two "
            'parts of its variance; "no mask noise": the signal share with infinitely many mask draws; blind share: '
            "the part of |g|² from completion positions the reward cannot see (Sudoku: copies of given cells).",
            "",
            *table,
            "",
            f"![gradient noise]({image})",
            "",
        ]
    )


def report_main(argv: list[str]) -> int:
    """`--report <dir> [--page FILE]`: variance_report.md and plots/variance.png under <dir>."""
    parser = argparse.ArgumentParser(prog="python -m dllm_rl.variance --report", description=report_main.__doc__)
    parser.add_argument("root", type=Path, help="a run or sweep directory holding variance.json files")
    parser.add_argument("--page", type=Path, default=None, help="also write the section into this markdown page")
    args = parser.parse_args(argv)
    results = find_results(args.root) if args.root.is_dir() else []
    if not results:
        print(f"error: no variance.json under {args.root}", file=sys.stderr)
        return 1
    plot(args.root / "plots" / "variance.png", results)
    text = render(results, "plots/variance.png")
    (args.root / "variance_report.md").write_text("# Gradient noise\n\n" + text)
    if args.page is not None:
        from dllm_rl.experiments.pages import write_section  # (its checkpoint helpers import transformers)

        image = args.page.parent / "results" / "variance.png"
        plot(image, results)
        write_section(args.page, PAGE_SECTION, PAGE_COMMAND, render(results, "results/variance.png"))
    print(text, end="")
    return 0


# ------------------------------------------------------------------------------------------- entry
@hydra.main(config_path="conf", config_name="variance", version_base="1.3")
def run_hydra(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        OmegaConf.to_object(cfg)  # enum and type checks of every typed node
        validate(cfg)
        check_writable(run_dir, "hydra.run.dir")
        check_writable(Path(cfg.cache_dir).expanduser(), "cache_dir")
        plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        plain["run_dir"] = str(run_dir)
        check(plain)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain))
        choices = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
        result = run(plain, choices)
    except DllmRlError as exc:
        say_error(str(exc))
        sys.exit(2)
    say(summary_line(result))
    return float(result["total"]["signal_share"])


def main() -> None:
    """``python -m dllm_rl.variance``: ``--report``, --help, then Hydra."""
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        sys.exit(report_main(sys.argv[2:]))
    exit_with_help_if_asked("variance")
    _preflight_output_dir(sys.argv[1:])
    run_hydra()


if __name__ == "__main__":
    main()
