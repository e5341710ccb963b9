"""tests/forked.py: a run forked from the preloaded server looks to the code under test like ``python -m``
(argv, working directory, environment, import path, output at the descriptor level, exit status, exit
handlers), and a run past its timeout is killed."""

from __future__ import annotations

import json
import subprocess

import pytest
from forked import run_module

PROBE = """
import atexit, json, os, sys
atexit.register(lambda: print("exit handler ran", flush=True))
os.write(2, b"raw fd 2\\n")  # below Python's sys.stderr, as C code or a child process writes
print(json.dumps({
    "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "probe_var": os.environ.get("PROBE_VAR"),
    "main": __name__,
}))
code = sys.argv[1]
if code == "raise":
    raise RuntimeError("boom")
sys.exit(code if not code.isdigit() else int(code))
"""


@pytest.fixture
def probe(tmp_path):
    package = tmp_path / "lib" / "probe_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(PROBE)
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "lib"), "PROBE_VAR": "seen"}
    return work, env


@pytest.mark.parametrize("code", ["0", "3", "a message", "raise"])
def test_forked_run_matches_a_new_interpreter(probe, code):
    work, env = probe
    forked = run_module("probe_pkg", code, "--flag", env=env, cwd=work)
    fresh = run_module("probe_pkg", code, "--flag", env=env, cwd=work, fresh=True)
    assert forked.returncode == fresh.returncode == {"0": 0, "3": 3}.get(code, 1)
    assert forked.stdout == fresh.stdout
    report = json.loads(forked.stdout.splitlines()[0])
    assert report == {
        "argv": ["__main__.py", code, "--flag"],
        "cwd": str(work),
        "path0": str(work),
        "probe_var": "seen",
        "main": "__main__",
    }
    assert forked.stdout.splitlines()[-1] == "exit handler ran"
    assert "raw fd 2" in forked.stderr
    if code == "a message":
        assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == "a message"
    if code == "raise":
        assert "RuntimeError: boom" in forked.stderr and "RuntimeError: boom" in fresh.stderr


def test_a_run_past_its_timeout_is_killed(tmp_path):
    (tmp_path / "sleeper.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        run_module("sleeper", env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path, timeout=3)
    assert stopped.value.output == "started\n"
