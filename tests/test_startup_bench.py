"""bench/startup.py: the large trees it times are valid datasets of the size and layout it says."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import REPO

from neuromoe.config import load_config
from neuromoe.inputs.bids import validate_dataset

sys.path.insert(0, str(REPO / "bench"))
import startup  # noqa: E402


def test_link_trees_are_valid_datasets_with_and_without_sessions(synth_cohort: Path, tmp_path: Path) -> None:
    cfg = load_config(REPO / "config.yaml")
    flat = validate_dataset(startup.link_tree(synth_cohort, tmp_path / "flat", 14, 1), cfg)
    assert not flat.sessions and len(flat.subjects) == 14
    two = validate_dataset(startup.link_tree(synth_cohort, tmp_path / "two", 14, 2), cfg)
    assert two.sessions and len(two.subjects) == 28 and "00014_ses-2" in two.subjects
    # the links point at real images: subject 00007 is the source's first subject again (6 in turn)
    t1 = tmp_path / "two" / "sub-00007" / "ses-1" / "anat" / "sub-00007_ses-1_T1w.nii.gz"
    assert t1.resolve() == (synth_cohort / "sub-01" / "anat" / "sub-01_T1w.nii.gz").resolve()
