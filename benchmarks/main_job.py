"""python -m benchmarks.main_job: run the README's main job and write its measured figures there.

The main job is `stableblocks train` with its defaults (the `stable` recipe, the tiny model, the
bundled corpus). This command trains it in a temporary folder, stores the summary in
benchmarks/results/main_job.json and rewrites the README's main-job sentence from it, so the
figures people read come from a run, not from typing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stableblocks.train import TrainConfig, run

from . import report, results

PATH = results.RESULTS / "main_job.json"


def sentence(data: dict) -> str:
    return (f"measured with `python -m benchmarks.main_job` on {data['device']}, {data['timestamp'][:10]}: "
            f"loss {data['first_loss']:.2f} -> {data['final_loss']:.2f}, best validation loss "
            f"{data['best_val_loss']:.2f}, {data['tokens_per_s'] / 1e3:.1f}k tokens/s, {data['wall_s']:.0f} s in all")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.main_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", type=Path, default=report.README, help="the README whose main-job block is rewritten")
    p.add_argument("--out", type=Path, default=PATH, help="where the measured summary is stored")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stableblocks-main-job-") as folder:
        start = time.perf_counter()
        summary = run(TrainConfig(out_dir=str(Path(folder) / "main-job"), plot=False))
        wall = time.perf_counter() - start
    data = {k: summary[k] for k in ("first_loss", "final_loss", "best_val_loss", "tokens_per_s", "diverged")}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where `stableblocks train` runs by default
    data.update(wall_s=wall, device=results.device_name(device), versions=results.versions(), timestamp=results.now())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(args.out)
    report.replace_block(args.readme, "main-job", sentence(data))
    print(sentence(data))
    return data


if __name__ == "__main__":
    main()
