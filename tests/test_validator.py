"""The official BIDS validator as an option (neuromoe.inputs.validator, validation.bids_validator)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from neuromoe.cli import main as cli_main
from neuromoe.config import validate_config
from neuromoe.errors import InputError, ValidationReport
from neuromoe.inputs import validator as V
from neuromoe.inputs.bids import validate_dataset

REPORT = {"issues": {
    "issues": [
        {"code": "NOT_INCLUDED", "severity": "error", "location": "/sub-01/anat/sub-01_T1weighted.nii.gz"},
        {"code": "SIDECAR_KEY_RECOMMENDED", "subCode": "Manufacturer", "severity": "warning",
         "location": "/sub-01/dwi/sub-01_dwi.nii.gz"},
        {"code": "SIDECAR_KEY_RECOMMENDED", "severity": "warning", "location": "/sub-02/dwi/sub-02_dwi.nii.gz"},
        {"code": "EMPTY_FILE", "severity": "error", "location": "/README"},
    ],
    "codeMessages": {
        "NOT_INCLUDED": "Files with such naming scheme are not part of BIDS specification. This error is most "
                        "commonly caused by typos in file names.",
        "SIDECAR_KEY_RECOMMENDED": "A data file's JSON sidecar is missing a key listed as recommended.",
        "EMPTY_FILE": "Empty files not allowed.",
    }}}


def needs_validator() -> str:
    exe = V.validator_executable()
    if exe is None:
        pytest.skip(f"the official BIDS validator is not installed: {V.INSTALL_HINT}")
    return exe


def test_report_maps_to_subject_file_code_and_fix() -> None:
    errors, warnings = V.parse_report(REPORT)
    assert [(e.subject, e.path, e.code) for e in errors] == [
        ("sub-01", "sub-01/anat/sub-01_T1weighted.nii.gz", "NOT_INCLUDED"), (None, "README", "EMPTY_FILE")]
    first = errors[0].format()
    assert first.startswith("[sub-01] sub-01/anat/sub-01_T1weighted.nii.gz: Files with such naming scheme")
    assert "fix: This error is most commonly caused by typos" in first and "[NOT_INCLUDED]" in first
    assert "see https://bids-validator" in errors[1].format()  # a one-sentence message: the docs are the fix
    assert warnings == ["BIDS validator: 2 x SIDECAR_KEY_RECOMMENDED: A data file's JSON sidecar is missing a "
                        "key listed as recommended."]


def test_the_projects_own_message_wins_for_the_same_check() -> None:
    ours = [InputError("64 b-values but the image has 65 volumes", subject="sub-02", code="VOLUME_COUNT_MISMATCH")]
    theirs = [InputError("Volume count mismatch.", subject="sub-02", code="VOLUME_COUNT_MISMATCH"),
              InputError("Volume count mismatch.", subject="sub-03", code="VOLUME_COUNT_MISMATCH")]
    assert V.merge_problems(ours, theirs) == [ours[0], theirs[1]]


def test_asking_without_the_extra_says_how_to_install(synth_cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(V, "validator_executable", lambda: None)
    cfg = validate_config({"bids_dir": str(synth_cohort), "validation": {"bids_validator": True}})
    with pytest.raises(InputError, match=r"not installed(.|\n)*pip install 'bids-validator-deno"):
        validate_dataset(synth_cohort, cfg)


def test_official_validator_passes_the_synthetic_cohort(synth_cohort: Path) -> None:
    needs_validator()
    errors, warnings = V.run_validator(synth_cohort)
    assert errors == []
    assert all(w.startswith("BIDS validator: ") for w in warnings)


def test_official_and_own_problems_in_one_message(synth_cohort: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    needs_validator()
    bids = tmp_path / "bids"
    shutil.copytree(synth_cohort, bids)
    t1 = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    shutil.copy(t1, t1.with_name("sub-01_T1weighted.nii.gz"))  # a typo'd name: only the official one sees it
    bval = bids / "sub-02" / "dwi" / "sub-02_dwi.bval"
    bval.write_text(" ".join(bval.read_text().split()[:-1]) + "\n")  # one b-value short: both see it
    cfg = validate_config({"bids_dir": str(bids), "validation": {"bids_validator": True}})
    with pytest.raises(ValidationReport) as info:
        validate_dataset(bids, cfg)
    codes = [(p.code, p.subject) for p in info.value.problems]
    assert ("NOT_INCLUDED", "sub-01") in codes
    assert codes.count(("VOLUME_COUNT_MISMATCH", "sub-02")) == 1  # once, in the project's words
    text = str(info.value)
    assert "sub-01_T1weighted.nii.gz" in text and "b-values but the image has" in text
    # the same through the command line, without the config key
    assert cli_main(["validate", str(bids), "--official"]) == 2
    err = capsys.readouterr().err
    assert "NOT_INCLUDED" in err and "Traceback" not in err
    assert cli_main(["validate", str(bids)]) == 2  # the project's own check alone still finds the .bval
    assert "NOT_INCLUDED" not in capsys.readouterr().err
