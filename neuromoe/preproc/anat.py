"""Anatomical stage (python backend): T1w brain extraction and registration to MNI.

Brain extraction (``extract_brain``) is atlas-based, as in ANTs' antsBrainExtraction, in five steps on
the native T1w grid:

1. head mask (``masks.head_mask``): background threshold (Otsu on the smoothed image, halved so dark
   skull and CSF stay in), largest component, holes filled slice by slice (the skull is a closed ring in
   each axial slice even where the field of view cuts the neck); where the head fills at most 80 % of the
   field of view (a scanner's, with neck and air), steps 2-5 run on the head's box (``head_box``: the mask's
   bounding box and 10 mm of air), and the results are put back on the whole grid;
2. N4 bias-field correction (SimpleITK) estimated on a ~8 mm copy inside the head mask, applied at
   full resolution;
3. localisation: the template brain's centre is placed under the top of the head (scalp + skull are
   ~10 mm), then the MNI template (nilearn's ICBM 2009a, brain only) is registered to the head,
   rigid then affine, mutual information, metric sampled only in and just around the template brain;
4. the template brain mask is pulled onto the T1w grid (a soft prior in [0, 1]);
5. refinement at the edge: each voxel's posterior of "brain" combines the prior (blurred by the
   ~2 mm registration uncertainty) with intensity likelihoods learnt from this image (brain: the
   prior; non-brain: tissue within 12 mm outside it), then the largest component, a closing
   and hole filling. Contrast-agnostic (no T1 intensity assumptions), so it also works on T2/b=0.

``register_to_mni`` then registers the extracted brain to the template brain (affine, or affine + a dense
displacement field: ``registration.dense_warp``) and resamples brain and mask onto the template's 2 mm grid
(99 x 117 x 95).
All transforms follow registration.py's ITK convention; ``anat_xfm`` maps MNI points to T1w points.
``write_outputs`` writes the stage's files for both backends (docs/preprocessing.md).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from neuromoe.config import AnatConfig
from neuromoe.errors import StageError
from neuromoe.inputs.imageio import load_image, new_image, save_map, save_mask, to_sitk
from neuromoe.paths import subject_label
from neuromoe.preproc import registration as reg
from neuromoe.preproc.masks import head_mask, largest_component

log = logging.getLogger(__name__)
STAGE = "anat"
OUTPUT_KEYS = ("anat_mask", "anat_brain", "anat_xfm", "anat_brain_mni", "anat_mask_mni")
QC_KEYS = ("qc_anat_mask", "qc_anat_reg")
SCALP_SKULL_MM = 10.0  # typical scalp + skull + CSF thickness above the brain (localisation only)
PRIOR_SIGMA_MM = 2.0  # registration uncertainty of the warped template mask
NEAR_MM = 12.0  # non-brain intensities are learnt within this distance outside the prior


@dataclass
class BrainExtraction:
    """Everything brain extraction computes, on the T1w grid (X, Y, Z; native space)."""

    brain: nib.Nifti1Image  # bias-corrected T1w inside the mask, 0 outside (float32)
    mask: nib.Nifti1Image  # brain mask (uint8)
    corrected: nib.Nifti1Image  # bias-corrected T1w, whole head (float32)
    prior: nib.Nifti1Image  # template brain mask warped to the T1w grid, in [0, 1] (float32)
    template_to_t1w: sitk.Transform  # affine, maps MNI points (LPS mm) to T1w points
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step


@functools.lru_cache(maxsize=1)
def mni_template() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(T1 template in [0, 1], brain mask uint8) on the 2 mm MNI grid (99 x 117 x 95), from nilearn's files.

    nilearn ships the ICBM 2009a symmetric template at 1 mm, skull-stripped; its 2 mm grid (what
    ``nilearn.datasets.load_mni152_template(resolution=2)`` returns) samples every other 1 mm voxel, so
    striding gives the same values without importing nilearn.datasets (seconds: it imports sklearn).
    The brain mask is the template above 0.2, nilearn's ``load_mni152_brain_mask`` definition.
    """
    path = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
    img = nib.load(str(path / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data /= max(float(data.max()), 1e-6)
    affine = img.affine.copy()
    affine[:3, :3] *= 2.0
    t1 = mni_header(new_image(data[::2, ::2, ::2], affine))
    mask = mni_header(new_image(data[::2, ::2, ::2] > 0.2, affine, dtype=np.uint8))
    return t1, mask


# ---------------------------------------------------------------- input checks

MIN_FINITE = 0.5  # below this share of finite voxels a T1w is refused; above, NaN/inf voxels become 0


def nonfinite_note(t1: nib.Nifti1Image, path: str | Path, subject: str | None = None) -> str:
    """A T1w with NaN or infinite voxels is handled, not refused (they are set to 0 by ``check_t1``): this
    logs a warning naming the file and returns the note for the QC figure's title ("" when all are finite)."""
    bad = float(1.0 - np.isfinite(np.asarray(t1.dataobj, dtype=np.float32)).mean())
    if bad == 0.0:
        return ""
    log.warning("%s: %.2f%% of the voxels of %s are NaN or infinite; set to 0 (check the conversion from DICOM)",
                subject_label(subject), 100 * bad, path)
    return f" ({100 * bad:.1f}% NaN/inf voxels set to 0)"


def check_t1(t1: nib.Nifti1Image, subject: str | None = None) -> nib.Nifti1Image:
    """The T1w as a float32 3D image, or StageError if it cannot be a head (4D, constant, tiny, NaN)."""
    sub = subject_label(subject)
    shape = t1.shape
    if len(shape) == 4 and shape[3] == 1:
        t1 = new_image(np.asarray(t1.dataobj, dtype=np.float32)[..., 0], t1.affine, like=t1)
    elif len(shape) != 3:
        raise StageError(f"the T1w image has shape {shape}; a T1w must be one 3D volume.", subject=sub,
                         stage=STAGE, fix="give the 3D T1w image (a 4D series looks like a BOLD or DWI run).")
    data = np.asarray(t1.dataobj, dtype=np.float32)
    finite = np.isfinite(data)
    if finite.mean() < MIN_FINITE:
        raise StageError(f"{100 * (1 - finite.mean()):.1f}% of the T1w voxels are NaN or infinite: too little "
                         "image to find a head", subject=sub, stage=STAGE,
                         fix="check the conversion from DICOM (dcm2niix); the file holds mostly no image")
    data = np.where(finite, data, 0.0).astype(np.float32)  # a few NaN (some converters' edges): 0, as outside
    if float(np.ptp(data)) <= 0:
        raise StageError("the T1w image is constant (no anatomy).", subject=sub, stage=STAGE,
                         fix="check the conversion from DICOM; the file holds no image.")
    zooms = np.asarray(t1.header.get_zooms()[:3], dtype=float)
    fov_ml = float(np.prod(shape[:3]) * np.prod(zooms)) / 1000.0
    if min(shape[:3]) < 8 or fov_ml < 600:
        raise StageError(f"the T1w field of view is {shape[:3]} voxels = {fov_ml:.0f} ml; a whole head "
                         "needs at least ~600 ml.", subject=sub, stage=STAGE,
                         fix="give a whole-head T1w (check the voxel sizes in the header).")
    return new_image(data, t1.affine, like=t1)


# ---------------------------------------------------------------- brain extraction

def extract_brain(t1: nib.Nifti1Image, subject: str | None = None, *, n4: bool = True,
                  threads: int | None = None) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Skull-strip a T1w image (native grid and space).

    Returns (brain, mask): the bias-corrected T1w inside the brain (float32, 0 outside) and the brain
    mask (uint8), both with ``t1``'s shape (X, Y, Z) and affine. See ``brain_extraction`` for the method
    and the intermediate results.
    """
    res = brain_extraction(t1, subject, n4=n4, threads=threads)
    return res.brain, res.mask


def brain_extraction(t1: nib.Nifti1Image, subject: str | None = None, *, n4: bool = True,
                     threads: int | None = None) -> BrainExtraction:
    """Brain extraction with its intermediates (see the module docstring for the method)."""
    sub = subject_label(subject)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    t1 = check_t1(t1, subject)
    data = np.asarray(t1.dataobj, dtype=np.float32)
    zooms = np.asarray(t1.header.get_zooms()[:3], dtype=float)
    # Clip the few hot voxels (vessels, artefacts) so they do not drive thresholds or histograms.
    hi = float(np.percentile(data, 99.9))
    data = np.clip(data, 0.0, hi)

    head = head_mask(data, t1.affine)
    head_ml = head.sum() * np.prod(zooms) / 1000.0
    if head_ml < 400:
        raise StageError(f"only {head_ml:.0f} ml of the image is above the background; no head found.",
                         subject=sub, stage=STAGE, fix="check that the file is a T1w of a whole head.")
    times["head_mask"] = time.perf_counter() - t0
    box = head_box(head, zooms)
    if box is not None:  # a scanner's field of view: the rest runs on the head, ~half the voxels or fewer
        log.info("%s anat: the head's box is %.0f %% of the field of view; brain extraction on its box %s",
                 sub, 100.0 * np.prod([b.stop - b.start for b in box]) / head.size,
                 " x ".join(f"{b.start}:{b.stop}" for b in box))
        res = brain_extraction(t1.slicer[box], subject, n4=n4, threads=threads)
        res.timings["head_mask"] += times["head_mask"]
        res.timings["total"] = time.perf_counter() - t0
        return uncrop(res, t1, box)

    t = time.perf_counter()
    corrected = n4_correct(data, head, t1.affine, threads=threads) if n4 else data
    corrected_img = new_image(corrected, t1.affine, like=t1)
    times["n4"] = time.perf_counter() - t

    t = time.perf_counter()
    tpl, tpl_mask = mni_template()
    start = _localise(head, t1.affine, tpl_mask)
    # Sample the metric in the template brain and a 6 mm rim around it: the rim (zeros in the template)
    # is what pins the brain edge against the subject's dark CSF/skull; the scalp stays outside it.
    rim = _dilate_mm(np.asarray(tpl_mask.dataobj) > 0, 6.0, tpl.header.get_zooms()[:3])
    # Where the field of view cuts the brain (common: cerebellum, vertex), template points that map
    # outside it drop out of the metric, which then rewards pushing more of them out; sample only the
    # part of the template that starts inside the field of view.
    rim &= _inside_fov(tpl, t1, start, margin_mm=4.0)
    if rim.sum() < 0.25 * (np.asarray(tpl_mask.dataobj) > 0).sum():
        raise StageError("the field of view covers less than a quarter of the brain.", subject=sub,
                         stage=STAGE, fix="give a T1w covering the whole brain (check the header).")
    rim_img = new_image(rim, tpl.affine, dtype=np.uint8)
    tf = _register(tpl, corrected_img, "affine", rim_img, start, sub, threads)
    tf = reg.flatten_linear(tf)
    check_affine(tf, sub)
    times["register_template"] = time.perf_counter() - t

    t = time.perf_counter()
    prior = reg.resample(new_image(np.asarray(tpl_mask.dataobj, dtype=np.float32), tpl.affine), t1,
                         tf.GetInverse(), interp="linear", threads=threads)
    prior_arr = np.clip(np.asarray(prior.dataobj, dtype=np.float32), 0, 1)
    mask = refine_mask(corrected, prior_arr, head, zooms)
    vol_ml = mask.sum() * np.prod(zooms) / 1000.0
    if vol_ml < 300:
        raise StageError(f"the brain mask holds only {vol_ml:.0f} ml; extraction failed.", subject=sub,
                         stage=STAGE, fix="check the T1w (orientation in the header, field of view).")
    times["refine"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    log.info("%s anat: brain extraction %.1f s (%s), mask %.0f ml", sub, times["total"],
             ", ".join(f"{k} {v:.1f}" for k, v in times.items() if k != "total"), vol_ml)
    return BrainExtraction(
        brain=new_image(np.where(mask, corrected, 0.0), t1.affine, like=t1),
        mask=new_image(mask, t1.affine, like=t1, dtype=np.uint8),
        corrected=corrected_img,
        prior=new_image(prior_arr, t1.affine, like=t1),
        template_to_t1w=tf,
        timings=times,
    )


CROP_MARGIN_MM = 10.0  # air kept around the head when brain extraction works on the head's box
CROP_MAX_FRACTION = 0.8  # crop only when the box holds at most this fraction of the image's voxels


def head_box(head: np.ndarray, zooms: np.ndarray, margin_mm: float = CROP_MARGIN_MM) -> tuple[slice, ...] | None:
    """The head mask's bounding box grown by ``margin_mm`` (within the image), or None where that box holds more
    than ``CROP_MAX_FRACTION`` of the image (a field of view already close to the head: nothing to gain).

    A scanner's T1w field of view (e.g. 256 x 256 x 192 mm with the neck and much air) holds about twice the
    voxels of the head; N4, the template registration and the mask refinement cost in proportion (FSL's
    ``robustfov`` and ANTs' cropping do the same before brain extraction)."""
    idx = np.argwhere(head)
    if idx.size == 0:
        return None
    pad = np.ceil(margin_mm / np.asarray(zooms, dtype=float)).astype(int)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, head.shape)
    if np.prod(hi - lo) > CROP_MAX_FRACTION * head.size:
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def uncrop(res: BrainExtraction, full: nib.Nifti1Image, box: tuple[slice, ...]) -> BrainExtraction:
    """``res`` (brain extraction on ``full.slicer[box]``) on ``full``'s grid: 0 outside the box. The
    transform needs nothing: the box keeps every voxel's place in the world."""

    def paste(img: nib.Nifti1Image, dtype: type) -> nib.Nifti1Image:
        arr = np.zeros(full.shape[:3], dtype=dtype)
        arr[box] = np.asarray(img.dataobj, dtype=dtype)
        return new_image(arr, full.affine, like=full, dtype=dtype)

    return BrainExtraction(brain=paste(res.brain, np.float32), mask=paste(res.mask, np.uint8),
                           corrected=paste(res.corrected, np.float32), prior=paste(res.prior, np.float32),
                           template_to_t1w=res.template_to_t1w, timings=res.timings)


def n4_correct(data: np.ndarray, mask: np.ndarray, affine: np.ndarray, threads: int | None = None,
               target_mm: float = 8.0) -> np.ndarray:
    """N4-corrected copy of ``data`` (X, Y, Z): the bias is fitted on a ~``target_mm`` copy, applied
    at full resolution; the mean intensity inside ``mask`` is kept."""
    img = new_image(np.maximum(data, 0), affine)
    im = to_sitk(img)
    # N4 works on log intensities: zero voxels (clipped, padded) inside the mask must stay out of the fit.
    m = to_sitk(new_image(mask & (data > 0), affine, dtype=np.uint8), dtype=np.uint8)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    factors = [max(1, int(round(target_mm / z))) for z in zooms]
    with reg.itk_threads(threads):
        small, small_m = sitk.Shrink(im, factors), sitk.Shrink(m, factors)
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        # Two fitting levels on an ~8 mm copy: the field is smooth, and this keeps N4 near 1 s at 2 mm.
        n4.SetMaximumNumberOfIterations([20, 20])
        n4.SetNumberOfHistogramBins(64)
        n4.SetConvergenceThreshold(1e-4)
        n4.Execute(small, small_m)
        log_bias = n4.GetLogBiasFieldAsImage(im)
    bias = np.exp(sitk.GetArrayFromImage(log_bias).T.astype(np.float32))
    bias /= float(np.mean(bias[mask])) if mask.any() else 1.0
    return (data / bias).astype(np.float32)


def refine_mask(image: np.ndarray, prior: np.ndarray, head: np.ndarray, zooms: np.ndarray) -> np.ndarray:
    """Brain mask (bool, X, Y, Z) from a warped-template prior in [0, 1] and this image's intensities.

    Posterior(brain) = p L_b(I) / (p L_b(I) + (1 - p) L_n(I)), with p the prior blurred by the
    registration uncertainty and L_b, L_n intensity histograms of the head inside the prior (p > 0.5)
    and within ``NEAR_MM`` outside it. Only the edge can change: deep inside p ~ 1, far out p ~ 0; and
    only intensities that tell the classes apart move it: partial-volume values, found on both sides
    of the edge, have L_b ~ L_n and leave the prior's decision (on synthetic heads a 4.5 mm
    registration error, Dice 0.947, is refined to 0.965, while an exact one loses < 0.01).
    """
    zooms = np.asarray(zooms, dtype=float)
    p = ndimage.gaussian_filter(prior, PRIOR_SIGMA_MM / zooms)
    p = np.clip(p, 1e-4, 1 - 1e-4)
    inside = prior > 0.5
    dist_out = ndimage.distance_transform_edt(~inside, sampling=zooms)
    core = inside & head
    near = (dist_out > 0) & (dist_out <= NEAR_MM) & head
    if core.sum() < 100 or near.sum() < 100:
        return _clean(inside & head, zooms)
    hi = float(np.percentile(image[head], 99.5))
    bins = np.linspace(0.0, hi, 65)
    lb = _density(image[core], bins)
    ln = _density(image[near], bins)
    idx = np.clip(np.digitize(image, bins) - 1, 0, len(bins) - 2)
    post = p * lb[idx] / (p * lb[idx] + (1 - p) * ln[idx])
    return _clean((post > 0.5) & head, zooms) & head


def _density(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Histogram density on ``bins``, lightly smoothed, floored so no intensity is impossible."""
    h, _ = np.histogram(values, bins=bins)
    h = ndimage.gaussian_filter1d(h.astype(float), 1.0)
    h /= h.sum()
    return np.maximum(h, 1e-3 / len(h))


def _clean(mask: np.ndarray, zooms: np.ndarray) -> np.ndarray:
    """Largest component after cutting thin bridges (opening), then closing and hole filling."""
    ball = _ball(2.0, zooms)
    opened = ndimage.binary_opening(mask, structure=ball)
    out = largest_component(opened if opened.any() else mask)
    out = ndimage.binary_closing(np.pad(out, 3), structure=_ball(4.0, zooms))[3:-3, 3:-3, 3:-3]
    return ndimage.binary_fill_holes(out)


# ---------------------------------------------------------------- registration to MNI

def register_to_mni(brain_img: nib.Nifti1Image, mask_img: nib.Nifti1Image, kind: str = "affine", *,
                    initial: sitk.Transform | None = None, subject: str | None = None,
                    threads: int | None = None) -> tuple[sitk.Transform, nib.Nifti1Image, nib.Nifti1Image]:
    """Register an extracted T1w brain (native grid) to the MNI template brain.

    kind: ``affine`` (12 dof), ``nonlinear`` (affine + a dense displacement field on the template's 2 mm grid:
    bias-corrected demons, ``registration.dense_warp``) or ``bspline`` (affine + cubic B-spline with 40 mm
    control points: the former ``nonlinear``, kept for comparison; bench/registration.py measures all three).
    ``initial``: a linear MNI -> T1w transform to start from (e.g. ``BrainExtraction.template_to_t1w``);
    otherwise the brains' centres of mass are aligned.
    Returns (transform, brain_mni, mask_mni): the transform maps MNI points (LPS mm) to T1w points (ITK,
    use ``registration.resample(t1w_space_img, template, transform)``); brain (float32, linear) and mask
    (uint8, linear > 0.5) on the template's 2 mm grid (99 x 117 x 95).
    """
    if kind not in ("affine", "nonlinear", "bspline"):
        raise ValueError(f"kind must be affine, nonlinear or bspline, got {kind!r}")
    sub = subject_label(subject)
    mask = np.asarray(mask_img.dataobj) > 0
    if mask.shape != brain_img.shape[:3] or not mask.any():
        raise StageError(f"brain mask shape {mask.shape} / {int(mask.sum())} voxels does not fit the "
                         f"brain image {brain_img.shape}.", subject=sub, stage=STAGE,
                         fix="rerun brain extraction for this subject.")
    tpl, tpl_mask = mni_template()
    tpl_brain = new_image(np.asarray(tpl.dataobj) * (np.asarray(tpl_mask.dataobj) > 0), tpl.affine)
    rim = _dilate_mm(np.asarray(tpl_mask.dataobj) > 0, 4.0, tpl.header.get_zooms()[:3])
    moving = new_image(np.where(mask, np.asarray(brain_img.dataobj, dtype=np.float32), 0), brain_img.affine)
    tf = _register(tpl_brain, moving, kind, new_image(rim, tpl.affine, dtype=np.uint8), initial, sub, threads)
    if kind == "affine":
        tf = reg.flatten_linear(tf)
    check_affine(tf if kind == "affine" else tf.GetNthTransform(0), sub)  # a composite's affine part
    brain_mni = reg.resample(brain_img, tpl, tf, interp="linear", threads=threads)
    soft = reg.resample(new_image(mask, mask_img.affine), tpl, tf, interp="linear", threads=threads)
    mask_mni = new_image(np.asarray(soft.dataobj) > 0.5, tpl.affine, dtype=np.uint8)
    brain_mni = new_image(np.asarray(brain_mni.dataobj) * np.asarray(mask_mni.dataobj), tpl.affine)
    return tf, mni_header(brain_mni), mni_header(mask_mni)


# ---------------------------------------------------------------- the stage

def run_anat(t1_path: str | Path, outputs: Mapping[str, str], subject: str, cfg: AnatConfig,
             threads: int | None = None) -> None:
    """The anat stage for one subject: brain extraction, registration to MNI, QC figures.

    ``outputs`` maps neuromoe.paths keys (anat_mask, anat_brain, anat_xfm, anat_brain_mni,
    anat_mask_mni; optional qc_anat_mask, qc_anat_reg) to file paths. ``cfg.registration``: affine | nonlinear.
    """
    check_outputs(outputs, "run_anat")
    kind = str(cfg.registration)
    t0 = time.perf_counter()
    t1 = load_image(t1_path, subject=subject_label(subject))
    note = nonfinite_note(t1, t1_path, subject)
    res = brain_extraction(t1, subject, threads=threads)
    t = time.perf_counter()
    tf, brain_mni, mask_mni = register_to_mni(res.brain, res.mask, kind=kind, initial=res.template_to_t1w,
                                              subject=subject, threads=threads)
    t_mni = time.perf_counter() - t
    write_outputs(outputs, subject, mask=res.mask, brain=res.brain, transform=tf, brain_mni=brain_mni,
                  mask_mni=mask_mni, qc_background=res.corrected,
                  mask_title=f"brain mask on the bias-corrected T1w{note}", method=kind)
    log.info("%s anat: done in %.1f s (extraction %.1f s, MNI %s %.1f s)", subject_label(subject),
             time.perf_counter() - t0, res.timings["total"], kind, t_mni)


def check_outputs(outputs: Mapping[str, str], caller: str) -> None:
    """ValueError unless ``outputs`` has every key of ``OUTPUT_KEYS`` (QC keys are optional)."""
    missing = [k for k in OUTPUT_KEYS if k not in outputs]
    if missing:
        raise ValueError(f"{caller}: outputs lacks {missing}; needs {list(OUTPUT_KEYS)}")


def write_outputs(outputs: Mapping[str, str], subject: str, *, mask: nib.Nifti1Image, brain: nib.Nifti1Image,
                  transform: sitk.Transform, brain_mni: nib.Nifti1Image, mask_mni: nib.Nifti1Image,
                  qc_background: nib.Nifti1Image, mask_title: str, method: str) -> None:
    """Write the anat stage's files (both backends): the native brain (float32) and mask (uint8) on the T1w grid,
    ``anat_xfm`` (ITK, MNI points -> T1w points), brain and mask on the MNI grid (sform/qform code MNI), and the QC
    figures asked for: the mask outlined on ``qc_background`` (titled ``mask_title``) and the MNI brain under
    the template's edges (``method`` names the registration)."""
    save_mask(mask, outputs["anat_mask"])
    save_map(brain, outputs["anat_brain"])
    reg.write_transform(transform, outputs["anat_xfm"])
    save_map(brain_mni, outputs["anat_brain_mni"])
    save_mask(mask_mni, outputs["anat_mask_mni"])
    if any(k in outputs for k in QC_KEYS):
        from neuromoe.preproc import qc  # matplotlib only when figures are asked for

        sub = subject_label(subject)
        if "qc_anat_mask" in outputs:
            qc.plot_mask_outline(qc_background, mask, outputs["qc_anat_mask"], f"{sub}: {mask_title}")
        if "qc_anat_reg" in outputs:
            qc.plot_registration_edges(mni_template()[0], brain_mni, outputs["qc_anat_reg"],
                                       f"{sub}: T1w brain in MNI ({method}), template edges")


# ---------------------------------------------------------------- helpers

def _register(fixed: nib.Nifti1Image, moving: nib.Nifti1Image, kind: str, fixed_mask: nib.Nifti1Image,
              initial: sitk.Transform | None, sub: str | None, threads: int | None) -> sitk.Transform:
    """MI registration template -> T1w; ITK's failures (no overlap, ...) become a StageError."""
    try:
        return reg.register(fixed, moving, kind=kind, metric="mi", fixed_mask=fixed_mask, initial=initial,
                            init="moments", threads=threads)
    except RuntimeError as exc:  # SimpleITK raises RuntimeError with ITK's message
        why = str(exc).strip().splitlines()[-1]
        raise StageError(f"registration to the MNI template failed: {why}", subject=sub, stage=STAGE,
                         fix="check the T1w header orientation and that it shows a whole head.") from exc


def _localise(head: np.ndarray, affine: np.ndarray, tpl_mask: nib.Nifti1Image) -> sitk.Transform:
    """Translation (MNI -> T1w, ITK) putting the template brain just under the top of the head.

    The head's centre of mass is biased by the neck and face (how much depends on the field of view);
    the top of the skull is not, so the brain's height is taken from there and its left-right /
    front-back centre from the top 100 mm of the head.
    """
    xyz = nib.affines.apply_affine(affine, np.argwhere(head))
    top = float(np.percentile(xyz[:, 2], 99.9))
    cranium = xyz[xyz[:, 2] > top - 100.0]
    bxyz = nib.affines.apply_affine(tpl_mask.affine, np.argwhere(np.asarray(tpl_mask.dataobj) > 0))
    b_top = float(np.percentile(bxyz[:, 2], 99.9))
    b_c = bxyz.mean(axis=0)
    target = np.array([cranium[:, 0].mean(), cranium[:, 1].mean(), top - SCALP_SKULL_MM - (b_top - b_c[2])])
    ras = np.eye(4)
    ras[:3, 3] = target - b_c
    return reg.ras_to_transform(ras)


def _inside_fov(fixed: nib.Nifti1Image, moving: nib.Nifti1Image, tf: sitk.Transform,
                margin_mm: float) -> np.ndarray:
    """Boolean mask on ``fixed``'s grid of the points ``tf`` maps at least ``margin_mm`` inside ``moving``."""
    ras = reg.transform_to_ras(tf)  # fixed RAS -> moving RAS
    vox = np.linalg.inv(moving.affine) @ ras @ fixed.affine  # fixed voxel -> moving voxel
    ijk = np.indices(fixed.shape[:3], dtype=np.float32).reshape(3, -1)
    m = (vox[:3, :3] @ ijk + vox[:3, 3:4]).reshape((3,) + fixed.shape[:3])
    zooms = np.asarray(moving.header.get_zooms()[:3], dtype=float)
    inside = np.ones(fixed.shape[:3], dtype=bool)
    for ax in range(3):
        pad = margin_mm / zooms[ax]
        inside &= (m[ax] >= pad - 0.5) & (m[ax] <= moving.shape[ax] - 0.5 - pad)
    return inside


def check_affine(tf: sitk.Transform, sub: str | None) -> None:
    """StageError when the fitted affine is implausible for a head (failed registration)."""
    m = np.asarray(reg.flatten_linear(tf).GetMatrix()).reshape(3, 3)
    scales = np.linalg.svd(m, compute_uv=False)
    if scales.min() < 0.6 or scales.max() > 1.6 or np.linalg.det(m) <= 0:
        raise StageError(f"registration to the MNI template failed (scale factors {np.round(scales, 2)}).",
                         subject=sub, stage=STAGE,
                         fix="check the T1w header orientation (superior must point up) and the image.")


def mni_header(img: nib.Nifti1Image) -> nib.Nifti1Image:
    img.set_sform(img.affine, code=4)  # 4 = MNI152 in the NIfTI standard
    img.set_qform(img.affine, code=4)
    return img


def _ball(radius_mm: float, zooms: np.ndarray) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on a grid of voxel sizes ``zooms``."""
    r = [max(1, int(np.floor(radius_mm / z))) for z in zooms]
    g = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((gi * z / radius_mm) ** 2 for gi, z in zip(g, zooms, strict=True)) <= 1.0


def _dilate_mm(mask: np.ndarray, mm: float, zooms: Any) -> np.ndarray:
    dist = ndimage.distance_transform_edt(~mask, sampling=np.asarray(zooms, dtype=float))
    return dist <= mm
