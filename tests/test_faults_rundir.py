"""Faults on the run directory (docs/RELIABILITY.md, "Run directories"): a second live start, a
re-run with changed or identical overrides, a stopped run's wall time, damaged metrics.jsonl lines,
unwritable locations and config errors.

One real run serves most tests: started, met by a second start while it trains, stopped by SIGTERM,
resumed by an identical re-run (plus a change of where-it-runs keys), then re-run with changes."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_e2e import FAST, REPO, child_env, run_cli

from dllm_rl import rundir
from dllm_rl.errors import ConfigError

pytestmark = pytest.mark.slow


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rundir")
    run_dir = root / "run"
    args = [*FAST, f"cache_dir={root / 'cache'}", f"hydra.run.dir={run_dir}", "logging=none", "cluster.threads=1"]
    first = subprocess.Popen(
        [sys.executable, "-m", "dllm_rl", *args], cwd=REPO, env=child_env(), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and _steps(run_dir)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.02)
    # Held still inside its first steps: alive, holding the lock, while the same command starts again.
    first.send_signal(signal.SIGSTOP)
    second = run_cli(*args)
    first.send_signal(signal.SIGTERM)  # delivered on SIGCONT: finish the step, checkpoint, exit
    first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, first_err[-3000:]
    stopped = json.loads((run_dir / "status.json").read_text())
    # The same computation again, with keys that only say where or how it runs changed.
    resumed = run_cli(*args, "log_every=1", "cluster.threads=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"run_dir": run_dir, "args": args, "first": first, "second": second, "stopped": stopped, "resumed": resumed}


def test_a_second_start_on_a_live_run_directory_is_refused_naming_the_holder(run):
    line = _one_line_error(run["second"], f"PID {run['first'].pid}", socket.gethostname(), "in use")
    assert str(run["run_dir"]) in line
    # Only the first process trained: every step once, in order.
    steps = _steps(run["run_dir"])
    assert steps == sorted(set(steps)) == list(range(1, 5))


def test_an_identical_rerun_resumes_and_the_wall_time_counts_both_attempts(run):
    stopped, run_dir = run["stopped"], run["run_dir"]
    assert stopped["status"] == "preempted" and stopped["attempt"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == 4
    assert summary["attempts"] == 2
    first, this = stopped["wall_seconds_this_attempt"], summary["wall_seconds_this_attempt"]
    assert first > 0 and this > 0
    assert summary["wall_seconds"] == pytest.approx(first + this)
    assert f"over 2 attempts (this one {this:.0f} s)" in run["resumed"].stdout


def test_a_rerun_that_changes_what_is_computed_is_refused_with_the_diff(run):
    run_dir = run["run_dir"]
    before = {p: p.read_bytes() for p in [run_dir / "config.yaml", *(run_dir / ".hydra").glob("*.yaml")]}
    proc = run_cli(*run["args"], "train.steps=8", "optim.lr=5e-4")
    _one_line_error(proc, "train.steps: 4 -> 8; optim.lr: 0.0001 -> 0.0005", str(run_dir))
    # config.yaml is written once, and Hydra's record of the refused start is undone.
    assert {p: p.read_bytes() for p in before} == before


def test_an_identical_rerun_of_a_finished_directory_says_finished(run, caplog):
    # What python -m dllm_rl and python -m dllm_rl.worker do after composing, in this process: the
    # resumed CLI start above already showed that an identical config passes the tie to config.yaml.
    from dllm_rl.launcher import start
    from dllm_rl.worker import run as run_worker

    run_dir = run["run_dir"]
    summary = (run_dir / "summary.json").read_bytes()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rundir.claim_config(run_dir / "config.yaml", yaml.safe_dump({**cfg, "log_every": 1}), write=True)
    with caplog.at_level(logging.INFO, logger="dllm_rl"):
        assert start(cfg, run_worker) == json.loads(summary)
    assert "already finished" in caplog.text
    assert (run_dir / "summary.json").read_bytes() == summary
    assert (run_dir / rundir.LOCK_NAME).read_text() == ""  # taken and given back


def test_a_killed_attempt_counts_until_its_last_write(tmp_path):
    from dllm_rl.worker import _previous_attempt

    now = time.time()
    (tmp_path / "status.json").write_text(
        json.dumps({"status": "running", "started": now - 100, "attempt": 2, "wall_seconds_before": 50.0})
    )
    os.utime(tmp_path / "status.json", (now - 90, now - 90))
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    os.utime(tmp_path / "metrics.jsonl", (now - 40, now - 40))  # SIGKILL after its last step's record
    found = _previous_attempt(tmp_path)
    assert found["attempt"] == 3 and found["wall_seconds_before"] == pytest.approx(50 + 60, abs=0.01)


def test_config_changes_ignore_where_and_how_a_run_happens():
    old = {"run_dir": "/a", "train": {"steps": 8}, "cluster": {"threads": 0, "nproc": 1}, "logging": {"backend": "x"}}
    new = {"run_dir": "/b", "train": {"steps": 8}, "cluster": {"threads": 4, "nproc": 1}, "logging": {"backend": "y"}}
    assert rundir.config_changes(old, new) == []
    new["cluster"]["nproc"] = 2  # the checkpoints' per-rank states depend on it
    new["optim"] = {"betas": [0.9, 0.95]}
    assert rundir.config_changes(old, new) == ["cluster.nproc: 1 -> 2", "optim.betas: (absent) -> [0.9, 0.95]"]


def test_a_start_that_computed_nothing_yields_to_a_corrected_config(tmp_path):
    # a first start failed on a broken data file before any record: the fixed path may take its place
    config = tmp_path / "config.yaml"
    first = {"run_dir": str(tmp_path), "task": {"train_file": "/data/broken.jsonl"}}
    fixed = {"run_dir": str(tmp_path), "task": {"train_file": "/data/fixed.jsonl"}}
    assert rundir.claim_config(config, yaml.safe_dump(first), write=True)
    assert rundir.claim_config(config, yaml.safe_dump(fixed), write=True)
    assert yaml.safe_load(config.read_text()) == fixed
    # once a record exists the directory is tied to that config
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ConfigError, match=r"task.train_file: /data/fixed.jsonl -> /data/broken.jsonl"):
        rundir.claim_config(config, yaml.safe_dump(first), write=True)
    assert yaml.safe_load(config.read_text()) == fixed


def _hold(path: str, ready) -> None:
    with rundir.lock(path):
        ready.set()
        time.sleep(600)


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(rundir.RunDirBusy, match=f"PID {holder.pid} on host"):
            with rundir.lock(tmp_path):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    with rundir.lock(tmp_path), rundir.lock(tmp_path):  # taken over, and re-entrant
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / rundir.LOCK_NAME).read_text() == ""


def test_without_flock_the_run_goes_on_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)  # Lustre without -o flock
    with caplog.at_level(logging.WARNING, logger="dllm_rl"), rundir.lock(tmp_path):
        pass
    assert "cannot lock (No locks available); running without a run-directory lock" in caplog.text


def test_a_non_utf8_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from dllm_rl.config import LoggingCfg
    from dllm_rl.tracking import Tracker

    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": 0.5}).encode() for s in (1, 2, 3)]
    path.write_bytes(b"\n".join([records[0], b"\xff\xfe garbage \x80" * 300, records[1], b"plain text", records[2]]))
    with caplog.at_level(logging.WARNING, logger="dllm_rl"):
        Tracker(tmp_path, LoggingCfg(backend="none"), resume_step=2).finish()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{path} line 2 is not a metrics record (cut off or damaged); dropped",
        f"{path} line 4 is not a metrics record (cut off or damaged); dropped",
    ]


def test_status_json_never_embeds_a_whole_file(tmp_path):
    from dllm_rl.worker import STATUS_TEXT_CHARS, _write_status

    exc = UnicodeDecodeError("utf-8", b"\xff" * 4500, 0, 1, "invalid start byte")
    _write_status(tmp_path, {"status": "failed", "error": repr(exc), "message": str(exc)})
    status = json.loads((tmp_path / "status.json").read_text())
    assert len(status["error"]) <= STATUS_TEXT_CHARS and status["error"].endswith("chars)")
    assert (tmp_path / "status.json").stat().st_size < 3 * STATUS_TEXT_CHARS


@pytest.mark.parametrize("arg", ["output_dir=/proc/nope", "hydra.run.dir=/proc/x"])
def test_an_unwritable_location_is_one_line(arg, capsys):
    # The check python -m dllm_rl runs before Hydra (whose own failure there is a traceback); the
    # CLI path is tested in test_e2e.test_unwritable_output_directory.
    from dllm_rl.__main__ import _preflight_output_dir

    with pytest.raises(SystemExit) as exit_:
        _preflight_output_dir([arg])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {arg}: not writable (")


def test_a_config_error_leaves_no_run_directory(tmp_path):
    proc = run_cli("rollout.prompts_per_step=3", f"hydra.run.dir={tmp_path / 'a' / 'b'}")
    assert proc.returncode == 2 and "rollout.prompts_per_step" in proc.stderr, proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
