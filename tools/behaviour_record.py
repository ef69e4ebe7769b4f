"""The behaviour record: checksums of what the tests' 9-subject end-to-end run writes.

A refactor that claims to preserve behaviour runs this before and after and compares:

    python tools/behaviour_record.py run /tmp/e2e            # the tests' e2e cohort and config, whole workflow
    python tools/behaviour_record.py sums /tmp/e2e > record.tsv
    python tools/behaviour_record.py compare /tmp/e2e tools/behaviour_record.tsv

``behaviour_record.tsv`` is the record of e7e5c29 (before the package redesign of issue 18); two runs of
that code on this machine agreed on all its files.

Images are summed on their decoded voxels, affine, dtype and shape (gzip stamps and nibabel's writer do not
count); arrays, tables and checkpoints on their bytes. Logs, benchmarks, figures and reports are left out;
JSON files on their content less the keys that record when, where or how long; the list of files is part of
the record.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a user compares: MNI/native maps and masks, the cache, metrics, predictions, gate weights.
KEEP_SUFFIXES = (".nii.gz", ".npy", ".tsv", ".csv", ".bval", ".bvec", ".txt", ".md", ".safetensors", ".json")
# Keys that record when, where or how long (not what), and the process's unseeded global RNG states that a
# resume checkpoint carries: left out of a digest.
VOLATILE = re.compile(r"second|time|date|path|host|created|dir|version|file|url|^rng", re.I)
SKIP_PARTS = {"logs", "benchmarks", "report", ".snakemake"}


def run(work: Path) -> None:
    import yaml

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import E2E_CONFIG, E2E_SUBJECTS, coarse_params, snakemake_cmd

    from neuromoe.inputs.synth import make_cohort

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "bids").exists():
        make_cohort(work / "bids", E2E_SUBJECTS, seed=11, params=coarse_params(), n_jobs=2)
    cfg = {"bids_dir": "bids", "output_dir": "results", **E2E_CONFIG}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run(snakemake_cmd(work, "--cores", "2", "--show-failed-logs"), check=True)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.name.endswith(".nii.gz"):
        import nibabel as nib
        import numpy as np

        img = nib.load(path)
        h.update(np.asarray(img.dataobj).tobytes())
        h.update(img.affine.tobytes())
        h.update(str(img.get_data_dtype()).encode())
        h.update(str(img.shape).encode())
    elif path.suffix == ".safetensors":  # tensors, and the metadata less its timings
        from safetensors import safe_open

        with safe_open(path, "numpy") as f:
            for k in sorted(k for k in f.keys() if not VOLATILE.search(k)):
                h.update(k.encode() + f.get_tensor(k).tobytes())
            meta = {k: json.loads(v) if v[:1] in "{[" else v for k, v in (f.metadata() or {}).items()}
        h.update(json.dumps(_stable(meta), sort_keys=True).encode())
    elif path.suffix in (".csv", ".tsv"):  # a table less its timing columns
        sep = "," if path.suffix == ".csv" else "\t"
        rows = [line.split(sep) for line in path.read_text().splitlines()]
        keep = [i for i, c in enumerate(rows[0] if rows else []) if not VOLATILE.search(c)]
        for r in rows:
            h.update(sep.join(r[i] for i in keep if i < len(r)).encode() + b"\n")
    elif path.suffix == ".json":
        h.update(json.dumps(_stable(json.loads(path.read_text())), sort_keys=True).encode())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _stable(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not VOLATILE.search(k)}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def sums(work: Path) -> dict[str, str]:
    root = work / "results"
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or SKIP_PARTS & set(rel.parts) or not p.name.endswith(KEEP_SUFFIXES):
            continue
        out[str(rel)] = digest(p)
    return out


def main(argv: list[str]) -> int:
    cmd, work = argv[0], Path(argv[1])
    if cmd == "run":
        run(work)
    elif cmd == "sums":
        for k, v in sums(work).items():
            print(f"{k}\t{v}")
    elif cmd == "compare":
        want = dict(line.split("\t") for line in Path(argv[2]).read_text().splitlines() if line)
        got = sums(work)
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        for k in bad:
            print(f"differs: {k}  record {want.get(k, '(absent)')}  now {got.get(k, '(absent)')}")
        print(f"{len(want) - len([k for k in bad if k in want])} of {len(want)} files identical; "
              f"{len(bad)} differ")
        return 1 if bad else 0
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
