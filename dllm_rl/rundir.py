"""A run directory belongs to one live process and one config (README, "Run directories").

- ``owner_lock``: an OS file lock (``flock`` on ``run.lock``) held by the process that owns the run
  for as long as it runs. The kernel drops it when the holder ends, however it ends (SIGKILL, a node
  reboot, a requeue), so a crashed run, a requeued SLURM job or a resumed run takes it over; a second
  live start on the same directory gets one line naming the holder's host and PID. Only the owner
  takes it: the Hydra parent, or the process of global rank 0 (RANK / SLURM_PROCID) when a launcher
  or SLURM started every rank, or ``python -m dllm_rl.worker`` started alone. The workers that the
  owner spawns (torch elastic launch) run under the owner's lock and never ask for it, and the other
  ranks of a torchrun or SLURM job do not either, so no rank waits on a lock another rank holds.
  Locking never blocks: a held lock is an error at once. On a filesystem without flock (Lustre
  mounted without ``-o flock``) the run goes on unlocked, with a warning.
- ``claim_config``: config.yaml is written once. A later start on the same directory must compute
  the same thing; keys that only say where or how it runs (``RUNTIME_KEYS``, ``cluster.*`` except
  the process count) may differ, any other difference is refused with the changed keys in one line.
- ``discard_unused``: a run directory that a failed start left holding only Hydra's own files is
  removed, so a config error leaves no directory behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import yaml

from dllm_rl.errors import ConfigError, DllmRlError

log = logging.getLogger("dllm_rl")

LOCK_NAME = "run.lock"

# Keys (and whole sections) that say where or how a run happens, not what it computes: a re-run of
# the directory may change them. cluster.* counts too, except the number of processes, which the
# checkpoints' per-rank states depend on.
RUNTIME_KEYS = (
    "run_dir",
    "run_name",
    "output_dir",
    "cache_dir",
    "log_every",
    "logging",
    "checkpoint.resume_mode",
    "checkpoint.resume_path",
    "checkpoint.every_n_steps",
    "checkpoint.keep_last",
)
WORLD_KEYS = ("cluster.nproc", "cluster.nodes")

_held: dict[Path, list[int]] = {}  # run dir -> [lock file descriptor, nesting depth] of this process


class RunDirBusy(DllmRlError):
    """Another live process holds the run directory's lock."""


@contextmanager
def lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (re-entrant within a process)."""
    key = Path(run_dir).expanduser().resolve()  # one key per directory: a second flock of it here would fail
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    path = key / LOCK_NAME
    try:
        key.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DllmRlError(f"{path}: cannot create the run directory's lock file ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        holder = _holder(fd) if busy else None
        os.close(fd)
        if busy:
            who = "another process" if holder is None else f"PID {holder.get('pid')} on host {holder.get('host')}"
            since = "" if holder is None else f" since {holder.get('since')}"
            raise RunDirBusy(
                f"run directory {key} is in use by {who}{since} ({path}); "
                "wait for it to end, or choose another run directory"
            ) from None
        log.warning("%s: cannot lock (%s); running without a run-directory lock", path, exc.strerror or exc)
        fd = -1
    if fd < 0:
        yield
        return
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}) + "\n").encode())
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        try:
            os.ftruncate(fd, 0)  # a free lock names nobody
        finally:
            os.close(fd)  # releases the flock


def owner_lock(run_dir: str | Path, owner: bool) -> Any:
    """``lock(run_dir)`` for the process that owns the run, a no-op context for the other ranks."""
    return lock(run_dir) if owner else nullcontext()


def _holder(fd: int) -> dict[str, Any] | None:
    """The host and PID the holder wrote into the lock file (it writes right after locking)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
        if text:
            try:
                return json.loads(text)
            except ValueError:
                return None
        time.sleep(0.05)
    return None


# ---------------------------------------------------------------------------------------- config


def is_runtime_key(key: str) -> bool:
    """The dotted config key only says where or how the run happens."""
    if key in WORLD_KEYS:
        return False
    return key.startswith("cluster.") or any(key == p or key.startswith(p + ".") for p in RUNTIME_KEYS)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


_ABSENT = object()


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key that changes what is computed, in ``new``'s key order."""
    a, b = _flatten(old), _flatten(new)
    keys = list(b) + [k for k in a if k not in b]
    return [
        f"{k}: {_show(a.get(k, _ABSENT))} -> {_show(b.get(k, _ABSENT))}"
        for k in keys
        if not is_runtime_key(k) and a.get(k, _ABSENT) != b.get(k, _ABSENT)
    ]


def computed_anything(run_dir: Path) -> bool:
    """Whether a start in ``run_dir`` got as far as a metrics record or a checkpoint."""
    checkpoints = run_dir / "checkpoints"
    try:
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            return True
        metrics = run_dir / "metrics.jsonl"
        return metrics.is_file() and metrics.stat().st_size > 0
    except OSError:
        return True


def claim_config(path: Path, text: str, write: bool) -> bool:
    """Tie the run directory to its config: write ``text`` (the resolved YAML) to ``path`` when there
    is none yet (``write``: this process is the owner), else refuse a config that computes something
    else than the one written first. config.yaml is never rewritten once the run has computed anything
    (a metrics record or a checkpoint); before that, a corrected config replaces it. True when this call
    wrote it."""
    if not path.is_file():
        if write:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)  # a reader sees no config.yaml or all of it
        return write
    try:
        old = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the run directory's config ({type(exc).__name__})") from None
    changes = config_changes(old if isinstance(old, dict) else {}, yaml.safe_load(text))
    if changes and write and not computed_anything(path.parent):
        # an earlier start failed before its first record (a bad data file, a missing model path):
        # nothing was computed under the old config, so the corrected one takes its place
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return True
    if changes:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ConfigError(
            f"{path.parent} already holds a run of another config: {shown} (its config.yaml is kept; re-run it "
            "with its own settings, changing only where or how it runs, or choose another run directory)"
        )
    return False


# ---------------------------------------------------------------------------------------- cleanup


def discard_unused(run_dir: Path, ours: set[str], stop_at: Path | None) -> bool:
    """Remove ``run_dir`` if it holds nothing but ``ours`` (Hydra's .hydra/ and job log, which Hydra
    writes before our code runs, and a config.yaml this start wrote) and the lock file, then its
    parents while they are empty, up to ``stop_at`` (the deepest directory that existed before this
    process). True when removed."""
    run_dir = run_dir.absolute()
    try:
        entries = {p.name for p in run_dir.iterdir()}
    except OSError:
        return False
    if not entries <= ours | {LOCK_NAME}:
        return False
    for name in entries:
        target = run_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    stop = None if stop_at is None else stop_at.absolute()
    parent = run_dir
    while parent != stop:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
        if stop is None or (parent != stop and stop not in parent.parents):
            break  # never climb above the directory that existed before
    return not run_dir.exists()


def finished_summary(resume_mode: str, run_dir: Path) -> dict[str, Any] | None:
    """The summary of this run directory's finished run (checkpoint.resume_mode=auto): nothing left to train."""
    if resume_mode != "auto":
        return None
    try:
        done = json.loads((run_dir / "status.json").read_text()).get("status") == "done"
        return json.loads((run_dir / "summary.json").read_text()) if done else None
    except (OSError, ValueError):
        return None
