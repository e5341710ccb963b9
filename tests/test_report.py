"""The sweep report: per-run rows and mean ± seed spread per (objective, task)."""

from __future__ import annotations

import json

from dllm_rl import report


def _summary(directory, seed, base, final):
    directory.mkdir(parents=True)
    (directory / "summary.json").write_text(
        json.dumps(
            {
                "objective": "elbo",
                "task": "sudoku",
                "seed": seed,
                "primary_metric": "cell_acc",
                "base_metric": base,
                "final_metric": final,
                "steps": 10,
                "wall_seconds": 12.0,
            }
        )
    )


def test_report_aggregates_seeds(tmp_path, capsys):
    for seed, (base, final) in enumerate([(0.40, 0.50), (0.40, 0.46), (0.40, 0.48)]):
        _summary(tmp_path / f"{seed}_seed={seed}", seed, base, final)
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text == capsys.readouterr().out
    # gains 0.10, 0.06, 0.08: mean 0.08, sample sd 0.02
    assert "| elbo | sudoku | cell_acc | 3 | 0.4000 ± 0.0000 | 0.4800 ± 0.0200 | 0.0800 ± 0.0200 |" in text
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("objective,task,seed")


def test_report_without_runs_fails_clearly(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err
