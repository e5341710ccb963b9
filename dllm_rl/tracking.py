"""Metrics sinks: metrics.jsonl in the run directory (always) and wandb (offline by default).

Only rank 0 of a multi-process run writes; other ranks get a tracker that records nothing. A
resumed run continues the same metrics.jsonl (records after the checkpoint's step are dropped, since
the resumed run repeats those steps; a run that starts again from step 0 keeps none) and the same
wandb run (its id is saved in the checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from dllm_rl.config import LoggingCfg

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def _record_step(line: bytes) -> int | None:
    """The step of one metrics.jsonl line, or None when the line is no record of ours."""
    try:
        record = json.loads(line.decode("utf-8"))
        return int(record.get("step", 0)) if isinstance(record, dict) else None
    except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
        return None


def truncate_after(path: Path, step: int) -> int:
    """Keep only the records of steps <= ``step`` (atomically); returns how many were dropped.

    A line that is no record (cut off by a kill mid-write, or damaged: not JSON, not UTF-8) is
    dropped with a warning naming the file and line."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        record_step = _record_step(line)
        if record_step is None:
            log.warning("%s line %d is not a metrics record (cut off or damaged); dropped", path, number)
            dropped += 1
        elif record_step <= step:
            kept.append(line.decode("utf-8"))
        else:
            dropped += 1
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
    return dropped


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        lcfg: LoggingCfg,
        enabled: bool = True,
        resume_step: int | None = None,
        wandb_id: str | None = None,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """metrics.jsonl in ``run_dir`` (``enabled``: this process writes), and a wandb run when
        logging.backend=wandb, named ``run_name`` and carrying ``config`` (the resolved config)."""
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id: str | None = wandb_id
        self._file = None
        if not enabled:
            return
        # A fresh start keeps nothing of an earlier one that left no checkpoint to resume from.
        dropped = truncate_after(self.path, -1 if resume_step is None else resume_step)
        if dropped and resume_step is None:
            log.info("metrics.jsonl: dropped the %d records of an earlier start (this run starts at step 0)", dropped)
        elif dropped:
            log.info(
                "metrics.jsonl: dropped %d records after step %d (the resumed run repeats them)", dropped, resume_step
            )
        self._file = self.path.open("a")
        if lcfg.backend == "wandb" and lcfg.wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=lcfg.project,
                entity=lcfg.entity,
                group=lcfg.group,
                name=run_name,
                dir=str(run_dir),
                mode=lcfg.wandb_mode,
                config=config,
                reinit="finish_previous",
                # the same wandb run after a restart or a requeue
                id=wandb_id,
                resume="allow" if wandb_id else None,
            )
            self.wandb_id = self.wandb_run.id
            log.info("wandb %s run %s in %s", lcfg.wandb_mode, self.wandb_id, run_dir / "wandb")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
