"""The derivatives folder's own metadata: BIDS-derivatives dataset_description.json and .bidsignore."""

from __future__ import annotations

import json
from pathlib import Path

import neuromoe


def write_dataset_description(path: str | Path, cfg: dict) -> None:
    desc = {
        "Name": "NeuroMoE preprocessing derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "neuromoe",
            "Version": neuromoe.__version__,
            "Description": f"preprocessing backend: {cfg['preprocessing']['backend']}",
        }],
        "SourceDatasets": [{"URL": f"file://{Path(cfg['bids_dir']).resolve()}"}],
        # the sidecars' Sources name raw files as bids:raw:<path>
        "DatasetLinks": {"raw": f"file://{Path(cfg['bids_dir']).resolve()}"},
    }
    # the maps of ingested series name their files as bids:fmriprep:<path> / bids:qsiprep:<path>
    for tool, folder in sorted(((cfg.get("inputs") or {}).get("derivatives") or {}).items()):
        if folder:
            desc["SourceDatasets"].append({"URL": f"file://{Path(folder).resolve()}"})
            desc["DatasetLinks"][tool] = f"file://{Path(folder).resolve()}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(desc, indent=2) + "\n")


# What the BIDS validator must not read, each with why (as fMRIPrep's and XCP-D's .bidsignore): files of
# conventions the released BIDS schema does not hold yet, and files that are not data.
BIDSIGNORE = {
    "*.html": "the QC pages (fMRIPrep's layout)",
    "figures": "the QC figures' folders (fMRIPrep's layout; the validator matches the folder without a slash)",
    "*_xfm.txt": "ITK text transforms (fMRIPrep ignores *_xfm.* too)",
    "*_timeseries.tsv": "motion and confounds tables (fMRIPrep ignores them too)",
    "*_dwimap.*": "diffusion model maps: BEP016 (model-tensor_param-*), not in the released schema",
    "*_boldmap.*": "BOLD maps: XCP-D's stat-* names, not in the released schema",
    "*_dwi.bval": "the preprocessed DWI's rotated gradients (keep_series): no derivative rule for them yet",
    "*_dwi.bvec": "the same",
}


def write_bidsignore(path: str | Path) -> None:
    lines = [f"# {why}\n{pattern}" for pattern, why in BIDSIGNORE.items()]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
