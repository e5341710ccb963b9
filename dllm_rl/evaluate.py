"""`python -m dllm_rl.evaluate [overrides]`: score a checkpoint the way the papers report it.

The same config tree as training (every group and override), plus ``evaluate.*``: for each
generation length L of ``evaluate.gen_lengths`` the split's (subset of) examples are decoded
greedily (temperature 0) with the configured sampler at block length min(32, L) and
steps = L · steps_per_token (L/2 in d1, wd1, SPG and GDSD), scored by the task's evaluation parsers,
and the metrics averaged over lengths (README, "Evaluation"). With ``cluster.nproc > 1`` the examples are
split across processes (torch elastic launch; gloo on CPU) and gathered, so the numbers do not
depend on the process count.

Writes to the run directory: ``generations_len<L>.jsonl`` (prompt, completion, reward per example),
``metrics.json`` (per length, the average over lengths, protocol, wall time) and one summary line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import dllm_rl  # noqa: F401  (registers the config schemas)
from dllm_rl.cli_help import exit_with_help_if_asked
from dllm_rl.config import (
    EvaluateCfg,
    RunConfig,
    check_keys,
    check_writable,
    model_errors,
    run_config,
    task_file_errors,
)
from dllm_rl.console import library_output_to, say, say_error
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.lazy import lazy_import

# loads at the first tensor, so that --help and config errors answer first (dllm_rl/lazy.py)
torch = lazy_import("torch")
log = logging.getLogger("dllm_rl")


def protocol(ecfg: EvaluateCfg, length: int) -> dict[str, int]:
    """Block length and steps of one evaluation length (steps a positive multiple of the block count)."""
    block = min(ecfg.block_length, length)
    if length % block:
        raise ConfigError(f"evaluate.gen_lengths: {length} is not a multiple of evaluate.block_length={block}")
    blocks = length // block
    per_block = max(1, round(length * ecfg.steps_per_token / blocks))
    return {"gen_length": length, "block_length": block, "steps": min(per_block * blocks, length)}


def check(cfg: dict[str, Any]) -> None:
    """The rules of an evaluation config, as one ConfigError naming the fields."""
    e, errors = cfg["evaluate"], []
    if not e["gen_lengths"] or any(int(n) < 1 for n in e["gen_lengths"]):
        errors.append(f"evaluate.gen_lengths={e['gen_lengths']} must be positive lengths")
    if e["block_length"] < 1:
        errors.append(f"evaluate.block_length={e['block_length']} must be >= 1")
    if not 0 < e["steps_per_token"] <= 1:
        errors.append(f"evaluate.steps_per_token={e['steps_per_token']} must be in (0, 1]")
    if e["split"] not in ("test", "validation"):
        errors.append(f"evaluate.split={e['split']!r} must be test or validation")
    if e["batch_size"] < 1:
        errors.append(f"evaluate.batch_size={e['batch_size']} must be >= 1")
    if e["subset_size"] is not None and e["subset_size"] < 1:
        errors.append(f"evaluate.subset_size={e['subset_size']} must be >= 1 (or null: all)")
    if int(cfg["cluster"]["nproc"]) < 1:
        errors.append(f"cluster.nproc={cfg['cluster']['nproc']} must be >= 1")
    if e["marginals"] and cfg["task"]["prompt_style"] != "compact":
        errors.append("evaluate.marginals=true needs task.prompt_style=compact (a chat answer has no fixed position)")
    errors += model_errors(cfg["model"], str(cfg["cluster"]["device"]), path_given_elsewhere=bool(e["checkpoint"]))
    errors += task_file_errors(cfg["task"])
    if errors:
        raise ConfigError("invalid evaluation configuration:\n  - " + "\n  - ".join(errors))


def resolve_checkpoint(cfg: RunConfig) -> tuple[str | None, str]:
    """(the save_pretrained directory to score or None for the cached warm-started base, why that one).

    A run directory (or its checkpoints/ folder) is scored at checkpoints/best/hf, the weights its
    validation split picked. A run without that export (validation never beat the starting weights,
    or eval.splits had no validation) is scored at checkpoints/final/hf, and the reason says so: the
    summary line and metrics.json carry it, so a final-weights score is never mistaken for the best.
    """
    given = cfg.evaluate.checkpoint or cfg.model.path
    field = "evaluate.checkpoint" if cfg.evaluate.checkpoint else "model.path"
    if given is None:
        if cfg.model.requires_path:
            raise ConfigError(f"model={cfg.model.name}: give evaluate.checkpoint=<dir> or model.path=<dir>")
        base = f"the cached warm-started base of model={cfg.model.name}"
        return None, f"{base}: no evaluate.checkpoint or model.path"
    path = Path(os.path.expanduser(str(given)))

    def loadable(d: Path) -> bool:  # a full checkpoint, or a LoRA adapter that names its base
        return (d / "config.json").is_file() or (d / "adapter_config.json").is_file()

    if loadable(path):
        return str(path), f"{field} as given"
    run_dir = path.parent if path.name == "checkpoints" else path
    if loadable(run_dir / "checkpoints" / "best" / "hf"):
        return str(run_dir / "checkpoints" / "best" / "hf"), "the run's best on validation"
    if loadable(run_dir / "checkpoints" / "final" / "hf"):
        why = f"the run's last weights: no checkpoints/best/hf, since {_why_no_best(run_dir)}"
        return str(run_dir / "checkpoints" / "final" / "hf"), why
    raise ConfigError(
        f"{field}={given}: neither a save_pretrained directory (config.json or adapter_config.json) nor a run "
        "directory with checkpoints/best/hf or checkpoints/final/hf"
    )


def _why_no_best(run_dir: Path) -> str:
    """Why a run directory has no checkpoints/best export, as its summary.json tells."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return "no summary.json says why"
    best = summary.get("best")
    if best is None:
        return "validation was off (eval.splits)"
    if best.get("step") == 0:
        return "validation never beat the starting weights"
    return f"the export of step {best.get('step')} (best on validation) is missing"


def run(resolved: dict[str, Any] | RunConfig) -> dict[str, Any]:
    """Evaluate in this process (one rank of several, or alone); rank 0 writes and returns the result.
    ``resolved`` is the plain config (config.yaml), or that config typed (config.run_config)."""
    import torch.distributed as dist

    from dllm_rl import evaluation
    from dllm_rl.build import quiet_libraries
    from dllm_rl.distributed import init_distributed
    from dllm_rl.models.policy import load_from_config
    from dllm_rl.samplers import get_sampler
    from dllm_rl.tasks import get_task
    from dllm_rl.warmstart import ensure_base
    from dllm_rl.worker import rank_logging

    start = time.perf_counter()
    cfg = run_config(resolved)
    quiet_libraries()
    if cfg.cluster.threads:
        torch.set_num_threads(cfg.cluster.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = Path(cfg.run_dir)
    if world > 1:
        # Spawned ranks log to logs/rank<R>.log, DeepSpeed's build noise included.
        with library_output_to(rank_logging(run_dir, int(os.environ["RANK"]))):
            init_distributed(cfg.cluster.backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    ecfg = cfg.evaluate

    task = get_task(cfg.task.name, cfg.task, Path(cfg.cache_dir).expanduser())
    source, choice = resolve_checkpoint(cfg)
    if source is None:
        # Rank 0 trains and caches a missing base first; the others then find it in the cache.
        if rank == 0:
            source = str(ensure_base(cfg, task)[0])
        if dist.is_initialized():
            dist.barrier()
        if rank != 0:
            source = str(ensure_base(cfg, task)[0])
    if rank == 0:
        log.info("scoring %s (%s)", source, choice)
    # model.adapter belongs to model.path; a checkpoint given here is scored as it is.
    model_cfg = dataclasses.replace(cfg.model, adapter=None) if ecfg.checkpoint else cfg.model
    policy = load_from_config(source, model_cfg)
    policy.model.to(torch.device(cfg.cluster.device))

    data = task.dataset(ecfg.split)
    indices = evaluation.paper_subset(len(data), ecfg.subset_size, ecfg.subset_seed)
    examples = data.select(indices).to_list()
    examples, dropped = evaluation.fit_prompts(
        policy, task, examples, "eval_prompt", task.eval_prefill, f"{ecfg.split} split"
    )
    per_length: dict[str, dict[str, Any]] = {}
    for length in ecfg.gen_lengths:
        settings = protocol(ecfg, length)
        sampler = get_sampler(dataclasses.replace(cfg.sampler, **settings, temperature=0.0))
        t0 = time.perf_counter()
        metrics, records = evaluation.score(
            policy,
            sampler,
            task,
            examples,
            ecfg.batch_size,
            evaluation.truncation(task.cfg),
            shard=True,
        )
        seconds = time.perf_counter() - t0
        per_length[str(length)] = {
            **metrics,
            **settings,
            "seconds": seconds,
            "seconds_per_100": 100 * seconds / max(len(examples), 1),
        }
        if rank == 0:
            evaluation.write_jsonl(run_dir / f"generations_len{length}.jsonl", records)
            log.info("length %d: %s", length, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    marginals = None
    if ecfg.marginals and rank == 0:
        length = cfg.task.completion_length
        marginals = evaluation.target_marginals(policy, task, examples, length, ecfg.batch_size)
        (run_dir / "marginals.json").write_text(json.dumps(marginals, indent=2))
        log.info(
            "marginals (whole completion masked, %d answer positions): argmax_acc=%.4f mean_p_target=%.4f",
            marginals["positions"],
            marginals["argmax_acc"],
            marginals["mean_p_target"],
        )
    metric_names = [k for k, v in next(iter(per_length.values())).items() if isinstance(v, float)]
    result = {
        "checkpoint": source,
        "checkpoint_choice": choice,
        "task": cfg.task.name,
        "prompt_style": task.prompt_style,
        "split": ecfg.split,
        "primary_metric": task.primary_metric,
        "num_examples": len(examples),
        "dropped_prompts": dropped,
        "subset": {"size": ecfg.subset_size, "seed": ecfg.subset_seed},
        "processes": world,
        "temperature": 0.0,
        "sampler": cfg.sampler.name,
        "per_length": per_length,
        "average": {k: sum(r[k] for r in per_length.values()) / len(per_length) for k in metric_names},
        **({"marginals": marginals} if marginals is not None else {}),
        "wall_seconds": time.perf_counter() - start,
    }
    if rank == 0:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return result


def launch(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``run`` in this process, or in cluster.nproc processes started by torch elastic launch."""
    typed = run_config(cfg)
    nproc = typed.cluster.nproc
    if nproc == 1:
        return run(typed)
    from torch.distributed.launcher.api import elastic_launch

    from dllm_rl.distributed import local_launch_config

    config = local_launch_config(nproc)
    # The function as dllm_rl.evaluate.run (not __main__.run), so that spawned workers can import it.
    import dllm_rl.evaluate as module

    results = elastic_launch(config, entrypoint=module.run)(cfg)
    return results[0]


def summary_line(result: dict[str, Any]) -> str:
    name = result["primary_metric"]
    lengths = " ".join(f"L{n}={r[name]:.4f}" for n, r in result["per_length"].items())
    per100 = sum(r["seconds_per_100"] for r in result["per_length"].values())
    marginals = result.get("marginals")
    first_step = (
        f" | whole completion masked: argmax {marginals['argmax_acc']:.4f},"
        f" mean p(answer) {marginals['mean_p_target']:.4f}"
        if marginals
        else ""
    )
    return (
        f"evaluate {result['task']} ({result['split']}, {result['num_examples']} examples): {name} {lengths} | "
        f"average {result['average'][name]:.4f}{first_step} | {per100:.1f} s per 100 examples over all lengths | "
        f"checkpoint {result['checkpoint']} ({result['checkpoint_choice']})"
    )


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def run_hydra(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        OmegaConf.to_object(cfg)  # enum and type checks of every typed node
        check_keys(cfg)  # a '+'-added key no schema declares
        plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        check(plain)
        check_writable(run_dir, "hydra.run.dir")
        plain["run_dir"] = str(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain))
        result = launch(plain)
    except DllmRlError as exc:
        say_error(str(exc))
        sys.exit(2)
    say(summary_line(result))
    return float(result["average"][result["primary_metric"]])


def main() -> None:
    """``python -m dllm_rl.evaluate``: answer --help quickly, then run Hydra."""
    exit_with_help_if_asked("evaluate")
    run_hydra()


if __name__ == "__main__":
    main()
