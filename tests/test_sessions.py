"""Longitudinal datasets (ses-* folders): names, discovery, the cohort index, subject-grouped splits, and a real
run of the workflow on a two-session cohort. A dataset without sessions keeps the names it always had."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import E2E_CONFIG, coarse_params, snakemake_cmd

from neuromoe import paths
from neuromoe.errors import InputError, ValidationReport
from neuromoe.inputs.bids import validate_dataset
from neuromoe.learn.splits import make_splits, split_rows, subject_table, write_splits


# --- names ----------------------------------------------------------------------------------------------------
def test_session_entity_and_folder_only_where_a_session_is_given() -> None:
    assert paths.derivative("out", "01", "dwi_fa_mni") == (
        "out/derivatives/neuromoe/sub-01/dwi/sub-01_space-MNI152NLin2009aSym_model-tensor_param-fa_dwimap.nii.gz")
    assert paths.derivative("out", "01", "dwi_fa_mni", "2") == (
        "out/derivatives/neuromoe/sub-01/ses-2/dwi/"
        "sub-01_ses-2_space-MNI152NLin2009aSym_model-tensor_param-fa_dwimap.nii.gz")
    assert paths.raw("b", "01", "bold") == "b/sub-01/func/sub-01_task-rest_bold.nii.gz"
    assert paths.raw("b", "01", "bval", "1") == "b/sub-01/ses-1/dwi/sub-01_ses-1_dwi.bval"
    assert paths.derivative_pattern("o", "anat_mask") == "o/derivatives/neuromoe/sub-{subject}/anat/" \
                                                         "sub-{subject}_desc-brain_mask.nii.gz"
    assert paths.derivative_pattern("o", "anat_mask", sessions=True) == (
        "o/derivatives/neuromoe/sub-{subject}/ses-{session}/anat/sub-{subject}_ses-{session}_desc-brain_mask.nii.gz")


# --- a two-session tree from a single-session cohort (files moved under ses-1 / ses-2) --------------------------
def sessioned_copy(src: Path, dst: Path, sessions: dict[str, list[str]], drop: dict[str, str] | None = None) -> Path:
    """``dst``: ``src`` with each subject's anat/dwi/func copied into the sessions named in ``sessions`` (subject
    label -> session labels; others dropped), files renamed with the session entity; ``drop`` removes one
    datatype folder of one ``"<sub>_ses-<ses>"`` unit."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    keep = [f"sub-{s}" for s in sessions]
    df = pd.read_csv(src / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    df[df["participant_id"].isin(keep)].to_csv(dst / "participants.tsv", sep="\t", index=False)
    for s, labels in sessions.items():
        for ses in labels:
            for datatype in ("anat", "dwi", "func"):
                if (drop or {}).get(f"{s}_ses-{ses}") == datatype:
                    continue
                out = dst / f"sub-{s}" / f"ses-{ses}" / datatype
                out.mkdir(parents=True)
                for f in (src / f"sub-{s}" / datatype).iterdir():
                    (out / f.name.replace(f"sub-{s}_", f"sub-{s}_ses-{ses}_")).symlink_to(f)
    return dst


def config(**extra: object) -> dict:
    from neuromoe.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    return {**cfg, **extra}


def test_units_are_subject_sessions_and_a_session_without_t1w_borrows_one(synth_cohort: Path, tmp_path: Path
                                                                            ) -> None:
    bids = sessioned_copy(synth_cohort, tmp_path / "bids", {"01": ["1", "2", "10"], "02": ["1"]},
                          drop={"01_ses-2": "anat", "01_ses-1": "anat"})
    ds = validate_dataset(bids, config())
    assert ds.sessions and sorted(ds.subjects) == ["01_ses-1", "01_ses-10", "01_ses-2", "02_ses-1"]
    u = ds.subjects
    # no earlier session has a T1w: the nearest later one (10, after 2: visit order is numeric)
    assert (u["01_ses-1"].anat_session, u["01_ses-2"].anat_session, u["01_ses-10"].anat_session) == ("10", "10", "10")
    assert u["01_ses-1"].has("anat") and not u["01_ses-1"].present["anat"]
    assert any("sub-01_ses-2: no T1w image; placed in MNI through ses-10" in w for w in ds.warnings)
    assert ds.training_labels("diagnosis") == [  # one label per subject, not per session
        d for p, d in pd.read_csv(bids / "participants.tsv", sep="\t")[["participant_id", "diagnosis"]].values
        if p in ("sub-01", "sub-02")]
    only = validate_dataset(bids, config(session_label=["ses-10"]))
    assert sorted(only.subjects) == ["01_ses-10"]


def test_bad_session_layouts_are_named(synth_cohort: Path, tmp_path: Path) -> None:
    bids = sessioned_copy(synth_cohort, tmp_path / "bids", {"01": ["1"], "02": ["1"]})
    shutil.copytree(synth_cohort / "sub-03", bids / "sub-03")  # no session folder, beside subjects with them
    pd.read_csv(synth_cohort / "participants.tsv", sep="\t", dtype=str).iloc[:3].to_csv(
        bids / "participants.tsv", sep="\t", index=False)
    (bids / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tupdrs3\nses-1\tmany\n")
    with pytest.raises(ValidationReport) as err:
        validate_dataset(bids, config())
    text = str(err.value)
    assert "sub-03" in text and "has no ses-* folder, but other subjects have sessions" in text
    assert "sub-02" in text and "non-numeric value 'many' (ses-1)" in text
    with pytest.raises(ValidationReport, match="no session folder for session label"):
        validate_dataset(bids, config(session_label=["7"]))
    with pytest.raises(ValidationReport, match="the dataset has no ses-\\* folders"):
        validate_dataset(synth_cohort, config(session_label=["1"]))


# --- the cohort index and the splits --------------------------------------------------------------------------
def visits_index(n_subjects: int = 12, n_sessions: int = 3) -> pd.DataFrame:
    """A cohort index with one row per visit: 4 subjects per class, ``n_sessions`` rows each."""
    rows = []
    for k in range(n_subjects):
        for s in range(1, n_sessions + 1):
            rows.append({"row": len(rows), "participant_id": f"sub-{k:02d}", "session_id": f"ses-{s}",
                         "diagnosis": ["HC", "PD", "iRBD"][k % 3], "label": k % 3})
    return pd.DataFrame(rows)


def test_no_subject_has_sessions_on_both_sides_of_a_split(tmp_path: Path) -> None:
    index = visits_index()
    splits = make_splits(subject_table(index), "cv", folds=3, seeds=[0, 1], val_fraction=0.25)
    write_splits(splits, tmp_path / "splits.tsv")
    subject_of = dict(zip(index["row"], index["participant_id"], strict=True))
    for sid in splits["split_id"].unique():
        parts = split_rows(index, tmp_path / "splits.tsv", sid)
        assert sorted(r for rs in parts.values() for r in rs) == list(index["row"])  # every visit, once
        owners = {p: {subject_of[r] for r in rs} for p, rs in parts.items()}
        assert not owners["train"] & owners["test"] and not owners["train"] & owners["val"]
        assert not owners["val"] & owners["test"]
        # all of a subject's sessions together
        assert all(len(rs) % 3 == 0 for rs in parts.values())
    with pytest.raises(InputError, match="duplicate participant ids"):  # visits are not what the splits split
        make_splits(index, "cv", folds=3, seeds=[0])


def test_cohort_index_has_a_row_per_visit_with_session_values(tmp_path: Path) -> None:
    """Two visits of one subject: session_id in the index, sessions.tsv's values over participants.tsv's."""
    from test_cache import CFG, out_paths, write_subject_maps

    from neuromoe.cache import store as C

    rng = np.random.default_rng(3)
    records = []
    for ses in ("1", "2"):
        maps = write_subject_maps(tmp_path / f"out{ses}", "01", rng)
        op = out_paths(tmp_path / "subjects", f"01_ses-{ses}")
        C.cache_subject(maps, op, [32, 32, 32], "float16", "01", patch=4, session=ses)
        records.append(C.default_record_path(op, f"01_ses-{ses}"))
    pd.DataFrame({"participant_id": ["sub-01"], "diagnosis": ["PD"], "age": [61.0], "sex": ["M"], "updrs3": [20]}
                 ).to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\tupdrs3\nses-1\tn/a\t20\n"
                                                              "ses-2\t63.0\t31\n")
    C.build_cohort(records, tmp_path / "participants.tsv", tmp_path / "cache", CFG)
    index = C.open_cohort(tmp_path / "cache", CFG).index
    assert list(index.columns[:3]) == ["row", "participant_id", "session_id"]
    assert list(index["session_id"]) == ["ses-1", "ses-2"]
    assert list(index["age"]) == [61.0, 63.0] and list(index["updrs3"]) == [20, 31]  # n/a keeps the subject's
    assert C.unit_ids(index) == ["01_ses-1", "01_ses-2"]


# --- a real run on a two-session cohort ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_session_cohort_runs_end_to_end(tmp_path: Path) -> None:
    """9 subjects, 4 of them with a second (progressed) visit and one of those visits without its T1w (5 subjects
    dropped out after the first): per-session derivatives, the borrowed anatomy, subject-grouped splits,
    per-session test predictions and `predict`."""
    from neuromoe.inputs.synth import make_cohort

    # the e2e fixture's subjects (seed 11) at their first visit: every training fold has both sexes
    bids = make_cohort(tmp_path / "bids", 9, seed=11, params=coarse_params(), n_jobs=2, sessions=2)
    shutil.rmtree(bids / "sub-02" / "ses-2" / "anat")  # placed in MNI through ses-1's T1w
    for k in range(5, 10):
        shutil.rmtree(bids / f"sub-{k:02d}" / "ses-2")
    units = [(f"{k:02d}", f"ses-{s}") for k in range(1, 10) for s in ((1, 2) if k <= 4 else (1,))]
    ev = {**E2E_CONFIG["evaluation"], "variants": ["full"], "baseline": "none"}
    cfg = {"bids_dir": "bids", "output_dir": "results", **E2E_CONFIG, "evaluation": ev}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # the per-session outputs (not the group's QC sheets and saliency, the same code per unit): CI time
    targets = ["results/evaluation/ablation.md", "results/derivatives/neuromoe/sub-01_ses-2.html", "predict"]
    run = subprocess.run(snakemake_cmd(tmp_path, "--cores", "2", *targets), capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    out = tmp_path / "results"
    for ses in ("1", "2"):
        for key in ("anat_brain_mni", "dwi_fa_mni", "func_falff_mni", "qc_dwi_motion"):
            assert Path(paths.derivative(out, "01", key, ses)).is_file(), (ses, key)
    assert not Path(paths.derivative(out, "02", "anat_brain", "2")).exists()
    assert Path(paths.derivative(out, "02", "dwi_fa_mni", "2")).is_file()
    assert "placed in MNI through ses-1" in run.stderr

    index = pd.read_csv(out / "cache" / "cohort" / "index.tsv", sep="\t", dtype=str)
    assert sorted(zip(index["participant_id"].str[4:], index["session_id"], strict=True)) == units
    assert (index["has_anat"] == "True").all()
    visits = pd.read_csv(bids / "sub-01" / "sub-01_sessions.tsv", sep="\t")
    got = index[index["participant_id"] == "sub-01"].set_index("session_id")["age"].astype(float)
    assert list(got) == list(visits.set_index("session_id").loc[got.index, "age"])  # per-visit clinical values

    splits = pd.read_csv(out / "model" / "splits.tsv", sep="\t", dtype=str)
    assert splits.groupby("split_id")["participant_id"].nunique().eq(9).all()  # subjects, not visits
    tested = []
    for run_dir in sorted((out / "model" / "runs" / "full").iterdir()):
        pred = pd.read_csv(run_dir / "predictions.tsv", sep="\t", dtype=str)
        assert list(pred.columns[:3]) == ["participant_id", "session_id", "part"]
        assert pred.groupby("participant_id")["part"].nunique().eq(1).all()  # a subject's visits together
        tested += [tuple(r) for r in pred.loc[pred["part"] == "test", ["participant_id", "session_id"]].values]
    assert sorted(tested) == units  # every visit tested once over the folds
    new = pd.read_csv(out / "predict" / "predictions.tsv", sep="\t", dtype=str)
    assert sorted(zip(new["participant_id"], new["session_id"], strict=True)) == units
    explained = sorted(p.name for p in (out / "predict" / "explain").glob("sub-*_desc-explain_gates.json"))
    assert len(explained) == len(units) and "sub-02_ses-2_desc-explain_gates.json" in explained
    assert (out / "derivatives" / "neuromoe" / "sub-01_ses-2.html").is_file()
