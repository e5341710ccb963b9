"""Run ``python -m <module> <args>`` for a test as its own process, without paying the interpreter's
start-up each time.

A CLI run of the tiny model spends about 6 s importing torch, transformers, DeepSpeed and the package,
against a few seconds of work. ``run_module`` forks every run from a server process that imported all
of that once (multiprocessing's ``forkserver`` with a preload list): each run is still a fresh process
with its own argv, environment, working directory, stdout/stderr (at the file-descriptor level, so that
the output of C code and of child processes is captured too), exit status and exit handlers, and
nothing of one run can leak into the next or into pytest. What differs from ``python -m``: modules are
imported before the run's environment is set, so settings that a library reads on import must be the
same as the test process's (``make test`` exports them; ``child_env`` sets the same values).

``DLLM_RL_TEST_SUBPROCESS=1`` runs every call as a plain ``python -m`` instead (to check that both agree).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

# what `python -m dllm_rl` imports before its first step (python -X importtime -m dllm_rl ...)
PRELOAD = ["torch", "transformers", "datasets", "deepspeed", "hydra", "dllm_rl.worker", "dllm_rl.evaluate"]

_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # as the interpreter does with sys.exit("message")
    return 1


def _child(
    module: str | None, script: str | None, args: list[str], env: dict[str, str], cwd: str, out: str, err: str
) -> None:
    """The forked run: the environment, directory, import path and output files of the call, then the
    module (or the script) as __main__."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # python puts the script's directory (the working directory for -m) first, then PYTHONPATH
    first = [os.path.dirname(os.path.abspath(script)) if script else os.getcwd()]
    first += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = first
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    code = 0
    try:
        if script is not None:
            sys.argv = [script, *args]
            runpy.run_path(script, run_name="__main__")
        else:
            sys.argv = [module, *args]  # runpy replaces argv[0] by the module's file, as python -m does
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter runs on exit; multiprocessing children skip it
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_module(
    module: str, *args: str, env: dict[str, str], cwd: str | Path, timeout: float = 600, fresh: bool = False
) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True,
    timeout=timeout)``, forked from the preloaded server (module docstring), or run that way with
    ``fresh=True``: for a test of what a new interpreter does, such as the output of imports."""
    return _run([sys.executable, "-m", module, *args], module, None, list(args), env, cwd, timeout, fresh)


def run_script(
    script: str | Path, *args: str, env: dict[str, str], cwd: str | Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` as run_module runs ``python -m``."""
    return _run([sys.executable, str(script), *args], None, str(script), list(args), env, cwd, timeout, False)


def _run(
    command: list[str],
    module: str | None,
    script: str | None,
    args: list[str],
    env: dict[str, str],
    cwd: str | Path,
    timeout: float,
    fresh: bool,
) -> subprocess.CompletedProcess:
    if fresh or os.environ.get("DLLM_RL_TEST_SUBPROCESS") == "1":
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="forked-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = _forkserver().Process(target=_child, args=(module, script, args, dict(env), str(cwd), out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, Path(out).read_text(), Path(err).read_text())
        return subprocess.CompletedProcess(command, process.exitcode, Path(out).read_text(), Path(err).read_text())
