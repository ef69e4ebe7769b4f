"""One contract for both preprocessing backends (docs/preprocessing.md), checked on one coarse synthetic subject.

Every stage is run through ``neuromoe.preproc.run_stage`` (the workflow's one backend switch) with backend
``python`` and ``fsl``. Where FSL is absent (the usual case, CI included) the fsl case runs its Python half with
tests/test_fsl.py's stand-in FSL programs (FSL's argv and output names; registrations return the world identity,
motion correction returns no motion), so file names, dtypes, grids, sidecars, QC figures and error types are held
to the same contract everywhere. The numbers the stand-ins cannot give (registration accuracy) are checked by
tests/test_fsl.py's ``fsl``-marked tests where FSL is installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import coarse_params
from test_fsl import FSL_MISSING, install_fake_fsl

from neuromoe import paths
from neuromoe.errors import StageError
from neuromoe.preproc import BACKENDS, STAGES, preproc_keys, run_stage
from neuromoe.preproc import registration as reg
from neuromoe.preproc.func import CONFOUND_COLUMNS
from neuromoe.preproc.motion import MOTION_COLUMNS

SUBJECT = "01"
MNI_SHAPE = (99, 117, 95)
DUMMY_SCANS = 4
CONFIG = {"preprocessing": {"dwi": {"b0_threshold": 50, "fit_method": "WLS"},
                            "func": {"dummy_scans": DUMMY_SCANS, "band_hz": [0.01, 0.08],
                                     "nuisance": ["motion", "wm", "csf"]},
                            "fsl": {"bet_frac": 0.5, "bet_gradient": 0.0, "bet_robust": True,
                                    "dwi_correction": "eddy_correct"}}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def registration(backend: str) -> str:
    """python: the default, nonlinear (config.yaml's demo, so the end-to-end runs, use affine); fsl: affine where
    FSL is absent (fnirt has no stand-in: its argv and warp conversion are tests/test_fsl.py's)."""
    return "affine" if backend == "fsl" and FSL_MISSING else "nonlinear"


def config(backend: str) -> dict:
    return {"preprocessing": {"backend": backend, "anat": {"registration": registration(backend)},
                              **CONFIG["preprocessing"]}}


def stage_outputs(out: Path, stage: str) -> dict[str, str]:
    """Every neuromoe.paths output of ``stage`` (QC figures included) for the subject."""
    return {k: paths.derivative(out, SUBJECT, k) for k in paths.OUTPUTS
            if k.startswith(f"{stage}_") or k.startswith(f"qc_{stage}_")}


def stage_inputs(bids: Path, out: Path, stage: str) -> dict[str, str]:
    anat = {k: paths.derivative(out, SUBJECT, k) for k in ("anat_brain", "anat_mask", "anat_xfm")}
    if stage == "anat":
        return {"t1w": paths.raw(bids, SUBJECT, "T1w")}
    if stage == "dwi":
        return {**{k: paths.raw(bids, SUBJECT, k) for k in ("dwi", "bval", "bvec")}, **anat}
    return {"bold": paths.raw(bids, SUBJECT, "bold"), "bold_json": paths.raw(bids, SUBJECT, "bold_json"), **anat}


@pytest.fixture(scope="module")
def bids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from neuromoe.inputs.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("contract") / "bids", 1, seed=11, params=coarse_params())


@pytest.fixture
def fsl_here(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For the fsl case without FSL: the stand-in programs on PATH for this test."""
    if request.node.callspec.params.get("backend") == "fsl" and FSL_MISSING:
        install_fake_fsl(tmp_path / "fake fsl", monkeypatch)


@pytest.fixture(scope="module", params=BACKENDS)
def run(request: pytest.FixtureRequest, bids: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[str, dict[str, str]]]:
    """The three stages of one backend on the subject: (backend, every output path)."""
    backend = request.param
    root = tmp_path_factory.mktemp(f"contract-{backend}")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        if backend == "fsl" and FSL_MISSING:
            install_fake_fsl(root / "fake fsl", mp)
        written: dict[str, str] = {}
        for stage in STAGES:
            outputs = stage_outputs(out, stage)
            run_stage(stage, stage_inputs(bids, out, stage), outputs, SUBJECT, config(backend), threads=1)
            written |= outputs
    yield backend, written


# ---------------------------------------------------------------------------------------------------- outputs
def test_every_output_is_written_under_its_name(run):
    _, o = run
    assert set(o) == set(paths.OUTPUTS)
    for key, path in o.items():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, key
    assert {k for k in paths.OUTPUTS if paths.OUTPUTS[k][3] == ".json"} == {f"{k}_json" for k in paths.IMAGE_KEYS}


def test_every_image_has_a_sidecar_a_reader_can_use(run, bids):
    """BIDS-Derivatives sidecars, the same keys from both backends: Sources as BIDS URIs that resolve (raw files
    under the raw dataset, our own files under the derivatives), a native image's SpatialReference, SkullStripped,
    brain masks' Type, the tensor maps' Model and units, the BOLD maps' parameters."""
    backend, o = run
    root = Path(o["anat_mask"]).parents[2]  # derivatives/neuromoe
    for key in paths.IMAGE_KEYS:
        side = Path(o[f"{key}_json"])
        assert side.name == Path(o[key]).name.replace(".nii.gz", ".json"), key
        meta = json.loads(side.read_text())
        assert meta["Sources"], key
        for src in meta["Sources"]:
            scheme, rel = src.rsplit(":", 1)
            assert scheme in ("bids:", "bids:raw"), src
            assert (bids / rel if scheme == "bids:raw" else root / rel).is_file(), (key, src)
        assert meta["Description"], key
        if "space" not in paths.OUTPUTS[key][1]:
            assert meta["SpatialReference"].startswith("bids:raw:sub-01/"), key
        else:  # an MNI image: its native image and the transforms that took it there
            assert any(s.endswith("_xfm.txt") for s in meta["Sources"]) and "ICBM152" in meta["SpatialReference"], key
    side = {k: json.loads(Path(o[f"{k}_json"]).read_text()) for k in paths.IMAGE_KEYS}
    assert side["anat_brain"]["SkullStripped"] is True and side["anat_mask_mni"]["Type"] == "Brain"
    assert side["dwi_preproc"]["SkullStripped"] is False and side["func_preproc"]["SkullStripped"] is False
    fa, md = side["dwi_fa_mni"], side["dwi_md"]
    assert fa["Model"]["Parameters"]["FitMethod"] and fa["Model"]["Parameters"]["Shells"][0] == 0
    b_max = max(float(b) for b in Path(paths.raw(bids, SUBJECT, "bval")).read_text().split())
    assert abs(max(fa["Model"]["Parameters"]["Shells"]) - b_max) <= 25  # rounded to 50 s/mm^2
    assert md["Units"] == "mm^2/s" and "mean diffusivity" in md["Description"]
    assert side["func_falff"]["Parameters"] == {"BandHz": [0.01, 0.08], "DummyScans": DUMMY_SCANS,
                                                "NuisanceRegressors": ["motion", "wm", "csf"]}
    assert ("FSL" in side["dwi_fa"]["Software"]) == (backend == "fsl")


def test_the_series_are_written_only_when_asked(run, bids, tmp_path):
    """Without preprocessing.keep_series the rules leave the 4D series' keys out; the stages then write every
    other output and no series (the shared tails decide, so the python backend stands for both)."""
    backend, written = run
    if backend != "python":
        pytest.skip("the series are written by the write_outputs tails both backends share")
    done = Path(written["anat_brain"]).parents[4]  # the fixture's output folder: its anat feeds dwi and func
    for stage in ("dwi", "func"):
        outputs = {k: paths.derivative(tmp_path, SUBJECT, k) for k in paths.stage_outputs(f"{stage}_")}
        run_stage(stage, stage_inputs(bids, done, stage), outputs, SUBJECT, config(backend), threads=1)
        assert all(Path(p).is_file() for p in outputs.values()), stage
    assert not [k for k in paths.SERIES if Path(paths.derivative(tmp_path, SUBJECT, k)).exists()]
    assert set(paths.stage_outputs("dwi_", keep_series=True)) - set(paths.stage_outputs("dwi_")) == {
        "dwi_preproc", "dwi_bval", "dwi_bvec", "dwi_preproc_json"}
    assert set(paths.stage_outputs("func_", keep_series=True)) - set(paths.stage_outputs("func_")) == {
        "func_preproc", "func_preproc_json"}


def test_images_have_their_dtype_and_grid(run, bids):
    _, o = run
    grids = {"anat": nib.load(paths.raw(bids, SUBJECT, "T1w")), "dwi": nib.load(paths.raw(bids, SUBJECT, "dwi")),
             "func": nib.load(paths.raw(bids, SUBJECT, "bold"))}
    for key, path in o.items():
        if not path.endswith(".nii.gz"):
            continue
        img = nib.load(path)
        assert img.get_data_dtype() == (np.uint8 if "mask" in key else np.float32), key
        if key.endswith("_mni"):
            continue
        native = grids[key.split("_")[0]]
        assert img.shape[:3] == native.shape[:3], key
        np.testing.assert_allclose(img.affine, native.affine, atol=1e-4, err_msg=key)
    for key in ("anat_mask", "dwi_mask", "func_mask"):
        assert np.asarray(nib.load(o[key]).dataobj).max() == 1, key  # non-empty, values 0/1
    assert nib.load(o["dwi_preproc"]).shape == grids["dwi"].shape
    bold, preproc = grids["func"], nib.load(o["func_preproc"])
    assert preproc.shape == bold.shape[:3] + (bold.shape[3] - DUMMY_SCANS,)
    tr = json.loads(Path(paths.raw(bids, SUBJECT, "bold_json")).read_text())["RepetitionTime"]
    assert preproc.header.get_zooms()[3] == pytest.approx(tr)


def test_mni_outputs_are_on_the_template_grid(run):
    from neuromoe.preproc.anat import mni_template

    _, o = run
    tpl = mni_template()[0]
    mni = [k for k in o if k.endswith("_mni")]
    assert len(mni) == 2 + 4 + 2
    for key in mni:
        img = nib.load(o[key])
        assert img.shape == MNI_SHAPE, key
        np.testing.assert_allclose(img.affine, tpl.affine, atol=1e-4, err_msg=key)
    for key in ("anat_brain_mni", "anat_mask_mni"):
        assert int(nib.load(o[key]).header["sform_code"]) == 4, key  # NIfTI's code for MNI152


def test_transforms_follow_the_itk_convention(run):
    backend, o = run
    tf = reg.read_transform(o["anat_xfm"])
    if registration(backend) == "affine":
        assert isinstance(tf, sitk.AffineTransform)
    else:  # [affine, a displacement field (python) or a B-spline (fsl)]
        assert isinstance(tf, sitk.CompositeTransform) and tf.GetNumberOfTransforms() == 2
        assert isinstance(tf.GetNthTransform(0).Downcast(), sitk.AffineTransform)
        assert not tf.GetNthTransform(1).IsLinear()
    for key in ("dwi_xfm", "func_xfm"):
        assert isinstance(reg.read_transform(o[key]), sitk.Euler3DTransform), key  # rigid


def test_text_sidecars(run, bids):
    _, o = run
    n_dwi = nib.load(paths.raw(bids, SUBJECT, "dwi")).shape[3]
    np.testing.assert_allclose(np.loadtxt(o["dwi_bval"]), np.loadtxt(paths.raw(bids, SUBJECT, "bval")))
    bvec = np.loadtxt(o["dwi_bvec"])
    assert bvec.shape == (3, n_dwi)
    moving = np.loadtxt(paths.raw(bids, SUBJECT, "bval")) > 50
    np.testing.assert_allclose(np.linalg.norm(bvec[:, moving], axis=0), 1.0, atol=1e-4)  # rotations keep norms
    motion = pd.read_csv(o["dwi_motion"], sep="\t")
    assert list(motion.columns) == MOTION_COLUMNS and len(motion) == n_dwi
    conf = pd.read_csv(o["func_confounds"], sep="\t", na_values="n/a")
    n_bold = nib.load(paths.raw(bids, SUBJECT, "bold")).shape[3] - DUMMY_SCANS
    assert list(conf.columns) == CONFOUND_COLUMNS and len(conf) == n_bold
    assert np.isnan(conf["dvars"].iloc[0]) and conf.drop(columns=["dvars", "std_dvars"]).notna().all().all()


def test_maps_hold_plausible_values(run):
    _, o = run
    fa = np.asarray(nib.load(o["dwi_fa"]).dataobj)
    assert 0.0 <= fa.min() and fa.max() <= 1.0 and (fa > 0).sum() > 100
    for key in ("dwi_md", "dwi_ad", "dwi_rd"):
        assert np.asarray(nib.load(o[key]).dataobj).min() >= 0.0, key
    falff = np.asarray(nib.load(o["func_falff"]).dataobj)
    assert 0.0 <= falff.min() and falff.max() <= 1.0 and (falff > 0).sum() > 100
    reho = np.asarray(nib.load(o["func_reho"]).dataobj)
    assert np.isfinite(reho).all() and reho.max() <= 1.0 + 1e-6


def test_qc_figures_are_pngs(run):
    _, o = run
    qc = [k for k in o if k.startswith("qc_")]
    assert len(qc) == 6
    for key in qc:
        data = Path(o[key]).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, key


# ---------------------------------------------------------------------------------------------------- errors
def _bad_input(stage: str, bids: Path, work: Path) -> dict[str, str]:
    """Inputs of ``stage`` with one fault a user can make: a constant T1w, a .bval one value short, a BOLD sidecar
    without RepetitionTime."""
    out = work / "out"
    inputs = stage_inputs(bids, out, stage)
    if stage == "anat":
        t1 = nib.load(inputs["t1w"])
        inputs["t1w"] = str(work / "sub-01_T1w.nii.gz")
        nib.save(nib.Nifti1Image(np.full(t1.shape, 7.0, np.float32), t1.affine), inputs["t1w"])
    elif stage == "dwi":
        bval = work / "sub-01_dwi.bval"
        bval.write_text(" ".join(Path(inputs["bval"]).read_text().split()[:-1]) + "\n")
        inputs["bval"] = str(bval)
    else:
        sidecar = work / "sub-01_task-rest_bold.json"
        meta = json.loads(Path(inputs["bold_json"]).read_text())
        meta.pop("RepetitionTime")
        sidecar.write_text(json.dumps(meta))
        inputs["bold_json"] = str(sidecar)
    return inputs


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_stage_error_naming_the_subject(backend, stage, bids, tmp_path, fsl_here):
    inputs = _bad_input(stage, bids, tmp_path)
    with pytest.raises(StageError) as err:
        run_stage(stage, inputs, stage_outputs(tmp_path / "out", stage), SUBJECT, config(backend), threads=1)
    assert str(err.value).startswith(f"[sub-{SUBJECT}] {stage}: ") and "fix:" in str(err.value)
    assert not any((tmp_path / "out").rglob("*.nii.gz"))  # nothing half-written


def test_fsl_backend_without_fsl_is_a_stage_error_with_the_fix(bids, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StageError, match=r"(?s)\[sub-01\] anat: the FSL backend cannot run.*--use-conda"):
        run_stage("anat", stage_inputs(bids, tmp_path, "anat"), stage_outputs(tmp_path, "anat"), SUBJECT,
                  config("fsl"))


# ---------------------------------------------------------------------------------------------------- the switch
def test_preproc_keys_name_what_each_backend_reads():
    for stage in STAGES:
        assert preproc_keys(stage, "python") == ["preprocessing.backend", f"preprocessing.{stage}"]
    assert preproc_keys("anat", "fsl") == ["preprocessing.backend", "preprocessing.anat", "preprocessing.fsl"]
    for stage in ("dwi", "func"):  # anat.registration decides whether applywarp is needed
        assert preproc_keys(stage, "fsl") == ["preprocessing.backend", f"preprocessing.{stage}", "preprocessing.fsl",
                                              "preprocessing.anat"]
    with pytest.raises(ValueError, match="backend"):
        preproc_keys("dwi", "ants")
    with pytest.raises(ValueError, match="stage"):
        preproc_keys("pet", "python")


def test_run_stage_refuses_an_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="ants"):
        run_stage("anat", {"t1w": str(tmp_path / "x.nii.gz")}, {}, SUBJECT, {"preprocessing": {"backend": "ants"}})


def test_scripts_hold_no_backend_switch():
    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    for stage in STAGES:
        text = (scripts / f"{stage}.py").read_text()
        assert f'run_stage("{stage}"' in text and "backend" not in text and "fsl" not in text, stage



def test_readme_lists_every_output_with_its_sidecar_keys():
    from conftest import REPO

    from neuromoe.preproc.sidecars import outputs_table

    text = (REPO / "README.md").read_text()
    start = text.index("<!-- outputs-table: neuromoe.preproc.sidecars.outputs_table() -->\n")
    end = text.index("<!-- /outputs-table -->")
    assert text[text.index("\n", start) + 1:end] == outputs_table(), "stale: python tools/outputs_table.py --write"
