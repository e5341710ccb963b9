"""Config composition (Hydra Compose API) and the cross-field validation pass."""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

import dllm_rl  # noqa: F401  (ConfigStore registration)
from dllm_rl.config import Config, RunConfig, apply_round_budget, check_writable, run_config, validate
from dllm_rl.errors import ConfigError
from dllm_rl.likelihood.masks import MaskCfg
from dllm_rl.objectives import OBJECTIVES
from dllm_rl.objectives.base import ObjectiveCfg
from dllm_rl.samplers import SAMPLERS
from dllm_rl.schema import SCHEMAS
from dllm_rl.tasks import TASKS, get_task

CONF_DIR = Path(dllm_rl.__file__).parent / "conf"


def _compose(*overrides: str):
    with initialize_config_module(config_module="dllm_rl.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_composition_has_every_group():
    cfg = _compose()
    for group in ("model", "objective", "task", "sampler", "cluster", "deepspeed", "logging"):
        assert group in cfg
    assert cfg.objective.name == "spg" and cfg.task.name == "sudoku" and cfg.model.name == "tiny"
    # gen_length follows the task's completion length by interpolation.
    assert cfg.sampler.gen_length == cfg.task.completion_length == 16
    validate(cfg)
    OmegaConf.to_object(cfg)


def test_unknown_group_option_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="objective/nope"):
        _compose("objective=nope")


def test_typo_in_key_fails_with_key_name():
    with pytest.raises(ConfigCompositionException) as info:
        _compose("objective.mc_samplse=3")
    assert "mc_samplse" in str(info.value.__cause__ or info.value)


def test_wrong_type_fails():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        _compose("objective.mc_samples=abc")
    assert "mc_samples" in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize("override", ["sampler.remasking=sideways", "sampler.confidence=softmax"])
def test_enum_value_is_checked(override):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        _compose(override)


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        (["sampler.block_length=5"], ["sampler.gen_length", "sampler.block_length"]),
        (["sampler.block_length=8", "sampler.steps=3"], ["sampler.steps"]),
        (["rollout.samples_per_prompt=3", "train.micro_batch_per_gpu=16"], ["train.micro_batch_per_gpu"]),
        (["train.micro_batch_per_gpu=48"], ["rollout.prompts_per_step*rollout.samples_per_prompt"]),
        (["objective.inner_iterations=4", "train.steps=10"], ["train.steps", "objective.inner_iterations"]),
        (["objective.mask.t_min=0.9", "objective.mask.t_max=0.5"], ["objective.mask.t_min"]),
        (["rollout.samples_per_prompt=1"], ["rollout.samples_per_prompt"]),
        (["sampler.temperature=-1"], ["sampler.temperature"]),
        (["sampler=threshold", "sampler.threshold=1.5"], ["sampler.threshold"]),
        (["sampler=entropy", "sampler.cache=prefix"], ["sampler.cache"]),
        (["sampler=entropy", "sampler.confidence=full"], ["sampler.confidence"]),
        (["sampler=entropy", "sampler.top_p=0"], ["sampler.top_p"]),
        (["sampler.threshold=0.9", "sampler.max_tokens_per_step=0"], ["sampler.max_tokens_per_step"]),
        (["objective.omega=1.5"], ["objective.omega"]),
        (["objective.beta=0"], ["objective.beta"]),
        (["objective/mask=coupled", "objective.mc_samples=3"], ["objective.mask.coupled"]),
        (["objective/mask=blockwise", "objective.mask.block_len=5"], ["objective.mask.block_len"]),
        (["objective=gdsd", "objective.mask.weight=tlc"], ["objective.mask.weight", "objective.score"]),
        (["objective=gdsd", "objective/mask=random"], ["objective.mask.kind"]),
        (["objective=dmpo", "objective.coeff=0"], ["objective.coeff"]),
        (["objective=diffu_grpo", "objective/mask=random"], ["mask.kind=full"]),
        (["objective=wd1", "objective/mask=random"], ["mask.kind=full"]),
        (["objective=gdsd", "objective.mc_pairs=0"], ["objective.mc_pairs"]),
        (["objective=dmpo", "objective.loss=wddo", "objective.mc_samples=3"], ["objective.loss=wddo"]),
        (["objective=spg", "objective.eubo_mc_samples=1"], ["objective.eubo_mc_samples", "objective.mc_samples"]),
        (["objective=rloo_elbo", "objective.mc_samples=0"], ["objective.mc_samples"]),
        (["task.prompt_style=chat", "eval.marginals=true"], ["eval.marginals", "task.prompt_style=compact"]),
    ],
)
def test_cross_field_rules_name_the_fields(overrides, fields):
    cfg = _compose(*overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    for f in fields:
        assert f in str(info.value)


@pytest.mark.parametrize("name", ["spg", "elbo", "dmpo", "gdsd", "diffu_grpo", "wd1", "rloo_elbo"])
def test_every_objective_composes_and_validates(name):
    cfg = _compose(f"objective={name}")
    validate(cfg)
    assert cfg.objective.name == name
    OmegaConf.to_container(cfg, resolve=True)


def test_each_objective_owns_its_schema_and_its_rules():
    """@register_objective(name, config=...) puts the schema beside the code into Hydra's ConfigStore and
    into the table validate() reads; a plain dict (what a worker loads from config.yaml) gets the same
    rules as the composed config."""
    assert set(SCHEMAS["objective"]) == set(OBJECTIVES)
    for name, schema in SCHEMAS["objective"].items():
        assert issubclass(schema, ObjectiveCfg) and schema.__module__.startswith("dllm_rl.objectives.")
        assert OmegaConf.get_type(_compose(f"objective={name}").objective) is schema
    cfg = _compose("objective=gdsd", "objective.epsilon=2")
    for form in (cfg, OmegaConf.to_container(cfg, resolve=True)):
        with pytest.raises(ConfigError, match=r"objective\.epsilon=2\.0 must be in \(0, 1\)"):
            validate(form)
    # diffu_grpo's epsilon is a clip range with its own rule: the rule follows the schema, not the key
    validate(_compose("objective=diffu_grpo", "objective.epsilon=2"))


def test_each_sampler_owns_its_schema_and_its_rules():
    assert set(SCHEMAS["sampler"]) == set(SAMPLERS)
    for option, name in (("low_confidence", "low_confidence"), ("threshold", "low_confidence"), ("entropy", "dream")):
        sampler = _compose(f"sampler={option}").sampler
        assert sampler.name == name and OmegaConf.get_type(sampler) is SCHEMAS["sampler"][name]
        assert SCHEMAS["sampler"][name].__module__ == SAMPLERS[name].__module__
    cfg = _compose("sampler=entropy", "sampler.eps=1.5")
    for form in (cfg, OmegaConf.to_container(cfg, resolve=True)):
        with pytest.raises(ConfigError, match=r"sampler\.eps=1\.5 must be in \(0, 1\)"):
            validate(form)
    plain = OmegaConf.to_container(_compose(), resolve=True)
    plain["sampler"]["name"] = "nonesuch"
    with pytest.raises(ConfigError, match="sampler.name='nonesuch' is unknown; available: dream, low_confidence"):
        validate(plain)


def test_each_task_owns_its_schema_and_its_rules(tmp_path):
    assert set(SCHEMAS["task"]) == set(TASKS)
    for name in TASKS:
        task = _compose(f"task={name}").task
        assert task.name == name and OmegaConf.get_type(task) is SCHEMAS["task"][name]
        assert SCHEMAS["task"][name].__module__ == TASKS[name].__module__
        assert TASKS[name].prompt_styles == SCHEMAS["task"][name].prompt_styles  # one declaration
    # A task's own rule fails in validation, before any process or data exists, in both config forms.
    cfg = _compose("task.few_shot=2")
    for form in (cfg, OmegaConf.to_container(cfg, resolve=True)):
        with pytest.raises(ConfigError, match=r"task\.few_shot=2 must be 0 .* or 3"):
            validate(form)
    # The same rule, and the same message, when a task is built without a validated config.
    with pytest.raises(ConfigError, match=r"task\.few_shot=2 must be 0 .* or 3"):
        get_task("sudoku", {"few_shot": "2"}, tmp_path)
    with pytest.raises(ConfigError, match=r"task\.prompt_style='compact': task gsm8k has chat"):
        validate(_compose("task=gsm8k", "task.prompt_style=compact"))
    plain = OmegaConf.to_container(_compose(), resolve=True)
    plain["task"]["name"] = "nonesuch"
    with pytest.raises(ConfigError, match="task.name='nonesuch' is unknown; available: countdown, gsm8k, math500"):
        validate(plain)


def test_spg_paper_settings_per_task_and_mask_schedules_are_selectable():
    assert _compose("objective=spg").objective.beta == 1.0  # Sudoku: objective_task/spg_sudoku.yaml
    for schedule, kind in [("random", "random"), ("coupled", "random"), ("stratified", "stratified")]:
        cfg = _compose("objective=spg", f"objective/mask={schedule}")
        validate(cfg)
        assert cfg.objective.mask.kind.value == kind
    assert _compose("objective=spg", "objective.beta=2.0").objective.beta == 2.0  # the command line wins
    assert _compose("objective=dmpo").objective.rollout_mask.weight.value == "inv_t_empirical"


def test_several_problems_reported_together():
    cfg = _compose("sampler.block_length=5", "objective.mc_samples=0")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "sampler.block_length" in str(info.value) and "objective.mc_samples" in str(info.value)


def test_missing_model_path_is_named(tmp_path):
    cfg = _compose(f"model.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="model.path=.*nowhere.*no such directory"):
        validate(cfg)
    (tmp_path / "empty").mkdir()
    cfg = _compose(f"model.path={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="no config.json"):
        validate(cfg)


def test_missing_data_file_is_named(tmp_path):
    cfg = _compose(f"task.train_file={tmp_path / 'train.csv'}")
    with pytest.raises(ConfigError, match="task.train_file=.*train.csv"):
        validate(cfg)


def test_unwritable_directory_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="hydra.run.dir=.*file.*not writable"):
        check_writable(blocker / "run", "hydra.run.dir")


def test_every_yaml_key_is_commented():
    """House rule: a comment above every key of every option file."""
    for path in CONF_DIR.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
                continue
            key = stripped.split(":", 1)[0]
            if key in ("defaults",):
                continue
            previous = lines[i - 1].strip() if i else ""
            value = stripped.split(":", 1)[1].strip()
            is_section = value == ""
            assert previous.startswith("#") or is_section, f"{path.name}:{i + 1} key '{key}' has no comment"


def _schema_default(schema: type, path: list[str]) -> object:
    """The dataclass default of a dotted key path (nested schemas followed), or _NO_DEFAULT."""
    for part in path[:-1]:
        schema = typing.get_type_hints(schema).get(part)
        if not dataclasses.is_dataclass(schema):
            return _NO_DEFAULT
    fields = {f.name: f for f in dataclasses.fields(schema)}
    f = fields.get(path[-1])
    if f is None or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
        return _NO_DEFAULT
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return getattr(value, "value", value)


_NO_DEFAULT = object()


def _leaves(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[list[str], object]]:
    """(key path, value) of every non-mapping value of a nested mapping."""
    out: list[tuple[list[str], object]] = []
    for key, value in node.items():
        out += _leaves(value, (*prefix, key)) if isinstance(value, dict) else [([*prefix, key], value)]
    return out


def test_no_yaml_option_repeats_a_schema_default():
    """Every default is written once, in its schema; an option file holds what differs (its presets). A key
    that resets what an earlier file of the option's own defaults list set (objective/mask/dmpo_rollout.yaml
    after dmpo_loss.yaml) is a preset too."""
    from hydra.core.config_store import ConfigStore

    repo = ConfigStore.instance().repo
    repeated = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        rel = path.relative_to(CONF_DIR).as_posix()
        data = OmegaConf.to_container(OmegaConf.load(path))  # OmegaConf's scalars: 1e-4 is a float here
        defaults = data.pop("defaults", []) or []
        bases = [d[len("/base_") :].split("@")[0] for d in defaults if isinstance(d, str) and d.startswith("/base_")]
        if bases:
            schema = OmegaConf.get_type(repo[f"base_{bases[0]}.yaml"].node)
        elif rel.startswith("objective/mask/"):
            schema = MaskCfg
        elif rel in ("config.yaml", "evaluate.yaml", "variance.yaml"):
            schema = Config
        else:
            continue  # sweeps, testbed and objective_task files override other files by design
        earlier = set()
        for d in defaults:
            if isinstance(d, str) and d not in ("_self_", "config") and not d.startswith("/"):
                earlier |= set(OmegaConf.to_container(OmegaConf.load(path.parent / f"{d}.yaml")))

        for key_path, value in _leaves(data):
            default = _schema_default(schema, key_path)
            if default is _NO_DEFAULT or key_path[-1] in earlier or (isinstance(value, str) and "${" in value):
                continue
            same = (value is default) if isinstance(default, bool) or isinstance(value, bool) else value == default
            if same:
                repeated.append(f"{rel}: {'.'.join(key_path)}: {value!r}")
    assert not repeated, "option files repeat their schema's default:\n" + "\n".join(repeated)


def test_objectives_sweep_gives_every_objective_the_same_budget():
    cfg = _compose("+sweep=objectives")
    validate(cfg)
    assert cfg.train.steps == 320 and cfg.eval.every_n_steps == 0
    for name in ("spg", "elbo", "dmpo", "gdsd", "diffu_grpo", "wd1"):
        validate(_compose("+sweep=objectives", f"objective={name}"))


@pytest.mark.parametrize("sampler", ["low_confidence", "threshold", "entropy"])
def test_every_sampler_composes_validates_and_builds(sampler):
    from dllm_rl.samplers import get_sampler

    cfg = _compose(f"sampler={sampler}", "model=tiny_dream")
    validate(cfg)
    built = get_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    assert built.gen_length == cfg.sampler.gen_length
    assert getattr(built, "threshold", None) == (0.9 if sampler == "threshold" else None)


def test_testbed_presets_apply_to_their_model_and_task_only():
    # the tiny-model Sudoku testbed (conf/testbed*/): its own estimator settings for spg, the paper's otherwise
    testbed = _compose("objective=spg", "task=sudoku")
    assert testbed.objective.mask.prompt_mask_prob == 0.0 and testbed.objective.inner_iterations == 1
    assert testbed.rollout.prompts_per_step == 64 and testbed.task.warmstart_steps == 200  # Q 64: spg's own
    assert testbed.train.steps == 125
    assert _compose("objective=elbo", "task=sudoku").rollout.prompts_per_step == 32  # every objective's
    paper = _compose("objective=spg", "task=sudoku", "~testbed", "~testbed_objective")
    assert paper.objective.mask.prompt_mask_prob == 0.15 and paper.objective.inner_iterations == 4
    assert paper.rollout.prompts_per_step == 16 and paper.objective.beta == 1.0  # objective_task stays
    other_model = _compose("objective=spg", "task=sudoku", "model=tiny_llada")
    assert other_model.objective.mask.prompt_mask_prob == 0.15 and other_model.rollout.prompts_per_step == 16
    # the command line still wins over a preset
    assert _compose("objective=spg", "objective.inner_iterations=4").objective.inner_iterations == 4


def test_optimizer_type_reaches_deepspeed():
    from dllm_rl.build import deepspeed_config

    def ds(*overrides: str) -> dict:
        return deepspeed_config(run_config(OmegaConf.to_container(_compose(*overrides), resolve=True)))

    adam = ds()
    assert adam["optimizer"]["type"] == "AdamW" and "zero_allow_untested_optimizer" not in adam
    sgd = ds("optim.type=SGD", "optim.momentum=0.9", "optim.lr=0.5")
    assert sgd["optimizer"] == {"type": "SGD", "params": {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.0}}
    assert sgd["zero_allow_untested_optimizer"] is True
    with pytest.raises(ConfigCompositionException):
        _compose("optim.type=Lion")


def test_cosine_schedule_runs_every_step_from_lr_down_to_its_floor():
    from dllm_rl.build import deepspeed_config, lr_lambda, lr_scheduler

    def built(*overrides: str) -> RunConfig:
        cfg = OmegaConf.to_container(_compose(*overrides), resolve=True)
        apply_round_budget(cfg)  # as the CLI does before anything reads train.steps
        validate(cfg)
        return run_config(cfg)

    plain = built()
    assert "scheduler" not in deepspeed_config(plain) and lr_scheduler(plain) is None
    assert deepspeed_config(built("optim.warmup_steps=5"))["scheduler"]["type"] == "WarmupLR"
    # train.rounds decides train.steps (10 rounds x mu 8) before the schedule's length is read
    cfg = built("optim.schedule=cosine", "optim.min_lr_ratio=0.1", "train.rounds=10", "objective=gdsd")
    assert "scheduler" not in deepspeed_config(cfg)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = lr_scheduler(cfg)(opt)
    lrs = []
    for _ in range(80):  # the lr each optimizer step runs with; the engine steps the scheduler after it
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-5)
    # the half cosine over steps 0 .. 79: step 40 is 40/79 of the way
    assert lrs[40] == pytest.approx(1e-5 + 9e-5 * (1 + math.cos(math.pi * 40 / 79)) / 2)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    # a warm-up never runs a step at lr 0 and ends at the full lr
    warm = [lr_lambda(10, 4, 0.0)(k) for k in range(10)]
    assert warm[:4] == [0.25, 0.5, 0.75, 1.0] and warm[4] == 1.0 and warm[-1] == 0.0
    with pytest.raises(ConfigError, match="optim.min_lr_ratio=1.5"):
        built("optim.schedule=cosine", "optim.min_lr_ratio=1.5")
