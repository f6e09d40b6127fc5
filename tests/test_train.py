"""The main job: `stableblocks train` on the bundled corpus."""

import json

from stableblocks import data
from stableblocks.train import main


def test_bundled_corpus():
    text = data.bundled_text()
    assert len(text) > 4_000_000 and "In the beginning God created the heaven and the earth." in text


def test_train_loss_falls(tmp_path):
    summary = main(["--steps", "40", "--n-layer", "2", "--n-embd", "64", "--block-size", "64",
                    "--batch-size", "8", "--eval-interval", "20", "--out-dir", str(tmp_path)])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 40 and "val_loss" in rows[-1]
    assert summary["final_loss"] < summary["first_loss"] - 1.0  # from ~ln(256) = 5.5 on bytes
