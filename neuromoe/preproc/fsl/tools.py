"""FSL's programs as the FSL backend runs them: the environment check, one argv builder per tool, and running.

Each FSL call is a nipype interface built by a small function of paths and options (``bet_interface``,
``flirt_interface``, ...), so tests check the exact argv (``.cmdline``) without FSL. ``run_interface`` runs that
argv with ``subprocess`` from ``shlex.split(interface.cmdline)``: no shell, and nipype quotes every path (the two
interfaces where nipype 1.11 does not, ``dtifit -o`` and ``fnirt --cout/--iout/--logout``, are subclassed here to
quote them). Tools run in a ``workdir`` with space-free names (FSL's own shell scripts, eddy_correct among them,
do not quote their arguments).

Imports only the standard library at module level: the workflow's start-up check (``fsl_problems``) uses it.
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
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from neuromoe.errors import StageError
from neuromoe.paths import subject_label

if TYPE_CHECKING:
    from neuromoe.config import FslConfig

log = logging.getLogger("neuromoe.fsl")

OUTPUT_TYPE = "NIFTI_GZ"
FNIRT_CONFIG = "T1_2_MNI152_2mm"  # FSL's schedule for T1w -> MNI152 at 2 mm ($FSLDIR/etc/flirtsch)
EDDY_COMMANDS = ("eddy", "eddy_cpu", "eddy_openmp")  # FSL >= 6.0.6 installs eddy (+ eddy_cpu); older ones eddy_openmp

FSL_FIX = (
    "run the workflow with `snakemake --use-conda` (envs/fsl.yaml installs FSL's conda packages and sets FSLDIR "
    "and FSLOUTPUTTYPE), or install FSL (https://fsl.fmrib.ox.ac.uk) and set FSLDIR and FSLOUTPUTTYPE=NIFTI_GZ "
    "with $FSLDIR/bin on PATH, or choose `preprocessing.backend: python` in config.yaml (no FSL needed)."
)


# ----------------------------------------------------------------------------------------------------------------
# The environment check
# ----------------------------------------------------------------------------------------------------------------
def required_tools(fsl: FslConfig | None = None, stage: str | None = None, registration: str = "nonlinear"
                   ) -> list[tuple[tuple[str, ...], str]]:
    """The FSL programs a run needs: (alternatives, what for), for one stage (anat, dwi, func) or all of them.

    ``fsl``: ``preprocessing.fsl`` (its ``dwi_correction``); ``registration``: ``preprocessing.anat.registration``
    (nonlinear, the default, adds fnirt and applywarp).
    """
    correction = fsl.dwi_correction if fsl is not None else "eddy_correct"
    tools_ = ("eddy_correct",) if correction == "eddy_correct" else EDDY_COMMANDS
    tools = {
        "anat": [(("bet",), "brain extraction"), (("flirt",), "registration to MNI"),
                 (("fslmaths",), "MNI brain mask")],
        "dwi": [(tools_, f"DWI correction ({correction})"), (("bet",), "b=0 brain mask"),
                (("dtifit",), "tensor fit"), (("flirt",), "b=0 -> T1w registration and MNI resampling")],
        "func": [(("fslroi",), "dummy scans"), (("mcflirt",), "motion correction"), (("fslmaths",), "mean BOLD"),
                 (("bet",), "BOLD brain mask"), (("flirt",), "BOLD -> T1w registration and MNI resampling")],
    }
    if registration == "nonlinear":
        tools["anat"] += [(("fnirt",), "nonlinear registration to MNI"), (("applywarp",), "MNI resampling")]
        tools["dwi"] += [(("applywarp",), "MNI resampling")]
        tools["func"] += [(("applywarp",), "MNI resampling")]
    out: list[tuple[tuple[str, ...], str]] = []
    for st in ([stage] if stage else ["anat", "dwi", "func"]):
        out += [t for t in tools[st] if t[0] not in [u[0] for u in out]]
    return out


def missing_tools(fsl: FslConfig | None, stage: str | None, registration: str, path: str) -> list[str]:
    """One sentence per program of ``required_tools`` that is not on ``path``."""
    out = []
    for alternatives, purpose in required_tools(fsl, stage, registration):
        if not any(shutil.which(name, path=path) for name in alternatives):
            names = " or ".join(f"`{n}`" for n in alternatives)
            out.append(f"FSL program {names} not found on PATH (needed for {purpose}).")
    return out


def fsl_problems(env: Mapping[str, str] = os.environ, config: Mapping[str, Any] | None = None,
                 stage: str | None = None) -> list[str]:
    """Why the FSL backend cannot run here: one sentence per missing piece, [] when everything is there.

    ``config``: the workflow config (its ``preprocessing.fsl`` and ``preprocessing.anat.registration``; absent
    keys take the schema's defaults). Checks that each FSL program the configured run needs (``required_tools``:
    bet, flirt, mcflirt, dtifit, eddy_correct or eddy, fslmaths, fslroi, and fnirt/applywarp when the registration
    is nonlinear) is on ``env["PATH"]``, that FSLDIR names a folder (FSL's scripts call ``$FSLDIR/bin/...``) and
    that FSLOUTPUTTYPE is a valid FSL output type. Show the list with ``FSL_FIX``.
    """
    from neuromoe.config import AnatConfig, FslConfig

    config = config or {}
    fsl, registration = FslConfig.from_config(config), AnatConfig.from_config(config).registration
    problems = missing_tools(fsl, stage, registration, env.get("PATH", ""))
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


def require(fsl: FslConfig, registration: str, stage: str, subject: str | None) -> None:
    """StageError (naming the subject and ``FSL_FIX``) unless every program ``stage`` needs is on PATH."""
    missing = missing_tools(fsl, stage, registration, os.environ.get("PATH", ""))
    if stage == "dwi" and fsl.dwi_correction == "eddy_correct" and not os.environ.get("FSLDIR"):
        missing.append("FSLDIR is not set (the eddy_correct script runs $FSLDIR/bin/<tool>).")
    if missing:
        raise StageError("the FSL backend cannot run: " + " ".join(missing), subject=subject_label(subject),
                         stage=stage, fix=FSL_FIX)


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


def bet_interface(in_file: str | Path, out_file: str | Path, options: FslConfig, mask: bool = True) -> Any:
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
    out_mat = Path(out_file).parent / (stem(out_file) + "_applied.mat")
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


def dwi_correction_interface(options: FslConfig, dwi: str | Path, work: str | Path, ref_num: int,
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


def stem(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mat"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


# ----------------------------------------------------------------------------------------------------------------
# Running the tools
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def workdir(stage: str, subject: str) -> Iterator[Path]:
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
    log.info("%s %s: %s", subject_label(subject), step, shlex.join(argv))
    t0 = time.perf_counter()
    try:
        res = subprocess.run(argv, cwd=str(cwd), env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise StageError(f"{step}: the FSL program `{argv[0]}` is not on PATH", subject=subject_label(subject),
                         stage=stage, fix=FSL_FIX) from exc
    for stream, text in (("stdout", res.stdout), ("stderr", res.stderr)):
        if text.strip():
            log.debug("%s %s %s:\n%s", subject_label(subject), argv[0], stream, text.rstrip()[-4000:])
    if res.returncode != 0:
        last = (res.stderr.strip() or res.stdout.strip() or "(no output)").splitlines()[-5:]
        raise StageError(f"{step}: `{argv[0]}` exited with status {res.returncode}: " + " | ".join(last),
                         subject=subject_label(subject), stage=stage,
                         fix="read the command and FSL's output in the rule's log; check the input image")
    log.info("%s %s: %.1f s", subject_label(subject), step, time.perf_counter() - t0)
    return res.stdout


def expect(path: Path, step: str, subject: str | None, stage: str) -> Path:
    """``path``, or a StageError naming the subject when the FSL ``step`` did not write it."""
    if not path.exists():
        raise StageError(f"{step}: FSL finished but did not write {path.name}", subject=subject_label(subject),
                         stage=stage, fix="read FSL's output in the rule's log (FSLOUTPUTTYPE must be NIFTI_GZ)")
    return path
