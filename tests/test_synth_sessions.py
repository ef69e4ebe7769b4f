"""Longitudinal synthetic cohorts: ``make_cohort(..., sessions=N)`` (neuromoe.inputs.synth, synth_plan).

Two subjects of seed 3 (sub-01 iRBD, sub-02 PD with the anat profile; sub-02 without DWI) at the demo's
coarse acquisition (config.yaml ``synthetic.acquisition``), written once as a single-session cohort and once
with two sessions: the layout and names, session 1 equal to the single-session subject byte for byte,
session 2 a new visit whose planted effect is stronger, the sessions tables, the truth per session,
determinism (a second write, in one process instead of two, gives the same bytes). The progression of the
clinical values is checked on plans, which cost no images; rewriting a folder with other sessions on a
tiny acquisition.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import coarse_params

from neuromoe.errors import InputError
from neuromoe.inputs import templates as tpl
from neuromoe.inputs.synth import (
    DESIGN_FILE,
    DISEASE_ROLE,
    MODALITIES,
    SESSION_COLUMNS,
    SESSION_INTERVAL_YEARS,
    SESSION_PROGRESSION,
    TRUTH_DIR,
    SynthParams,
    make_cohort,
    progression_factor,
    read_truth,
    session_plans,
    subject_plan,
    write_subject,
)

SEED = 3
N = 2
MISSING = {"02": ["dwi"]}
# Raw files of one subject-session with every modality (relative to sub-<id>/[ses-<k>/]), by stem.
RAW = [
    "anat/{u}_T1w.nii.gz",
    "dwi/{u}_dwi.nii.gz",
    "dwi/{u}_dwi.bval",
    "dwi/{u}_dwi.bvec",
    "dwi/{u}_dwi.json",
    "func/{u}_task-rest_bold.nii.gz",
    "func/{u}_task-rest_bold.json",
]
TRUTH = [
    "{u}_desc-truth_mask.nii.gz",
    "{u}_pose.json",
    "{u}_dwi_motion.tsv",
    "{u}_dwi_motion.json",
    "{u}_task-rest_motion.tsv",
    "{u}_task-rest_motion.json",
]
TINY = SynthParams(t1_voxel_mm=4.0, dwi_voxel_mm=5.0, bold_voxel_mm=6.0, n_directions=6, n_b0=1, n_dummy=2, n_bold=16)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth_sessions")
    p = coarse_params()
    return {
        "single": make_cohort(root / "single", N, SEED, p, missing=MISSING),
        "long": make_cohort(root / "long", N, SEED, p, missing=MISSING, sessions=2, n_jobs=2),
    }


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _expected(s: str, ses: int | None, mods: list[str]) -> list[str]:
    u = f"sub-{s}" if ses is None else f"sub-{s}_ses-{ses}"
    folder = f"sub-{s}" if ses is None else f"sub-{s}/ses-{ses}"
    raw = [f"{folder}/{r.format(u=u)}" for r in RAW if r.split("/")[0] in mods]
    truth = [
        f"{TRUTH_DIR}/{folder}/{t.format(u=u)}"
        for t in TRUTH + ["{u}_profile.json"]
        if "dwi_motion" not in t or "dwi" in mods
    ]
    return raw + truth


def test_layout_and_names(cohorts: dict[str, Path]):
    long = cohorts["long"]
    files = set(_files(long))
    for s, mods in (("01", list(MODALITIES)), ("02", ["anat", "func"])):
        for ses in (1, 2):
            assert set(_expected(s, ses, mods)) <= files, (s, ses, sorted(set(_expected(s, ses, mods)) - files))
        assert {f"sub-{s}/sub-{s}_sessions.tsv", f"sub-{s}/sub-{s}_sessions.json"} <= files
        # Nothing outside the session folders but the sessions table; no subject-level truth files.
        assert sorted(d.name for d in (long / f"sub-{s}").iterdir()) == [
            "ses-1",
            "ses-2",
            f"sub-{s}_sessions.json",
            f"sub-{s}_sessions.tsv",
        ]
        assert sorted(d.name for d in (long / TRUTH_DIR / f"sub-{s}").iterdir()) == ["ses-1", "ses-2"]
    assert not any("dwi" in f for f in files if f.startswith(("sub-02/", f"{TRUTH_DIR}/sub-02/")))
    bold_json = long / "sub-01/ses-2/func/sub-01_ses-2_task-rest_bold.json"
    assert json.loads(bold_json.read_text())["RepetitionTime"] == 2.0
    # Recorded: sessions in synth_params.json, design.json, the description and the README; none of it when N=1.
    rec = json.loads((long / TRUTH_DIR / "synth_params.json").read_text())
    assert (rec["sessions"], rec["session_progression"], rec["session_interval_years"]) == (
        2,
        SESSION_PROGRESSION,
        SESSION_INTERVAL_YEARS,
    )
    assert json.loads((long / DESIGN_FILE).read_text())["sessions"] == 2
    desc = json.loads((long / "dataset_description.json").read_text())["GeneratedBy"][0]["Description"]
    assert "sessions=2" in desc and "## Sessions (2 visits per subject)" in (long / "README").read_text()
    single = cohorts["single"]
    assert "sessions" not in json.loads((single / TRUTH_DIR / "synth_params.json").read_text())
    assert "sessions" not in json.loads((single / DESIGN_FILE).read_text())
    assert "Sessions" not in (single / "README").read_text() and not list(single.rglob("ses-*"))
    assert "sessions=" not in (single / "dataset_description.json").read_text()


def test_session_one_is_the_single_session_subject(cohorts: dict[str, Path]):
    single, long = _files(cohorts["single"]), _files(cohorts["long"])
    n = 0
    for name, data in single.items():
        parts = name.split("/")
        if name.startswith("sub-") and len(parts) == 3:  # sub-01/anat/sub-01_T1w.nii.gz
            s = parts[0]
            other = f"{s}/ses-1/{parts[1]}/{parts[2].replace(s, f'{s}_ses-1', 1)}"
        elif name.startswith(f"{TRUTH_DIR}/sub-") and not name.endswith(("_profile.json", "_motion.json")):
            s = parts[-2]
            other = "/".join(parts[:-1] + ["ses-1", parts[-1].replace(s, f"{s}_ses-1", 1)])
        else:
            continue
        assert long[other] == data, other
        n += 1
    assert n == 10 + 7  # raw: 7 + 3 (sub-02 has no DWI); truth: mask, pose, motion tables
    # One row per subject, session 1's values: the same participants table.
    assert long["participants.tsv"] == single["participants.tsv"]
    for s in ("01", "02"):
        one, ses1 = read_truth(cohorts["single"], s), read_truth(cohorts["long"], s, session="1")
        assert ses1["session"] == "1" and ses1["progression_factor"] == 1.0
        assert all(ses1[k] == one[k] for k in ("diagnosis", "profile", "effects", "affected", "modalities_written"))
        assert np.array_equal(ses1["pose"], one["pose"])


def test_later_session_is_a_new_visit_with_progressed_effects(cohorts: dict[str, Path], tmp_path: Path):
    long, p = cohorts["long"], coarse_params()
    for s in ("01", "02"):
        t1, t2 = read_truth(long, s, session="1"), read_truth(long, f"sub-{s}", session="ses-2")
        assert (t2["diagnosis"], t2["profile"], t2["session"]) == (t1["diagnosis"], t1["profile"], "2")
        assert not np.allclose(t1["pose"], t2["pose"]) and not t1["func_motion"].equals(t2["func_motion"])
        for kind in ("anat/{u}_T1w.nii.gz", "func/{u}_task-rest_bold.nii.gz"):
            a, b = (long / f"sub-{s}/ses-{k}" / kind.format(u=f"sub-{s}_ses-{k}") for k in (1, 2))
            assert a.read_bytes() != b.read_bytes()
        f = progression_factor(t1["diagnosis"], 2)
        assert t2["progression_factor"] == f == 1 + SESSION_PROGRESSION
        for m in MODALITIES:
            for role, e in t1["effects"][m].items():
                want = min(1.0, e["strength"] * f) if e["cause"] == "disease" else e["strength"]
                assert t2["effects"][m][role]["strength"] == pytest.approx(want, abs=1e-4), (s, m, role)
                assert t2["effects"][m][role]["cause"] == e["cause"]
    # Measured in the images: sub-02 (PD, anat profile) loses grey matter in region A. Each session's T1w is
    # compared with the same session written without effects (same pose, bias field and noise), in region A
    # mapped through that session's truth pose: the relative drop grows by the progression factor.
    plans = session_plans(2, SEED, p, 2)
    assert (plans[0].diagnosis, plans[0].profile) == ("PD", "anat")
    roi = p.design.effect_rois("anat")[DISEASE_ROLE["PD"]]
    drops = []
    for pl in plans:
        u = f"sub-02_ses-{pl.session}"
        clean = dataclasses.replace(pl, effects={m: {"A": 0.0, "B": 0.0} for m in MODALITIES})
        write_subject(tmp_path, clean, p, ["anat"])
        hit = nib.load(long / f"sub-02/ses-{pl.session}/anat/{u}_T1w.nii.gz")
        ref = nib.load(tmp_path / f"sub-02/ses-{pl.session}/anat/{u}_T1w.nii.gz")
        truth = read_truth(long, "02", session=str(pl.session))
        mask = tpl.roi_mask(roi, hit, world_to_mni=np.linalg.inv(truth["pose"]))
        mask &= np.asanyarray(nib.load(truth["mask"]).dataobj) > 0
        h, c = (np.asanyarray(img.dataobj).astype(float)[mask] for img in (hit, ref))
        assert mask.sum() > 300
        drops.append(1 - h.sum() / c.sum())
    assert drops[0] > 0.08, drops
    assert 1.1 < drops[1] / drops[0] < 1.45, drops


def test_sessions_tables(cohorts: dict[str, Path]):
    long, p = cohorts["long"], coarse_params()
    part = pd.read_csv(long / "participants.tsv", sep="\t", na_values=["n/a"], dtype={"participant_id": str})
    desc = json.loads((long / "participants.json").read_text())
    assert "at session 1" in desc["updrs3"]["Description"] and "at session 1" not in desc["rbdsq"]["Description"]
    for i, s in ((1, "01"), (2, "02")):
        tab = pd.read_csv(long / f"sub-{s}/sub-{s}_sessions.tsv", sep="\t", na_values=["n/a"])
        assert (
            list(tab.columns)
            == ["session_id", *SESSION_COLUMNS]
            == ["session_id", "age", "updrs3", "moca", "serum_nfl", "serum_asyn"]
        )
        assert list(tab["session_id"]) == ["ses-1", "ses-2"]
        row = part[part["participant_id"] == f"sub-{s}"].iloc[0]
        for c in SESSION_COLUMNS:  # session 1: participants.tsv's values
            assert (pd.isna(row[c]) and pd.isna(tab[c][0])) or row[c] == tab[c][0], (s, c)
        assert tab["age"][1] == tab["age"][0] + SESSION_INTERVAL_YEARS
        for k, plan in enumerate(session_plans(i, SEED, p, 2)):  # every value is the session's plan's
            for c in SESSION_COLUMNS:
                v = plan.clinical[c]
                assert (v is None and pd.isna(tab[c][k])) or tab[c][k] == v, (s, k, c)
        side = json.loads((long / f"sub-{s}/sub-{s}_sessions.json").read_text())
        assert set(side) == {"session_id", *SESSION_COLUMNS}


def test_same_bytes_twice_and_in_one_process(cohorts: dict[str, Path], tmp_path: Path):
    again = make_cohort(tmp_path / "again", N, SEED, coarse_params(), missing=MISSING, sessions=2)  # n_jobs=1
    a, b = _files(cohorts["long"]), _files(again)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_read_truth_needs_the_session_of_a_sessioned_cohort(cohorts: dict[str, Path]):
    with pytest.raises(InputError, match="session"):
        read_truth(cohorts["long"], "01")
    with pytest.raises(InputError, match="no synthetic ground truth"):
        read_truth(cohorts["long"], "01", session="3")
    assert "session" not in read_truth(cohorts["single"], "01")


def test_progression_of_plans():
    """On 270 subjects' plans (no images): controls keep every effect, patients' disease effects grow by the
    factor (capped at 1), pose and clinical values change; UPDRS-III rises fastest in PD, MoCA falls in PD,
    serum NfL rises with age."""
    p = coarse_params()
    rows = []
    for i in range(1, 271):
        one, two, three = session_plans(i, 42, p, 3)
        base = subject_plan(i, 42, p)
        assert dataclasses.replace(one, session=None) == base
        assert (two.diagnosis, two.profile, two.causes, two.session) == (base.diagnosis, base.profile, base.causes, 2)
        assert two.rotation_deg != base.rotation_deg and max(map(abs, two.rotation_deg)) <= p.max_rotation_deg
        for m in MODALITIES:
            for role, e in base.effects[m].items():
                grow = base.causes[m][role] == "disease"
                assert grow == (base.diagnosis != "HC" and base.profile == m and DISEASE_ROLE[base.diagnosis] == role)
                assert three.effects[m][role] == pytest.approx(min(1.0, e * (1.5 if grow else 1.0)))
        assert three.clinical["age"] == base.clinical["age"] + 2 * SESSION_INTERVAL_YEARS
        assert (three.clinical["sex"], three.clinical["rbdsq"]) == (base.clinical["sex"], base.clinical["rbdsq"])
        rows.append(
            {
                "dx": base.diagnosis,
                **{
                    f"{c}_{k}": pl.clinical[c]
                    for k, pl in enumerate((one, three))
                    for c in ("updrs3", "moca", "serum_nfl")
                },
            }
        )
    df = pd.DataFrame(rows).astype({c: float for c in rows[0] if c != "dx"})
    change = {c: (df[f"{c}_1"] - df[f"{c}_0"]).groupby(df["dx"]).mean() for c in ("updrs3", "moca", "serum_nfl")}
    assert change["updrs3"]["PD"] > 7 and change["updrs3"]["PD"] > change["updrs3"]["iRBD"] > change["updrs3"]["HC"]
    assert change["moca"]["PD"] < -1 and change["moca"]["PD"] < change["moca"]["HC"]
    assert (change["serum_nfl"] > 0).all()
    # Session streams are new and per session: not the subject's, not another session's.
    one, two, three = session_plans(1, 42, p, 3)
    draws = [pl.streams()["anat"].random() for pl in (one, two, three)]
    assert draws[0] == subject_plan(1, 42, p).streams()["anat"].random() and len(set(draws)) == 3
    with pytest.raises(ValueError, match="sessions"):
        session_plans(1, 42, p, 0)
    with pytest.raises(ValueError, match="sessions"):
        make_cohort("/nonexistent/never-written", 1, 42, p, sessions=0)


def test_rewriting_a_folder_with_other_sessions(tmp_path: Path):
    out = make_cohort(tmp_path / "bids", 1, seed=1, params=TINY, sessions=3)
    assert sorted(d.name for d in (out / "sub-01").glob("ses-*")) == ["ses-1", "ses-2", "ses-3"]
    make_cohort(out, 1, seed=1, params=TINY, sessions=2)
    assert sorted(d.name for d in (out / "sub-01").glob("ses-*")) == ["ses-1", "ses-2"]
    assert sorted(d.name for d in (out / TRUTH_DIR / "sub-01").iterdir()) == ["ses-1", "ses-2"]
    make_cohort(out, 1, seed=1, params=TINY)  # one session: the single-session layout only
    assert sorted(d.name for d in (out / "sub-01").iterdir()) == ["anat", "dwi", "func"]
    assert not list((out / TRUTH_DIR / "sub-01").glob("ses-*"))
    single = _files(make_cohort(tmp_path / "fresh", 1, seed=1, params=TINY))
    assert _files(out) == single
    make_cohort(out, 1, seed=1, params=TINY, sessions=2)  # and back: no subject-level folders or truth
    assert sorted(d.name for d in (out / "sub-01").iterdir()) == [
        "ses-1",
        "ses-2",
        "sub-01_sessions.json",
        "sub-01_sessions.tsv",
    ]
    assert sorted(d.name for d in (out / TRUTH_DIR / "sub-01").iterdir()) == ["ses-1", "ses-2"]
