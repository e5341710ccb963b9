"""`python -m dllm_rl.report <dir>`: every finished run under <dir> (its summary.json) in one table,
plus the mean and seed-to-seed spread per (objective, task). Writes report.md and report.csv there."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = ("objective", "task", "seed", "base", "final", "delta", "steps", "wall_s", "run_dir")


def collect(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        base, final = s.get("base_metric"), s["final_metric"]
        rows.append(
            {
                "objective": s["objective"],
                "task": s["task"],
                "seed": s["seed"],
                "metric": s["primary_metric"],
                "base": base,
                "final": final,
                "delta": None if base is None else final - base,
                "steps": s["steps"],
                "wall_s": round(s["wall_seconds"], 1),
                "run_dir": str(path.parent),
            }
        )
    return rows


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def render(rows: list[dict[str, Any]]) -> str:
    fmt = {"base": "{:.4f}", "final": "{:.4f}", "delta": "{:+.4f}"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = ["-" if r[c] is None else fmt.get(c, "{}").format(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["objective"], r["task"], r["metric"])].append(r)
    lines += [
        "",
        "| objective | task | metric | runs | base (mean ± sd) | final (mean ± sd) | gain (mean ± sd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (objective, task, metric), rs in sorted(groups.items()):
        base, final, gain = (_mean_std([r[k] for r in rs if r[k] is not None]) for k in ("base", "final", "delta"))
        lines.append(f"| {objective} | {task} | {metric} | {len(rs)} | {base} | {final} | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m dllm_rl.report <run or sweep directory>", file=sys.stderr)
        return 2
    root = Path(args[0])
    rows = collect(root)
    if not rows:
        print(f"error: no summary.json under {root} (no finished run)", file=sys.stderr)
        return 1
    text = render(rows)
    (root / "report.md").write_text(text)
    with (root / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "metric"])
        writer.writeheader()
        writer.writerows(rows)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
