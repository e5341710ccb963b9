"""Stop requests from the scheduler: SIGTERM / SIGUSR1 / submitit's signal (SIGUSR2) -> checkpoint at the
next step boundary -> stop.

The handler only records the signal; the trainer asks ``requested()`` after every optimizer step
(all ranks agree through one all-reduce), writes a checkpoint, and calls ``stop``. Inside a job of
hydra-submitit-launcher, ``stop`` hands over to submitit's own handler (of its signal) on rank 0, which requeues the
job with the same config (``max_num_timeout`` = cluster.max_requeues); the requeued run resumes from
that checkpoint (checkpoint.resume_mode=auto). Elsewhere it raises ``Preempted``: the process exits
with 128 + the signal number, and running the same config again resumes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dllm_rl.errors import Preempted

log = logging.getLogger(__name__)


def submitit_signal() -> int:
    """The signal submitit asks SLURM for before the time limit (SUBMITIT_PREEMPT_SIGNAL, USR2 by default)."""
    import os

    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def stop_signals() -> tuple[int, ...]:
    """SIGTERM (kill, scancel, preemption), SIGUSR1 (sbatch --signal=USR1@T) and submitit's signal."""
    return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGUSR1, submitit_signal())))


class StopRequests:
    def __init__(self) -> None:
        self.signum = 0
        self.message = ""  # what stop() said: the step, the checkpoint, how to resume
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequests:
        """Record the stop signals from now on (only possible in the main thread; a no-op elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in stop_signals():
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: Any) -> None:
        if not self.signum:
            log.warning("received %s: checkpointing after the current optimizer step", signal.Signals(signum).name)
        self.signum = signum

    def requested(self, device: torch.device) -> int:
        """The signal any rank received (0: none); collective under torch.distributed."""
        value = self.signum
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([value], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            value = int(flag.item())
        return value

    def submitit_handler(self) -> Callable[[int, Any], None] | None:
        """submitit's checkpoint-and-requeue handler, when this process runs a submitit job."""
        for handler in self._previous.values():
            owner = getattr(handler, "__self__", None)
            if owner is not None and type(owner).__module__.startswith("submitit"):
                if getattr(handler, "__name__", "") == "checkpoint_and_try_requeue":
                    return handler
        return None

    def stop(self, signum: int, message: str) -> None:
        """End the run after its checkpoint: requeue through submitit, or raise Preempted."""
        self.message = message
        requeue = self.submitit_handler()
        if requeue is None:
            raise Preempted(message, signum)
        log.warning("%s; requeueing through submitit", message)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            requeue(submitit_signal(), None)  # requeues the job and exits (submitit raises if it cannot)
        # Other ranks wait for the requeue to end the job step: leaving first could end it as done.
        time.sleep(600)
        raise Preempted(message, signum)
