"""The README's table of output files (Outputs), generated from neuromoe.paths and neuromoe.preproc.sidecars.

usage: python tools/outputs_table.py [--write | --check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
README = ROOT / "README.md"
START = "<!-- outputs-table: neuromoe.preproc.sidecars.outputs_table() -->\n"
END = "<!-- /outputs-table -->"


def main() -> int:
    from neuromoe.preproc.sidecars import outputs_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    g.add_argument("--check", action="store_true", help="exit 1 if README.md's table is not current")
    args = ap.parse_args()
    text = README.read_text()
    i, j = text.index(START) + len(START), text.index(END)
    table = outputs_table()
    if args.write:
        README.write_text(text[:i] + table + text[j:])
    elif args.check:
        if text[i:j] != table:
            print("README.md's outputs table is stale: python tools/outputs_table.py --write", file=sys.stderr)
            return 1
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
