"""FSL preprocessing backend: the same stages, outputs and file names as the python backend, run with FSL's tools.

``run_anat_fsl``, ``run_dwi_fsl`` and ``run_func_fsl`` take the same arguments as ``anat.run_anat``,
``dwi.run_dwi`` and ``func.run_func`` and write the same ``neuromoe.paths`` outputs: same names, same dtypes
(maps float32, masks uint8), MNI maps on the same 2 mm MNI152 2009a grid (99 x 117 x 95, the template
nilearn ships), transforms as ITK text files in the python backend's convention (see ``registration.py``),
motion tables with the same columns and conventions (see ``motion.py``). Downstream rules cannot tell which
backend ran.

Each FSL call is a nipype interface built by a small function of paths and options (``bet_interface``,
``flirt_interface``, ...), so tests check the exact argv (``.cmdline``) without FSL. The argv is run with
``subprocess`` from ``shlex.split(interface.cmdline)``: no shell, and nipype quotes every path (the two
interfaces where nipype 1.11 does not, ``dtifit -o`` and ``fnirt --cout/--iout/--logout``, are subclassed
here to quote them). Every tool runs in a temporary folder with space-free names (FSL's own shell scripts,
eddy_correct among them, do not quote their arguments); inputs are copied in, outputs are written to their
final paths by Python (nibabel), so paths with spaces work end to end.

Steps
-----
anat: bet on the T1w (``-f bet_frac -g bet_gradient``, ``-R`` when ``bet_robust``, ``-m``) -> flirt of the
brain to the MNI template brain (12 dof, correlation ratio) -> optionally fnirt (``preprocessing.fsl.nonlinear``,
FSL's ``T1_2_MNI152_2mm`` schedule, template brain mask as ``--refmask``) -> flirt -applyxfm / applywarp of the
brain and mask (trilinear; mask thresholded at 0.5 with fslmaths).
dwi: eddy_correct (default; each volume flirted (12 dof) to the first b=0) or eddy
(``preprocessing.fsl.dwi_correction``) -> b-vectors rotated (eddy: its ``.eddy_rotated_bvecs``; eddy_correct:
the rotation of each ``.ecclog`` matrix, ``motion.rotate_bvecs``) -> bet ``-m`` on the mean corrected b=0 ->
dtifit (``--wls`` when ``preprocessing.dwi.fit_method`` is WLS) -> FA, MD, AD = L1, RD = (L2 + L3) / 2 from
dtifit's eigenvalues clipped at 0 (``dwi.tensor_scalars``) -> flirt of the b=0 brain to the T1w brain (6 dof)
-> maps to MNI in one interpolation: flirt -applyxfm with the matrix dwi -> T1w -> MNI (affine anat) or
applywarp --premat dwi -> T1w --warp T1w -> MNI (nonlinear anat).
func: fslroi drops the dummy scans -> mcflirt ``-plots`` (reference: the middle volume, as the python backend)
-> fslmaths -Tmean -> bet ``-m`` on the mean BOLD -> flirt to the T1w brain (6 dof) -> WM/CSF template priors,
confounds (motion from the .par, FD, DVARS), nuisance regression, fALFF and ReHo in Python
(``neuromoe.preproc.func``; FSL has no fALFF/ReHo tool) -> maps to MNI as for dwi.

The template
------------
FLIRT's reference is always nilearn's MNI152 2009a template (written to a temporary NIfTI), never
``$FSLDIR/data/standard/MNI152_T1_2mm_brain``: that one is another template (MNI152 6th generation, space
``MNI152NLin6Asym``) on another grid (91 x 109 x 91), so outputs registered to it would carry a wrong space label
and would need a second interpolation onto the 99 x 117 x 95 grid. With nilearn's template as ``-ref``, FLIRT
writes straight onto the grid both backends share.

Conversions (world = RAS mm, the NIfTI affine's space; ITK physical points are LPS)
-----------------------------------------------------------------------------------
- FLIRT matrix -> ITK (``flirt_to_itk``): a FLIRT matrix maps the ``-in`` image's FSL coordinates (voxels scaled
  by pixdim, x reversed when the affine has a positive determinant) to the ``-ref`` image's. fslpy's
  ``fromFlirt(mat, src, ref, "world", "world")`` turns it into a world -> world map W (src -> ref); the ITK file
  stores its inverse (ref points -> src points), because ITK transforms map fixed (= FLIRT's -ref) points to
  moving (= -in) points: ``anat_xfm`` maps MNI points to T1w points, ``dwi_xfm`` / ``func_xfm`` map T1w points
  to dwi / BOLD points, exactly what ``registration.register(fixed, moving)`` returns. Rigid (6 dof) results
  are written as Euler3DTransform, affine ones as AffineTransform, as the python backend does.
  ``itk_to_flirt`` is the inverse, used to concatenate ``anat_xfm`` with a dwi/BOLD -> T1w FLIRT matrix.
- FNIRT -> ITK (``nonlinear_to_itk``): the fnirt field (read with fslpy) is sampled at every template voxel,
  giving the T1w point y(x) of each MNI point x; with A the affine (FLIRT) part, the residual
  b(x) = A^-1(y(x)) - x is fitted (least squares, separable, exact on the grid up to the spline's resolution) by
  an ITK cubic B-spline with control points ``NONLINEAR_MESH_MM`` apart, and ``anat_xfm`` is the ITK composite
  [A, b] (b applied first), the structure the python backend writes for its nonlinear registration.
  ``itk_to_fnirt_warp`` goes back: the ITK transform evaluated on the template grid is written as a FNIRT
  relative displacement field (fslpy ``toFnirt``) for applywarp.
- Motion: every FSL result is turned into a 4x4 map M_k from the reference volume to volume k in world space,
  and then into the python backend's parameters (``motion_from_affines``): M_k = R (x - c) + c + t with c the
  centroid of the brain mask, R = Rz Ry Rx (``motion.rotation_matrix``), t = the displacement of c. mcflirt's
  ``.par`` row is (rx, ry, rz, tx, ty, tz): FSL's ``construct_rotmat_euler`` gives the FLIRT matrix
  volume -> reference, rotation ``make_rot(x) make_rot(y) make_rot(z)`` about mcflirt's centre (the centre of
  gravity of the reference volume, minimum subtracted, in FSL coordinates) plus the translation
  (``par_to_flirt``); fslpy maps it to world and it is inverted. eddy_correct's ``.ecclog`` holds the FLIRT
  matrices volume -> reference (12 dof: R is the closest rotation, t still the displacement of c). eddy's
  ``.eddy_parameters`` (tx, ty, tz, rx, ry, rz) give TOPUP's ``MovePar2Matrix`` (the same Euler construction
  about the centre of the field of view), eddy's "forward movement matrix" from the reference to the volume.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pandas as pd

from neuromoe.errors import InputError, StageError

if TYPE_CHECKING:  # SimpleITK and nipype cost ~1 s each to import; loaded where used
    import SimpleITK as sitk

log = logging.getLogger("neuromoe.fsl")

MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
OUTPUT_TYPE = "NIFTI_GZ"
FNIRT_CONFIG = "T1_2_MNI152_2mm"  # FSL's schedule for T1w -> MNI152 at 2 mm ($FSLDIR/etc/flirtsch)
NONLINEAR_MESH_MM = 10.0  # control-point spacing of the ITK B-spline that stores the fnirt warp (fnirt's knots: 10 mm)
EDDY_COMMANDS = ("eddy", "eddy_cpu", "eddy_openmp")  # FSL >= 6.0.6 installs eddy (+ eddy_cpu); older ones eddy_openmp
# eddy needs an acquisition line even without topup; the readout time only scales a susceptibility field (none here).
DEFAULT_ACQP = "0 1 0 0.05"
_F = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS

FSL_FIX = (
    "run the workflow with `snakemake --use-conda` (envs/fsl.yaml installs FSL's conda packages and sets FSLDIR "
    "and FSLOUTPUTTYPE), or install FSL (https://fsl.fmrib.ox.ac.uk) and set FSLDIR and FSLOUTPUTTYPE=NIFTI_GZ "
    "with $FSLDIR/bin on PATH, or choose `preprocessing.backend: python` in config.yaml (no FSL needed)."
)


# ----------------------------------------------------------------------------------------------------------------
# Options and the environment check
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FslOptions:
    """``preprocessing.fsl`` of config.yaml."""

    bet_frac: float = 0.5
    bet_gradient: float = 0.0
    bet_robust: bool = True
    dwi_correction: str = "eddy_correct"
    nonlinear: bool = False


def fsl_options(config: Mapping[str, Any] | None) -> FslOptions:
    """FslOptions from the workflow config (or its ``preprocessing`` section); absent keys take the defaults."""
    config = config or {}
    pre = config.get("preprocessing", config)
    section = dict(pre.get("fsl", {}) or {})
    unknown = sorted(set(section) - set(FslOptions.__dataclass_fields__))
    if unknown:
        raise ValueError(f"preprocessing.fsl: unknown keys {unknown}; known: {sorted(FslOptions.__dataclass_fields__)}")
    opts = FslOptions(**section)
    if not 0.0 < float(opts.bet_frac) < 1.0:
        raise ValueError(f"preprocessing.fsl.bet_frac must be in (0, 1), got {opts.bet_frac}")
    if not -1.0 <= float(opts.bet_gradient) <= 1.0:
        raise ValueError(f"preprocessing.fsl.bet_gradient must be in [-1, 1], got {opts.bet_gradient}")
    if opts.dwi_correction not in ("eddy", "eddy_correct"):
        raise ValueError(f"preprocessing.fsl.dwi_correction must be eddy or eddy_correct, got {opts.dwi_correction!r}")
    return opts


def required_tools(options: FslOptions | None = None, stage: str | None = None) -> list[tuple[tuple[str, ...], str]]:
    """The FSL programs a run needs: (alternatives, what for), for one stage (anat, dwi, func) or all of them."""
    o = options or FslOptions()
    correction = ("eddy_correct",) if o.dwi_correction == "eddy_correct" else EDDY_COMMANDS
    tools = {
        "anat": [(("bet",), "brain extraction"), (("flirt",), "registration to MNI"),
                 (("fslmaths",), "MNI brain mask")],
        "dwi": [(correction, f"DWI correction ({o.dwi_correction})"), (("bet",), "b=0 brain mask"),
                (("dtifit",), "tensor fit"), (("flirt",), "b=0 -> T1w registration and MNI resampling")],
        "func": [(("fslroi",), "dummy scans"), (("mcflirt",), "motion correction"), (("fslmaths",), "mean BOLD"),
                 (("bet",), "BOLD brain mask"), (("flirt",), "BOLD -> T1w registration and MNI resampling")],
    }
    if o.nonlinear:
        tools["anat"] += [(("fnirt",), "nonlinear registration to MNI"), (("applywarp",), "MNI resampling")]
        tools["dwi"] += [(("applywarp",), "MNI resampling")]
        tools["func"] += [(("applywarp",), "MNI resampling")]
    out: list[tuple[tuple[str, ...], str]] = []
    for st in ([stage] if stage else ["anat", "dwi", "func"]):
        out += [t for t in tools[st] if t[0] not in [u[0] for u in out]]
    return out


def fsl_problems(env: Mapping[str, str] = os.environ, config: Mapping[str, Any] | None = None,
                 stage: str | None = None) -> list[str]:
    """Why the FSL backend cannot run here: one sentence per missing piece, [] when everything is there.

    Checks that each FSL program the configured run needs (``required_tools``: bet, flirt, mcflirt, dtifit,
    eddy_correct or eddy, fslmaths, fslroi, and fnirt/applywarp when ``preprocessing.fsl.nonlinear``) is on
    ``env["PATH"]``, that FSLDIR names a folder (FSL's scripts call ``$FSLDIR/bin/...``) and that FSLOUTPUTTYPE
    is a valid FSL output type. Show the list with ``FSL_FIX``.
    """
    opts = fsl_options(config)
    path = env.get("PATH", "")
    problems = []
    for alternatives, purpose in required_tools(opts, stage):
        if not any(shutil.which(name, path=path) for name in alternatives):
            names = " or ".join(f"`{n}`" for n in alternatives)
            problems.append(f"FSL program {names} not found on PATH (needed for {purpose}).")
    fsldir = env.get("FSLDIR", "")
    if not fsldir:
        problems.append("FSLDIR is not set (FSL's scripts, e.g. eddy_correct, run $FSLDIR/bin/<tool>).")
    elif not Path(fsldir).is_dir():
        problems.append(f"FSLDIR={fsldir} is not a folder.")
    out_type = env.get("FSLOUTPUTTYPE", "")
    if not out_type:
        problems.append("FSLOUTPUTTYPE is not set (FSL tools choose their output format from it; use NIFTI_GZ).")
    elif out_type not in ("NIFTI_GZ", "NIFTI", "NIFTI_PAIR", "NIFTI_PAIR_GZ", "NIFTI2", "NIFTI2_GZ"):
        problems.append(f"FSLOUTPUTTYPE={out_type} is not an FSL output type (use NIFTI_GZ).")
    return problems


def eddy_command(env: Mapping[str, str] = os.environ) -> str:
    """The eddy executable on PATH: ``eddy`` (FSL >= 6.0.6), else ``eddy_cpu``, else ``eddy_openmp``; ``eddy``
    when none is found (the run then fails with the FSL fix)."""
    for name in EDDY_COMMANDS:
        if shutil.which(name, path=env.get("PATH", "")):
            return name
    return EDDY_COMMANDS[0]


def _require(options: FslOptions, stage: str, subject: str | None) -> None:
    missing = [p for p in fsl_problems(os.environ, {"fsl": options.__dict__}, stage) if p.startswith("FSL program")]
    if stage == "dwi" and options.dwi_correction == "eddy_correct" and not os.environ.get("FSLDIR"):
        missing.append("FSLDIR is not set (the eddy_correct script runs $FSLDIR/bin/<tool>).")
    if missing:
        raise StageError("the FSL backend cannot run: " + " ".join(missing), subject=_sub(subject), stage=stage,
                         fix=FSL_FIX)


# ----------------------------------------------------------------------------------------------------------------
# nipype interfaces: one small builder per tool, so tests can check the exact argv
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _nipype() -> SimpleNamespace:
    """nipype's FSL interfaces (imported once, lazily) and two subclasses that quote what nipype leaves bare."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network at import
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nipype.interfaces import fsl

    # A fixed output type: nipype would otherwise read $FSLOUTPUTTYPE (and warn when it is unset); every
    # interface then also sets FSLOUTPUTTYPE in its own environment, for the scripts FSL tools call.
    fsl.FSLCommand.set_default_output_type(OUTPUT_TYPE)

    class DTIFit(fsl.DTIFit):
        """dtifit with ``-o`` quoted (nipype 1.11 formats the base name as a bare string)."""

        def _format_arg(self, name: str, spec: Any, value: Any) -> str:
            if name == "base_name":
                return spec.argstr % shlex.quote(str(value))
            return super()._format_arg(name, spec, value)

    class FNIRT(fsl.FNIRT):
        """fnirt with its output names (--cout, --iout, --logout, ...) quoted."""

        def _format_arg(self, name: str, spec: Any, value: Any) -> str:
            if name in self.filemap and name not in ("in_intensitymap_file", "out_intensitymap_file"):
                return spec.argstr % shlex.quote(str(self._list_outputs()[name]))
            return super()._format_arg(name, spec, value)

    return SimpleNamespace(fsl=fsl, DTIFit=DTIFit, FNIRT=FNIRT)


def _s(path: str | Path) -> str:
    return str(path)


def bet_interface(in_file: str | Path, out_file: str | Path, options: FslOptions, mask: bool = True) -> Any:
    """``bet in out -f bet_frac [-m] [-R] -g bet_gradient``: brain (``out_file``) and, with ``mask``, its mask
    (``<out>_mask.nii.gz``)."""
    iface = _nipype().fsl.BET(in_file=_s(in_file), out_file=_s(out_file), frac=float(options.bet_frac),
                              vertical_gradient=float(options.bet_gradient), mask=bool(mask))
    if options.bet_robust:
        iface.inputs.robust = True
    return iface


def flirt_interface(in_file: str | Path, reference: str | Path, out_file: str | Path, out_matrix_file: str | Path,
                    dof: int, cost: str = "corratio") -> Any:
    """``flirt -in -ref -out -omat -cost -dof -interp trilinear``: ``in_file`` registered to ``reference``
    (``dof`` 6 = rigid, 12 = affine), resampled onto its grid; the matrix maps -in to -ref FSL coordinates."""
    return _nipype().fsl.FLIRT(in_file=_s(in_file), reference=_s(reference), out_file=_s(out_file),
                               out_matrix_file=_s(out_matrix_file), dof=int(dof), cost=cost, interp="trilinear")


def applyxfm_interface(in_file: str | Path, reference: str | Path, matrix_file: str | Path, out_file: str | Path,
                       interp: str = "trilinear") -> Any:
    """``flirt -applyxfm -init matrix``: ``in_file`` resampled onto ``reference``'s grid through a FLIRT matrix
    (the -omat copy it also writes goes next to ``out_file``)."""
    out_mat = Path(out_file).parent / (_stem(out_file) + "_applied.mat")
    return _nipype().fsl.ApplyXFM(in_file=_s(in_file), reference=_s(reference), in_matrix_file=_s(matrix_file),
                                  out_file=_s(out_file), out_matrix_file=_s(out_mat), apply_xfm=True, interp=interp)


def fnirt_interface(in_file: str | Path, ref_file: str | Path, affine_file: str | Path, refmask_file: str | Path,
                    fieldcoeff_file: str | Path, warped_file: str | Path, log_file: str | Path) -> Any:
    """``fnirt --config=T1_2_MNI152_2mm --aff --ref --refmask --in --cout --iout --logout``."""
    return _nipype().FNIRT(in_file=_s(in_file), ref_file=_s(ref_file), affine_file=_s(affine_file),
                           refmask_file=_s(refmask_file), config_file=FNIRT_CONFIG,
                           fieldcoeff_file=_s(fieldcoeff_file), warped_file=_s(warped_file), log_file=_s(log_file))


def applywarp_interface(in_file: str | Path, ref_file: str | Path, field_file: str | Path, out_file: str | Path,
                        premat: str | Path | None = None, interp: str = "trilinear", relative: bool | None = None
                        ) -> Any:
    """``applywarp --in --ref --out --warp [--premat] [--rel] --interp``: a fnirt coefficient file (``relative``
    None: applywarp reads the type from the header) or a displacement field (``relative`` True)."""
    iface = _nipype().fsl.ApplyWarp(in_file=_s(in_file), ref_file=_s(ref_file), field_file=_s(field_file),
                                    out_file=_s(out_file), interp=interp)
    if premat is not None:
        iface.inputs.premat = _s(premat)
    if relative:
        iface.inputs.relwarp = True
    return iface


def eddy_correct_interface(in_file: str | Path, out_file: str | Path, ref_num: int) -> Any:
    """``eddy_correct in out ref_num``: every volume flirted (12 dof) to volume ``ref_num``; the matrices go to
    ``<out without extension>.ecclog``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # nipype warns that FSL deprecates eddy_correct
        return _nipype().fsl.EddyCorrect(in_file=_s(in_file), out_file=_s(out_file), ref_num=int(ref_num))


def eddy_interface(in_file: str | Path, mask: str | Path, index: str | Path, acqp: str | Path, bvecs: str | Path,
                   bvals: str | Path, out_base: str | Path, threads: int = 1, command: str = "eddy") -> Any:
    """``eddy --imain --mask --index --acqp --bvecs --bvals --out`` (nipype's defaults for the rest), OpenMP threads
    from ``threads``; ``command`` is the executable name (see ``eddy_command``)."""
    iface = _nipype().fsl.Eddy(in_file=_s(in_file), in_mask=_s(mask), in_index=_s(index), in_acqp=_s(acqp),
                               in_bvec=_s(bvecs), in_bval=_s(bvals), out_base=_s(out_base),
                               num_threads=max(1, int(threads)))
    iface._cmd = command  # nipype's default is eddy_openmp, which FSL >= 6.0.6 no longer installs
    return iface


def dwi_correction_interface(options: FslOptions, dwi: str | Path, work: str | Path, ref_num: int,
                             mask: str | Path, index: str | Path, acqp: str | Path, bvecs: str | Path,
                             bvals: str | Path, threads: int = 1, command: str | None = None) -> Any:
    """The DWI correction ``preprocessing.fsl.dwi_correction`` asks for: eddy_correct (to volume ``ref_num``,
    output ``work/dwi_ec.nii.gz``) or eddy (output base ``work/eddy``; ``mask``, ``index``, ``acqp`` are its own)."""
    work = Path(work)
    if options.dwi_correction == "eddy_correct":
        return eddy_correct_interface(dwi, work / "dwi_ec.nii.gz", ref_num)
    return eddy_interface(dwi, mask, index, acqp, bvecs, bvals, work / "eddy", threads=threads,
                          command=command or eddy_command())


def dtifit_interface(dwi: str | Path, mask: str | Path, bvecs: str | Path, bvals: str | Path,
                     base_name: str | Path, wls: bool = True) -> Any:
    """``dtifit -k dwi -o base -m mask -r bvecs -b bvals [--wls]``: ``<base>_FA``, ``_MD``, ``_L1..3``, ..."""
    iface = _nipype().DTIFit(dwi=_s(dwi), mask=_s(mask), bvecs=_s(bvecs), bvals=_s(bvals), base_name=_s(base_name))
    if wls:
        iface.inputs.args = "--wls"
    return iface


def mcflirt_interface(in_file: str | Path, out_file: str | Path, ref_vol: int) -> Any:
    """``mcflirt -in -out -plots -refvol``: realigned series and ``<out>.par`` (rx ry rz tx ty tz per volume)."""
    return _nipype().fsl.MCFLIRT(in_file=_s(in_file), out_file=_s(out_file), save_plots=True, ref_vol=int(ref_vol))


def fslroi_interface(in_file: str | Path, roi_file: str | Path, t_min: int) -> Any:
    """``fslroi in out t_min -1``: the volumes from ``t_min`` (0-based) to the end."""
    return _nipype().fsl.ExtractROI(in_file=_s(in_file), roi_file=_s(roi_file), t_min=int(t_min), t_size=-1)


def tmean_interface(in_file: str | Path, out_file: str | Path) -> Any:
    """``fslmaths in -Tmean out``: the mean over time."""
    return _nipype().fsl.MeanImage(in_file=_s(in_file), dimension="T", out_file=_s(out_file))


def binarise_interface(in_file: str | Path, out_file: str | Path, threshold: float = 0.5) -> Any:
    """``fslmaths in -thr t -bin out -odt char``: a uint8 mask of the voxels >= ``threshold``."""
    return _nipype().fsl.ImageMaths(in_file=_s(in_file), out_file=_s(out_file), op_string=f"-thr {threshold:g} -bin",
                                    out_data_type="char")


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mat"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


# ----------------------------------------------------------------------------------------------------------------
# Running the tools
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _workdir(stage: str, subject: str) -> Iterator[Path]:
    """A temporary folder for one stage's FSL files (space-free names; removed afterwards unless
    $NEUROMOE_KEEP_WORK is set, for debugging)."""
    path = Path(tempfile.mkdtemp(prefix=f"neuromoe-fsl-{stage}-sub-{subject}-"))
    if re.search(r"\s", str(path)):
        log.warning("the temporary folder %s contains white space; FSL's shell scripts may fail (set TMPDIR)", path)
    try:
        yield path
    finally:
        if os.environ.get("NEUROMOE_KEEP_WORK"):
            log.info("kept the FSL work folder %s", path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def run_interface(iface: Any, cwd: str | Path, *, subject: str | None, stage: str, step: str) -> str:
    """Run a nipype interface's argv (``shlex.split(iface.cmdline)``, no shell) in ``cwd``; returns its stdout.

    The interface's environment (FSLOUTPUTTYPE, OMP_NUM_THREADS) is added to ours. A missing program or a
    non-zero exit becomes a StageError naming the subject, the step and FSL's last words.
    """
    argv = shlex.split(iface.cmdline)
    env = {**os.environ, **{k: str(v) for k, v in dict(iface.inputs.environ).items()}}
    log.info("%s %s: %s", _sub(subject), step, shlex.join(argv))
    t0 = time.perf_counter()
    try:
        res = subprocess.run(argv, cwd=str(cwd), env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise StageError(f"{step}: the FSL program `{argv[0]}` is not on PATH", subject=_sub(subject), stage=stage,
                         fix=FSL_FIX) from exc
    for stream, text in (("stdout", res.stdout), ("stderr", res.stderr)):
        if text.strip():
            log.debug("%s %s %s:\n%s", _sub(subject), argv[0], stream, text.rstrip()[-4000:])
    if res.returncode != 0:
        last = (res.stderr.strip() or res.stdout.strip() or "(no output)").splitlines()[-5:]
        raise StageError(f"{step}: `{argv[0]}` exited with status {res.returncode}: " + " | ".join(last),
                         subject=_sub(subject), stage=stage,
                         fix="read the command and FSL's output in the rule's log; check the input image")
    log.info("%s %s: %.1f s", _sub(subject), step, time.perf_counter() - t0)
    return res.stdout


def _expect(path: Path, step: str, subject: str | None, stage: str) -> Path:
    if not path.exists():
        raise StageError(f"{step}: FSL finished but did not write {path.name}", subject=_sub(subject), stage=stage,
                         fix="read FSL's output in the rule's log (FSLOUTPUTTYPE must be NIFTI_GZ)")
    return path


def _load(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine, img.header)


def _save_float(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    from neuromoe.inputs.imageio import new_image

    nib.save(new_image(data, affine), str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Transforms: FLIRT / FNIRT <-> ITK
# ----------------------------------------------------------------------------------------------------------------
def _fsl_image(img: nib.Nifti1Image | str | Path) -> Any:
    from fsl.data.image import Image

    return Image(img if isinstance(img, nib.Nifti1Image) else nib.load(str(img)))


def read_flirt(path: str | Path) -> np.ndarray:
    """A FLIRT matrix file (4 rows of 4 numbers) as a (4, 4) array."""
    mat = np.loadtxt(str(path), dtype=float)
    if mat.shape != (4, 4):
        raise ValueError(f"{path}: a FLIRT matrix has 4 x 4 numbers, got shape {mat.shape}")
    return mat


def write_flirt(mat: np.ndarray, path: str | Path) -> str:
    np.savetxt(str(path), np.asarray(mat, dtype=float), fmt="%.10f")
    return str(path)


def flirt_to_world(mat: np.ndarray, src: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """(4, 4) world (RAS mm) map src -> ref equal to a FLIRT matrix computed with ``-in src -ref ref``."""
    from fsl.transform.flirt import fromFlirt

    return fromFlirt(np.asarray(mat, float), _fsl_image(src), _fsl_image(ref), from_="world", to="world")


def world_to_flirt(world: np.ndarray, src: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """The FLIRT matrix (``-in src -ref ref``) of a world (RAS mm) map src -> ref."""
    from fsl.transform.flirt import toFlirt

    return toFlirt(np.asarray(world, float), _fsl_image(src), _fsl_image(ref), from_="world", to="world")


def flirt_to_itk(mat: np.ndarray, src: nib.Nifti1Image, ref: nib.Nifti1Image, rigid: bool = False) -> sitk.Transform:
    """ITK transform (LPS, fixed = FLIRT's -ref, moving = -in) equal to a FLIRT matrix: it maps ``ref`` points to
    ``src`` points. ``rigid``: an Euler3DTransform (rotation projected onto SO(3): FLIRT prints 6 digits), else an
    AffineTransform."""
    import SimpleITK as sitk

    from neuromoe.preproc import registration as reg

    ref_to_src = np.linalg.inv(flirt_to_world(mat, src, ref))
    if not rigid:
        return reg.ras_to_transform(ref_to_src)
    lps = np.eye(4)
    lps[:3, :3] = _F @ ref_to_src[:3, :3] @ _F
    lps[:3, 3] = _F @ ref_to_src[:3, 3]
    u, _, vt = np.linalg.svd(lps[:3, :3])
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        raise ValueError("flirt_to_itk: the FLIRT matrix is a reflection, not a rigid transform")
    out = sitk.Euler3DTransform()
    out.SetMatrix(tuple(rot.ravel().tolist()))
    out.SetTranslation(tuple(lps[:3, 3].tolist()))
    return out


def itk_to_flirt(tf: sitk.Transform, src: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """FLIRT matrix (``-in src -ref ref``) of a linear ITK transform mapping ``ref`` points to ``src`` points
    (the inverse of ``flirt_to_itk``)."""
    from neuromoe.preproc import registration as reg

    return world_to_flirt(np.linalg.inv(reg.transform_to_ras(tf)), src, ref)


def _grid_lps(img: nib.Nifti1Image) -> np.ndarray:
    """(X, Y, Z, 3) LPS mm of every voxel centre of ``img``."""
    ijk = np.indices(img.shape[:3], dtype=np.float64)
    ras = np.einsum("ij,j...->...i", img.affine[:3, :3], ijk) + img.affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def _bspline_basis(u: np.ndarray, n: int) -> np.ndarray:
    """(len(u), n) cubic B-spline weights beta3(u - j), j = 0..n-1 (ITK's BSplineTransform kernel)."""
    t = np.abs(u[:, None] - np.arange(n)[None, :])
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def fit_bspline(displacement_lps: np.ndarray, grid: nib.Nifti1Image, spacing_mm: float = NONLINEAR_MESH_MM
                ) -> sitk.BSplineTransform:
    """ITK cubic B-spline transform whose displacement best fits (least squares) ``displacement_lps``.

    ``displacement_lps`` is (X, Y, Z, 3) mm (LPS) at the voxel centres of ``grid``; control points are about
    ``spacing_mm`` apart over ``grid``'s field of view, on axes aligned with its voxel axes, so the fit separates
    into one small pseudo-inverse per axis.
    """
    import SimpleITK as sitk

    from neuromoe.inputs.imageio import affine_to_itk

    shape = grid.shape[:3]
    spacing, origin, direction = affine_to_itk(grid.affine)
    ref = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    ref.SetDirection(direction)
    mesh = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(shape, spacing, strict=True)]
    bs = sitk.BSplineTransformInitializer(ref, mesh, order=3)
    fixed = np.asarray(bs.GetFixedParameters())
    size, g_origin, g_spacing = fixed[0:3].astype(int), fixed[3:6], fixed[6:9]
    g_dir = fixed[9:18].reshape(3, 3)
    # Continuous control-grid index of grid voxel k along each axis: u = G^-1 (p0 + D s k - o) / g_spacing.
    rel = np.linalg.solve(g_dir, np.asarray(direction).reshape(3, 3) @ np.diag(spacing))
    if np.abs(rel - np.diag(np.diag(rel))).max() > 1e-6:
        raise ValueError("fit_bspline: control grid not aligned with the voxel axes")
    start = np.linalg.solve(g_dir, np.asarray(origin) - g_origin)
    pinvs = []
    for d in range(3):
        u = (start[d] + rel[d, d] * np.arange(shape[d])) / g_spacing[d]
        pinvs.append(np.linalg.pinv(_bspline_basis(u, int(size[d]))))  # (m_d, n_d)
    params = []
    for c in range(3):
        coef = np.einsum("ai,ijk->ajk", pinvs[0], displacement_lps[..., c])
        coef = np.einsum("bj,ajk->abk", pinvs[1], coef)
        coef = np.einsum("ck,abk->abc", pinvs[2], coef)
        params.append(coef.ravel(order="F"))  # ITK coefficient images: x fastest
    bs.SetParameters(tuple(np.concatenate(params).tolist()))
    return bs


def nonlinear_to_itk(field: Any, linear: sitk.Transform, template: nib.Nifti1Image,
                     spacing_mm: float = NONLINEAR_MESH_MM) -> sitk.CompositeTransform:
    """ITK composite [affine, B-spline] equal (on ``template``'s grid) to an fslpy nonlinear transform.

    ``field``: fslpy NonLinearTransform (``fsl.transform.fnirt.readFnirt`` of a fnirt coefficient or field file,
    reference = the template, source = the T1w) whose ``transform(x, "world", "world")`` maps MNI points to T1w
    points, its affine part included. ``linear``: the ITK affine (MNI points -> T1w points) of the same
    registration (``flirt_to_itk`` of fnirt's ``--aff``). The B-spline holds b(x) = A^-1(y(x)) - x, applied before
    A, as in the python backend's nonlinear ``anat_xfm``.
    """
    import SimpleITK as sitk

    from neuromoe.preproc import registration as reg

    x_lps = _grid_lps(template)
    x_ras = x_lps * np.array([-1.0, -1.0, 1.0])
    y_ras = np.asarray(field.transform(x_ras.reshape(-1, 3), from_="world", to="world"), float).reshape(x_ras.shape)
    a_inv = np.linalg.inv(reg.transform_to_ras(linear))
    back = y_ras @ a_inv[:3, :3].T + a_inv[:3, 3]
    disp = (back - x_ras) * np.array([-1.0, -1.0, 1.0])
    disp[~np.isfinite(disp)] = 0.0  # outside the field: the affine alone
    bs = fit_bspline(disp, template, spacing_mm)
    return sitk.CompositeTransform([reg.flatten_linear(linear), bs])


def itk_to_fnirt_warp(tf: sitk.Transform, src: nib.Nifti1Image, ref: nib.Nifti1Image, path: str | Path) -> str:
    """Write an ITK transform (``ref`` points -> ``src`` points, any kind) as a FNIRT relative displacement field on
    ``ref``'s grid, for ``applywarp --ref ref --warp path --rel`` of images in ``src``'s space."""
    import SimpleITK as sitk
    from fsl.transform import fnirt, nonlinear

    from neuromoe.inputs.imageio import affine_to_itk

    spacing, origin, direction = affine_to_itk(ref.affine)
    dfield = sitk.TransformToDisplacementField(tf, sitk.sitkVectorFloat64, [int(s) for s in ref.shape[:3]],
                                               origin, spacing, direction)
    disp_lps = np.transpose(sitk.GetArrayFromImage(dfield), (2, 1, 0, 3))  # (X, Y, Z, 3)
    absolute_ras = (_grid_lps(ref) + disp_lps) * np.array([-1.0, -1.0, 1.0])
    field = nonlinear.DeformationField(nib.Nifti1Image(absolute_ras.astype(np.float32), ref.affine),
                                       src=_fsl_image(src), ref=_fsl_image(ref), srcSpace="world", refSpace="world",
                                       defType="absolute")
    fnirt.toFnirt(field).save(str(path))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Motion parameters
# ----------------------------------------------------------------------------------------------------------------
def _fsl_make_rot(angles: np.ndarray) -> np.ndarray:
    """MISCMATHS::make_rot: rotation by |angles| about the axis angles / |angles|, built as FSL builds it (a basis
    with the axis last and a 2D rotation [[c, s], [-s, c]] in the first two: it turns the frame, so for a
    coordinate axis it is the point rotation by -theta)."""
    angles = np.asarray(angles, float)
    theta = float(np.linalg.norm(angles))
    if theta < 1e-8:
        return np.eye(3)
    x1 = angles / theta
    x2 = np.array([-x1[1], x1[0], 0.0])
    if np.linalg.norm(x2) <= 0.0:
        x2 = np.array([1.0, 0.0, 0.0])
    x2 /= np.linalg.norm(x2)
    x3 = np.cross(x1, x2)
    x3 /= np.linalg.norm(x3)
    basis = np.column_stack([x2, x3, x1])
    core = np.eye(3)
    core[0, 0] = core[1, 1] = np.cos(theta)
    core[0, 1], core[1, 0] = np.sin(theta), -np.sin(theta)
    return basis @ core @ basis.T


def fsl_euler_matrix(rotations: Sequence[float], translations: Sequence[float], centre: Sequence[float]) -> np.ndarray:
    """FSL's ``construct_rotmat_euler``: (4, 4) = make_rot(x) make_rot(y) make_rot(z) about ``centre``, then the
    translation; angles in radians, mm in FSL coordinates."""
    rot = np.eye(3)
    for axis in range(3):
        angles = np.zeros(3)
        angles[axis] = rotations[axis]
        rot = rot @ _fsl_make_rot(angles)
    out = np.eye(4)
    out[:3, :3] = rot
    c = np.asarray(centre, float)
    out[:3, 3] = c - rot @ c + np.asarray(translations, float)
    return out


def read_par(path: str | Path) -> np.ndarray:
    """mcflirt's ``.par``: (T, 6) rows of rx ry rz (radians) tx ty tz (mm)."""
    par = np.atleast_2d(np.loadtxt(str(path), dtype=float))
    if par.shape[1] != 6:
        raise ValueError(f"{path}: a .par file has 6 columns, got {par.shape[1]}")
    return par


def mcflirt_centre(volume: np.ndarray, img: nib.Nifti1Image) -> np.ndarray:
    """mcflirt's rotation centre for the ``.par``: the centre of gravity of the reference volume (minimum
    subtracted), in FSL coordinates (mm)."""
    w = np.asarray(volume, np.float64)
    w = w - w.min()
    if w.sum() <= 1e-5:
        cog = np.zeros(3)
    else:
        cog = np.array([np.sum(w * g) for g in np.indices(w.shape, sparse=True)]) / w.sum()
    vox_to_fsl = _fsl_image(_first_volume(img)).getAffine("voxel", "fsl")
    return vox_to_fsl[:3, :3] @ cog + vox_to_fsl[:3, 3]


def par_to_flirt(par: np.ndarray, centre_fsl: Sequence[float]) -> np.ndarray:
    """(T, 4, 4) FLIRT matrices volume -> reference from mcflirt ``.par`` rows (``fsl_euler_matrix``)."""
    return np.stack([fsl_euler_matrix(row[:3], row[3:], centre_fsl) for row in np.asarray(par, float)])


def read_ecclog(path: str | Path) -> np.ndarray:
    """(N, 4, 4) FLIRT matrices volume -> reference from eddy_correct's ``.ecclog`` (one per "Final result:")."""
    lines = Path(path).read_text().splitlines()
    mats = []
    for i, line in enumerate(lines):
        if line.strip().startswith("Final result"):
            rows = [ln.split() for ln in lines[i + 1:] if ln.strip()][:4]
            mats.append(np.array(rows, dtype=float))
    if not mats or any(m.shape != (4, 4) for m in mats):
        raise ValueError(f"{path}: no 4 x 4 'Final result:' matrices found")
    return np.stack(mats)


def eddy_params_to_matrices(params: np.ndarray, img: nib.Nifti1Image) -> np.ndarray:
    """(N, 4, 4) reference -> volume matrices in FSL coordinates from ``.eddy_parameters`` (first 6 columns:
    tx ty tz (mm) rx ry rz (radians)): TOPUP::MovePar2Matrix, Euler construction about the field-of-view centre."""
    shape = np.asarray(img.shape[:3], float)
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    centre = (shape - 1) * zooms / 2.0
    p = np.atleast_2d(np.asarray(params, float))
    return np.stack([fsl_euler_matrix(row[3:6], row[0:3], centre) for row in p])


def motion_from_affines(ref_to_vol: np.ndarray, centre_ras: Sequence[float]) -> pd.DataFrame:
    """The python backend's motion table from (T, 4, 4) world maps reference -> volume.

    Each map is read as y = R (x - c) + c + t: R the closest rotation to its linear part (exact for rigid maps),
    t the displacement of the centre c (mm, RAS), angles from R = Rz Ry Rx. Columns ``MOTION_COLUMNS``;
    ``attrs``: ``rotations`` (T, 3, 3), ``center_ras``, ``affines``.
    """
    from neuromoe.preproc.motion import euler_angles

    c = np.asarray(centre_ras, float)
    rows, rots = [], []
    for m in np.asarray(ref_to_vol, float):
        u, _, vt = np.linalg.svd(m[:3, :3])
        rot = u @ vt
        t = m[:3, :3] @ c + m[:3, 3] - c
        rows.append([*t, *euler_angles(rot)])
        rots.append(rot)
    table = pd.DataFrame(rows, columns=MOTION_COLUMNS)
    table.attrs.update(rotations=np.stack(rots), center_ras=c, affines=np.asarray(ref_to_vol, float))
    return table


def flirt_motion(vol_to_ref: np.ndarray, img: nib.Nifti1Image, centre_ras: Sequence[float]) -> pd.DataFrame:
    """Motion table from FLIRT matrices volume -> reference (mcflirt, eddy_correct) of a series ``img``."""
    fimg = _fsl_image(_first_volume(img))
    world = [np.linalg.inv(_from_flirt_same(m, fimg)) for m in np.asarray(vol_to_ref, float)]
    return motion_from_affines(np.stack(world), centre_ras)


def par_to_motion(par: np.ndarray, img: nib.Nifti1Image, reference: np.ndarray, centre_ras: Sequence[float]
                  ) -> pd.DataFrame:
    """Motion table (python backend conventions) from mcflirt ``.par`` rows of series ``img`` whose reference
    volume is ``reference`` (X, Y, Z)."""
    return flirt_motion(par_to_flirt(par, mcflirt_centre(reference, img)), img, centre_ras)


def _from_flirt_same(mat: np.ndarray, fimg: Any) -> np.ndarray:
    from fsl.transform.flirt import fromFlirt

    return fromFlirt(mat, fimg, fimg, from_="world", to="world")


def _first_volume(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """A header-only 3D stand-in with ``img``'s grid (fslpy needs only the geometry)."""
    hdr = img.header.copy()
    hdr.set_data_shape(img.shape[:3])
    return nib.Nifti1Image(np.zeros(img.shape[:3], np.uint8), img.affine, hdr)


def _centroid_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


# ----------------------------------------------------------------------------------------------------------------
# Shared steps
# ----------------------------------------------------------------------------------------------------------------
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
        raise InputError("file not found.", subject=_sub(subject), path=src,
                         fix="check the BIDS dataset or rerun the stage that writes it.")
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
        t1_to_mni = itk_to_flirt(tf, t1, tpl)
        combined = write_flirt(t1_to_mni @ read_flirt(native_to_t1), work / f"{stage}_to_mni.mat")
        for name, path in maps.items():
            dst = work / f"{name}_mni.nii.gz"
            run_interface(applyxfm_interface(path, tpl_path, combined, dst), work, subject=subject, stage=stage,
                          step=f"{name} -> MNI (flirt -applyxfm)")
            out[name] = new_image(np.asarray(_load(_expect(dst, name, subject, stage)).dataobj), template.affine)
    else:
        warp = itk_to_fnirt_warp(tf, t1, tpl, work / "t1w_to_mni_warp.nii.gz")
        for name, path in maps.items():
            dst = work / f"{name}_mni.nii.gz"
            run_interface(applywarp_interface(path, tpl_path, warp, dst, premat=native_to_t1, relative=True), work,
                          subject=subject, stage=stage, step=f"{name} -> MNI (applywarp)")
            out[name] = new_image(np.asarray(_load(_expect(dst, name, subject, stage)).dataobj), template.affine)
    return out


def _bet(in_path: Path, out_path: Path, opts: FslOptions, work: Path, subject: str, stage: str, what: str
         ) -> tuple[nib.Nifti1Image, np.ndarray]:
    run_interface(bet_interface(in_path, out_path, opts), work, subject=subject, stage=stage, step=f"bet ({what})")
    brain = _load(_expect(out_path, "bet", subject, stage))
    mask = np.asarray(nib.load(str(_expect(work / (_stem(out_path) + "_mask.nii.gz"), "bet", subject, stage))
                                 ).dataobj) > 0
    if mask.sum() < 100:
        raise StageError(f"bet found no brain in the {what} ({int(mask.sum())} voxels)", subject=_sub(subject),
                         stage=stage, fix="check the image, or change preprocessing.fsl.bet_frac (smaller keeps more)")
    return brain, mask


# ----------------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------------
def run_anat_fsl(t1_path: str | Path, outputs: Mapping[str, str], subject: str, config: Mapping[str, Any],
                 threads: int | None = 1) -> None:
    """The anat stage with FSL (bet, flirt, optionally fnirt); same outputs as ``anat.run_anat``.

    ``outputs``: anat_mask, anat_brain (native T1w grid), anat_xfm (ITK, MNI points -> T1w points), anat_brain_mni,
    anat_mask_mni (MNI 2 mm grid), optional qc_anat_mask, qc_anat_reg. ``config``: the workflow config (or its
    ``preprocessing`` section); reads ``preprocessing.fsl``.
    """
    from neuromoe.inputs.imageio import load_image, new_image, save_map, save_mask
    from neuromoe.preproc import anat
    from neuromoe.preproc import registration as reg

    missing = [k for k in anat.OUTPUT_KEYS if k not in outputs]
    if missing:
        raise ValueError(f"run_anat_fsl: outputs lacks {missing}; needs {list(anat.OUTPUT_KEYS)}")
    opts = fsl_options(config)
    _require(opts, "anat", subject)
    sub = _sub(subject)
    t0 = time.perf_counter()
    t1 = anat.check_t1(load_image(t1_path, subject=sub), subject)
    with _workdir("anat", subject) as work:
        t1_file = work / "t1w.nii.gz"
        nib.save(t1, str(t1_file))
        tpl_path, tpl_mask_path, tpl = _template_files(work)
        brain, mask = _bet(t1_file, work / "t1w_brain.nii.gz", opts, work, subject, "anat", "T1w")
        brain_file = work / "t1w_brain.nii.gz"
        mat = work / "t1w_to_mni.mat"
        flirted = work / "t1w_brain_mni_flirt.nii.gz"
        run_interface(flirt_interface(brain_file, tpl_path, flirted, mat, dof=12), work, subject=subject,
                      stage="anat", step="flirt T1w -> MNI (12 dof)")
        tpl_file_img = nib.load(str(tpl_path))  # the header FLIRT reads
        linear = flirt_to_itk(read_flirt(_expect(mat, "flirt", subject, "anat")), brain, tpl_file_img)
        anat._check_affine(linear, sub)
        mask_file = _save_float(mask.astype(np.float32), brain.affine, work / "t1w_mask_float.nii.gz")
        soft_mni, brain_mni_file = work / "t1w_mask_mni_soft.nii.gz", work / "t1w_brain_mni.nii.gz"
        if opts.nonlinear:
            from fsl.transform.fnirt import readFnirt

            coef, warped = work / "t1w_to_mni_coef.nii.gz", work / "t1w_brain_mni_fnirt.nii.gz"
            run_interface(fnirt_interface(brain_file, tpl_path, mat, tpl_mask_path, coef, warped,
                                          work / "fnirt.log"), work, subject=subject, stage="anat",
                          step="fnirt T1w -> MNI")
            for src, dst in ((brain_file, brain_mni_file), (mask_file, soft_mni)):
                run_interface(applywarp_interface(src, tpl_path, _expect(coef, "fnirt", subject, "anat"), dst), work,
                              subject=subject, stage="anat", step=f"applywarp {src.name} -> MNI")
            field = readFnirt(str(coef), src=_fsl_image(brain), ref=_fsl_image(tpl_file_img))
            xfm = nonlinear_to_itk(field, linear, tpl_file_img)
        else:
            brain_mni_file = flirted
            run_interface(applyxfm_interface(mask_file, tpl_path, mat, soft_mni), work, subject=subject, stage="anat",
                          step="brain mask -> MNI (flirt -applyxfm)")
            xfm = linear
        mask_mni_file = work / "t1w_mask_mni.nii.gz"
        run_interface(binarise_interface(_expect(soft_mni, "MNI mask", subject, "anat"), mask_mni_file), work,
                      subject=subject, stage="anat", step="threshold the MNI mask (fslmaths)")
        mask_mni = np.asarray(nib.load(str(_expect(mask_mni_file, "fslmaths", subject, "anat"))).dataobj) > 0
        brain_mni = np.asarray(_load(_expect(brain_mni_file, "MNI brain", subject, "anat")).dataobj) * mask_mni

    save_mask(new_image(mask, t1.affine, like=t1, dtype=np.uint8), outputs["anat_mask"])
    save_map(new_image(np.where(mask, np.asarray(brain.dataobj), 0.0), t1.affine, like=t1), outputs["anat_brain"])
    reg.write_transform(xfm, outputs["anat_xfm"])
    brain_mni_img = anat._mni_header(new_image(brain_mni, tpl.affine))
    save_map(brain_mni_img, outputs["anat_brain_mni"])
    save_mask(anat._mni_header(new_image(mask_mni, tpl.affine, dtype=np.uint8)), outputs["anat_mask_mni"])
    if "qc_anat_mask" in outputs or "qc_anat_reg" in outputs:
        from neuromoe.preproc import qc

        if "qc_anat_mask" in outputs:
            qc.plot_mask_outline(t1, new_image(mask, t1.affine, dtype=np.uint8), outputs["qc_anat_mask"],
                                 f"{sub}: brain mask (FSL bet) on the T1w")
        if "qc_anat_reg" in outputs:
            qc.plot_registration_edges(anat.mni_template()[0], brain_mni_img, outputs["qc_anat_reg"],
                                       f"{sub}: T1w brain in MNI (FSL {'fnirt' if opts.nonlinear else 'flirt'}), "
                                       "template edges")
    log.info("%s anat (FSL): done in %.1f s", sub, time.perf_counter() - t0)


def run_dwi_fsl(inputs: Mapping[str, str], outputs: Mapping[str, str], subject: str, config: Mapping[str, Any],
                threads: int | None = 1) -> Mapping[str, str]:
    """The dwi stage with FSL (eddy_correct or eddy, bet, dtifit, flirt); same outputs as ``dwi.run_dwi``.

    inputs: ``dwi``, ``bval``, ``bvec``, ``anat_brain``, ``anat_mask``, ``anat_xfm`` (as for the python backend).
    config: reads ``preprocessing.dwi`` (b0_threshold, fit_method: WLS -> dtifit --wls, otherwise OLS; NLLS is
    not in dtifit and falls back to WLS) and ``preprocessing.fsl``.
    """
    from neuromoe.inputs.imageio import new_image, save_map, save_mask
    from neuromoe.preproc import dwi as D
    from neuromoe.preproc import registration as reg
    from neuromoe.preproc.motion import rotate_bvecs

    stage = "dwi"
    sub = _sub(subject)
    opts = fsl_options(config)
    b0_threshold, method = D._config(config)
    if method.upper() == "NLLS":
        log.warning("%s: dtifit has no NLLS fit; using its weighted least squares (--wls)", sub)
    _require(opts, stage, subject)
    img, bvals, bvecs = D.load_inputs(inputs, subject, b0_threshold)
    b0_idx = np.flatnonzero(bvals <= b0_threshold)
    t0 = time.perf_counter()
    with _workdir(stage, subject) as work:
        dwi_file = work / "dwi.nii.gz"
        nib.save(img, str(dwi_file))
        bval_file, bvec_file = work / "dwi.bval", work / "dwi.bvec"
        bval_file.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
        bvec_file.write_text("\n".join(" ".join(f"{v:.6f}" for v in np.nan_to_num(row)) for row in bvecs) + "\n")
        t1_file = _copy_in(inputs["anat_brain"], work / "t1w_brain.nii.gz", subject, stage)

        # 1. correction, motion, b-vectors
        if opts.dwi_correction == "eddy_correct":
            corrected_file = work / "dwi_ec.nii.gz"
            run_interface(dwi_correction_interface(opts, dwi_file, work, int(b0_idx[0]), "", "", "", bvec_file,
                                                   bval_file), work, subject=subject, stage=stage, step="eddy_correct")
            vol_to_ref = read_ecclog(_expect(work / "dwi_ec.ecclog", "eddy_correct", subject, stage))
            corrected = _load(_expect(corrected_file, "eddy_correct", subject, stage))
        else:
            raw_b0 = new_image(np.asarray(img.dataobj, np.float32)[..., b0_idx].mean(-1), img.affine)
            nib.save(raw_b0, str(work / "b0_raw.nii.gz"))
            _bet(work / "b0_raw.nii.gz", work / "b0_raw_brain.nii.gz", opts, work, subject, stage,
                            "raw mean b=0")
            (work / "index.txt").write_text(" ".join(["1"] * img.shape[3]) + "\n")
            (work / "acqp.txt").write_text(DEFAULT_ACQP + "\n")
            run_interface(dwi_correction_interface(opts, dwi_file, work, int(b0_idx[0]),
                                                   work / "b0_raw_brain_mask.nii.gz", work / "index.txt",
                                                   work / "acqp.txt", bvec_file, bval_file, threads=threads or 1),
                          work, subject=subject, stage=stage, step="eddy")
            corrected_file = _expect(work / "eddy.nii.gz", "eddy", subject, stage)
            corrected = _load(corrected_file)
            params = np.loadtxt(str(_expect(work / "eddy.eddy_parameters", "eddy", subject, stage)), ndmin=2)
            vol_to_ref = None
            ref_to_vol_fsl = eddy_params_to_matrices(params[:, :6], img)
        data_c = np.asarray(corrected.dataobj, np.float32)

        # 2. mask on the mean corrected b=0
        b0_mean = new_image(data_c[..., b0_idx].mean(-1), img.affine)
        nib.save(b0_mean, str(work / "b0.nii.gz"))
        _, mask = _bet(work / "b0.nii.gz", work / "b0_brain.nii.gz", opts, work, subject, stage, "mean b=0")
        centre = _centroid_ras(mask, img.affine)
        if vol_to_ref is not None:
            motion = flirt_motion(vol_to_ref, img, centre)
            bvecs_rot = rotate_bvecs(bvecs, motion.attrs["rotations"], img.affine)
        else:
            fimg = _fsl_image(_first_volume(img))
            motion = motion_from_affines(np.stack([_from_flirt_same(m, fimg) for m in ref_to_vol_fsl]), centre)
            bvecs_rot = np.loadtxt(str(_expect(work / "eddy.eddy_rotated_bvecs", "eddy", subject, stage)), ndmin=2)
        rot_file = work / "dwi_rotated.bvec"
        rot_file.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs_rot) + "\n")

        # 3. tensor
        run_interface(dtifit_interface(corrected_file, work / "b0_brain_mask.nii.gz", rot_file, bval_file,
                                       work / "dti", wls=method.upper() != "OLS"), work, subject=subject, stage=stage,
                      step="dtifit")
        evals = np.stack([np.asarray(_load(_expect(work / f"dti_L{k}.nii.gz", "dtifit", subject, stage)).dataobj)
                          for k in (1, 2, 3)], axis=-1)
        evals = -np.sort(-np.clip(np.nan_to_num(evals), 0.0, None), axis=-1)
        scalars = D.tensor_scalars(evals)
        maps = {m: new_image(np.where(mask, scalars[m], 0.0), img.affine) for m in D.MAPS}
        map_files = {m: _save_float(np.asarray(maps[m].dataobj), img.affine, work / f"{m}.nii.gz") for m in D.MAPS}

        # 4. b=0 brain -> T1w brain (6 dof), maps -> MNI
        b0_brain_file = work / "b0_brain.nii.gz"
        dwi_to_t1 = work / "dwi_to_t1w.mat"
        run_interface(flirt_interface(b0_brain_file, t1_file, work / "b0_in_t1w.nii.gz", dwi_to_t1, dof=6), work,
                      subject=subject, stage=stage, step="flirt b=0 -> T1w (6 dof)")
        xfm = flirt_to_itk(read_flirt(_expect(dwi_to_t1, "flirt", subject, stage)), nib.load(str(b0_brain_file)),
                           nib.load(str(t1_file)), rigid=True)
        mni = _maps_to_mni(map_files, dwi_to_t1, t1_file, inputs["anat_xfm"], work, subject, stage)

    save_map(new_image(data_c, img.affine, like=img), outputs["dwi_preproc"])
    D._write_text(outputs["dwi_bval"], " ".join(f"{b:g}" for b in bvals) + "\n")
    D._write_text(outputs["dwi_bvec"], "\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs_rot) + "\n")
    save_mask(mask, outputs["dwi_mask"], affine=img.affine)
    Path(outputs["dwi_motion"]).parent.mkdir(parents=True, exist_ok=True)
    motion.to_csv(outputs["dwi_motion"], sep="\t", index=False, float_format="%.6f")
    for m in D.MAPS:
        save_map(maps[m], outputs[f"dwi_{m.lower()}"])
        save_map(mni[m], outputs[f"dwi_{m.lower()}_mni"])
    reg.write_transform(xfm, outputs["dwi_xfm"])
    if "qc_dwi_fa" in outputs and "qc_dwi_motion" in outputs:
        D._qc(dict(outputs), subject, maps, new_image(mask, img.affine, dtype=np.uint8), motion)
    log.info("%s dwi (FSL %s): done in %.1f s; mask %d voxels, median FA %.2f", sub, opts.dwi_correction,
             time.perf_counter() - t0, int(mask.sum()), float(np.median(scalars["FA"][mask])))
    return outputs


def run_func_fsl(inputs: Mapping[str, str], outputs: Mapping[str, str], subject: str, config: Mapping[str, Any],
                 threads: int | None = 1) -> Mapping[str, str]:
    """The func stage with FSL (fslroi, mcflirt, fslmaths, bet, flirt) and Python for what FSL lacks (confounds,
    nuisance regression, fALFF, ReHo: ``neuromoe.preproc.func``); same outputs as ``func.run_func``.

    inputs: ``bold``, ``bold_json``, ``anat_brain``, ``anat_mask``, ``anat_xfm``. config: ``preprocessing.func``
    (dummy_scans, band_hz, nuisance) and ``preprocessing.fsl``.
    """
    from neuromoe.inputs.imageio import new_image, save_map, save_mask
    from neuromoe.preproc import func as F
    from neuromoe.preproc import qc
    from neuromoe.preproc import registration as reg

    stage = "func"
    sub = _sub(subject)
    opts = fsl_options(config)
    n_dummy, band, nuisance = F._func_config(config)
    _require(opts, stage, subject)
    tr = F.repetition_time(inputs["bold_json"], subject)
    if not Path(inputs["bold"]).exists():
        raise InputError("file not found.", subject=sub, path=inputs["bold"], fix="check the BIDS dataset.")
    raw = nib.load(str(inputs["bold"]))
    # The volume-count check of the python backend, on a stand-in of the same length (no voxel data read).
    F.drop_dummy_scans(nib.Nifti1Image(np.zeros((1, 1, 1, raw.shape[3] if raw.ndim == 4 else 1), np.int8),
                                       np.eye(4)) if raw.ndim == 4 else raw, n_dummy, tr, f_low=band[0],
                       subject=subject)
    t0 = time.perf_counter()
    with _workdir(stage, subject) as work:
        bold_file = _copy_in(inputs["bold"], work / "bold.nii.gz", subject, stage)
        t1_file = _copy_in(inputs["anat_brain"], work / "t1w_brain.nii.gz", subject, stage)
        if n_dummy:
            trimmed = work / "bold_trimmed.nii.gz"
            run_interface(fslroi_interface(bold_file, trimmed, n_dummy), work, subject=subject, stage=stage,
                          step=f"fslroi (drop {n_dummy} dummy scans)")
            bold_file = _expect(trimmed, "fslroi", subject, stage)
        img = nib.load(str(bold_file))
        n_t = img.shape[3]
        ref_vol = n_t // 2
        reference = np.asarray(img.dataobj[..., ref_vol], np.float32)
        mc_file = work / "bold_mc.nii.gz"
        run_interface(mcflirt_interface(bold_file, mc_file, ref_vol), work, subject=subject, stage=stage,
                      step="mcflirt")
        par_file = next((p for p in (work / "bold_mc.nii.gz.par", work / "bold_mc.par") if p.exists()), None)
        if par_file is None:
            raise StageError("mcflirt wrote no .par file", subject=sub, stage=stage,
                             fix="read mcflirt's output in the rule's log")
        mean_file = work / "bold_mean.nii.gz"
        run_interface(tmean_interface(_expect(mc_file, "mcflirt", subject, stage), mean_file), work, subject=subject,
                      stage=stage, step="fslmaths -Tmean")
        _, mask = _bet(_expect(mean_file, "fslmaths", subject, stage), work / "bold_brain.nii.gz", opts, work,
                       subject, stage, "mean BOLD")
        data = np.asarray(_load(mc_file).dataobj, np.float32)
        affine = img.affine
        mask &= data.min(axis=3) > 0  # voxels that left the field of view hold zeros in some volumes
        if mask.sum() < 100:
            raise StageError(f"the BOLD brain mask is (nearly) empty ({int(mask.sum())} voxels)", subject=sub,
                             stage=stage, path=inputs["bold"], fix="check that the BOLD volumes contain a head")
        motion = par_to_motion(read_par(par_file), img, reference, _centroid_ras(mask, affine))
        bold_to_t1 = work / "bold_to_t1w.mat"
        run_interface(flirt_interface(work / "bold_brain.nii.gz", t1_file, work / "bold_in_t1w.nii.gz", bold_to_t1,
                                      dof=6), work, subject=subject, stage=stage, step="flirt mean BOLD -> T1w (6 dof)")
        mean_img = new_image(data.mean(axis=3), affine)
        xfm = flirt_to_itk(read_flirt(_expect(bold_to_t1, "flirt", subject, stage)),
                           nib.load(str(work / "bold_brain.nii.gz")),
                           nib.load(str(t1_file)), rigid=True)

        # Python steps, as in func.run_func: tissue signals, confounds, regression, maps.
        mni_to_bold = reg.compose(reg.read_transform(inputs["anat_xfm"]), xfm)
        template, priors = F.template_tissue_priors()
        native = F.priors_to_native(mean_img, mni_to_bold, priors, template, threads=threads or 1)
        tissue = {k: F.tissue_mask(native[k], mask, F.TISSUE_THRESHOLDS[k]) for k in ("wm", "csf")}
        for k, m in tissue.items():
            if not m.any():
                raise StageError(f"no {k.upper()} voxels found in BOLD space", subject=sub, stage=stage,
                                 path=inputs["bold"], fix="check the BOLD -> T1w -> MNI registration (QC figures)")
        series = data[mask]
        fd = F.framewise_displacement(motion)
        dv, std_dv = F.dvars(series)
        confounds = F.confounds_table(motion, fd, dv, data[tissue["wm"]].mean(axis=0),
                                      data[tissue["csf"]].mean(axis=0), std_dvars=std_dv)
        cols = {"motion": F.MOTION_COLUMNS, "wm": ["white_matter"], "csf": ["csf"]}
        chosen = [c for k in nuisance for c in cols[k]]
        clean = F.regress_nuisance(series, confounds[chosen].to_numpy() if chosen else None, detrend=True,
                                   keep_mean=True)
        preproc = np.zeros(data.shape, np.float32)
        preproc[mask] = clean
        falff_vol = np.zeros(mask.shape, np.float32)
        falff_vol[mask] = F.falff(clean, tr, band)
        filtered = np.zeros(data.shape, np.float32)
        filtered[mask] = F.bandpass(clean, tr, band)
        maps = {"fALFF": new_image(falff_vol, affine), "ReHo": new_image(F.reho(filtered, mask, 27), affine)}
        del filtered
        map_files = {k: _save_float(np.asarray(v.dataobj), affine, work / f"{k}.nii.gz") for k, v in maps.items()}
        mni = _maps_to_mni(map_files, bold_to_t1, t1_file, inputs["anat_xfm"], work, subject, stage)

    F.write_confounds(confounds, outputs["func_confounds"])
    preproc_img = new_image(preproc, affine, like=img)
    preproc_img.header.set_xyzt_units("mm", "sec")
    preproc_img.header.set_zooms(preproc_img.header.get_zooms()[:3] + (tr,))
    save_map(preproc_img, outputs["func_preproc"])
    save_mask(mask, outputs["func_mask"], affine=affine)
    reg.write_transform(xfm, outputs["func_xfm"])
    for name in maps:
        save_map(maps[name], outputs[f"func_{name.lower()}"])
        save_map(mni[name], outputs[f"func_{name.lower()}_mni"])
    if "qc_func_maps" in outputs:
        qc.plot_map_slices(maps, outputs["qc_func_maps"], title=f"{sub} fALFF / ReHo (native, FSL)",
                           mask=new_image(mask, affine, dtype=np.uint8))
    if "qc_func_motion" in outputs:
        qc.plot_motion(confounds[F.MOTION_COLUMNS], outputs["qc_func_motion"], title=f"{sub} BOLD motion (mcflirt)",
                       fd=confounds["framewise_displacement"].to_numpy())
    log.info("%s func (FSL): done in %.1f s", sub, time.perf_counter() - t0)
    return outputs


def _sub(subject: str | None) -> str | None:
    return None if subject is None else (subject if subject.startswith("sub-") else f"sub-{subject}")
