"""Metrics sinks: metrics.jsonl in the run directory (always) and wandb (offline by default)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class Tracker:
    def __init__(self, run_dir: Path, cfg: dict[str, Any]) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id: str | None = None
        self._file = self.path.open("a")
        lcfg = cfg["logging"]
        if lcfg["backend"] == "wandb" and lcfg["wandb_mode"] != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=lcfg["project"],
                entity=lcfg["entity"],
                group=lcfg["group"],
                name=cfg["run_name"],
                dir=str(run_dir),
                mode=lcfg["wandb_mode"],
                config=cfg,
                reinit="finish_previous",
            )
            self.wandb_id = self.wandb_run.id
            log.info("wandb %s run %s in %s", lcfg["wandb_mode"], self.wandb_id, run_dir / "wandb")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def finish(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
