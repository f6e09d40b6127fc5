"""stableblocks plot: several runs overlaid, one PNG per diagnostic, labelled by recipe."""

from __future__ import annotations

import json
import math

import pytest

from stableblocks import cli, plot


def fake_run(path, recipe: str, blowup: float) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"recipe": recipe}))
    lines = []
    for step in range(50):
        row = {"step": step, "loss": 5 * math.exp(-step / 20) + 2, "lr": 1e-3, "grad_norm": 1 + blowup * step}
        if step % 10 == 0:
            row.update(val_loss=row["loss"] + 0.1, tev_mean=0.05, tev_std=0.01, attn_logit_max=[3 + blowup * step, 2.0],
                       qkv_norm=[1.0, 2.0], proj_norm=[1.0, 1.5], fc2_norm=[2.0, 2.5 + blowup])
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_overlays_runs_with_their_recipes(tmp_path, capsys):
    fake_run(tmp_path / "a", "vanilla", 2.0)
    fake_run(tmp_path / "b", "stable", 0.0)
    cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
    names = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert names == ["attn_logit.png", "grad_norm.png", "loss.png", "output_norms.png", "tev.png"]
    assert all((tmp_path / "cmp" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert capsys.readouterr().out.count(".png") == 5
    assert [plot.read_run(tmp_path / r)[0] for r in "ab"] == ["vanilla", "stable"]


def test_plot_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        plot.plot_runs([tmp_path])
