"""Tests of neuromoe.cache.grid and .store: model grid, resampling/normalisation, subject and cohort caches.

Synthetic MNI-space maps on the template's 2 mm grid: the nilearn MNI152 template (T1w), linear ramps in
mm (FA, MD: their resampled values are known exactly in the brain interior) and noise (fALFF, ReHo).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from neuromoe import paths
from neuromoe.cache import grid as G
from neuromoe.cache import store as C
from neuromoe.errors import CacheError, InputError, StageError

GRID = (32, 32, 32)
CFG = {
    "cache": {"grid": list(GRID), "dtype": "float16", "dwi_maps": ["FA", "MD"],
              "func_maps": ["fALFF", "ReHo"]},
    "participants": {"diagnosis_column": "diagnosis", "labels": ["HC", "PD", "iRBD"],
                     "clinical_columns": ["age", "sex", "updrs3"]},
}
MAP_KEYS = {"anat": ["anat_brain_mni"], "dwi": ["dwi_fa_mni", "dwi_md_mni"],
            "func": ["func_falff_mni", "func_reho_mni"]}
RAMP = {"dwi_fa_mni": (np.array([0.004, -0.002, 0.003]), 0.45),
        "dwi_md_mni": (np.array([-1e-5, 2e-5, 1e-5]), 8e-4)}
FP16_RTOL = 2.0**-11  # float16 keeps 11 significant bits: relative rounding error <= 2^-11
SUBJECTS = ["01", "02", "03"]  # sub-03 has no func maps


def mni_mask() -> tuple[np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=2)
    return np.asarray(img.dataobj) > 0, img.affine


def mm_coords(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(3, X, Y, Z) mm coordinates of every voxel centre."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)


def ramp(key: str, xyz: np.ndarray) -> np.ndarray:
    coef, const = RAMP[key]
    return (np.tensordot(coef, xyz, axes=1) + const).astype(np.float32)


def write_subject_maps(deriv: Path, sub: str, rng: np.random.Generator, with_func: bool = True
                       ) -> dict[str, list[str]]:
    """Write one subject's five MNI-space maps (float32 .nii.gz, zero outside the brain)."""
    from nilearn.datasets import load_mni152_template

    t1 = load_mni152_template(resolution=2)
    mask, affine = mni_mask()
    xyz = mm_coords(affine, mask.shape)
    data = {
        "anat_brain_mni": np.asarray(t1.dataobj, np.float32) * 900 + rng.normal(0, 20, mask.shape),
        "dwi_fa_mni": ramp("dwi_fa_mni", xyz),
        "dwi_md_mni": ramp("dwi_md_mni", xyz),
        "func_falff_mni": 0.3 + 0.05 * rng.normal(size=mask.shape),
        "func_reho_mni": 0.5 + 0.1 * rng.normal(size=mask.shape),
    }
    maps: dict[str, list[str]] = {}
    for modality, keys in MAP_KEYS.items():
        maps[modality] = [paths.derivative(deriv, sub, k) for k in keys]
        if modality == "func" and not with_func:
            continue
        for k, p in zip(keys, maps[modality], strict=True):
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.where(mask, data[k], 0).astype(np.float32), affine), p)
    return maps


def out_paths(root: Path, sub: str) -> dict[str, Path]:
    return {m: p for m, p in C.subject_paths(root, sub).items() if m != "record"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three subjects' maps -> per-subject caches -> cohort cache (float16, 32^3)."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    maps, records = {}, []
    for sub in SUBJECTS:
        maps[sub] = write_subject_maps(root / "out", sub, rng, with_func=(sub != "03"))
        op = out_paths(root / "subjects", sub)
        C.cache_subject(maps[sub], op, GRID, "float16", sub, patch=4)
        records.append(C.default_record_path(op, sub))
    pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-99"],
                  "diagnosis": ["PD", "HC", "iRBD", "HC"], "age": [61.0, 58.5, np.nan, 70.0],
                  "sex": ["M", "F", "F", "M"], "updrs3": [22, np.nan, 5, 1]}
                 ).to_csv(root / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    cache_dir = root / "cache"
    C.build_cohort(records, root / "participants.tsv", cache_dir, CFG)
    return {"root": root, "maps": maps, "records": records, "cache_dir": cache_dir}


# --- model grid -------------------------------------------------------------------------------------
def test_model_grid_covers_and_centres_the_brain() -> None:
    mask, affine = mni_mask()
    lo, hi = G._voxel_box_mm(mask, affine)
    for n, voxel in [(32, 5.625), (64, 2.8125)]:
        g = G.model_grid(n)
        assert g.shape == (n, n, n)
        assert np.allclose(g.affine[:3, :3], np.diag([voxel] * 3)) and np.isclose(g.voxel_mm, voxel)
        first = g.affine[:3, 3] - voxel / 2
        last = g.affine[:3, 3] + voxel * (n - 0.5)
        assert np.all(first <= lo + 1e-6) and np.all(last >= hi - 1e-6)  # brain box inside the grid
        assert np.allclose((first + last) / 2, (lo + hi) / 2, atol=1e-6)  # centred on it
    # non-cubic grids keep isotropic voxels, sized by the tightest axis
    g = G.model_grid([32, 40, 32])
    assert g.shape == (32, 40, 32) and np.isclose(g.voxel_mm, max((hi - lo) / np.array([32, 40, 32])))


@pytest.mark.parametrize("bad", [[32, 32], [0, 32, 32], [-4, 32, 32]])
def test_grid_is_three_positive_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="grid"):
        G.model_grid(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grid"):
        C.cache_subject({}, {}, bad, "float16", "01", patch=4)  # type: ignore[arg-type]


@pytest.mark.parametrize(("grid", "patch"), [(30, 4), ([32, 32, 30], 4), ([18, 18, 18], 4), ([32, 32, 32], 6)])
def test_grid_must_be_divisible_by_the_patch(grid: object, patch: int) -> None:
    with pytest.raises(ValueError, match=f"cache.grid.*not divisible by model.patch_size {patch}"):
        G.check_grid(grid, patch)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not divisible"):
        C.cache_subject({}, {}, grid, "float16", "01", patch=patch)  # type: ignore[arg-type]


def test_patch_size_flows_from_the_config(tmp_path: Path) -> None:
    """model.patch_size 6 with an 18^3 grid: the subject cache, the cohort and its opening all accept it."""
    maps = write_subject_maps(tmp_path / "out", "01", np.random.default_rng(1))
    op = out_paths(tmp_path / "subjects", "01")
    C.cache_subject(maps, op, [18, 18, 18], "float16", "01", patch=6)
    pd.DataFrame({"participant_id": ["sub-01"], "diagnosis": ["PD"], "age": [60.0], "sex": ["M"],
                  "updrs3": [20]}).to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    cfg = {**CFG, "cache": {**CFG["cache"], "grid": [18, 18, 18]}, "model": {"patch_size": 6}}
    C.build_cohort([C.default_record_path(op, "01")], tmp_path / "participants.tsv", tmp_path / "cache", cfg)
    cc = C.open_cohort(tmp_path / "cache", cfg)
    assert cc.grid == (18, 18, 18) and cc.arrays["dwi"].shape == (1, 2, 18, 18, 18)
    with pytest.raises(ValueError, match="not divisible by model.patch_size 4"):  # the schema's default patch
        C.build_cohort([C.default_record_path(op, "01")], tmp_path / "participants.tsv", tmp_path / "c2",
                       {k: v for k, v in cfg.items() if k != "model"})


def test_grid_mask_is_the_brain() -> None:
    m = G.grid_mask(32)
    mask, _ = mni_mask()
    # the grid mask's volume matches the 2 mm mask's within 3 % (partial voxels thresholded at 1/2)
    vol_grid = m.sum() * G.model_grid(32).voxel_mm ** 3
    assert abs(vol_grid / (mask.sum() * 8.0) - 1) < 0.03
    assert m.dtype == bool and ndimage.label(m)[1] == 1


# --- resampling and normalisation ----------------------------------------------------------------
def test_resample_reproduces_a_linear_ramp() -> None:
    """A linear function survives smoothing + trilinear sampling exactly away from the brain edge."""
    mask, affine = mni_mask()
    xyz = mm_coords(affine, mask.shape)
    img = nib.Nifti1Image(np.where(mask, ramp("dwi_fa_mni", xyz), 0).astype(np.float32), affine)
    values, valid = G.resample_to_grid(img, GRID)
    g = G.model_grid(GRID)
    truth = ramp("dwi_fa_mni", mm_coords(g.affine, g.shape))
    interior = ndimage.binary_erosion(valid, iterations=2)
    assert interior.sum() > 2000
    assert np.max(np.abs(values[interior] - truth[interior])) < 1e-4  # values ~0.5: float32 rounding
    assert not values[~valid].any() and np.all(valid <= G.grid_mask(GRID))
    # at the edge the weighted average only uses brain voxels: still within the ramp's local range
    edge = valid & ~interior
    assert np.max(np.abs(values[edge] - truth[edge])) < 0.004 * 2 * g.voxel_mm * 3


def test_resample_antialiases() -> None:
    """A 4 mm checkerboard (above the 5.6 mm grid's Nyquist) must vanish, not alias into a pattern."""
    mask, affine = mni_mask()
    board = (np.indices(mask.shape).sum(0) % 2 * 2 - 1).astype(np.float32)
    values, valid = G.resample_to_grid(nib.Nifti1Image(np.where(mask, board, 0), affine), GRID)
    interior = ndimage.binary_erosion(valid, iterations=2)
    assert np.std(values[interior]) < 1e-3  # input std is 1.0
    # plain trilinear sampling (what we avoid) leaves a large aliased pattern
    g = G.model_grid(GRID)
    naive = ndimage.map_coordinates(board, G._grid_coords(g, affine), order=1).reshape(g.shape)
    assert np.std(naive[interior]) > 0.1


def test_robust_zscore_properties() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (16, 16, 16)).astype(np.float32)
    valid = np.zeros(x.shape, bool)
    valid[2:14, 2:14, 2:14] = True
    z, st = G.robust_zscore(x, valid)
    assert abs(st["median"] - 3.0) < 0.1 and abs(st["scale"] / 2.0 - 1) < 0.06  # 1728 samples
    assert not z[~valid].any() and z.dtype == np.float32
    assert abs(np.median(z[valid])) < 1e-6
    # robust: 5 % of huge outliers move the scale by < 10 % and are clipped at +-6
    y = x.copy()
    idx = np.flatnonzero(valid)[::20]
    y.flat[idx] = 1e4
    z2, st2 = G.robust_zscore(y, valid)
    assert abs(st2["scale"] / st["scale"] - 1) < 0.1 and z2.max() == G.ZSCORE_CLIP
    # a constant map is all zeros, not NaN
    zc, _ = G.robust_zscore(np.full(x.shape, 5.0, np.float32), valid)
    assert np.all(zc == 0)


def test_bfloat16_bits_round_trip() -> None:
    import torch

    x = np.random.default_rng(2).normal(0, 3, 1000).astype(np.float32)
    bits = C.encode(x, "bfloat16")
    assert bits.dtype == np.uint16
    back = C.decode(bits, "bfloat16")
    assert np.max(np.abs(back - x) / np.maximum(np.abs(x), 1e-30)) <= 2.0**-8  # 8 significant bits
    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(back, ref)
    with pytest.raises(ValueError, match="dtype"):
        C.storage_dtype("float32")


# --- per-subject cache ----------------------------------------------------------------------------
def test_subject_record_and_missing_modality(cohort: dict) -> None:
    rec1 = json.loads(Path(cohort["records"][0]).read_text())
    assert rec1["grid"] == list(GRID) and rec1["dtype"] == "float16"
    assert rec1["modalities"]["dwi"]["channels"] == ["FA", "MD"]
    assert rec1["modalities"]["func"]["channels"] == ["fALFF", "ReHo"]
    assert rec1["modalities"]["anat"]["channels"] == ["T1w"]
    src = rec1["modalities"]["dwi"]["sources"][0]
    assert len(src["sha256"]) == 64 and src["bytes"] == Path(src["path"]).stat().st_size
    rec3 = json.loads(Path(cohort["records"][2]).read_text())
    assert rec3["modalities"]["func"]["present"] is False
    assert len(rec3["modalities"]["func"]["missing"]) == 2
    assert not out_paths(cohort["root"] / "subjects", "03")["func"].exists()


def test_absent_modality_removes_a_stale_tensor(cohort: dict, tmp_path: Path) -> None:
    op = out_paths(tmp_path, "03")
    op["func"].parent.mkdir(parents=True)
    np.save(op["func"], np.ones((2, *GRID), np.float16))
    maps = dict(cohort["maps"]["03"])
    maps["anat"] = []
    maps["dwi"] = []
    rec = C.cache_subject(maps, op, GRID, "float16", "03", patch=4)
    assert not op["func"].exists() and not rec["modalities"]["func"]["present"]


def test_a_4d_map_is_a_stage_error(tmp_path: Path) -> None:
    p = tmp_path / "sub-01_space-MNI152NLin2009aSym_desc-brain_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), p)
    with pytest.raises(StageError, match="sub-01"):
        C.cache_subject({"anat": [p]}, {"anat": tmp_path / "a.npy"}, GRID, "float16", "01", patch=4)


# --- cohort cache --------------------------------------------------------------------------------
def test_round_trip_maps_to_cache(cohort: dict) -> None:
    """Each cached channel equals normalise_map of its input within float16 rounding; ramps match truth."""
    cc = C.open_cohort(cohort["cache_dir"], CFG)
    g = G.model_grid(GRID)
    truth_xyz = mm_coords(g.affine, g.shape)
    for row, sub in enumerate(SUBJECTS):
        rec = json.loads(Path(cohort["records"][row]).read_text())
        for modality, files in cohort["maps"][sub].items():
            got = cc.image(modality, row)
            assert got.shape == (len(files), *GRID)
            if sub == "03" and modality == "func":
                assert not got.any()
                continue
            for c, f in enumerate(files):
                ref, _ = G.normalise_map(f, GRID)
                np.testing.assert_allclose(got[c], ref, rtol=FP16_RTOL, atol=1e-7)
                key = MAP_KEYS[modality][c]
                if key in RAMP:  # independent check: z = (ramp(mm) - median) / scale in the interior
                    st = rec["modalities"][modality]["stats"][c]
                    z_truth = (ramp(key, truth_xyz) - st["median"]) / st["scale"]
                    interior = ndimage.binary_erosion(got[c] != 0, iterations=2)
                    assert np.max(np.abs(got[c][interior] - z_truth[interior])) < 5e-3


def test_cohort_layout_index_and_manifest(cohort: dict) -> None:
    d = cohort["cache_dir"]
    cc = C.open_cohort(d, CFG)
    assert {m: a.shape for m, a in cc.arrays.items()} == {"anat": (3, 1, *GRID), "dwi": (3, 2, *GRID),
                                                          "func": (3, 2, *GRID)}
    assert all(isinstance(a, np.memmap) and a.dtype == np.float16 for a in cc.arrays.values())
    idx = pd.read_csv(d / "index.tsv", sep="\t")
    assert list(idx.columns) == ["row", "participant_id", "diagnosis", "label", "has_anat", "has_dwi",
                                 "has_func", "age", "sex", "updrs3"]
    assert idx["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert idx["label"].tolist() == [1, 0, 2]  # class order = config labels [HC, PD, iRBD]
    assert idx["has_func"].tolist() == [True, True, False] and idx["has_dwi"].all()
    assert np.isnan(idx.loc[2, "age"]) and np.isnan(idx.loc[1, "updrs3"])
    assert idx["sex"].tolist() == ["M", "F", "F"]
    man = json.loads((d / "manifest.json").read_text())
    assert man["n_subjects"] == 3 and man["grid"] == list(GRID) and man["dtype"] == "float16"
    assert np.isclose(man["voxel_mm"], 5.625) and np.allclose(man["affine"], G.model_grid(GRID).affine)
    assert man["channels"] == {"anat": ["T1w"], "dwi": ["FA", "MD"], "func": ["fALFF", "ReHo"]}
    assert man["config"]["cache"] == CFG["cache"] and man["labels"] == ["HC", "PD", "iRBD"]
    assert set(man["files"]) == {"anat.npy", "dwi.npy", "func.npy", "mask.npy", "index.tsv"}
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())
    assert np.array_equal(cc.mask, G.grid_mask(GRID)) and cc.present[:, 2].tolist() == [True, True, False]
    # values are zero outside the brain mask and robust z-scores inside
    anat = cc.image("anat", 0)[0]
    assert not anat[~cc.mask].any() and np.abs(anat).max() <= G.ZSCORE_CLIP
    assert not list(d.glob("*.tmp"))


def test_manifest_mismatch_is_a_cache_error(cohort: dict) -> None:
    d = cohort["cache_dir"]
    changes = [("grid", {"cache": {**CFG["cache"], "grid": [64, 64, 64]}}),
               ("dtype", {"cache": {**CFG["cache"], "dtype": "bfloat16"}}),
               ("channels", {"cache": {**CFG["cache"], "dwi_maps": ["FA", "MD", "RD"]}}),
               ("labels", {"participants": {**CFG["participants"], "labels": ["PD", "HC", "iRBD"]}}),
               ("clinical_columns", {"participants": {**CFG["participants"], "clinical_columns": ["age"]}})]
    for key, change in changes:
        with pytest.raises(CacheError) as e:
            C.open_cohort(d, {**CFG, **change}, verify=False)
        msg = str(e.value)
        assert key in msg and "in the cache but" in msg and "snakemake --forcerun cache_cohort" in msg
    with pytest.raises(CacheError, match=r"\[64, 64, 64\] in the config"):
        C.open_cohort(d, {**CFG, "cache": {**CFG["cache"], "grid": [64, 64, 64]}}, verify=False)


def test_corruption_is_caught(cohort: dict, tmp_path: Path) -> None:
    d = tmp_path / "cache"
    shutil.copytree(cohort["cache_dir"], d)
    C.open_cohort(d, CFG)  # intact copy opens
    with open(d / "dwi.npy", "r+b") as f:  # flip one byte in the data, same size
        f.seek(-10, 2)
        b = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CacheError, match="sha256.*does not match") as e:
        C.open_cohort(d, CFG)
    assert "dwi.npy" in str(e.value) and "fix:" in str(e.value)
    C.open_cohort(d, CFG, verify=False)  # the quick check only sees sizes (documented)
    with open(d / "func.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    with pytest.raises(CacheError, match="bytes but the manifest says"):
        C.open_cohort(d, CFG, verify=False)
    (d / "manifest.json").unlink()
    with pytest.raises(CacheError, match="no manifest"):
        C.open_cohort(d, CFG)


def test_never_unpickles(cohort: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    cc = C.open_cohort(cohort["cache_dir"], CFG)
    assert cc.image("dwi", 1).shape == (2, *GRID)
    # an object array planted in the cache (manifest updated to match) is refused, not unpickled
    d = tmp_path / "cache"
    shutil.copytree(cohort["cache_dir"], d)
    np.save(d / "anat.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    man = json.loads((d / "manifest.json").read_text())
    planted = d / "anat.npy"
    man["files"]["anat.npy"].update(bytes=planted.stat().st_size, sha256=C.sha256_file(planted))
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CacheError, match="without pickle"):  # pickle.load would raise AssertionError
        C.open_cohort(d, CFG)


def test_build_cohort_input_errors(cohort: dict, tmp_path: Path) -> None:
    root = cohort["root"]
    tsv = tmp_path / "participants.tsv"
    table = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "diagnosis": ["PD", "HC"], "age": [1, 2],
                          "sex": ["M", "F"], "updrs3": [1, 2]})
    table.to_csv(tsv, sep="\t", index=False)
    with pytest.raises(InputError, match=r"sub-03.*not in participants.tsv"):
        C.build_cohort(cohort["records"], tsv, tmp_path / "c1", CFG)
    table.assign(diagnosis=["PD", "MSA"]).to_csv(tsv, sep="\t", index=False)
    with pytest.raises(InputError, match=r"'MSA' is not one of the configured labels"):
        C.build_cohort(cohort["records"][:2], tsv, tmp_path / "c2", CFG)
    with pytest.raises(CacheError, match=r"sub-01.*grid is \[32, 32, 32\] in the subject cache"):
        C.build_cohort(cohort["records"][:1], root / "participants.tsv", tmp_path / "c3",
                       {**CFG, "cache": {**CFG["cache"], "grid": [16, 16, 16]}})
    with pytest.raises(CacheError, match="dwi channels"):
        C.build_cohort(cohort["records"][:1], root / "participants.tsv", tmp_path / "c4",
                       {**CFG, "cache": {**CFG["cache"], "dwi_maps": ["FA"]}})


def test_subject_maps_and_paths_follow_the_config(tmp_path: Path) -> None:
    maps = C.subject_maps("results", "07", CFG)
    assert maps["anat"] == [paths.derivative("results", "07", "anat_brain_mni")]
    assert [Path(p).name for p in maps["dwi"]] == [
        "sub-07_space-MNI152NLin2009aSym_model-tensor_param-fa_dwimap.nii.gz",
        "sub-07_space-MNI152NLin2009aSym_model-tensor_param-md_dwimap.nii.gz"]
    assert C._channel_names("func", maps["func"]) == ["fALFF", "ReHo"]
    sp = C.subject_paths(tmp_path, "07")
    assert sp["record"] == C.default_record_path({m: sp[m] for m in C.MODALITIES}, "07")
