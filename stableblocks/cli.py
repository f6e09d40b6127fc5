"""The `stableblocks` command: `stableblocks train ...` and `stableblocks plot RUN_DIR ...`."""

from __future__ import annotations

import sys

COMMANDS = {"train": "stableblocks.train", "plot": "stableblocks.plot"}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: stableblocks {{{','.join(COMMANDS)}}} [options]  (see stableblocks COMMAND --help)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
