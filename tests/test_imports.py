"""The package's import structure: no cycle between its modules (function-level imports included), and
the entry points' first import loads no torch, so --help and config errors answer quickly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_graph() -> dict[str, set[str]]:
    """dllm_rl module -> the dllm_rl modules it imports anywhere in its source (any nesting level)."""
    files = {}
    for path in (REPO / "dllm_rl").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dllm_rl"):
                targets = [resolve(f"{node.module}.{alias.name}") or resolve(node.module) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(alias.name) for alias in node.names if alias.name.startswith("dllm_rl")]
            graph[name].update(t for t in targets if t and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    graph = module_graph()
    assert "dllm_rl.launcher" in graph and "dllm_rl.worker" in graph["dllm_rl.__main__"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_entry_point_imports_load_no_torch():
    """The objectives' and samplers' modules (imported with the package, for their schemas) name torch
    through dllm_rl/lazy.py, which imports it at the first attribute a run asks for."""
    code = (
        "import sys, dllm_rl, dllm_rl.__main__, dllm_rl.launcher, dllm_rl.distributed, dllm_rl.cli_help; "
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_lazy_module_loads_on_first_use_and_is_then_the_module():
    code = (
        "import sys, inspect; from dllm_rl.lazy import lazy_import; torch = lazy_import('torch'); "
        "inspect.getmodule(inspect.currentframe()); "  # walks sys.modules, as Hydra's error report does
        "print('torch' in sys.modules, lazy_import('torch') is torch); "
        "x = torch.ones(2); import torch as plain; "
        "print('torch' in sys.modules, torch.ones is plain.ones, float(x.sum()), lazy_import('torch') is plain, "
        "'Tensor' in dir(torch))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False True", "True True 2.0 True True"]
