"""The results CSVs: one schema for timings and cost-model numbers, appended run after run."""

from __future__ import annotations

import csv
import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Where quick and partial runs write by default: ignored by git, so committed results stay as measured.
SCRATCH = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"
COLUMNS = ("op", "provider", "mode", "shape", "metric", "unit", "p50", "p20", "p80", "device", "versions",
           "timestamp", "note")


def versions() -> str:
    import triton

    import stableblocks

    return f"torch {torch.__version__}; triton {triton.__version__}; stableblocks {stableblocks.__version__}"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def row(op, provider, mode, shape, metric, unit, p50=None, p20=None, p80=None, *, device, versions, timestamp,
        note="") -> dict:
    return dict(op=op, provider=provider, mode=mode, shape=shape, metric=metric, unit=unit, p50=p50, p20=p20, p80=p80,
                device=device, versions=versions, timestamp=timestamp, note=note)


def append(path: Path, rows: list[dict]) -> None:
    """Append rows (header first when the file is new); atomically, so a crash leaves the old file."""
    old = path.read_text() if path.exists() else ""
    _write(path, old, rows, header=not old)


def write(path: Path, rows: list[dict]) -> None:
    """Replace the file with these rows, atomically."""
    _write(path, "", rows, header=True)


def _write(path: Path, head: str, rows: list[dict], header: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(head)
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if header:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    os.replace(tmp, path)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("p50", "p20", "p80"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    return rows


def latest(rows: list[dict]) -> list[dict]:
    """The last row for each (op, provider, mode, shape, metric, device), in first-seen order."""
    out: dict[tuple, dict] = {}
    for r in rows:
        out[r["op"], r["provider"], r["mode"], r["shape"], r["metric"], r["device"]] = r
    return list(out.values())


def parse_shape(label: str) -> dict:
    """"B=8 T=1024 d=768 bf16" -> {"B": 8, "T": 1024, "d": 768, "dtype": "bf16"}."""
    out = {}
    for part in label.split():
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = int(v) if v.isdigit() else v
        else:
            out["dtype"] = part
    return out


def output_folder(parser, committed: Path, out: Path | None, partial: bool, name: str) -> Path:
    """The folder a benchmark command writes: the committed results only for a full run. A quick or
    partial run goes to runs/benchmarks/NAME (or --out), never into a committed results folder
    (this command's, or anything under benchmarks/results)."""
    if out is None:
        return SCRATCH / name if partial else committed
    if partial and any(Path(out).resolve().is_relative_to(c.resolve()) for c in (committed, RESULTS)):
        parser.error(f"--out {out}: a quick or partial run never writes into the committed results; "
                     f"leave --out unset (it writes {SCRATCH / name}) or run the full benchmark")
    return Path(out)
