"""stableblocks plot: several runs overlaid, one PNG per diagnostic, labelled by recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
                       qkv_out_norm=[1.0, 2.0], proj_out_norm=[1.0, 1.5], fc2_out_norm=[2.0, 2.5 + blowup])
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _capture_lines(monkeypatch) -> dict:
    """PNG name -> [(panel title, line label, points)] of every figure plot.py saves (written to
    .NAME.tmp.png, then renamed)."""
    from matplotlib.figure import Figure

    drawn, save = {}, Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        name = Path(path).name
        final = name[1:].replace(".tmp.", ".") if name.startswith(".") else name
        drawn[final] = [(ax.get_title(), line.get_label(), len(line.get_xdata()))
                                  for ax in fig.axes for line in ax.get_lines()]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return drawn


def test_plot_overlays_runs_with_their_recipes(tmp_path, capsys, monkeypatch):
    fake_run(tmp_path / "a", "vanilla", 2.0)
    fake_run(tmp_path / "b", "stable", 0.0)
    drawn = _capture_lines(monkeypatch)
    cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
    names = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert names == ["attn_logit.png", "grad_norm.png", "loss.png", "output_norms.png", "tev.png"]
    # Every panel holds a line per run with every logged point: the metric names match train's.
    panels = {"loss.png": 1, "grad_norm.png": 1, "tev.png": 2, "attn_logit.png": 2, "output_norms.png": 3}
    for name, count in panels.items():
        lines = drawn[name]
        titles = {t for t, _, _ in lines}
        assert len(titles) == count, (name, lines)
        for title in titles:
            got = {label: n for t, label, n in lines if t == title}
            assert {"vanilla", "stable"} <= {label.split()[0] for label in got}, (name, title, got)
            assert all(n == (50 if name in ("loss.png", "grad_norm.png") and "val" not in label else 5)
                       for label, n in got.items()), (name, title, got)
    assert all((tmp_path / "cmp" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert capsys.readouterr().out.count(".png") == 5
    assert [plot.read_run(tmp_path / r)[0] for r in "ab"] == ["vanilla", "stable"]


def test_plot_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        plot.plot_runs([tmp_path])
