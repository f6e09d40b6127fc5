"""The `stableblocks` command: `stableblocks train ...`."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": "stableblocks.train"}
    if not argv or argv[0] not in commands:
        print(f"usage: stableblocks {{{','.join(commands)}}} [options]  (see stableblocks COMMAND --help)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])
