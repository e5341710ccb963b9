"""One exception type for every problem a user can fix (bad config, missing file, bad data row).

The entry point prints these as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class DllmRlError(Exception):
    """A user-facing error: the message names the field, file or row at fault."""


class ConfigError(DllmRlError):
    """A configuration value is invalid or inconsistent with another one."""


class NonFiniteError(DllmRlError):
    """Training produced non-finite losses or gradients for too many optimizer steps in a row."""


class Preempted(Exception):
    """The run stopped on a stop signal (SIGTERM, SIGUSR1, SIGUSR2) after writing a checkpoint it will resume from."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
