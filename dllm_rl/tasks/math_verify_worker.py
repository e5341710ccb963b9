"""Child process that answers math-verify equivalence questions for dllm_rl.tasks.math500.

Run as a script (``python math_verify_worker.py``), never imported: it needs only math-verify, so it
starts in about a second instead of importing dllm_rl (torch, transformers).

Protocol, one JSON object per line: the worker first writes ``{"ready": true}``; then for each request
``{"gold": str, "pred": str, "timeout": float}`` on stdin it writes ``{"equal": bool, "timed_out": bool}``.
It exits at end of input (its parent closed the pipe or died).

Each comparison (both parses and the verification) runs in this process's main thread under one
SIGALRM interval timer of ``timeout`` seconds, with math-verify's own whole-second signal timeouts
turned off. The parent waits a little longer and kills this process if even the timer could not
interrupt the work (a long C-level operation, e.g. a huge integer power), so a hang here costs a
restart, never a hung trainer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

GOLD_CACHE_SIZE = 4096


class Deadline(BaseException):
    """Raised by the alarm; a BaseException so that math-verify's ``except Exception`` cannot swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Deadline


def _write(out: Any, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def main() -> None:
    # Running a script puts its own directory first on sys.path; the package's modules there (base.py,
    # rewards.py, ...) must not shadow anything math-verify imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    import logging

    logging.disable(logging.CRITICAL)  # math-verify logs every failed parse; stdout carries the protocol
    from math_verify import parse, verify

    signal.signal(signal.SIGALRM, _on_alarm)
    out = sys.stdout
    _write(out, {"ready": True})
    golds: dict[str, Any] = {}  # a group's completions share one ground truth: parse it once

    def compare(gold: str, pred: str, timeout: float) -> tuple[bool, bool]:
        signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-3))
        try:
            parsed_gold = golds.get(gold)
            if parsed_gold is None:
                parsed_gold = parse(gold, parsing_timeout=None)
                if len(golds) >= GOLD_CACHE_SIZE:
                    golds.clear()
                golds[gold] = parsed_gold
            parsed_pred = parse(pred, parsing_timeout=None)
            return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None)), False
        except Deadline:
            return False, True
        except Exception:  # math-verify failing on odd input: not equivalent
            return False, False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold, pred, timeout = str(request["gold"]), str(request["pred"]), float(request["timeout"])
        except (ValueError, KeyError, TypeError):
            _write(out, {"equal": False, "timed_out": False})
            continue
        try:
            equal, timed_out = compare(gold, pred, timeout)
        except Deadline:  # the alarm fired between the comparison's end and the timer's reset
            equal, timed_out = False, True
        _write(out, {"equal": equal, "timed_out": timed_out})


if __name__ == "__main__":
    main()
