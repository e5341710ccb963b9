"""`python -m dllm_rl objective=elbo task=sudoku [overrides]`: compose, validate, run.

The Hydra process composes the config once, checks it (types at composition, cross-field rules in
``validate``), writes the resolved config to the run directory and runs the worker on the plain
dict. A problem the user can fix ends the run with one line naming the field, file or row.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import dllm_rl  # noqa: F401  (registers the config schemas)
from dllm_rl.checkpoint import write_text_atomic
from dllm_rl.config import apply_round_budget, check_writable, validate
from dllm_rl.errors import DllmRlError

log = logging.getLogger("dllm_rl")


def _summary_line(summary: dict) -> str:
    name = summary["primary_metric"]
    base, final = summary["base_metric"], summary["final_metric"]
    change = "" if base is None else f"{base:.4f} -> "
    delta = "" if base is None else f" ({100 * (final - base):+.1f} pts)"
    best = ""
    if summary.get("best_test_metric") is not None:
        best = f" | best on validation: step {summary['best_step']}, test {summary['best_test_metric']:.4f}"
    return (
        f"{summary['objective']} on {summary['task']}: {summary['final_split']} {name} {change}{final:.4f}{delta}"
        f"{best} | {summary['steps']} steps | wall {summary['wall_seconds']:.0f} s | run dir {summary['run_dir']}"
    )


def _search_metric(summary: dict) -> float:
    """What a sweeper optimises: the last validation score (the test split never selects anything)."""
    name = summary["primary_metric"]
    val = [e for e in summary.get("evals", []) if e.get("split") == "validation"]
    return float(val[-1][name] if val else summary["final_metric"])


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from dllm_rl.launcher import Preempted, exit_preempted, global_rank, in_slurm_task, start, worker_command

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        OmegaConf.to_object(cfg)  # enum and type checks of every typed node
        apply_round_budget(cfg)  # train.rounds / eval.every_n_rounds set the step counts
        validate(cfg)
        check_writable(run_dir, "hydra.run.dir")
        check_writable(Path(cfg.cache_dir).expanduser(), "cache_dir")
        plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        plain["run_dir"] = str(run_dir)
        config_path = run_dir / "config.yaml"
        if global_rank() == 0:  # every task of a SLURM job runs this function; one writes
            write_text_atomic(config_path, OmegaConf.to_yaml(plain))
        if cfg.cluster.launcher == "external" and not in_slurm_task():
            command = worker_command(config_path, int(cfg.cluster.nproc))
            log.info("config written to %s; start the workers with: %s", config_path, command)
            print(command)
            return None
        summary = start(plain)
    except DllmRlError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Preempted as exc:
        exit_preempted(exc)
    if global_rank() != 0 or summary is None:
        return None
    line = _summary_line(summary)
    log.info("%s", line)
    print(line)
    return _search_metric(summary)


def _preflight_output_dir(argv: list[str]) -> None:
    """Hydra creates the run directory before any of our code runs, and reports a failure there
    as a traceback; check the requested location first so the user gets one line instead."""
    target, field = "outputs", "output_dir"
    for arg in argv:
        for key in ("output_dir", "hydra.run.dir", "hydra.sweep.dir"):
            if arg.startswith(f"{key}="):
                target, field = arg.split("=", 1)[1], key
    existing = Path(target.split("${", 1)[0] or ".").expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        print(f"error: {field}={target}: not writable ({existing} is not a writable directory)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _preflight_output_dir(sys.argv[1:])
    main()
