"""The sha256 of a finished run's outputs that must not change by accident (tests/test_workflow.py compares the
suite's end-to-end run with ``tests/data/e2e_outputs.sha256``).

usage: python tools/e2e_manifest.py RESULTS_DIR [--write]

Covered: every derivative image, table, gradient and transform, the per-subject and cohort cache arrays and index,
the splits, each run's predictions and the evaluation tables (per_run.tsv aside: it holds run paths). Not
covered: what differs between any two runs (creation times, seconds measured, checkpoints holding them, logs).

Byte for byte, except the explanation's outputs (``evaluation/explain/``: saliency maps and gate weights at
float32 precision): they are gradients and outputs of the trained model, and the kernels torch picks by the CPU
change their last bits (an AVX-512 host against the AVX2 one that wrote this manifest: 4e-7 of a map's maximum at
most, gate weights one float32 unit in the last place). Those entries are ``approx:`` fingerprints, the exact
digest of what is not a float (ids and classes; a NIfTI's shape, dtype and affine) and four sums of the floats,
compared within a relative ``RTOL`` (1e-5: 25 times the largest change measured, far below any change of code).
After a deliberate change of an output, rerun the end-to-end run (pytest tests/test_workflow.py) and write the
manifest from its results folder with ``--write``, saying in the commit why the outputs changed.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

MANIFEST = Path(__file__).resolve().parents[1] / "tests" / "data" / "e2e_outputs.sha256"
SUFFIXES = (".nii.gz", ".tsv", ".bval", ".bvec", ".txt", ".npy")
APPROX_UNDER = "evaluation/explain/"
RTOL = 1e-5


def _float_sums(values) -> str:
    """n, sum, sum of squares and a position-weighted sum (weights 1..2) of a float array, as text."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64).ravel()
    w = np.linspace(1.0, 2.0, a.size) if a.size else a
    return ",".join(repr(float(x)) for x in (a.size, a.sum(), (a * a).sum(), (a * w).sum()))


def approx_fingerprint(path: Path) -> str:
    """``approx:<digest of what is not a float>:<float sums>`` of a NIfTI image or a TSV table."""
    if path.name.endswith(".nii.gz"):
        import nibabel as nib
        import numpy as np

        img = nib.load(path)
        exact = repr((img.shape, str(img.get_data_dtype()), np.round(img.affine, 6).tolist())).encode()
        floats = np.asarray(img.dataobj, dtype=np.float64)
    else:
        import pandas as pd

        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        as_float = table.apply(pd.to_numeric, errors="coerce")
        is_float = [c for c in table if as_float[c].notna().all() and table[c].str.contains(r"[.eE]").any()]
        exact = table.drop(columns=is_float).to_csv(sep="\t", index=False).encode() + repr(list(table)).encode()
        floats = as_float[is_float].to_numpy(dtype=float)
    return f"approx:{hashlib.sha256(exact).hexdigest()[:16]}:{_float_sums(floats)}"


def same(found: str | None, known: str | None) -> bool:
    """Equal digests, or two ``approx:`` fingerprints with the same exact part and sums within ``RTOL``."""
    if found == known:
        return True
    if not (found and known and found.startswith("approx:") and known.startswith("approx:")):
        return False
    (_, ex_f, sums_f), (_, ex_k, sums_k) = found.split(":", 2), known.split(":", 2)
    f, k = [float(x) for x in sums_f.split(",")], [float(x) for x in sums_k.split(",")]
    return (ex_f == ex_k and len(f) == len(k)
            and all(math.isclose(a, b, rel_tol=RTOL) for a, b in zip(f, k, strict=True)))


def differing(found: dict[str, str], known: dict[str, str]) -> list[str]:
    """The files whose entries differ (or that only one side has), sorted."""
    return sorted(r for r in set(found) | set(known) if not same(found.get(r), known.get(r)))


def manifest(results: str | Path) -> dict[str, str]:
    """{path relative to ``results``: sha256} of the covered files."""
    results = Path(results)
    out = {}
    for top in ("derivatives", "cache", "model", "evaluation"):
        for p in sorted((results / top).rglob("*")):
            rel = p.relative_to(results).as_posix()
            if p.is_file() and rel.endswith(SUFFIXES) and p.name != "per_run.tsv" and "/checkpoint/" not in rel:
                out[rel] = (approx_fingerprint(p) if rel.startswith(APPROX_UNDER)
                            else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def read(path: Path = MANIFEST) -> dict[str, str]:
    return {rel: digest for digest, rel in (line.split(maxsplit=1) for line in path.read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--write", action="store_true", help=f"write {MANIFEST.relative_to(MANIFEST.parents[2])}")
    args = ap.parse_args()
    found = manifest(args.results)
    if not found:
        raise SystemExit(f"{args.results}: no run's outputs there (derivatives/, cache/, model/, evaluation/)")
    if args.write:
        MANIFEST.parent.mkdir(parents=True, exist_ok=True)
        MANIFEST.write_text("".join(f"{d}  {rel}\n" for rel, d in found.items()))
    else:
        known = read()
        changed = differing(found, known)
        print(f"{len(found)} files, {len(changed)} differ from the manifest" + "".join(f"\n  {r}" for r in changed))


if __name__ == "__main__":
    main()
