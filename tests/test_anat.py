"""Tests of neuromoe.preproc.anat: brain extraction, registration to MNI, the anat stage.

A synthetic posed head is built here (not with neuromoe.inputs.synth, to keep this test independent of it):
the MNI template brain (nilearn) wrapped in CSF, skull and scalp shells made by dilation, moved by a
known rigid pose with scipy (not with the code under test), on a 2 mm scanner-aligned LAS grid, with a
smooth multiplicative bias field and Rician noise. The truth brain mask goes through the same pose.
One real head from a package (dipy's ``aniso_vox.nii.gz``, a b=0 image: oblique 4 x 4 x 5 mm) checks
that the masks are sane on real anatomy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from neuromoe import paths
from neuromoe.config import AnatConfig
from neuromoe.errors import StageError
from neuromoe.inputs.imageio import new_image
from neuromoe.preproc import anat, masks
from neuromoe.preproc import registration as reg

POSE_DEG = (6.0, -5.0, 4.0)  # rotation about x, y, z (RAS), degrees
POSE_MM = (6.0, -7.0, 5.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def posed_head(seed: int = 0) -> tuple[nib.Nifti1Image, np.ndarray]:
    """(T1w-like head, truth brain mask) on a 2 mm grid of 100 x 120 x 104 voxels."""
    rng = np.random.default_rng(seed)
    tpl, tpl_mask = anat.mni_template()
    t = np.asarray(tpl.dataobj, dtype=np.float32)
    brain = np.asarray(tpl_mask.dataobj) > 0
    csf, skull, scalp = (ndimage.binary_dilation(brain, iterations=k) for k in (1, 4, 7))  # 2, 8, 14 mm
    head = np.zeros_like(t)
    head[scalp], head[skull], head[csf] = 0.75, 0.06, 0.15  # T1: fat bright, bone dark, CSF dark
    head[brain] = t[brain]
    head = ndimage.gaussian_filter(head, 0.5)
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("xyz", POSE_DEG, degrees=True).as_matrix()
    pose[:3, 3] = POSE_MM
    shape = (100, 120, 104)
    aff = np.array([[-2.0, 0, 0, 99.0], [0, 2.0, 0, -128.0], [0, 0, 2.0, -90.0], [0, 0, 0, 1]])
    vox = np.linalg.inv(tpl.affine) @ np.linalg.inv(pose) @ aff  # subject voxel -> template voxel
    img = ndimage.affine_transform(head, vox[:3, :3], vox[:3, 3], output_shape=shape, order=1)
    truth = ndimage.affine_transform(brain.astype(np.float32), vox[:3, :3], vox[:3, 3],
                                     output_shape=shape, order=1) > 0.5
    g = np.indices(shape, dtype=np.float32)
    bias = np.exp(0.25 * ((g[0] - 50) / 50 + 0.5 * (g[1] - 60) / 60 - 0.5 * ((g[2] - 52) / 52) ** 2))
    img = img * bias  # ~0.7x to 1.4x across the head
    noise = 0.03 * rng.standard_normal((2,) + shape)
    img = np.abs(img + noise[0] + 1j * noise[1])  # Rician, SNR ~ 20 in white matter
    return new_image(1000 * img, aff), truth


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> tuple[dict[str, str], np.ndarray]:
    """run_anat on the posed head (2 mm, affine), outputs written under a temp dir."""
    root = tmp_path_factory.mktemp("anat")
    img, truth = posed_head()
    t1_path = root / "sub-01_T1w.nii.gz"
    nib.save(img, str(t1_path))
    keys = list(anat.OUTPUT_KEYS) + list(anat.QC_KEYS)
    outputs = {k: paths.derivative(root / "out", "01", k) for k in keys}
    anat.run_anat(t1_path, outputs, "01", AnatConfig(registration="affine"), threads=1)
    return outputs, truth


def test_run_anat_writes_every_output_with_its_type(stage):
    outputs, truth = stage
    for k, p in outputs.items():
        assert Path(p).is_file() and Path(p).stat().st_size > 0, k
    mask = nib.load(outputs["anat_mask"])
    assert mask.get_data_dtype() == np.uint8 and mask.shape == truth.shape
    brain = nib.load(outputs["anat_brain"])
    assert brain.get_data_dtype() == np.float32
    b, m = np.asarray(brain.dataobj), np.asarray(mask.dataobj) > 0
    assert np.all(b[~m] == 0) and np.all(b[m] >= 0) and b[m].mean() > 0
    for k in ("anat_brain_mni", "anat_mask_mni"):
        img = nib.load(outputs[k])
        assert img.shape == (99, 117, 95)  # the template's 2 mm grid
        np.testing.assert_allclose(img.affine, anat.mni_template()[0].affine)
        assert int(img.header["sform_code"]) == 4  # MNI152
    assert isinstance(reg.read_transform(outputs["anat_xfm"]), reg.sitk.AffineTransform)


def test_brain_extraction_dice_on_posed_head(stage):
    outputs, truth = stage
    mask = np.asarray(nib.load(outputs["anat_mask"]).dataobj) > 0
    d = dice(mask, truth)
    print(f"brain extraction Dice vs truth: {d:.4f}")
    assert d >= 0.90  # acceptance threshold; ~0.98 measured


def test_mni_mask_overlaps_template_mask(stage):
    outputs, _ = stage
    mask_mni = np.asarray(nib.load(outputs["anat_mask_mni"]).dataobj) > 0
    tpl_mask = np.asarray(anat.mni_template()[1].dataobj) > 0
    d = dice(mask_mni, tpl_mask)
    print(f"MNI mask Dice vs template mask: {d:.4f}")
    assert d >= 0.90  # acceptance threshold; ~0.98 measured


def test_xfm_maps_mni_to_t1w_like_the_known_pose(stage):
    outputs, truth = stage
    tf = reg.read_transform(outputs["anat_xfm"])
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("xyz", POSE_DEG, degrees=True).as_matrix()
    pose[:3, 3] = POSE_MM
    tpl_mask = anat.mni_template()[1]
    xyz = nib.affines.apply_affine(tpl_mask.affine, np.argwhere(np.asarray(tpl_mask.dataobj) > 0)[::25])
    err = np.linalg.norm(nib.affines.apply_affine(reg.transform_to_ras(tf), xyz)
                         - nib.affines.apply_affine(pose, xyz), axis=1)
    assert err.mean() < 2.0  # mm; one voxel at 2 mm


def test_a_scanner_field_of_view_is_cropped_to_the_head_with_the_same_result(stage, caplog):
    """The posed head inside a scanner's field of view (256 x 264 x 256 mm of noisy air around it): brain
    extraction runs on the head's box and gives the head-sized image's mask and transform on the larger grid."""
    import logging

    outputs, truth = stage
    img, _ = posed_head()
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.asarray(img.header.get_zooms()[:3])
    assert anat.head_box(masks.head_mask(data, img.affine), zooms) is None  # the head fills this one: no crop
    rng = np.random.default_rng(1)
    shape, at = (128, 132, 128), (14, 4, 12)
    air = np.abs(30.0 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)))  # the image's Rician air
    box = tuple(slice(a, a + n) for a, n in zip(at, data.shape, strict=True))
    air[box] = data
    shift = np.eye(4)
    shift[:3, 3] = -np.asarray(at, dtype=float)  # voxel i of the large image is voxel i - at of the small one
    large = new_image(air, img.affine @ shift)
    with caplog.at_level(logging.INFO, logger="neuromoe.preproc.anat"):
        res = anat.brain_extraction(large, "01")
    assert "brain extraction on its box" in caplog.text
    mask = np.asarray(res.mask.dataobj) > 0
    assert mask.shape == shape and not mask[:at[0]].any()  # on the large grid, nothing in the air
    small = np.asarray(nib.load(outputs["anat_mask"]).dataobj) > 0
    assert dice(mask[box], small) >= 0.98 and dice(mask[box], truth) >= 0.90
    tpl_mask = anat.mni_template()[1]
    xyz = nib.affines.apply_affine(tpl_mask.affine, np.argwhere(np.asarray(tpl_mask.dataobj) > 0)[::25])
    ref = anat.brain_extraction(img, "01").template_to_t1w  # the head-sized image's template -> T1w transform
    err = np.linalg.norm(nib.affines.apply_affine(reg.transform_to_ras(res.template_to_t1w), xyz)
                         - nib.affines.apply_affine(reg.transform_to_ras(ref), xyz), axis=1)
    assert err.mean() < 1.0  # mm, half a voxel


def _aniso_vox() -> nib.Nifti1Image:
    d = Path(importlib.util.find_spec("dipy").submodule_search_locations[0]) / "data" / "files"
    return nib.load(str(d / "aniso_vox.nii.gz"))


def test_mask_is_sane_on_a_real_head():
    img = _aniso_vox()  # real b=0 head, 58 x 58 x 24 at 4 x 4 x 5 mm, oblique
    brain, mask_img = anat.extract_brain(img, subject="real")
    mask = np.asarray(mask_img.dataobj) > 0
    data = np.asarray(img.dataobj, dtype=np.float32)
    ml = mask.sum() * np.prod(img.header.get_zooms()[:3]) / 1000
    print(f"real head mask: {ml:.0f} ml")
    # An adult brain is ~1.1-1.7 l; the field of view (120 mm high) cuts the vertex and cerebellum.
    assert 900 < ml < 2000
    assert ndimage.label(mask)[1] == 1  # one connected component
    head = masks.head_mask(data, img.affine)
    centroid = np.round(np.argwhere(mask).mean(axis=0)).astype(int)
    assert head[tuple(centroid)] and mask[tuple(centroid)]  # centred in the head, and brain there
    # No brain on the in-plane borders of the field of view (background there).
    assert not mask[[0, -1], :, :].any() and not mask[:, [0, -1], :].any()
    # The mask holds tissue, not background. Air: the four 8 x 8 in-plane corner columns of the image.
    air = np.concatenate([data[:8, :8].ravel(), data[-8:, :8].ravel(), data[:8, -8:].ravel(),
                          data[-8:, -8:].ravel()])
    assert np.mean(data[mask] <= np.percentile(air, 99)) < 0.02  # < 2% of the mask as dark as air
    assert data[mask].mean() > 10 * air.mean()
    # Inside an independent head estimate (3x the air's 99th percentile, holes filled per slice).
    fg = ndimage.gaussian_filter(data, 1.0) > 3 * np.percentile(air, 99)
    indep = np.stack([ndimage.binary_fill_holes(fg[..., k]) for k in range(fg.shape[2])], axis=-1)
    assert np.mean(mask & ~indep) < 0.01 * np.mean(mask)
    # ... and it keeps nearly all bright tissue inside the head's core away from the scalp.
    core = ndimage.binary_erosion(head, iterations=4) & (data > np.percentile(data[head], 50))
    assert np.mean(mask[core]) > 0.95
    assert np.all(np.asarray(brain.dataobj)[~mask] == 0)


@pytest.mark.parametrize("case", ["constant", "4d", "tiny", "nan"])
def test_unusable_t1_raises_stage_error(case):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = {
        "constant": np.full((60, 70, 60), 7.0),
        "4d": np.random.default_rng(0).random((60, 70, 60, 5)),
        "tiny": np.random.default_rng(0).random((10, 10, 10)),
        "nan": np.full((60, 70, 60), np.nan),
    }[case]
    with pytest.raises(StageError) as err:
        anat.extract_brain(new_image(data, aff), subject="09")
    msg = str(err.value)
    assert "sub-09" in msg and "anat" in msg and "fix:" in msg


def test_single_volume_4d_is_accepted_as_3d():
    img = anat.check_t1(new_image(np.random.default_rng(0).random((60, 70, 60, 1)), np.diag([2.0, 2, 2, 1])))
    assert img.shape == (60, 70, 60)


def test_register_to_mni_rejects_mismatched_mask():
    tpl, tpl_mask = anat.mni_template()
    bad = new_image(np.ones((10, 10, 10)), np.eye(4), dtype=np.uint8)
    with pytest.raises(StageError, match="sub-02"):
        anat.register_to_mni(tpl, bad, subject="02")
    with pytest.raises(ValueError, match="kind"):
        anat.register_to_mni(tpl, tpl_mask, kind="rigid")


def test_template_is_the_one_neuromoe_templates_serves():
    # anat reads nilearn's 1 mm file directly (no nilearn.datasets import, ~3 s less per job); the
    # result must be the template and brain mask every other stage uses.
    templates = pytest.importorskip("neuromoe.inputs.templates")
    t1, mask = anat.mni_template()
    np.testing.assert_allclose(t1.affine, templates.mni_t1().affine)
    np.testing.assert_allclose(np.asarray(t1.dataobj), np.asarray(templates.mni_t1().dataobj), atol=1e-6)
    theirs = np.asarray(templates.brain_mask().dataobj) > 0
    np.testing.assert_array_equal(np.asarray(mask.dataobj) > 0, theirs)


def test_mask_building_blocks():
    """neuromoe.preproc.masks: Otsu splits a bimodal sample between its modes; the largest component wins."""
    rng = np.random.default_rng(0)
    low, high = rng.normal(10, 1, 5000), rng.normal(50, 2, 3000)
    thr = masks.otsu_threshold(np.r_[low, high])
    assert (low < thr).mean() > 0.99 and (high > thr).all()
    m = np.zeros((20, 20, 20), bool)
    m[2:5, 2:5, 2:5] = True  # 27 voxels
    m[10:16, 10:16, 10:16] = True  # 216 voxels
    big = masks.largest_component(m)
    assert big.sum() == 216 and big[12, 12, 12] and not big[3, 3, 3]
    assert masks.largest_component(np.zeros((4, 4, 4))).dtype == bool
