"""The derivatives folder's own metadata (BIDS-derivatives dataset_description.json)."""

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
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(desc, indent=2) + "\n")
