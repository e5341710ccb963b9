"""hydra-submitit-launcher's SLURM launcher, with each sweep point's resources taken from its own config.

The stock launcher reads ``hydra.launcher`` once, from the sweep's primary config, in which sweep
overrides are not applied: ``-m cluster.nproc=1,2`` would submit two jobs with the same task count.
Here every job's ``hydra.launcher`` is resolved from that job's config; jobs with equal resources
share one job array (named after its first job), and every array is submitted before the launcher
waits for any of them.
Hydra only loads launchers from the ``hydra_plugins`` package, hence this module's place.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _StockSlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Executor settings that submitit takes at construction rather than in update_parameters.
_INIT_KEYS = {"submitit_folder", "max_num_timeout"}


class SlurmLauncher(_StockSlurmLauncher):
    def _executor(self, params: dict[str, Any]) -> Any:
        """A submitit executor for one resource set (the stock launcher's mapping of the fields)."""
        import submitit

        executor = submitit.AutoExecutor(
            cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in shared else f"slurm_{k}": v for k, v in params.items() if k not in _INIT_KEYS}
        )
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")

        groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for i, overrides in enumerate(job_overrides):
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            params = OmegaConf.to_container(job_config.hydra.launcher, resolve=True)
            params.pop("_target_", None)
            resources = json.dumps({k: v for k, v in params.items() if k != "name"}, sort_keys=True)
            groups.setdefault(resources, (params, []))[1].append(i)

        jobs: dict[int, Any] = {}
        for params, members in groups.values():
            # the stock launcher's per-job arguments of __call__: overrides, job dir key, number, id, state
            calls = []
            for i in members:
                num = initial_job_idx + i
                log.info(f"\t#{num} : {' '.join(filter_overrides(job_overrides[i]))}")
                calls.append(
                    (list(job_overrides[i]), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
                )
            submitted = self._executor(params).map_array(self, *zip(*calls, strict=True))
            jobs.update(zip(members, submitted, strict=True))
        return [jobs[i].results()[0] for i in range(len(job_overrides))]
