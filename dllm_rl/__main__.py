"""`python -m dllm_rl objective=elbo task=sudoku [overrides]`: compose, validate, run.

The Hydra process composes the config once, checks it (types at composition, cross-field rules in
``validate``), writes the resolved config to the run directory and runs the worker on the plain
dict. A problem the user can fix ends the run with one line naming the field, file or row.
"""

from __future__ import annotations

import errno
import logging
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import dllm_rl  # noqa: F401  (registers the config schemas)
from dllm_rl import rundir
from dllm_rl.cli_help import exit_with_help_if_asked
from dllm_rl.config import apply_round_budget, check_writable, missing_extra, validate
from dllm_rl.console import exit_preempted, say, say_error
from dllm_rl.distributed import global_rank, in_slurm_task
from dllm_rl.errors import DllmRlError, Preempted
from dllm_rl.launcher import start, worker_command

log = logging.getLogger("dllm_rl")


def _summary_line(summary: dict) -> str:
    name = summary["primary_metric"]
    base, final = summary["base_metric"], summary["final_metric"]
    change = "" if base is None else f"{base:.4f} -> "
    delta = "" if base is None else f" ({100 * (final - base):+.1f} pts)"
    best = ""
    if summary.get("best_test_metric") is not None:
        best = f" | best on validation: step {summary['best_step']}, test {summary['best_test_metric']:.4f}"
    wall = f"wall {summary['wall_seconds']:.0f} s"
    if summary.get("attempts", 1) > 1:
        wall += f" over {summary['attempts']} attempts (this one {summary['wall_seconds_this_attempt']:.0f} s)"
    return (
        f"{summary['objective']} on {summary['task']}: {summary['final_split']} {name} {change}{final:.4f}{delta}"
        f"{best} | {summary['steps']} steps | {wall} | run dir {summary['run_dir']}"
    )


def _search_metric(summary: dict) -> float:
    """What a sweeper optimises: the last validation score (the test split never selects anything)."""
    name = summary["primary_metric"]
    val = [e for e in summary.get("evals", []) if e.get("split") == "validation"]
    return float(val[-1][name] if val else summary["final_metric"])


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def run_hydra(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    wrote_config = False
    try:
        OmegaConf.to_object(cfg)  # enum and type checks of every typed node
        apply_round_budget(cfg)  # train.rounds / eval.every_n_rounds set the step counts
        validate(cfg)
        check_writable(run_dir, "hydra.run.dir")
        check_writable(Path(cfg.cache_dir).expanduser(), "cache_dir")
        plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        plain["run_dir"] = str(run_dir)
        config_path = run_dir / "config.yaml"
        # Every task of a SLURM job runs this function; rank 0 owns the run directory (rundir.py).
        owner = global_rank() == 0
        with rundir.owner_lock(run_dir, owner):
            wrote_config = rundir.claim_config(config_path, OmegaConf.to_yaml(plain), write=owner)
            if cfg.cluster.launcher == "external" and not in_slurm_task():
                command = worker_command(config_path, int(cfg.cluster.nproc), int(cfg.cluster.nodes))
                log.info("config written to %s; start the workers with: %s", config_path, command)
                print(command)
                return None
            from dllm_rl.worker import run  # torch, DeepSpeed and the models: only when training starts

            summary = start(plain, run)
    except DllmRlError as exc:
        say_error(str(exc))
        _undo_hydra_files(run_dir, {"config.yaml"} if wrote_config else set())
        sys.exit(2)
    except Preempted as exc:
        exit_preempted(exc)
    if global_rank() != 0 or summary is None:
        return None
    say(_summary_line(summary))
    return _search_metric(summary)


# Set before Hydra runs (_preflight_output_dir): the deepest directory of the requested location that
# already existed, and Hydra's files in a run directory given again with hydra.run.dir, as they were.
_existed: Path | None = None
_hydra_files_before: dict[Path, bytes] = {}


def _undo_hydra_files(run_dir: Path, ours: set[str]) -> None:
    """A start that failed before training leaves the run directory as it found it: a directory that
    holds nothing but Hydra's files and ``ours`` is removed (a config error creates no run
    directory), and an existing run directory gets back the .hydra/ files that Hydra rewrote for
    the refused start."""
    hydra = HydraConfig.get()
    ours = ours | {hydra.output_subdir or ".hydra", f"{hydra.job.name}.log"}
    if rundir.discard_unused(run_dir, ours, _existed):
        return
    for path, data in _hydra_files_before.items():
        if path.parent.parent == run_dir.absolute():
            try:
                path.write_bytes(data)
            except OSError:
                pass


def _preflight_output_dir(argv: list[str]) -> None:
    """Hydra creates the run directory before any of our code runs, and reports a failure there
    as a traceback; check the requested location first so the user gets one line instead. The
    check creates the missing directories and a file, then removes them again: a permission test
    alone passes for root on /proc, where nothing can be created."""
    global _existed
    target, field = "outputs", "output_dir"
    for arg in argv:
        for key in ("output_dir", "hydra.run.dir", "hydra.sweep.dir"):
            if arg.startswith(f"{key}="):
                target, field = arg.split("=", 1)[1], key
    wanted = Path(target.split("${", 1)[0] or ".").expanduser().absolute()
    existing, missing = wanted, []
    while not existing.exists():
        existing, missing = existing.parent, [existing, *missing]
    created: list[Path] = []
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(existing))
        for directory in missing:
            directory.mkdir()
            created.append(directory)
        with tempfile.TemporaryFile(dir=created[-1] if created else existing):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc)
        print(f"error: {field}={target}: not writable ({why}: {exc.filename or existing})", file=sys.stderr)
        sys.exit(2)
    finally:
        for directory in reversed(created):
            directory.rmdir()
    _existed = existing
    if field == "hydra.run.dir" and (existing / "config.yaml").is_file():
        _hydra_files_before.update({p: p.read_bytes() for p in (existing / ".hydra").glob("*.yaml")})


def main() -> None:
    """``python -m dllm_rl``: answer --help and the checks that need no config, then run Hydra."""
    exit_with_help_if_asked("config")
    if (missing := missing_extra(sys.argv[1:])) is not None:
        print(f"error: {missing}", file=sys.stderr)
        sys.exit(2)
    _preflight_output_dir(sys.argv[1:])
    run_hydra()


if __name__ == "__main__":
    main()
