"""MATH500 competition math (docs/tasks.md, "MATH500"), chat prompts only.

Data: train rows ``problem``, ``solution`` (ground truth = the last ``\\boxed{}`` of the
solution; ``ankner/math-500``: the MATH train set minus the MATH-500 problems); test rows ``problem``,
``answer`` (``HuggingFaceH4/MATH-500``). Local files or the hub (see hub_task.py).

Prompts: ``prompt`` = SYSTEM_PROMPT + "\\n\\n" + the boxed instruction + " \\n\\n" + problem;
``eval_prompt`` = MATH500_SYSTEM_PROMPT + "\\n\\n" + problem.

Training reward (intended maximum 3.0). pred = the content of the last ``\\boxed`` (brace-matched
``\\boxed{x}`` or the ``\\boxed x`` form) in the completion, or in its answer-tag region with
``task.math_pred_region: answer_tags`` (GDSD ``math_xml``); the whole searched text if
there is no complete box.

  correctness  2.0 if is_equiv(pred, ground truth): both sides normalised by ``strip_string`` (our
               Hendrycks-style normalisation, below), then compared exactly. Same in both modes.
  format       0.5 * s: s = 1 if the text contains "<answer>" (the region after it, up to
               "</answer>", is then searched, else the whole text), plus 1 if the region contains
               "\\boxed", else plus 0.5. fixed: 1.0 / 0.75 / 0.5 / 0.25 (tags and box / tags / box /
               neither). reference: d1 wrote "\\boxed" in a non-raw literal, i.e. a backspace + "oxed",
               which model text never contains, so 0.75 (tags) or 0.25.

``task.verifier: math_verify`` (GDSD ``math``): a single part ``correctness`` worth 2.0 when
math-verify finds the searched text equivalent to ``\\boxed{ground truth}``, under a time limit of
``task.verify_timeout`` seconds per comparison (0 on timeout; see ``MathVerifyClient``).

strip_string: drop newlines, "\\!", "\\left", "\\right", "^{\\circ}"/"^\\circ", "\\$", "\\%" and
everything from a "\\text{ " unit on; "\\\\" -> "\\"; tfrac/dfrac -> frac; " ." / "{." -> " 0." / "{0."
and a leading "." gets a "0"; a left side of at most two characters before a single "=" is dropped
("k = 5"); "\\sqrt3" -> "\\sqrt{3}"; then all spaces go; "\\frac12" -> "\\frac{1}{2}", "\\frac1b" ->
"\\frac{1}{b}"; "0.5" -> "\\frac{1}{2}"; "a/b" of two integers -> "\\frac{a}{b}". Where the
reference's normalisation raises (several "\\text{ " units, a "\\sqrt" or "\\frac" with nothing after
it), is_equiv compares the raw strings, as the reference does.

Evaluation: ``acc`` = ``acc_reference``, d1's parser: the last ``\\boxed`` of the raw text;
if it is empty or missing, the first <answer>…</answer>, stripped; is_equiv with the ``answer``.
``acc_fixed``: chat special tokens removed, the last complete box in the ``math_pred_region``
(an unterminated final box no longer hides an earlier complete one), else the last
<answer>…</answer>; is_equiv. ``acc_math_verify`` (with ``verifier: math_verify``): math-verify on
the searched text. ``format_rate``: the share of completions with a box inside <answer>…</answer>.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dllm_rl.lazy import lazy_import
from dllm_rl.tasks.base import SYSTEM_PROMPT, register_task
from dllm_rl.tasks.hub_task import (
    HubTask,
    HubTaskCfg,
    first_answer_region,
    last_boxed,
    string_field,
    strip_special_tokens,
)
from dllm_rl.tasks.rewards import (
    RewardFn,
    boxed_contents,
    clip_text,
    first_tag_content,
    last_tag_content,
    register_reward,
)

datasets = lazy_import("datasets")  # loads on first use (dllm_rl/lazy.py)

# task.verifier: hendrycks = normalised string match (d1); math_verify = symbolic equivalence (GDSD)
VERIFIERS: tuple[str, ...] = ("hendrycks", "math_verify")

log = logging.getLogger(__name__)

BOXED_INSTRUCTION = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. "
    "Wrap the final answer in a \\boxed{}."
)
# The evaluation block: GSM_SYSTEM_PROMPT without the first line's trailing space, and '" \n' after the last tag
# (as in the reference).
MATH500_SYSTEM_PROMPT = (
    BOXED_INSTRUCTION + "\nRespond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
    '<answer>\n\\boxed{...}\n</answer>" \n'
)
PRED_REGIONS = ("anywhere", "answer_tags")
EXAMPLE = {"ground_truth": "\\frac{1}{2}"}
# What d1's format reward actually tests for: "\b" in a non-raw string literal is a backspace.
_BACKSPACE_BOXED = "\x08oxed"
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]*", re.ASCII)


# ------------------------------------------------------------------------------------------ is_equiv


class _Unnormalisable(ValueError):
    """The reference normalisation fails on this string; is_equiv then compares raw strings."""


def _drop_text_unit(s: str) -> str:
    """Everything before a "\\text{ " unit; several units make the reference's assertion fail."""
    pieces = s.split("\\text{ ")
    if len(pieces) > 2:
        raise _Unnormalisable("several units")
    return pieces[0]


def _brace_sqrt(s: str) -> str:
    """Brace one-character square-root arguments: "\\sqrt3" -> "\\sqrt{3}"."""
    pieces = s.split("\\sqrt")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise _Unnormalisable("\\sqrt without an argument")
        out.append("\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:]))
    return "".join(out)


def _brace_frac(s: str) -> str:
    """Brace one-character fraction arguments: "\\frac12" -> "\\frac{1}{2}", "\\frac1{b}" -> "\\frac{1}{b}"."""
    pieces = s.split("\\frac")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise _Unnormalisable("\\frac without arguments")
        if piece[0] == "{":
            out.append("\\frac" + piece)
        elif len(piece) < 2:
            return s  # the reference gives up on the whole string here
        elif piece[1] == "{":
            out.append("\\frac{" + piece[0] + "}" + piece[1:])
        else:
            out.append("\\frac{" + piece[0] + "}{" + piece[1] + "}" + piece[2:])
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    """Turn "a/b" of two integers in canonical form into "\\frac{a}{b}"."""
    pieces = s.split("/")
    if len(pieces) == 2 and all(_CANONICAL_INT.fullmatch(p) for p in pieces):
        return "\\frac{" + pieces[0] + "}{" + pieces[1] + "}"
    return s


def strip_string(text: str) -> str:
    """Hendrycks-style normalisation of a MATH answer (see the module docstring for the steps).

    Raises _Unnormalisable where the reference normalisation raises. Every step is a linear scan.
    """
    s = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _drop_text_unit(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5", "x=3": keep the value
        s = sides[1]
    s = _brace_sqrt(s)
    s = s.replace(" ", "")
    s = _brace_frac(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def is_equiv(a: str | None, b: str | None) -> bool:
    """Equal after strip_string on both sides (raw equality where normalisation fails); None never matches."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return strip_string(a) == strip_string(b)
    except _Unnormalisable:
        return a == b


# ------------------------------------------------------------------------------------------ math-verify


WORKER_SCRIPT = Path(__file__).with_name("math_verify_worker.py")


class MathVerifyClient:
    """Runs math-verify comparisons in a child process, each under a deadline, from any thread.

    math-verify's own timeouts use SIGALRM, which only works in the main thread, and a thread cannot
    be stopped, so the comparisons run in a long-lived worker process (math_verify_worker.py): it
    applies ``timeout`` itself with an interval timer; if its answer is not back within
    ``timeout + grace_s`` (work the timer cannot interrupt), the worker is killed and a fresh one is
    started for the next call. Calls from several threads take turns (one lock); a forked child starts
    its own worker. ``equal`` never raises: a timeout, a dead worker or math-verify missing all count
    as "not equivalent" (logged).
    """

    def __init__(self, command: Sequence[str] | None = None, grace_s: float = 1.0, startup_s: float = 120.0):
        self.command = list(command) if command is not None else [sys.executable, str(WORKER_SCRIPT)]
        self.grace_s = grace_s
        self.startup_s = startup_s
        self.timeouts = 0
        self.restarts = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._buffer = b""
        self._owner = os.getpid()

    def equal(self, gold: str, pred: str, timeout: float) -> bool:
        """Whether math-verify finds pred equivalent to gold within ``timeout`` seconds (False otherwise)."""
        with self._lock:
            try:
                return self._equal(gold, pred, float(timeout))
            except Exception as exc:  # broken pipe, bad reply: start afresh next time
                log.warning("math-verify worker failed (%s: %s); counted as not equivalent", type(exc).__name__, exc)
                self._stop()
                return False

    def close(self) -> None:
        """Stop the worker (a later call starts a new one)."""
        with self._lock:
            self._stop()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's worker (it is not ours to stop) and its lock state."""
        if self._proc is not None:
            for stream in (self._proc.stdin, self._proc.stdout):  # our copies only; the parent keeps its own
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        self._lock = threading.Lock()
        self._proc, self._ready, self._buffer, self._owner = None, False, b"", os.getpid()

    def _equal(self, gold: str, pred: str, timeout: float) -> bool:
        if self._owner != os.getpid():
            self.after_fork()
        if not self._ensure_ready():
            return False
        assert self._proc is not None and self._proc.stdin is not None
        request = json.dumps({"gold": gold, "pred": pred, "timeout": timeout}) + "\n"
        self._proc.stdin.write(request.encode("ascii"))  # json.dumps escapes everything non-ASCII
        self._proc.stdin.flush()
        reply = self._read_line(time.monotonic() + timeout + self.grace_s)
        if reply is None:  # past the deadline, or the worker died: replace it
            self.timeouts += 1
            log.warning("math-verify gave no answer within %.1f s; counted as not equivalent", timeout)
            self._stop()
            self._start()  # start importing now, so the next call waits less
            return False
        message = json.loads(reply)
        if message.get("timed_out"):
            self.timeouts += 1
        return bool(message.get("equal"))

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            close_fds=True,
        )
        self._ready, self._buffer = False, b""
        self.restarts += 1

    def _ensure_ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        if self._ready:
            return True
        line = self._read_line(time.monotonic() + self.startup_s)
        if line is None or not json.loads(line).get("ready"):
            log.warning("the math-verify worker did not start (is math-verify installed?); counted as not equivalent")
            self._stop()
            return False
        self._ready = True
        return True

    def _read_line(self, deadline: float) -> bytes | None:
        """The worker's next output line, or None at the deadline or end of output."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stop(self) -> None:
        proc, self._proc, self._ready, self._buffer = self._proc, None, False, b""
        if proc is None or self._owner != os.getpid():
            return
        try:
            proc.kill()
            proc.wait(timeout=10)
        except Exception:  # already gone
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


MATH_VERIFY = MathVerifyClient()
atexit.register(MATH_VERIFY.close)
os.register_at_fork(after_in_child=MATH_VERIFY.after_fork)


def math_verify_equal(gold: str, pred: str, timeout: float) -> bool:
    """math-verify's verdict on ``\\boxed{gold}`` against the text ``pred`` within ``timeout`` seconds."""
    return MATH_VERIFY.equal("\\boxed{" + gold + "}", pred, timeout)


# ------------------------------------------------------------------------------------------ extraction


def search_region(text: str, pred_region: str) -> str:
    """The text the prediction is read from: all of it, or the answer-tag region when there is one."""
    if pred_region == "answer_tags":
        region = first_answer_region(text)
        return text if region is None else region
    return text


def training_prediction(text: str, pred_region: str = "anywhere") -> str:
    """The training pred: the last box's content in the searched text, else the whole searched text."""
    region = search_region(text, pred_region)
    boxed = last_boxed(region)
    return region if boxed is None else boxed


def reference_prediction(text: str) -> str | None:
    """d1's eval pred: the last box; if empty or missing, the first <answer>…</answer>, stripped."""
    boxed = last_boxed(text)
    if boxed:
        return boxed
    tagged = first_tag_content(text, "answer")
    return None if tagged is None else tagged.strip()


def fixed_prediction(text: str, pred_region: str = "anywhere") -> str | None:
    """acc_fixed's pred: the last complete box in the searched text, else the last <answer>…</answer>."""
    text = strip_special_tokens(text)
    region = search_region(text, pred_region)
    boxed = last_boxed(region)
    if boxed is None:
        complete = boxed_contents(region)
        boxed = complete[-1] if complete else None
    if boxed is not None and boxed.strip():
        return boxed
    tagged = last_tag_content(text, "answer")
    return None if tagged is None else tagged.strip()


def solution_ground_truth(solution: str) -> str | None:
    """Training ground truth: the content of the solution's last box (None without a complete one)."""
    return last_boxed(solution)


def format_score(text: str, fixed: bool) -> float:
    """The format reward 0.5 * s: 1 for "<answer>", then 1 for a box in the region (else 0.5)."""
    region = first_answer_region(text)
    s = 0.0 if region is None else 1.0
    searched = text if region is None else region
    s += 1.0 if ("\\boxed" if fixed else _BACKSPACE_BOXED) in searched else 0.5
    return 0.5 * s


# ------------------------------------------------------------------------------------------ rewards


@register_reward("math500_correctness", 0.0, 2.0, EXAMPLE)
def correctness(completion: str, *, ground_truth: str, pred_region: str = "anywhere", **_: Any) -> float:
    """2.0 if the last box (or the searched text) is_equiv the ground truth (both modes)."""
    if not isinstance(ground_truth, str):
        return 0.0
    return 2.0 if is_equiv(training_prediction(clip_text(completion), pred_region), ground_truth) else 0.0


@register_reward("math500_correctness_math_verify", 0.0, 2.0, EXAMPLE)
def correctness_math_verify(
    completion: str, *, ground_truth: str, pred_region: str = "anywhere", verify_timeout: float = 5.0, **_: Any
) -> float:
    """2.0 if math-verify finds the searched text equivalent to the ground truth in time."""
    if not isinstance(ground_truth, str):
        return 0.0
    region = search_region(clip_text(completion), pred_region)
    return 2.0 if math_verify_equal(ground_truth, region, verify_timeout) else 0.0


@register_reward("math500_format", 0.25, 1.0, EXAMPLE)
def format_reward(completion: str, **_: Any) -> float:
    """1.0 / 0.75 / 0.5 / 0.25 for tags and box / tags only / box only / neither (fixed)."""
    return format_score(clip_text(completion), fixed=True)


@register_reward("math500_format_reference", 0.25, 1.0, EXAMPLE)
def format_reward_reference(completion: str, **_: Any) -> float:
    """d1's format reward with its backspace bug: 0.75 with tags, 0.25 without."""
    return format_score(clip_text(completion), fixed=False)


def math500_metrics(
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    pred_region: str = "anywhere",
    verify_timeout: float | None = None,
) -> dict[str, float]:
    """acc (= acc_reference), acc_fixed, format_rate, and acc_math_verify when verify_timeout is given."""
    if len(completions) != len(examples):
        raise ValueError(f"got {len(completions)} completions for {len(examples)} examples")
    reference = fixed = verified = formatted = 0
    for raw, example in zip(completions, examples, strict=True):
        text = clip_text(raw)
        truth = str(example.get("ground_truth", ""))
        reference += is_equiv(reference_prediction(text), truth)
        fixed += is_equiv(fixed_prediction(text, pred_region), truth)
        region = first_tag_content(text, "answer")
        formatted += region is not None and last_boxed(region) is not None
        if verify_timeout is not None:
            verified += math_verify_equal(truth, search_region(strip_special_tokens(text), pred_region), verify_timeout)
    n = max(len(completions), 1)
    out = {"acc": reference / n, "acc_reference": reference / n, "acc_fixed": fixed / n, "format_rate": formatted / n}
    if verify_timeout is not None:
        out["acc_math_verify"] = verified / n
    return out


# ------------------------------------------------------------------------------------------ task


@dataclasses.dataclass
class Math500TaskCfg(HubTaskCfg):
    """``task=math500`` (a comment above each field; the rest are HubTaskCfg's)."""

    # registry name
    name: str = "math500"
    # hub data set of the training split (used when train_file is null): MATH train minus the MATH-500 problems
    train_hub_id: str | None = "ankner/math-500"
    # hub data set of the test split (used when test_file is null)
    test_hub_id: str | None = "HuggingFaceH4/MATH-500"
    # hendrycks: normalised string match (d1); math_verify: symbolic equivalence (GDSD)
    verifier: str = "hendrycks"
    # seconds math-verify may spend on one comparison
    verify_timeout: float = 5.0
    # where the prediction's boxed answer is taken from: anywhere (d1) | answer_tags (GDSD math_xml)
    math_pred_region: str = "anywhere"

    @classmethod
    def check(cls, t: Any, need: Callable[[bool, str], None]) -> None:
        super().check(t, need)
        verifier = t.get("verifier", cls.verifier)
        need(verifier in VERIFIERS, f"task.verifier={verifier!r} must be one of: {', '.join(VERIFIERS)}")
        region = t.get("math_pred_region", cls.math_pred_region)
        need(
            region in PRED_REGIONS,
            f"task.math_pred_region={region!r} must be one of: {', '.join(PRED_REGIONS)}",
        )
        timeout = t.get("verify_timeout", cls.verify_timeout)
        need(timeout > 0, f"task.verify_timeout={timeout} must be > 0 (seconds per comparison)")
        need(
            verifier != "math_verify" or importlib.util.find_spec("math_verify") is not None,
            "task.verifier=math_verify needs the math-verify package (pip install math-verify)",
        )


@register_task("math500", config=Math500TaskCfg)
class Math500Task(HubTask):
    """MATH500 with d1's prompts and rewards (both modes), and GDSD's math-verify variant."""

    fields = {"train": ("problem", "solution"), "test": ("problem", "answer")}

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path) -> None:
        super().__init__(cfg, cache_dir)
        self.verifier = str(self.options["verifier"])
        self.pred_region = str(self.options["math_pred_region"])
        self.verify_timeout = float(self.options["verify_timeout"])

    def row_problem(self, row: Mapping[str, Any], kind: str) -> str | None:
        problem = string_field(row, "problem")
        if problem is not None:
            return problem
        if kind == "test":
            return string_field(row, "answer")
        problem = string_field(row, "solution")
        if problem is not None:
            return problem
        if not solution_ground_truth(row["solution"]):
            return "solution has no complete, non-empty \\boxed{} (its last one is the ground truth)"
        return None

    def make_columns(self, rows: datasets.Dataset, kind: str) -> dict[str, list[Any]]:
        problems = rows["problem"]
        if kind == "test":
            truths = [a.strip() for a in rows["answer"]]
            solutions = rows["solution"] if "solution" in rows.column_names else [""] * len(rows)
            solutions = [s if isinstance(s, str) else "" for s in solutions]
        else:
            solutions = rows["solution"]
            truths = [solution_ground_truth(s) or "" for s in solutions]
        return {
            "prompt": [SYSTEM_PROMPT + "\n\n" + BOXED_INSTRUCTION + " \n\n" + p for p in problems],
            "eval_prompt": [MATH500_SYSTEM_PROMPT + "\n\n" + p for p in problems],
            "problem": list(problems),
            "solution": list(solutions),
            "ground_truth": truths,
        }

    def default_rewards(self) -> list[tuple[str, RewardFn]]:
        if self.verifier == "math_verify":
            bound = functools.partial(
                correctness_math_verify, pred_region=self.pred_region, verify_timeout=self.verify_timeout
            )
            return [("correctness", bound)]
        fmt = format_reward if self.reward_mode == "fixed" else format_reward_reference
        return [("correctness", functools.partial(correctness, pred_region=self.pred_region)), ("format", fmt)]

    def target(self, example: Mapping[str, Any]) -> str:
        """<reasoning> the worked solution </reasoning> <answer> \\boxed{ground truth} </answer>."""
        reasoning = str(example.get("solution") or "").strip()
        truth = str(example.get("ground_truth", ""))
        return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n\\boxed{{{truth}}}\n</answer>\n"

    def metrics(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        timeout = self.verify_timeout if self.verifier == "math_verify" else None
        return math500_metrics(completions, examples, self.pred_region, timeout)
