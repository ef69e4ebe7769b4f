"""Tests of neuromoe.preproc.qc: each figure is a valid PNG of sensible size; bad input raises
ValueError and writes nothing."""

from __future__ import annotations

import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neuromoe.inputs.imageio import new_image
from neuromoe.preproc import qc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _check_png(path: str, expected: Path) -> None:
    assert Path(path) == expected and expected.is_file()
    w, h = png_size(path)
    # Sensible: large enough to read slices, and well under poster size.
    assert 400 <= w <= 4000 and 200 <= h <= 3000, (w, h)
    assert expected.stat().st_size > 10_000  # a blank figure compresses to a few kB


@pytest.fixture(scope="module")
def head() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A 40 x 48 x 40 ellipsoidal 'head' at 4 mm, oblique-free LAS grid, and its 'brain' mask."""
    g = np.indices((40, 48, 40), dtype=np.float32)
    r = np.sqrt(((g[0] - 20) / 16) ** 2 + ((g[1] - 24) / 20) ** 2 + ((g[2] - 20) / 16) ** 2)
    rng = np.random.default_rng(0)
    data = np.where(r < 1, 100 + 40 * np.sin(g[0] / 2) * np.cos(g[1] / 3), 0) + rng.random(r.shape) * 5
    aff = np.diag([-4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = [80, -96, -80]
    return new_image(data, aff), new_image(r < 0.8, aff, dtype=np.uint8)


def _colour_pixels(path: str | Path, rgb: tuple[int, int, int], tol: int = 40) -> int:
    """How many pixels of the PNG lie within ``tol`` (0-255 per channel) of colour ``rgb``."""
    from matplotlib.image import imread

    px = np.asarray(imread(str(path)))[..., :3] * 255.0
    return int(np.all(np.abs(px - np.asarray(rgb)) <= tol, axis=-1).sum())


def test_mask_outline(head, tmp_path):
    img, mask = head
    out = tmp_path / "figs" / "mask.png"
    _check_png(qc.plot_mask_outline(img, mask, out, "sub-01: brain mask"), out)
    assert _colour_pixels(out, (255, 0, 0)) > 500  # the red outline is drawn on every row


def test_mosaic_tiles_slices_with_blank_gaps():
    a, b = np.zeros((3, 4)), np.ones((3, 4))
    tiles, x0s = qc._mosaic([a, b], gap=2)
    assert tiles.shape == (3, 10) and x0s == [0, 6]
    np.testing.assert_array_equal(tiles[:, 6:], b)
    assert np.isnan(tiles[:, 4:6]).all() and not np.isnan(tiles[:, :4]).any()


def test_anisotropic_voxels(tmp_path):
    """2 x 2 x 6 mm voxels: one mosaic per row still draws (imshow aspect / extents in mm)."""
    g = np.indices((40, 48, 14), dtype=np.float32)
    r = np.sqrt(((g[0] - 20) / 16) ** 2 + ((g[1] - 24) / 20) ** 2 + ((g[2] - 7) / 5) ** 2)
    data = np.where(r < 1, 100 + 40 * np.sin(g[0] / 2), 0).astype(np.float32)
    aff = np.diag([2.0, 2.0, 6.0, 1.0])
    img, mask = new_image(data, aff), new_image(r < 0.8, aff, dtype=np.uint8)
    out = tmp_path / "aniso_mask.png"
    _check_png(qc.plot_mask_outline(img, mask, out, "anisotropic"), out)
    assert _colour_pixels(out, (255, 0, 0)) > 500
    out = tmp_path / "aniso_maps.png"
    _check_png(qc.plot_map_slices({"A": img, "B": new_image(data * r, aff)}, out, "anisotropic", mask=mask), out)


def test_registration_edges(head, tmp_path):
    img, _ = head
    moved = new_image(np.roll(np.asarray(img.dataobj), 2, axis=1), img.affine)
    out = tmp_path / "reg.png"
    _check_png(qc.plot_registration_edges(img, moved, out, "sub-01: T1w in MNI"), out)
    assert _colour_pixels(out, (0xFF, 0x40, 0x40)) > 200  # template edges: outline (red) ...
    assert _colour_pixels(out, (0x40, 0xC0, 0xFF)) > 200  # ... and inner boundary (blue)


def test_map_slices(head, tmp_path):
    img, mask = head
    d = np.asarray(img.dataobj)
    maps = {"FA": new_image(d / d.max(), img.affine), "MD": new_image(1e-3 * (1 + d / d.max()), img.affine)}
    out = tmp_path / "maps.png"
    _check_png(qc.plot_map_slices(maps, out, "sub-01: DTI", mask=mask), out)


@pytest.mark.parametrize("with_fd", [True, False])
def test_motion(tmp_path, with_fd):
    rng = np.random.default_rng(1)
    n = 60
    df = pd.DataFrame(np.cumsum(rng.normal(0, 0.02, (n, 6)), axis=0), columns=list(qc.MOTION_COLUMNS))
    df["framewise_displacement"] = np.abs(rng.normal(0, 0.1, n))  # extra columns are ignored
    out = tmp_path / "motion.png"
    fd = df["framewise_displacement"] if with_fd else None
    _check_png(qc.plot_motion(df, out, "sub-01: BOLD motion", fd=fd), out)


def test_bad_inputs_raise_and_write_nothing(head, tmp_path):
    img, mask = head
    out = tmp_path / "bad.png"
    small = new_image(np.ones((10, 10, 10)), img.affine, dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        qc.plot_mask_outline(img, small, out, "x")
    shifted = new_image(np.asarray(mask.dataobj), img.affine @ np.diag([1.0, 1, 1.5, 1]), dtype=np.uint8)
    with pytest.raises(ValueError, match="affine"):
        qc.plot_mask_outline(img, shifted, out, "x")
    with pytest.raises(ValueError, match="empty"):
        qc.plot_mask_outline(img, new_image(np.zeros(img.shape), img.affine, dtype=np.uint8), out, "x")
    with pytest.raises(ValueError, match="3D"):
        qc.plot_registration_edges(img, new_image(np.zeros(img.shape + (3,)), img.affine), out, "x")
    with pytest.raises(ValueError, match="constant"):
        qc.plot_registration_edges(img, new_image(np.zeros(img.shape), img.affine), out, "x")
    with pytest.raises(ValueError, match="no maps"):
        qc.plot_map_slices({}, out, "x")
    with pytest.raises(ValueError, match="shape"):
        qc.plot_map_slices({"FA": img, "MD": small}, out, "x")
    df = pd.DataFrame(np.zeros((5, 3)), columns=["trans_x", "trans_y", "trans_z"])
    with pytest.raises(ValueError, match="rot_x"):
        qc.plot_motion(df, out, "x")
    full = pd.DataFrame(np.zeros((5, 6)), columns=list(qc.MOTION_COLUMNS))
    with pytest.raises(ValueError, match="fd"):
        qc.plot_motion(full, out, "x", fd=np.zeros(4))
    with pytest.raises(ValueError, match="PNG"):
        qc.plot_mask_outline(img, mask, tmp_path / "mask.jpg", "x")
    assert not out.exists() and not (tmp_path / "mask.jpg").exists()
