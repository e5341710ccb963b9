"""One training process: init distributed -> build from registries -> Trainer.fit() -> summary.json.

The Hydra parent hands over a plain, fully resolved dict; workers never parse argv. For users who
start processes themselves: ``python -m dllm_rl.worker <run_dir>/config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from dllm_rl import checkpoint, rundir
from dllm_rl.build import build_policy, build_training, quiet_libraries
from dllm_rl.checkpoint import write_text_atomic
from dllm_rl.config import CheckpointCfg, RunConfig, run_config, world_size
from dllm_rl.console import detach_library_loggers, exit_preempted, library_output_to
from dllm_rl.distributed import (
    barrier,
    end_distributed,
    gather_layouts,
    global_rank,
    init_distributed,
    rank_layout,
    rank_world,
    run_device,
)
from dllm_rl.errors import DllmRlError, Preempted
from dllm_rl.preemption import StopRequests
from dllm_rl.schema import plain
from dllm_rl.tasks import get_task
from dllm_rl.tracking import Tracker
from dllm_rl.trainer import Trainer

log = logging.getLogger("dllm_rl")


def rank_logging(run_dir: Path, rank: int) -> logging.FileHandler:
    """Every rank logs to run_dir/logs/rank<R>.log; only rank 0 reaches the console (and Hydra's log)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    logger = logging.getLogger("dllm_rl")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if rank != 0:
        logger.propagate = False
    elif not logging.getLogger().handlers:  # a spawned worker: nothing configured the console
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("[%(asctime)s][%(name)s] %(message)s"))
        logger.addHandler(console)
    return handler


def _log_traceback(handler: logging.Handler, exc: BaseException) -> None:
    """A failure's traceback, causes included (a reward plug-in's own error), into this rank's log file
    only: the console keeps the one-line message."""
    info = (type(exc), exc, exc.__traceback__)
    handler.handle(logging.LogRecord(log.name, logging.ERROR, __file__, 0, "run failed: %s", (exc,), info))


STATUS_TEXT_CHARS = 500  # status.json is a small record: an error's text is cut to this (the log has it whole)


def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > STATUS_TEXT_CHARS:
            return f"{value[: STATUS_TEXT_CHARS - 20]} ... ({len(value)} chars)"
        return value

    write_text_atomic(run_dir / "status.json", json.dumps({k: cut(v) for k, v in status.items()}))


def _previous_attempt(run_dir: Path) -> dict[str, Any]:
    """The run directory's earlier attempts as this one would continue them: ``attempt`` (this one's
    number) and ``wall_seconds_before`` (the wall time of all before it). An attempt that ended
    cleanly recorded its own time in status.json; for one that was killed, the time from its start to
    its last write (status.json, metrics.jsonl, the rank-0 log) is what counts. Read before this
    attempt writes anything."""
    try:
        prev = json.loads((run_dir / "status.json").read_text())
        started = float(prev["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return {"attempt": 1, "wall_seconds_before": 0.0}
    seconds = prev.get("wall_seconds_this_attempt")
    if seconds is None:
        last = [started] + [
            p.stat().st_mtime
            for p in (run_dir / "status.json", run_dir / "metrics.jsonl", run_dir / "logs" / "rank0.log")
            if p.is_file()
        ]
        seconds = max(last) - started
    return {
        "attempt": int(prev.get("attempt", 1)) + 1,
        "wall_seconds_before": float(prev.get("wall_seconds_before", 0.0)) + max(0.0, float(seconds)),
    }


def resume_point(ccfg: CheckpointCfg, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (checkpoint.resume_mode); collective, the same for all ranks."""
    mode = ccfg.resume_mode
    path: Path | None = None
    if mode == "path":
        path = Path(os.path.expanduser(str(ccfg.resume_path))).absolute()
        why = checkpoint.verify(path)  # sizes and content hashes (every rank checks a share of the files)
        if why is not None:
            raise DllmRlError(f"checkpoint.resume_path={ccfg.resume_path}: cannot resume from it: {why}")
    elif mode == "auto":
        path, warnings = checkpoint.resumable(run_dir / "checkpoints")
        for w in warnings:
            log.warning("%s; trying an older one", w)
        if warnings and path is not None:
            log.warning("resuming from %s, the newest checkpoint that verifies", path)
        elif warnings:
            log.warning("no complete checkpoint in %s: starting from step 0", run_dir / "checkpoints")
    return path


def run(resolved: dict[str, Any] | RunConfig) -> dict[str, Any]:
    """Train one run described by the resolved config (the plain dict of config.yaml, or that config typed);
    returns (and rank 0 writes) the summary.

    Collective: with several processes every rank calls it (torch.distributed comes from the
    environment: elastic launch, torchrun or SLURM). A run directory that holds checkpoints continues
    from the newest complete one (checkpoint.resume_mode=auto).
    """
    start = time.perf_counter()
    cfg = run_config(resolved)  # every section typed (config.run_config)
    run_dir = Path(cfg.run_dir)
    # Provisional until the resume point is known: an attempt that fails before then still passes
    # the count on to the next one.
    attempts = _previous_attempt(run_dir)
    # The rank log exists before DeepSpeed is imported: its build noise goes there, not to the console.
    handler = rank_logging(run_dir, global_rank())
    quiet_libraries()
    if cfg.cluster.threads:
        torch.set_num_threads(cfg.cluster.threads)
    with library_output_to(handler):
        init_distributed(cfg.cluster.backend)
    rank, world = rank_world()
    main = rank == 0
    stop = StopRequests().install()
    tracker = None
    status: dict[str, Any] = {"status": "starting", "started": time.time(), "world_size": world, **attempts}
    try:
        if world != world_size(cfg.cluster):
            raise DllmRlError(
                f"{world} processes joined, but the config asks for cluster.nodes*cluster.nproc="
                f"{world_size(cfg.cluster)} (start as many as it says)"
            )
        layout = rank_layout(cfg.cluster.nproc)
        # Rank 0 generates the data and warm-starts the base into the cache; the others then read them.
        if not main:
            barrier()
        task = get_task(cfg.task.name, cfg.task, Path(cfg.cache_dir).expanduser())
        policy, base_info = build_policy(cfg, task)
        if main:
            barrier()
        sampler, objective, engine = build_training(cfg, policy, run_device(cfg.cluster.device))
        ranks = gather_layouts({**layout, "rank": rank, "world_size": world})
        if main and world > 1:
            log.info(
                "ranks: %s",
                ", ".join(f"{r['rank']} = node {r['node_rank']} local {r['local_rank']} ({r['host']})" for r in ranks),
            )
        resume = resume_point(cfg.checkpoint, run_dir)
        if resume is None or run_dir.absolute() not in resume.absolute().parents:
            # The result continues no earlier attempt of this directory: its wall time starts here.
            status.update(attempt=1, wall_seconds_before=0.0)
        if resume is not None:
            info = checkpoint.manifest(resume)
            step, wandb_id = int(info["global_step"]), info.get("wandb_id")
        else:
            step, wandb_id = None, None
        tracker = Tracker(
            run_dir, cfg.logging, main, resume_step=step, wandb_id=wandb_id, run_name=cfg.run_name, config=plain(cfg)
        )
        status = {**status, "status": "running", "resumed_from": None if resume is None else str(resume)}
        if main:
            _write_status(run_dir, status)
        trainer = Trainer(cfg, policy, engine, task, sampler, objective, tracker, run_dir, resume, stop)
        result = trainer.fit()
    except (Preempted, SystemExit) as exc:
        # SystemExit: submitit's handler requeued the job after the checkpoint and ends the process.
        status["wall_seconds_this_attempt"] = time.perf_counter() - start
        if main and stop.signum:
            message = stop.message or str(exc)
            _write_status(run_dir, {**status, "status": "preempted", "message": message, "signal": stop.signum})
        elif main:
            _write_status(run_dir, {**status, "status": "failed", "error": repr(exc), "message": str(exc)})
        raise
    except BaseException as exc:
        _log_traceback(handler, exc)
        if main:
            failure = {"status": "failed", "error": repr(exc), "message": str(exc)}
            status["wall_seconds_this_attempt"] = time.perf_counter() - start
            _write_status(run_dir, {**status, **failure, "user_error": isinstance(exc, DllmRlError)})
        raise
    finally:
        if tracker is not None:
            tracker.finish()
        stop.uninstall()
        logging.getLogger("dllm_rl").removeHandler(handler)
        detach_library_loggers(handler)
        handler.close()
    primary = result["primary_metric"]
    summary = {
        "run_dir": str(run_dir),
        "objective": cfg.objective.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "world_size": world,
        # every rank's place: node rank, local rank, host (distributed.rank_layout)
        "ranks": ranks,
        "base_model": base_info,
        **result,
        "base_metric": result["base"][primary] if result["base"] else None,
        "final_metric": result["final"][primary],
        # the test metric of the weights the validation split picked (checkpoints/best, or the start)
        "best_step": result["best"]["step"] if result["best"] else None,
        "best_test_metric": (result["best"]["test"] or {}).get(primary) if result["best"] else None,
        # every attempt this result continues (status.json carries the count across restarts)
        "wall_seconds": status["wall_seconds_before"] + (wall := time.perf_counter() - start),
        "wall_seconds_this_attempt": wall,
        "attempts": status["attempt"],
    }
    if main:
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        _write_status(run_dir, {**status, "status": "done", "wall_seconds_this_attempt": wall})
    end_distributed()
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m dllm_rl.worker <run_dir>/config.yaml`: run a config the parent already resolved.

    Started by torchrun / the deepspeed launcher (RANK set) or srun (SLURM task), it is one rank of
    the run; started alone with cluster.nproc > 1 it spawns the ranks itself. Run again on the same
    file, it resumes from the run directory's newest complete checkpoint. Rank 0 (or the process
    started alone) holds the run directory's lock, and a config other than the directory's own
    config.yaml is refused (dllm_rl/rundir.py).
    """
    import dllm_rl.worker as module  # run by its module path, so that spawned ranks can import it
    from dllm_rl.launcher import start

    parser = argparse.ArgumentParser(
        prog="python -m dllm_rl.worker",
        description="Run (or resume) the run that a config.yaml written by python -m dllm_rl describes: one "
        "rank under torchrun, the deepspeed launcher or srun, or all cluster.nproc ranks when started alone. "
        "Prints the summary's base_metric, final_metric and run_dir as JSON.",
    )
    parser.add_argument("config", type=Path, help="<run_dir>/config.yaml (cluster.launcher=external prints the line)")
    path = parser.parse_args(sys.argv[1:] if argv is None else argv).config
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        if not path.is_file():
            raise DllmRlError(f"{path}: no such file (give the config.yaml python -m dllm_rl wrote in a run directory)")
        cfg = yaml.safe_load(path.read_text())
        if not isinstance(cfg, dict) or "run_dir" not in cfg:
            raise DllmRlError(f"{path}: not a resolved dllm_rl run config (it has no run_dir key)")
        owner = global_rank() == 0
        with rundir.owner_lock(cfg["run_dir"], owner):
            # a copy of a config elsewhere (launch/worker.sh) must match the run directory's own
            rundir.claim_config(Path(cfg["run_dir"]) / "config.yaml", path.read_text(), write=owner)
            summary = start(cfg, module.run)
    except DllmRlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        exit_preempted(exc)
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("base_metric", "final_metric", "run_dir")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
