"""The FSL backend's three stage drivers: FSL's tools for each step they have, then the python stages' shared tails.

``run_anat_fsl``, ``run_dwi_fsl`` and ``run_func_fsl`` write the same files as ``anat.run_anat``, ``dwi.run_dwi``
and ``func.run_func`` (the contract in docs/preprocessing.md): each converts FSL's results to the python
backend's conventions (``transforms``) and hands them to ``anat.write_outputs``, ``dwi.write_outputs`` or
``func.derive_maps`` + ``func.write_outputs``. Every tool runs in a temporary folder with space-free names; inputs
are copied in and outputs written to their final paths by Python (nibabel), so paths with spaces work end to end.
FLIRT's reference is always nilearn's MNI152 2009a template (written to the work folder), never FSL's own
MNI152 (another template on another grid): FLIRT then writes straight onto the grid both backends share.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from neuromoe.errors import InputError, StageError
from neuromoe.paths import subject_label
from neuromoe.preproc.fsl import tools as T
from neuromoe.preproc.fsl import transforms as X

if TYPE_CHECKING:
    from neuromoe.config import AnatConfig, DwiConfig, FslConfig, FuncConfig

log = logging.getLogger("neuromoe.fsl")

# eddy needs an acquisition line even without topup; the readout time only scales a susceptibility field (none here).
DEFAULT_ACQP = "0 1 0 0.05"


# ----------------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------------
def run_anat_fsl(t1_path: str | Path, outputs: Mapping[str, str], subject: str, cfg: AnatConfig, fsl: FslConfig,
                 threads: int | None = 1) -> None:
    """The anat stage with FSL: bet, flirt (12 dof) to the MNI template brain, with ``cfg.registration``
    nonlinear also fnirt (``T1_2_MNI152_2mm``, template mask as ``--refmask``), then the brain and mask resampled
    (flirt -applyxfm or applywarp; mask thresholded at 0.5 with fslmaths). Outputs as ``anat.run_anat``."""
    from neuromoe.inputs.imageio import load_image, new_image
    from neuromoe.preproc import anat

    anat.check_outputs(outputs, "run_anat_fsl")
    nonlinear = cfg.registration == "nonlinear"
    T.require(fsl, cfg.registration, "anat", subject)
    sub = subject_label(subject)
    t0 = time.perf_counter()
    t1 = load_image(t1_path, subject=sub)
    note = anat.nonfinite_note(t1, t1_path, subject)
    t1 = anat.check_t1(t1, subject)
    with T.workdir("anat", subject) as work:
        t1_file = work / "t1w.nii.gz"
        nib.save(t1, str(t1_file))
        tpl_path, tpl_mask_path, tpl = _template_files(work)
        brain, mask = _bet(t1_file, work / "t1w_brain.nii.gz", fsl, work, subject, "anat", "T1w")
        brain_file = work / "t1w_brain.nii.gz"
        mat = work / "t1w_to_mni.mat"
        flirted = work / "t1w_brain_mni_flirt.nii.gz"
        T.run_interface(T.flirt_interface(brain_file, tpl_path, flirted, mat, dof=12), work, subject=subject,
                        stage="anat", step="flirt T1w -> MNI (12 dof)")
        tpl_file_img = nib.load(str(tpl_path))  # the header FLIRT reads
        linear = X.flirt_to_itk(X.read_flirt(T.expect(mat, "flirt", subject, "anat")), brain, tpl_file_img)
        anat.check_affine(linear, sub)
        mask_file = _save_float(mask.astype(np.float32), brain.affine, work / "t1w_mask_float.nii.gz")
        soft_mni, brain_mni_file = work / "t1w_mask_mni_soft.nii.gz", work / "t1w_brain_mni.nii.gz"
        if nonlinear:
            from fsl.transform.fnirt import readFnirt

            coef, warped = work / "t1w_to_mni_coef.nii.gz", work / "t1w_brain_mni_fnirt.nii.gz"
            T.run_interface(T.fnirt_interface(brain_file, tpl_path, mat, tpl_mask_path, coef, warped,
                                              work / "fnirt.log"), work, subject=subject, stage="anat",
                            step="fnirt T1w -> MNI")
            for src, dst in ((brain_file, brain_mni_file), (mask_file, soft_mni)):
                T.run_interface(T.applywarp_interface(src, tpl_path, T.expect(coef, "fnirt", subject, "anat"), dst),
                                work, subject=subject, stage="anat", step=f"applywarp {src.name} -> MNI")
            field = readFnirt(str(coef), src=X.fsl_image(brain), ref=X.fsl_image(tpl_file_img))
            xfm = X.nonlinear_to_itk(field, linear, tpl_file_img)
        else:
            brain_mni_file = flirted
            T.run_interface(T.applyxfm_interface(mask_file, tpl_path, mat, soft_mni), work, subject=subject,
                            stage="anat", step="brain mask -> MNI (flirt -applyxfm)")
            xfm = linear
        mask_mni_file = work / "t1w_mask_mni.nii.gz"
        T.run_interface(T.binarise_interface(T.expect(soft_mni, "MNI mask", subject, "anat"), mask_mni_file), work,
                        subject=subject, stage="anat", step="threshold the MNI mask (fslmaths)")
        mask_mni = np.asarray(nib.load(str(T.expect(mask_mni_file, "fslmaths", subject, "anat"))).dataobj) > 0
        brain_mni = np.asarray(_load(T.expect(brain_mni_file, "MNI brain", subject, "anat")).dataobj) * mask_mni

    anat.write_outputs(
        outputs, subject, mask=new_image(mask, t1.affine, like=t1, dtype=np.uint8),
        brain=new_image(np.where(mask, np.asarray(brain.dataobj), 0.0), t1.affine, like=t1), transform=xfm,
        brain_mni=anat.mni_header(new_image(brain_mni, tpl.affine)),
        mask_mni=anat.mni_header(new_image(mask_mni, tpl.affine, dtype=np.uint8)), qc_background=t1,
        mask_title=f"brain mask (FSL bet) on the T1w{note}", method=f"FSL {'fnirt' if nonlinear else 'flirt'}")
    log.info("%s anat (FSL): done in %.1f s", sub, time.perf_counter() - t0)


def run_dwi_fsl(inputs: Mapping[str, str], outputs: Mapping[str, str], subject: str, cfg: DwiConfig,
                fsl: FslConfig, anat: AnatConfig, threads: int | None = 1) -> Mapping[str, str]:
    """The dwi stage with FSL; outputs as ``dwi.run_dwi``.

    eddy_correct (each volume flirted, 12 dof, to the first b=0) or eddy (``fsl.dwi_correction``) -> b-vectors
    rotated (eddy: its ``.eddy_rotated_bvecs``; eddy_correct: the rotation of each ``.ecclog`` matrix) -> bet on
    the mean corrected b=0 -> dtifit (``--wls`` unless ``cfg.fit_method`` is OLS; dtifit has no NLLS) -> FA, MD,
    AD, RD from its eigenvalues clipped at 0 (``dwi.tensor_scalars``) -> flirt of the b=0 brain to the T1w brain
    (6 dof) -> maps to MNI in one interpolation. ``anat.registration`` decides whether applywarp is needed.
    """
    from neuromoe.inputs.imageio import new_image
    from neuromoe.preproc import dwi as D
    from neuromoe.preproc.motion import rotate_bvecs

    stage = "dwi"
    sub = subject_label(subject)
    b0_threshold, method = float(cfg.b0_threshold), str(cfg.fit_method)
    if method.upper() == "NLLS":
        log.warning("%s: dtifit has no NLLS fit; using its weighted least squares (--wls)", sub)
    T.require(fsl, anat.registration, stage, subject)
    img, bvals, bvecs = D.load_inputs(inputs, subject, b0_threshold)
    b0_idx = np.flatnonzero(bvals <= b0_threshold)
    t0 = time.perf_counter()
    with T.workdir(stage, subject) as work:
        dwi_file = work / "dwi.nii.gz"
        nib.save(img, str(dwi_file))
        bval_file, bvec_file = work / "dwi.bval", work / "dwi.bvec"
        bval_file.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
        bvec_file.write_text("\n".join(" ".join(f"{v:.6f}" for v in np.nan_to_num(row)) for row in bvecs) + "\n")
        t1_file = _copy_in(inputs["anat_brain"], work / "t1w_brain.nii.gz", subject, stage)

        # 1. correction, motion, b-vectors
        if fsl.dwi_correction == "eddy_correct":
            corrected_file = work / "dwi_ec.nii.gz"
            T.run_interface(T.dwi_correction_interface(fsl, dwi_file, work, int(b0_idx[0]), "", "", "", bvec_file,
                                                       bval_file), work, subject=subject, stage=stage,
                            step="eddy_correct")
            vol_to_ref = X.read_ecclog(T.expect(work / "dwi_ec.ecclog", "eddy_correct", subject, stage))
            corrected = _load(T.expect(corrected_file, "eddy_correct", subject, stage))
        else:
            raw_b0 = new_image(np.asarray(img.dataobj, np.float32)[..., b0_idx].mean(-1), img.affine)
            nib.save(raw_b0, str(work / "b0_raw.nii.gz"))
            _bet(work / "b0_raw.nii.gz", work / "b0_raw_brain.nii.gz", fsl, work, subject, stage, "raw mean b=0")
            (work / "index.txt").write_text(" ".join(["1"] * img.shape[3]) + "\n")
            (work / "acqp.txt").write_text(DEFAULT_ACQP + "\n")
            T.run_interface(T.dwi_correction_interface(fsl, dwi_file, work, int(b0_idx[0]),
                                                       work / "b0_raw_brain_mask.nii.gz", work / "index.txt",
                                                       work / "acqp.txt", bvec_file, bval_file, threads=threads or 1),
                            work, subject=subject, stage=stage, step="eddy")
            corrected_file = T.expect(work / "eddy.nii.gz", "eddy", subject, stage)
            corrected = _load(corrected_file)
            params = np.loadtxt(str(T.expect(work / "eddy.eddy_parameters", "eddy", subject, stage)), ndmin=2)
            vol_to_ref = None
            ref_to_vol_fsl = X.eddy_params_to_matrices(params[:, :6], img)
        data_c = np.asarray(corrected.dataobj, np.float32)

        # 2. mask on the mean corrected b=0
        b0_mean = new_image(data_c[..., b0_idx].mean(-1), img.affine)
        nib.save(b0_mean, str(work / "b0.nii.gz"))
        _, mask = _bet(work / "b0.nii.gz", work / "b0_brain.nii.gz", fsl, work, subject, stage, "mean b=0")
        centre = _centroid_ras(mask, img.affine)
        if vol_to_ref is not None:
            motion = X.flirt_motion(vol_to_ref, img, centre)
            bvecs_rot = rotate_bvecs(bvecs, motion.attrs["rotations"], img.affine)
        else:
            motion = X.eddy_motion(ref_to_vol_fsl, img, centre)
            bvecs_rot = np.loadtxt(str(T.expect(work / "eddy.eddy_rotated_bvecs", "eddy", subject, stage)), ndmin=2)
        rot_file = work / "dwi_rotated.bvec"
        rot_file.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs_rot) + "\n")

        # 3. tensor
        T.run_interface(T.dtifit_interface(corrected_file, work / "b0_brain_mask.nii.gz", rot_file, bval_file,
                                           work / "dti", wls=method.upper() != "OLS"), work, subject=subject,
                        stage=stage, step="dtifit")
        evals = np.stack([np.asarray(_load(T.expect(work / f"dti_L{k}.nii.gz", "dtifit", subject, stage)).dataobj)
                          for k in (1, 2, 3)], axis=-1)
        evals = -np.sort(-np.clip(np.nan_to_num(evals), 0.0, None), axis=-1)
        scalars = D.tensor_scalars(evals)
        maps = {m: new_image(np.where(mask, scalars[m], 0.0), img.affine) for m in D.MAPS}
        map_files = {m: _save_float(np.asarray(maps[m].dataobj), img.affine, work / f"{m}.nii.gz") for m in D.MAPS}

        # 4. b=0 brain -> T1w brain (6 dof), maps -> MNI
        b0_brain_file = work / "b0_brain.nii.gz"
        dwi_to_t1 = work / "dwi_to_t1w.mat"
        T.run_interface(T.flirt_interface(b0_brain_file, t1_file, work / "b0_in_t1w.nii.gz", dwi_to_t1, dof=6), work,
                        subject=subject, stage=stage, step="flirt b=0 -> T1w (6 dof)")
        xfm = X.flirt_to_itk(X.read_flirt(T.expect(dwi_to_t1, "flirt", subject, stage)),
                             nib.load(str(b0_brain_file)), nib.load(str(t1_file)), rigid=True)
        mni = _maps_to_mni(map_files, dwi_to_t1, t1_file, inputs["anat_xfm"], work, subject, stage)

    D.write_outputs(outputs, subject, dwi=img, corrected=data_c, bvals=bvals, bvecs=bvecs_rot, mask=mask,
                    motion=motion, maps=maps, maps_mni=mni, transform=xfm)
    log.info("%s dwi (FSL %s): done in %.1f s; mask %d voxels, median FA %.2f", sub, fsl.dwi_correction,
             time.perf_counter() - t0, int(mask.sum()), float(np.median(scalars["FA"][mask])))
    return outputs


def run_func_fsl(inputs: Mapping[str, str], outputs: Mapping[str, str], subject: str, cfg: FuncConfig,
                 fsl: FslConfig, anat: AnatConfig, threads: int | None = 1) -> Mapping[str, str]:
    """The func stage with FSL; outputs as ``func.run_func``.

    fslroi drops ``cfg.dummy_scans`` -> mcflirt ``-plots`` (reference: the middle volume, as the python backend)
    -> fslmaths -Tmean -> bet on the mean BOLD -> flirt to the T1w brain (6 dof) -> ``func.derive_maps`` (tissue
    signals, confounds, nuisance regression, fALFF, ReHo: FSL has no tool for these) -> maps to MNI.
    """
    from neuromoe.inputs.imageio import new_image
    from neuromoe.preproc import func as F
    from neuromoe.preproc import registration as reg

    stage = "func"
    sub = subject_label(subject)
    n_dummy, band = int(cfg.dummy_scans), F.band_hz(cfg)
    T.require(fsl, anat.registration, stage, subject)
    tr = F.repetition_time(inputs["bold_json"], subject)
    if not Path(inputs["bold"]).exists():
        raise InputError("file not found.", subject=sub, path=inputs["bold"], fix="check the BIDS dataset.")
    raw = nib.load(str(inputs["bold"]))
    # The volume-count check of the python backend, on a stand-in of the same length (no voxel data read).
    F.drop_dummy_scans(nib.Nifti1Image(np.zeros((1, 1, 1, raw.shape[3] if raw.ndim == 4 else 1), np.int8),
                                       np.eye(4)) if raw.ndim == 4 else raw, n_dummy, tr, f_low=band[0],
                       subject=subject)
    t0 = time.perf_counter()
    with T.workdir(stage, subject) as work:
        bold_file = _copy_in(inputs["bold"], work / "bold.nii.gz", subject, stage)
        t1_file = _copy_in(inputs["anat_brain"], work / "t1w_brain.nii.gz", subject, stage)
        if n_dummy:
            trimmed = work / "bold_trimmed.nii.gz"
            T.run_interface(T.fslroi_interface(bold_file, trimmed, n_dummy), work, subject=subject, stage=stage,
                            step=f"fslroi (drop {n_dummy} dummy scans)")
            bold_file = T.expect(trimmed, "fslroi", subject, stage)
        img = nib.load(str(bold_file))
        n_t = img.shape[3]
        ref_vol = n_t // 2
        reference = np.asarray(img.dataobj[..., ref_vol], np.float32)
        mc_file = work / "bold_mc.nii.gz"
        T.run_interface(T.mcflirt_interface(bold_file, mc_file, ref_vol), work, subject=subject, stage=stage,
                        step="mcflirt")
        par_file = next((p for p in (work / "bold_mc.nii.gz.par", work / "bold_mc.par") if p.exists()), None)
        if par_file is None:
            raise StageError("mcflirt wrote no .par file", subject=sub, stage=stage,
                             fix="read mcflirt's output in the rule's log")
        mean_file = work / "bold_mean.nii.gz"
        T.run_interface(T.tmean_interface(T.expect(mc_file, "mcflirt", subject, stage), mean_file), work,
                        subject=subject, stage=stage, step="fslmaths -Tmean")
        _, mask = _bet(T.expect(mean_file, "fslmaths", subject, stage), work / "bold_brain.nii.gz", fsl, work,
                       subject, stage, "mean BOLD")
        data = np.asarray(_load(mc_file).dataobj, np.float32)
        affine = img.affine
        mask &= data.min(axis=3) > 0  # voxels that left the field of view hold zeros in some volumes
        if mask.sum() < 100:
            raise StageError(f"the BOLD brain mask is (nearly) empty ({int(mask.sum())} voxels)", subject=sub,
                             stage=stage, path=inputs["bold"], fix="check that the BOLD volumes contain a head")
        motion = X.par_to_motion(X.read_par(par_file), img, reference, _centroid_ras(mask, affine))
        bold_to_t1 = work / "bold_to_t1w.mat"
        T.run_interface(T.flirt_interface(work / "bold_brain.nii.gz", t1_file, work / "bold_in_t1w.nii.gz",
                                          bold_to_t1, dof=6), work, subject=subject, stage=stage,
                        step="flirt mean BOLD -> T1w (6 dof)")
        mean_img = new_image(data.mean(axis=3), affine)
        xfm = X.flirt_to_itk(X.read_flirt(T.expect(bold_to_t1, "flirt", subject, stage)),
                             nib.load(str(work / "bold_brain.nii.gz")), nib.load(str(t1_file)), rigid=True)

        mni_to_bold = reg.compose(reg.read_transform(inputs["anat_xfm"]), xfm)
        series = data[mask]
        del data
        derived = F.derive_maps(series, mask, affine, mean_img, motion, mni_to_bold, tr, cfg, subject=subject,
                                bold_path=inputs["bold"], threads=threads or 1, maps=F.wanted_maps(outputs))
        map_files = {k: _save_float(np.asarray(v.dataobj), affine, work / f"{k}.nii.gz")
                     for k, v in derived.maps.items()}
        mni = _maps_to_mni(map_files, bold_to_t1, t1_file, inputs["anat_xfm"], work, subject, stage)

    F.write_outputs(outputs, subject, bold=img, tr=tr, mask=mask, derived=derived, maps_mni=mni, transform=xfm,
                    qc_note="FSL", motion_source="mcflirt")
    log.info("%s func (FSL): done in %.1f s", sub, time.perf_counter() - t0)
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# Steps the stages share
# ----------------------------------------------------------------------------------------------------------------
def _load(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine, img.header)


def _save_float(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    from neuromoe.inputs.imageio import new_image

    nib.save(new_image(data, affine), str(path))
    return path


def _centroid_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _template_files(work: Path) -> tuple[Path, Path, nib.Nifti1Image]:
    """The MNI template brain and its mask as NIfTI files in ``work`` (the FLIRT/applywarp reference)."""
    from neuromoe.inputs.imageio import new_image
    from neuromoe.preproc.anat import mni_template

    tpl, tpl_mask = mni_template()
    m = np.asarray(tpl_mask.dataobj) > 0
    brain = new_image(np.asarray(tpl.dataobj, np.float32) * m, tpl.affine)
    t1_path, mask_path = work / "mni_brain.nii.gz", work / "mni_mask.nii.gz"
    nib.save(brain, str(t1_path))
    nib.save(new_image(m, tpl.affine, dtype=np.uint8), str(mask_path))
    return t1_path, mask_path, brain


def _copy_in(src: str | Path, dst: Path, subject: str | None, stage: str) -> Path:
    if not Path(src).exists():
        raise InputError("file not found.", subject=subject_label(subject), path=src,
                         fix="check the BIDS dataset or rerun the stage that writes it.")
    if str(src).endswith(".nii") and dst.name.endswith(".nii.gz"):
        dst = dst.with_suffix("")  # an uncompressed input stays uncompressed under its working name
    shutil.copyfile(src, dst)
    return dst


def _maps_to_mni(maps: Mapping[str, Path], native_to_t1: Path, t1_path: Path, anat_xfm: str | Path, work: Path,
                 subject: str, stage: str) -> dict[str, nib.Nifti1Image]:
    """Native maps -> MNI 2 mm grid in one interpolation: flirt -applyxfm with the concatenated matrix
    native -> T1w -> MNI (affine ``anat_xfm``) or applywarp --premat native -> T1w --warp T1w -> MNI."""
    from neuromoe.inputs.imageio import new_image
    from neuromoe.preproc import registration as reg

    tpl_path, _, template = _template_files(work)
    tpl, t1 = nib.load(str(tpl_path)), nib.load(str(t1_path))  # the headers FLIRT reads
    tf = reg.read_transform(anat_xfm)
    out: dict[str, nib.Nifti1Image] = {}
    if tf.IsLinear():
        t1_to_mni = X.itk_to_flirt(tf, t1, tpl)
        combined = X.write_flirt(t1_to_mni @ X.read_flirt(native_to_t1), work / f"{stage}_to_mni.mat")
        for name, path in maps.items():
            dst = work / f"{name}_mni.nii.gz"
            T.run_interface(T.applyxfm_interface(path, tpl_path, combined, dst), work, subject=subject, stage=stage,
                            step=f"{name} -> MNI (flirt -applyxfm)")
            out[name] = new_image(np.asarray(_load(T.expect(dst, name, subject, stage)).dataobj), template.affine)
    else:
        warp = X.itk_to_fnirt_warp(tf, t1, tpl, work / "t1w_to_mni_warp.nii.gz")
        for name, path in maps.items():
            dst = work / f"{name}_mni.nii.gz"
            T.run_interface(T.applywarp_interface(path, tpl_path, warp, dst, premat=native_to_t1, relative=True),
                            work, subject=subject, stage=stage, step=f"{name} -> MNI (applywarp)")
            out[name] = new_image(np.asarray(_load(T.expect(dst, name, subject, stage)).dataobj), template.affine)
    return out


def _bet(in_path: Path, out_path: Path, fsl: FslConfig, work: Path, subject: str, stage: str, what: str
         ) -> tuple[nib.Nifti1Image, np.ndarray]:
    """bet ``-m`` on ``in_path``: (brain image, mask bool); StageError when the mask is (nearly) empty."""
    T.run_interface(T.bet_interface(in_path, out_path, fsl), work, subject=subject, stage=stage, step=f"bet ({what})")
    brain = _load(T.expect(out_path, "bet", subject, stage))
    mask = np.asarray(nib.load(str(T.expect(work / (T.stem(out_path) + "_mask.nii.gz"), "bet", subject, stage))
                                 ).dataobj) > 0
    if mask.sum() < 100:
        raise StageError(f"bet found no brain in the {what} ({int(mask.sum())} voxels)", subject=subject_label(subject),
                         stage=stage, fix="check the image, or change preprocessing.fsl.bet_frac (smaller keeps more)")
    return brain, mask
