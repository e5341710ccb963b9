"""What every objective plugs into: the rollout batch, the section's base schema (ObjectiveCfg), the Objective
interface and its registry."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from omegaconf import MISSING

from dllm_rl.errors import ConfigError
from dllm_rl.lazy import lazy_import
from dllm_rl.likelihood.bounds import masked_logp
from dllm_rl.likelihood.masks import (
    MaskCfg,
    MaskDraw,
    MaskKind,
    StratifyOver,
    Stratum,
    check_mask,
    mask_seed,
    sample_masks,
)
from dllm_rl.schema import option, register_schema, typed

torch = lazy_import("torch")  # loads on first use (dllm_rl/lazy.py)


@dataclass
class RolloutBatch:
    """One rollout round on this process: G completions for each of its prompts, scored."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_attention: torch.Tensor  # [N, P] 1 = real token
    completion_ids: torch.Tensor  # [N, L]
    completion_mask: torch.Tensor  # [N, L] bool: valid positions v_i (up to and including the first EOS)
    group_index: torch.Tensor  # [N] which prompt each completion answers
    sample_uid: torch.Tensor  # [N] global id inside the round (seeds the masks)
    rewards: torch.Tensor  # [N] total reward
    reward_parts: dict[str, torch.Tensor]  # name -> [N]
    advantages: torch.Tensor  # [N]
    round: int  # rollout round number
    extras: dict[str, Any] = field(default_factory=dict)  # what an objective precomputes in prepare()
    # [N, L] gradient weight of each completion position's log-prob (None: 1), values unchanged
    # (likelihood.masked_logp); only the gradient-noise instrument sets it (dllm_rl/variance.py)
    position_weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> RolloutBatch:
        """A micro-batch: the same fields restricted to ``index`` along the sample dimension."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[index]
            elif f.name in ("reward_parts", "extras"):
                value = {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in value.items()}
            out[f.name] = value
        return RolloutBatch(**out)


def group_mean_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_j = r_j − mean of its group (no std scaling); groups are consecutive runs of group_size."""
    r = rewards.view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_j = r_j − mean of the other G−1 rewards of its group = G/(G−1)·(r_j − group mean) (RLOO)."""
    return group_mean_advantages(rewards, group_size) * (group_size / (group_size - 1))


@dataclass
class ObjectiveCfg:
    """What every objective takes (the ``objective`` section); each objective declares its own schema,
    a subclass of this one, beside its code and registers it with ``@register_objective(name, config=...)``
    (docs/ARCHITECTURE.md, "Adding an objective")."""

    name: str = MISSING
    inner_iterations: int = 1
    mask: MaskCfg = field(default_factory=MaskCfg)
    forward_chunk: int = 0
    loss_forward_dropout: bool = True
    max_nonfinite_frac: float = 0.5

    @classmethod
    def mask_copies(cls, o: Any) -> int | None:
        """Masked copies drawn per sequence from ``objective.mask`` (None: the schema has no such count)."""
        return o.get("mc_samples")

    @classmethod
    def check(cls, o: Any, sampler: Any, need: Callable[[bool, str], None]) -> None:
        """The section's rules: ``need(ok, message)`` for each; ``o`` is the composed ``objective`` node (a
        DictConfig or a plain dict) and ``sampler`` the ``sampler`` one. A schema that adds rules also
        calls ``super().check``."""
        mu = o["inner_iterations"]
        need(mu >= 1, f"objective.inner_iterations={mu} must be >= 1")
        need(o["forward_chunk"] >= 0, f"objective.forward_chunk={o['forward_chunk']} must be >= 0 (0 = one forward)")
        need(
            0.0 <= o["max_nonfinite_frac"] <= 1.0,
            f"objective.max_nonfinite_frac={o['max_nonfinite_frac']} must be in [0, 1]",
        )
        if o.get("mc_samples") is not None:
            need(o["mc_samples"] >= 1, f"objective.mc_samples={o['mc_samples']} must be >= 1")
        check_mask(o["mask"], "objective.mask", cls.mask_copies(o), need)
        if option(o["mask"], "kind") == "blockwise":
            need(
                sampler["gen_length"] % o["mask"]["block_len"] == 0,
                f"objective.mask.block_len={o['mask']['block_len']} must divide "
                f"sampler.gen_length={sampler['gen_length']}",
            )


class Objective(abc.ABC):
    """A policy loss computed from a RolloutBatch.

    ``prepare`` runs once per rollout round without gradients (old/reference scores, weights);
    ``loss`` runs for every micro-batch of every inner step and returns (scalar loss, metrics).
    """

    name: str = ""
    schema: type[ObjectiveCfg] = ObjectiveCfg  # the section's schema (register_objective sets it)

    def __init__(self, cfg: Mapping[str, Any] | ObjectiveCfg, seed: int, group_size: int, micro_batch: int) -> None:
        # The section as its schema's dataclass: defaults filled in, every value of its declared type (a
        # subclass used without registering it, e.g. in a test, takes its class name).
        if isinstance(cfg, Mapping) and "name" not in cfg:
            cfg = {**cfg, "name": self.name or type(self).__name__}
        self.cfg: Any = typed(self.schema, cfg, "objective")
        self.seed = seed
        self.group_size = group_size  # G: completions per prompt (consecutive rows of a batch)
        self.micro_batch = micro_batch  # rows per gradient micro-batch (fixed slices of the rollout batch)

    @property
    def needs_reference(self) -> bool:
        """Whether loss/prepare call ``policy.reference_logits`` (the worker then builds the reference)."""
        return False

    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return group_mean_advantages(rewards, group_size)

    def prepare(self, batch: RolloutBatch, policy: Any) -> None:  # noqa: B027  (optional hook)
        """Precompute per-round quantities into batch.extras (nothing by default)."""

    def state_dict(self) -> dict[str, Any]:
        """What the objective itself keeps between steps (tensors and plain values; none by default):
        saved with each checkpoint so that a run resumed inside a round continues exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027  (optional hook)
        """Restore what ``state_dict`` returned."""

    @abc.abstractmethod
    def loss(self, batch: RolloutBatch, policy: Any, inner_step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def reuses_first_forward(self, policy: Any) -> bool:
        """Whether inner step 0's gradient forward stands in for prepare's no-grad scoring of its masks.

        At inner step 0 the policy is still the one ``prepare`` scored with (the optimizer has not
        stepped since the rollout), so the old policy's scores of step 0 equal the detached values of
        the gradient forward on the same masks, unless that forward applies dropout: the trainer runs
        it in train mode exactly when objective.loss_forward_dropout is set. ``prepare`` then leaves
        step 0 of its old scores as a NaN placeholder (``OLD_FROM_LOSS``) and ``loss`` fills it in.
        """
        model = getattr(policy, "model", None)
        if not isinstance(model, torch.nn.Module):
            return True
        return not dropout_active(model, training=self.cfg.loss_forward_dropout)

    def old_scores(
        self,
        stored: torch.Tensor,
        inner_step: int,
        current: torch.Tensor,
        policy: Any,
        rescore: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The old policy's scores for ``inner_step``, on ``current``'s dtype.

        ``stored`` [N, μ, ...] comes from ``prepare``. At inner step 0, where it holds the placeholder
        (all NaN), the old scores are ``current.detach()``, the gradient forward's own values, or,
        should that forward have applied dropout after all, a fresh no-grad ``rescore()`` under
        ``policy.scoring()``.
        """
        step = stored[:, inner_step]
        if inner_step != 0 or not bool(torch.isnan(step).all()):
            return step.to(current.dtype)
        model = getattr(policy, "model", None)
        if isinstance(model, torch.nn.Module) and dropout_active(model):
            with policy.scoring():
                return rescore().to(current.dtype)
        return current.detach()

    def logp(self, logits_fn: Any, batch: RolloutBatch, masks: MaskDraw, mask_id: int) -> torch.Tensor:
        """log f(x_i | row) [N, R, L] at every scored position of every copy, in one (or chunked) forward."""
        return masked_logp(
            logits_fn,
            batch.prompt_ids,
            batch.prompt_attention,
            batch.completion_ids,
            masks,
            mask_id,
            chunk_rows=self.cfg.forward_chunk,
            position_weight=batch.position_weight,
        )

    def draw_masks(
        self,
        batch: RolloutBatch,
        inner_step: int,
        replicates: int,
        slot: int | str = "",
        mask_cfg: MaskCfg | None = None,
    ) -> MaskDraw:
        """Masks for these rows: one generator per sample seeded by (seed, round, inner step, slot, uid).

        A row's masks depend only on its uid and these keys, never on which other rows are drawn with
        it, so the same call made in ``prepare`` and in ``loss`` yields identical masks for the old,
        reference and current policies. Stratified schedules share an offset over a stratum of rows:
        a fixed slice of uids (the micro-batch, or the prompt group).
        """
        cfg = self.cfg.mask if mask_cfg is None else mask_cfg
        uids = batch.sample_uid.tolist()
        seeds = [mask_seed(self.seed, batch.round, inner_step, slot, int(u)) for u in uids]
        strata = None
        if cfg.kind is MaskKind.stratified:
            size = self.group_size if cfg.stratify_over is StratifyOver.group else self.micro_batch
            strata = [
                Stratum(mask_seed(self.seed, batch.round, inner_step, slot, "stratum", u // size), u % size, size)
                for u in uids
            ]
        return sample_masks(cfg, batch.completion_mask, batch.prompt_attention.bool(), replicates, seeds, strata)


# What prepare stores for the old scores of inner step 0 when loss computes them from its own forward.
OLD_FROM_LOSS = math.nan


def with_step_zero_placeholder(later: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """[N, μ, ...] old scores: NaN for inner step 0 (``OLD_FROM_LOSS``), then ``later`` (steps 1..μ−1, or None).

    ``like`` [N, 1, ...] gives the shape of one step (and, without ``later``, the device)."""
    dtype = later.dtype if later is not None else torch.float32
    first = torch.full(like.shape, OLD_FROM_LOSS, dtype=dtype, device=like.device)
    return first if later is None else torch.cat([first, later], dim=1)


def dropout_active(model: torch.nn.Module, training: bool | None = None) -> bool:
    """Whether a forward of ``model`` applies dropout, in its modules' current train/eval modes or, with
    ``training`` given, with every module in that mode (what ``engine.train(training)`` sets).

    Counted: dropout modules with p > 0 (PEFT's lora_dropout among them), an ``attention_dropout`` rate
    > 0 on a module (LLaDA's and Qwen2's attention apply it only in train mode), and any dropout rate
    > 0 in a module's config (``*dropout*`` / ``*pdrop*`` keys) -- erring on the side of "active".
    """
    for module in model.modules():
        mode = module.training if training is None else training
        if not mode:
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if isinstance(module, torch.nn.MultiheadAttention) and module.dropout > 0:
            return True
        rate = getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
            return True
        config = module.__dict__.get("config")
        if config is not None:
            items = config.to_dict().items() if hasattr(config, "to_dict") else vars(config).items()
            for key, value in items:
                rated = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ("dropout" in key or "pdrop" in key) and rated and value > 0:
                    return True
    return False


METRIC_WEIGHT_SUFFIX = ":weight"


def metric_weight(name: str) -> str:
    """The metrics key that weights metric ``name`` across micro-batches (and ranks).

    The trainer logs each metric as the mean over the micro-batches that report it, each with weight
    1 unless ``loss`` also returns ``metrics[metric_weight(name)]``, e.g. the number of samples the
    micro-batch's value averages over; a metric over a subset of samples (the negative-advantage ones)
    is then the mean over that subset of the whole batch. Weight keys are not logged themselves.
    """
    return name + METRIC_WEIGHT_SUFFIX


def finite_or_zero(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-sequence surrogates with NaN/inf entries replaced by 0, and how many there were (the non-finite guard)."""
    finite = torch.isfinite(values)
    return torch.where(finite, values, torch.zeros_like(values)), int((~finite).sum())


@dataclass
class OneStepCfg(ObjectiveCfg):
    """Base schema of the objectives scored by the one-step estimator (the whole completion masked once)."""

    @classmethod
    def check(cls, o: Any, sampler: Any, need: Callable[[bool, str], None]) -> None:
        super().check(o, sampler, need)
        need(
            option(o["mask"], "kind") == "full",
            f"objective={o['name']} uses the one-step estimator: mask.kind=full",
        )


class LossNorm(Enum):
    """How a loss over sequences is normalised: by the batch's tokens (token_weighted) or sequences."""

    token_weighted = "token_weighted"
    per_sequence = "per_sequence"


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str, config: type[ObjectiveCfg]) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: ``objective=<name>`` builds this class, and ``config`` (a dataclass extending
    ObjectiveCfg, declared beside the class) is the section's schema, stored for Hydra as ``base_<name>``."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        cls.schema = config
        OBJECTIVES[name] = cls
        register_schema("objective", name, config)
        return cls

    return wrap


def get_objective(cfg: Mapping[str, Any] | ObjectiveCfg, seed: int, group_size: int, micro_batch: int) -> Objective:
    """The registered objective that ``cfg`` (the objective section, typed or plain) names."""
    name = cfg["name"] if isinstance(cfg, Mapping) else cfg.name
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name={name!r} is unknown; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](cfg, seed, group_size, micro_batch)
