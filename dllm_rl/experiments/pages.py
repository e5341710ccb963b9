"""Marked sections of a markdown page: a tool owns the text between its two markers and rewrites only
that, so several tools and hand-written prose can share one page (docs/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

from dllm_rl.checkpoint import write_text_atomic


def markers(name: str, command: str) -> tuple[str, str]:
    """The begin / end markers of the section ``name``, the begin one naming the command that writes it."""
    return f"<!-- {name}:begin (written by {command}; edits here are overwritten) -->", f"<!-- {name}:end -->"


def write_section(page: Path, name: str, command: str, section: str) -> None:
    """``section`` between the markers of ``name`` in ``page``: in place of the old section (found by its
    name, whatever command its begin marker names), else appended, else a new page."""
    begin, end = markers(name, command)
    block = f"{begin}\n{section}{end}\n"
    if page.is_file():
        text = page.read_text()
        opening = f"<!-- {name}:begin"
        start = text.find(opening)
        stop = text.find(end, start) if start >= 0 else -1
        if start >= 0 and stop >= 0:
            tail = text[stop + len(end) :].lstrip("\n")
            text = text[:start] + block + ("\n" + tail if tail else "")
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        text = "# Results\n\n" + block
    page.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(page, text)
