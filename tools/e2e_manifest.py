"""The sha256 of a finished run's outputs that must not change by accident (tests/test_workflow.py compares the
suite's end-to-end run with ``tests/data/e2e_outputs.sha256``).

usage: python tools/e2e_manifest.py RESULTS_DIR [--write]

Covered: every derivative image, table, gradient and transform, the per-subject and cohort cache arrays and index,
the splits, each run's predictions and the evaluation tables (per_run.tsv aside: it holds run paths). Not
covered: what differs between any two runs (creation times, seconds measured, checkpoints holding them, logs).
After a deliberate change of an output, rerun the end-to-end run (pytest tests/test_workflow.py) and write the
manifest from its results folder with ``--write``, saying in the commit why the outputs changed.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

MANIFEST = Path(__file__).resolve().parents[1] / "tests" / "data" / "e2e_outputs.sha256"
SUFFIXES = (".nii.gz", ".tsv", ".bval", ".bvec", ".txt", ".npy")


def manifest(results: str | Path) -> dict[str, str]:
    """{path relative to ``results``: sha256} of the covered files."""
    results = Path(results)
    out = {}
    for top in ("derivatives", "cache", "model", "evaluation"):
        for p in sorted((results / top).rglob("*")):
            rel = p.relative_to(results).as_posix()
            if p.is_file() and rel.endswith(SUFFIXES) and p.name != "per_run.tsv" and "/checkpoint/" not in rel:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def read(path: Path = MANIFEST) -> dict[str, str]:
    return {rel: digest for digest, rel in (line.split(maxsplit=1) for line in path.read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--write", action="store_true", help=f"write {MANIFEST.relative_to(MANIFEST.parents[2])}")
    args = ap.parse_args()
    found = manifest(args.results)
    if args.write:
        MANIFEST.parent.mkdir(parents=True, exist_ok=True)
        MANIFEST.write_text("".join(f"{d}  {rel}\n" for rel, d in found.items()))
    else:
        known = read()
        changed = sorted(r for r in set(found) | set(known) if found.get(r) != known.get(r))
        print(f"{len(found)} files, {len(changed)} differ from the manifest" + "".join(f"\n  {r}" for r in changed))


if __name__ == "__main__":
    main()
