"""The `stableblocks` command: `stableblocks train ...` and `stableblocks plot RUN_DIR ...`."""

from __future__ import annotations

import difflib
import importlib
import sys

# command -> (module, its command-line entry)
COMMANDS = {"train": ("stableblocks.train", "command"), "plot": ("stableblocks.plot", "main")}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: stableblocks {{{','.join(COMMANDS)}}} [options]  (see stableblocks COMMAND --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        print(f"stableblocks: unknown command {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    module, entry = COMMANDS[argv[0]]
    getattr(importlib.import_module(module), entry)(argv[1:])
