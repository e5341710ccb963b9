"""What the console shows: an entry point's result or error line once, library build noise never.

Hydra's job logging writes every record to the console and to ``<run dir>/<job>.log``. The entry
points print their summary or error line themselves (stdout / stderr, where scripts and tests read
it) and log the same line for the log file only: the record carries ``extra=FILE_ONLY``, which the
console handlers drop. Before the line, a progress bar the failure interrupted is closed, so the
line starts on a line of its own.

DeepSpeed's first import and distributed init announce the accelerator it picked ("Setting
accelerator to CPU"), run its op builders' C compiler probes (gcc command lines on the
``compilers`` logger) and print "... shm_comm_op built successfully": ``library_output_to`` sends
all of it to a process's own log file (logs/rank<R>.log), and DeepSpeed's later messages with it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

from dllm_rl.errors import Preempted

log = logging.getLogger("dllm_rl")

FILE_ONLY = {"file_only": True}


class _NotOnConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def _console_handlers() -> list[logging.Handler]:
    handlers = logging.getLogger().handlers + log.handlers
    return [h for h in handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _keep_file_only_records_off_the_console() -> None:
    for handler in _console_handlers():
        if not any(isinstance(f, _NotOnConsole) for f in handler.filters):
            handler.addFilter(_NotOnConsole())


def _close_progress_bars() -> None:
    """End the line of any live tqdm bar (a run that failed mid-loop leaves its bar open)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def say(line: str, level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """``line`` once on the console (``stream``, default stdout, below any progress bar) and once in the
    log files, at ``level``."""
    _close_progress_bars()
    _keep_file_only_records_off_the_console()
    log.log(level, "%s", line, extra=FILE_ONLY)
    print(line, file=stream or sys.stdout, flush=True)


def say_error(message: str) -> None:
    """``error: <message>`` once on stderr and once in the log files."""
    say(f"error: {message}", logging.ERROR, sys.stderr)


# DeepSpeed's own logger (it writes to stdout through a handler of its own); setuptools' C compiler,
# whose probes DeepSpeed's op builders run (their command lines at INFO).
LIBRARY_LOGGERS = ("DeepSpeed", "compilers")


def _route_library_loggers(handler: logging.Handler, names: tuple[str, ...]) -> None:
    for name in names:
        logger = logging.getLogger(name)
        for other in list(logger.handlers):
            if other is not handler and isinstance(other, logging.StreamHandler):
                logger.removeHandler(other)
        if handler not in logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("compilers").setLevel(logging.INFO)


@contextlib.contextmanager
def library_output_to(handler: logging.FileHandler) -> Iterator[None]:
    """Around DeepSpeed's import and init: what the libraries log or print goes to ``handler``'s file.

    Inside the block, stdout is that file (DeepSpeed prints, and the handler its logger creates at
    import binds to the stdout of that moment); afterwards DeepSpeed's and the compiler's loggers
    write through ``handler`` only, until ``detach_library_loggers``.
    """
    # DeepSpeed's logger is only touched once it exists: created at import, it gets its own handler.
    _route_library_loggers(handler, LIBRARY_LOGGERS if "deepspeed" in sys.modules else ("compilers",))
    if handler.stream is None:  # a handler made with delay=True opens its file at the first record
        handler.stream = handler._open()
    stream = handler.stream
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()
        _route_library_loggers(handler, LIBRARY_LOGGERS)


def detach_library_loggers(handler: logging.Handler) -> None:
    """Undo ``library_output_to``'s routing (the file is about to close); the compiler's logger
    propagates again."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    logging.getLogger("compilers").propagate = True


def exit_preempted(exc: Preempted) -> None:
    """The process's end after a preemption checkpoint: one line and the signal's exit status."""
    say(f"stopped: {exc}", logging.WARNING, sys.stderr)
    sys.exit(128 + exc.signum)
