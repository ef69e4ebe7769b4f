# Start-up: config validation, the synthetic demo cohort, BIDS discovery and validation, targets.
import functools
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the neuromoe package for the Snakefile itself

from neuromoe import paths
from neuromoe.inputs.ingested import discover as discover_ingested
from neuromoe.inputs.bids import (
    MODALITIES,
    generate_synthetic,
    sessions_tsv,
    unit_key,
    validate_dataset,
)
from neuromoe.config import validate_config
from neuromoe.errors import NeuroMoEError
from neuromoe.preproc import preproc_keys
from neuromoe.preproc.resources import STAGE_IMAGE, job_estimate
from neuromoe.learn.variants import expert_donor
from neuromoe.smk import coalesce_scheduler_wakeups, trains
from neuromoe import worker

coalesce_scheduler_wakeups()  # one scheduler timer, not one more per finished job (neuromoe/smk.py)


onstart:
    # Local jobs of one thread run as forks of a process that keeps their imports (neuromoe/worker.py); the
    # executor is known only now, not while this file is read. NEUROMOE_WORKER=0 in the environment turns it off.
    from snakemake.settings.types import DeploymentMethod

    os.environ[worker.ENV] = worker.enabled(
        workflow.local_exec,
        workflow.is_main_process,
        containers=DeploymentMethod.APPTAINER
        in workflow.deployment_settings.deployment_method,
    )


try:
    validate_config(config)  # readable, every problem at once, semantic checks
except NeuroMoEError as exc:
    raise WorkflowError(str(exc))
validate(
    config, "../schemas/config.schema.yaml"
)  # snakemake's own check (and defaults)

OUT = config["output_dir"]
BIDS = config["bids_dir"]
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
SCRIPTS = "../scripts"
BACKEND = config["preprocessing"]["backend"]
PREPROC_ENV = "../../envs/fsl.yaml" if BACKEND == "fsl" else "../../envs/preproc.yaml"

if BACKEND == "fsl":
    from snakemake.settings.types import DeploymentMethod

    # With --use-conda, envs/fsl.yaml brings FSL; otherwise it must be installed here already.
    if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
        from neuromoe.preproc.fsl.tools import FSL_FIX, fsl_problems

        _problems = fsl_problems(os.environ, config)
        if _problems:
            raise WorkflowError(
                "preprocessing.backend is fsl, but FSL cannot run here:\n- "
                + "\n- ".join(_problems)
                + f"\n  fix: {FSL_FIX}"
            )


@functools.cache
def invocation():
    """This process's command line as Snakemake's own parser reads it (while this file is read, Snakemake has
    chosen neither targets nor executor: workflow.dryrun reads False); None when it is not Snakemake's CLI.
    """
    try:
        from snakemake.cli import get_argument_parser

        return get_argument_parser().parse_known_args(sys.argv[1:])[0]
    except (Exception, SystemExit):
        return None


def dry_run():
    return workflow.dryrun or bool(getattr(invocation(), "dryrun", False))


try:
    _write_cohort = generate_synthetic(
        BIDS, config, dry_run=not Path(BIDS).exists() and dry_run()
    )
except NeuroMoEError as exc:
    raise WorkflowError(str(exc))
if _write_cohort:
    from neuromoe.inputs.synth import SynthParams, make_cohort

    _syn = config["synthetic"]
    print(
        f"neuromoe: {BIDS} does not exist; writing the synthetic demo cohort ({_syn['subjects']} subjects, "
        f"seed {_syn['seed']}, design seed {_syn.get('design_seed')}, {workflow.cores} processes) ...",
        file=sys.stderr,
    )
    # Written next to BIDS and renamed when complete: an interrupted start leaves no half cohort behind.
    _partial = Path(f"{BIDS}.partial")
    make_cohort(
        _partial,
        _syn["subjects"],
        _syn["seed"],
        params=SynthParams(
            design_seed=_syn.get("design_seed"), **_syn.get("acquisition", {})
        ),
        n_jobs=max(1, min(int(workflow.cores), _syn["subjects"])),
    )
    os.replace(_partial, BIDS)

# The files are checked (and the official BIDS validator, validation.bids_validator, runs) once, in the main
# process: a cluster job's own Snakemake process, which re-reads this file, only discovers the layout.
_official = config["validation"]["bids_validator"] and workflow.is_main_process
try:
    DATASET = validate_dataset(
        BIDS,
        {**config, "validation": {**config["validation"], "bids_validator": _official}},
        check_files=workflow.is_main_process,
    )
except NeuroMoEError as exc:
    raise WorkflowError(str(exc))
for _w in DATASET.warnings:
    print(f"neuromoe: warning: {_w}", file=sys.stderr)

# Series fMRIPrep / QSIPrep already preprocessed (inputs.derivatives): unit key -> {modality: Ingested}. Their
# maps come from the func_fmriprep / dwi_qsiprep rules (rules/func.smk, rules/dwi.smk), never from func / dwi.
try:
    INGESTED = discover_ingested(config, DATASET.subjects)
except NeuroMoEError as exc:
    raise WorkflowError(str(exc))
if workflow.is_main_process:
    for _m, _tool in (("func", "fMRIPrep's BOLD"), ("dwi", "QSIPrep's DWI")):
        _n = sum(_m in v for v in INGESTED.values())
        if _n:
            print(
                f"neuromoe: {_tool} found for {_n} of {len(DATASET.subjects)} units: their {_m} maps are "
                f"computed from it (no {_m} preprocessing here)",
                file=sys.stderr,
            )

# The units processed: subjects, or subject-sessions where the dataset has ses-* folders (keys 01 or 01_ses-2).
SUBJECTS = sorted(DATASET.subjects)
SESSIONS = DATASET.sessions
# How a unit is named in logs, benchmarks and cache folders (sub-01, or sub-01_ses-2).
UNIT = "sub-{subject}_ses-{session}" if SESSIONS else "sub-{subject}"
SESSION_TABLES = sorted(
    {
        str(sessions_tsv(BIDS, u.id))
        for u in DATASET.subjects.values()
        if u.session is not None and sessions_tsv(BIDS, u.id).is_file()
    }
)

# Enough labelled subjects per class for the evaluation protocol, checked now rather than after every
# subject's preprocessing (only for a run that will make splits: a preprocessing-only run needs none).
if workflow.is_main_process and trains(invocation()):
    from neuromoe.learn.splits import check_class_sizes

    try:
        check_class_sizes(
            DATASET.training_labels(config["participants"]["diagnosis_column"]),
            config["evaluation"]["protocol"],
            config["evaluation"]["folds"],
            config["evaluation"]["val_fraction"],
        )
    except NeuroMoEError as exc:
        raise WorkflowError(str(exc))


# Any BIDS label: a regex listing every subject made matching each file against the rules quadratic in the
# number of subjects. A target naming a subject the dataset lacks still has no rule (unit_of fails).
wildcard_constraints:
    subject="[A-Za-z0-9]+",
    session="|".join(sorted({str(u.session) for u in DATASET.subjects.values()})),


def unit_of(wildcards):
    """The dataset's unit (neuromoe.inputs.bids.Subject) a job's wildcards name."""
    return DATASET.subjects[unit_key(wildcards.subject, wildcards.get("session"))]


def deriv(key, unit=None):
    """Path of a derivative (see neuromoe/paths.py): one unit's (a SUBJECTS key), or the rules' pattern with
    the {subject} (and {session}) wildcards."""
    if unit is None:
        return paths.derivative_pattern(OUT, key, SESSIONS)
    u = DATASET.subjects[unit]
    return paths.derivative(OUT, u.id, key, u.session)


def raw(kind):
    """A raw input as the rule's input function: each unit's file, as .nii.gz or .nii."""
    return lambda wc: paths.raw(BIDS, wc.subject, kind, wc.get("session"))


def anat(key):
    """An anat derivative the DWI and BOLD stages read: the unit's own, or for a session without a T1w that of
    the session that places it in MNI (neuromoe.inputs.bids: the nearest earlier session with one).
    """
    if not SESSIONS:
        return deriv(key)
    return lambda wc: paths.derivative(OUT, wc.subject, key, unit_of(wc).anat_session)


def keys(prefix, ingested=False):
    """Output keys of one stage: {key: pattern} for the rule's named outputs (the 4D series only with
    preprocessing.keep_series; no transform of its own for an ``ingested`` series)."""
    keep = config["preprocessing"]["keep_series"]
    return {
        k: deriv(k)
        for k in paths.stage_outputs(prefix, keep, config["cache"]["func_maps"])
        if not (ingested and k == f"{prefix}xfm")
    }


def ingested(modality):
    """Input function of an ingest rule: the unit's files from fMRIPrep / QSIPrep (INGESTED). A unit without them
    gets a path no rule makes, so Snakemake plans the preprocessing rule (the ruleorder's second) instead.
    """

    def files(wildcards):
        found = INGESTED.get(unit_key(wildcards.subject, wildcards.get("session")), {})
        if modality not in found:
            return {"not_ingested": f"{OUT}/.not-ingested/{modality}"}
        return found[modality].files

    return files


def stage_config(*sections):
    """The config keys a stage uses (dotted paths), nested as in config.yaml.

    Passed as ``params``: Snakemake reruns a job when its params change, so editing another stage's
    keys (or a comment) reruns nothing here. Preprocessing rules pass ``preproc_keys(stage, BACKEND)``:
    only the keys their backend reads (an fsl-only key reruns no python-backend job).
    """
    out = {}
    for dotted in sections:
        node, dst = config, out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
            dst = dst.setdefault(part, {})
        dst[parts[-1]] = node[parts[-1]]
    return out


def sized(stage, resource):
    """A preprocessing rule's ``mem_mb`` or ``runtime`` (``resource``: "mem_mb" or "runtime_min") from the NIfTI
    headers of the job's own image and, for dwi and func, of the raw T1w: the grid of anat_brain, which need not
    exist yet when the job is sized (a SLURM group job). Times the attempt: --retries asks for more. The model
    and its calibration: neuromoe/preproc/resources.py."""

    def size(wildcards, input, attempt):
        t1w = None
        if stage != "anat":
            session = unit_of(wildcards).anat_session
            t1w = paths.raw(BIDS, wildcards.subject, "T1w", session)
        est = job_estimate(stage, input[STAGE_IMAGE[stage]], t1w, attempt)
        return getattr(est, resource)

    return size


def cache_subject_inputs(wildcards):
    """The MNI maps of the modalities this subject has, named <modality>_<channel index>."""
    from neuromoe.cache.store import subject_maps

    sub = unit_of(wildcards)
    return {
        f"{m}_{i}": p
        for m, maps in subject_maps(
            OUT, sub.id, config, sub.session, sub.anat_session
        ).items()
        if sub.has(m)
        for i, p in enumerate(maps)
    }


def preproc_targets():
    t = []
    for s in SUBJECTS:
        # a session without a T1w has no anat outputs of its own (it uses another session's)
        if DATASET.subjects[s].present["anat"]:
            t += [
                deriv(k, s)
                for k in (
                    "anat_brain_mni",
                    "anat_mask_mni",
                    "qc_anat_mask",
                    "qc_anat_reg",
                )
            ]
        for m in ("dwi", "func"):
            if not DATASET.subjects[s].has(m):
                continue
            t += [
                deriv(k, s)
                for k in paths.stage_outputs(
                    f"{m}_", func_maps=config["cache"]["func_maps"]
                )
                if k.endswith("_mni")
            ]
            t += [deriv(k, s) for k in paths.OUTPUTS if k.startswith(f"qc_{m}_")]
            # Asked for, the series are targets, so a finished folder writes them too.
            if config["preprocessing"]["keep_series"]:
                t += [deriv(k, s) for k in paths.SERIES if k.startswith(f"{m}_")]
    return t


def participant_targets():
    """The BIDS App's participant level: each selected subject's derivatives and QC figures, and its cache
    entry (``snakemake participant``; the group level, ``all``, adds the cohort cache, training, evaluation and
    the report)."""
    return (
        [f"{OUT}/derivatives/neuromoe/dataset_description.json"]
        + preproc_targets()
        + [f"{OUT}/cache/subjects/sub-{s}" for s in SUBJECTS]
    )


def all_targets():
    return (
        [f"{OUT}/derivatives/neuromoe/dataset_description.json"]
        + preproc_targets()
        + [
            f"{OUT}/evaluation/ablation.md",
            f"{OUT}/evaluation/explain/group_saliency.png",
            # the QC sheets and subject pages (qc_group's outputs: not listed page by page, since Snakemake
            # compares every requested file with every input of its job, n^2 at 5,000 subjects) and the
            # check of every file the report promises
            f"{OUT}/report_manifest.txt",
        ]
    )


def adopted_experts(wildcards):
    """Input of a train job: a gated run whose experts train as an ungated run's do adopts that run's
    (neuromoe.learn.variants.expert_donor); VARIANTS and MODEL come from rules/train.smk.
    """
    donor = expert_donor(wildcards.variant, VARIANTS, config["train"]["gate_fit"])
    if donor is None:
        return {}
    return {"experts_from": f"{MODEL}/runs/{donor}/{wildcards.split}/model.safetensors"}


def qc_figures(wildcards=None):
    """Every subject's QC figures, named <kind>__<subject> (a subject without a modality has none of it)."""
    out = {}
    for s in SUBJECTS:
        for kind in QC_KINDS:
            modality = kind.split("_")[1]
            if DATASET.subjects[s].present.get(modality, False):
                out[f"{kind}__{s}"] = deriv(kind, s)
    return out


def report_promised():
    """Every file the report must hold: the QC sheets, the evaluation table and figures, the explanation, the
    methods text."""
    ev = rules.evaluate.output
    return list(QC_SHEETS.values()) + [
        ev.table,
        ev.ablation_png,
        ev.confusion,
        ev.roc,
        ev.calibration,
        ev.gates,
        ev.curves,
        rules.explain.output.figure,
        rules.methods.output[0],
    ]
