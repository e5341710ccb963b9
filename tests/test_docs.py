"""docs/ARCHITECTURE.md names only files that exist: every source, config or doc path it mentions
(``*.py``, ``*.yaml``, ``*.md``, ``*.sh``, ``*.toml``) is a file of the repository. Names of files a run
writes (summary.json, report.md, ...) are not checked, since they live in run directories."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WRITTEN_BY_RUNS = {"report.md", "RESULTS.md"}  # names a run or a tool writes, besides the repository's own


def repository_files() -> list[str]:
    skip = {".git", ".venv", "outputs", "multirun", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return [
        p.relative_to(REPO).as_posix()
        for p in REPO.rglob("*")
        if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)
    ]


def test_architecture_names_only_files_that_exist():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    files = repository_files()
    names = set(re.findall(r"[\w./-]+\.(?:py|yaml|md|sh|toml)\b", text)) - WRITTEN_BY_RUNS
    missing = [n for n in sorted(names) if not any(f == n or f.endswith("/" + n.split("/")[-1]) for f in files)]
    assert missing == []
