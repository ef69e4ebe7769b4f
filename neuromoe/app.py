"""``neuromoe BIDS_DIR OUTPUT_DIR {participant,group}``: the BIDS-App command line, on top of Snakemake.

The same workflow as ``snakemake --cores 8 --use-conda`` from the repository, reached the way fMRIPrep, QSIPrep
or a snakebids app is: the app resolves one configuration (the repository's ``config.yaml``, then ``--config``
files, then its own options), validates it, writes it to ``OUTPUT_DIR/config.yaml`` and runs the repository's
Snakefile with ``--directory OUTPUT_DIR`` (as snakebids apps do): Snakemake's records (``.snakemake/``: locks,
incomplete jobs, what each output was made with) live with the outputs they describe. A later plain
``snakemake --snakefile REPO/Snakefile --directory OUTPUT_DIR --cores N`` continues the same run (the Snakefile's
``configfile: config.yaml`` is then OUTPUT_DIR's).

Levels:
  participant  validation, preprocessing, maps, QC figures and the per-subject cache of the selected subjects
               (the target rule ``participant``); run it per subject or batch of subjects, anywhere.
  group        the cohort cache, splits, training, evaluation, explanations, QC pages and the report (rule
               ``all``). Whatever participant-level output is missing is computed first (Snakemake's DAG), so
               ``group`` alone does everything; running ``participant`` first only spreads the work.

Every option this parser does not know goes to Snakemake unchanged (``--dry-run``, ``--forcerun``, ``--until``,
``--use-conda``, ``--executor``, ...); relative paths in them are relative to OUTPUT_DIR, where Snakemake runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from neuromoe import __version__
from neuromoe.config import ConfigError, read_config_file

REPO = Path(__file__).resolve().parents[1]
LEVELS = {"participant": "participant", "group": "all"}  # analysis level -> Snakemake target rule
# --skip NAME -> the cache list it leaves (a skipped BOLD map is not computed; DWI maps share one tensor fit)
SKIPPABLE = {"fa": ("dwi_maps", "FA"), "md": ("dwi_maps", "MD"), "ad": ("dwi_maps", "AD"), "rd": ("dwi_maps", "RD"),
             "falff": ("func_maps", "fALFF"), "reho": ("func_maps", "ReHo")}
CONFIG_NAME = "config.yaml"  # written into OUTPUT_DIR


def _skip_name(text: str) -> str:
    key = text.strip().lower()
    if key not in SKIPPABLE:
        raise argparse.ArgumentTypeError(f"cannot skip {text!r}; choose from "
                                         f"{', '.join(v for _, v in SKIPPABLE.values())} (case does not matter)")
    return key


def _derivatives(text: str) -> tuple[str, str]:
    """``fmriprep=PATH`` / ``qsiprep=PATH`` (``--derivatives``, as XCP-D's)."""
    from neuromoe.inputs.ingested import TOOLS

    tool, sep, path = text.partition("=")
    if not sep or tool.strip().lower() not in TOOLS or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write TOOL=PATH, TOOL one of {', '.join(TOOLS)} "
                                         "(e.g. fmriprep=/data/derivatives/fmriprep)")
    return tool.strip().lower(), str(Path(path).expanduser().resolve())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuromoe", allow_abbrev=False,  # an abbreviation would swallow a Snakemake option
        usage="neuromoe BIDS_DIR OUTPUT_DIR {participant,group} [options] [snakemake options]",
        description="NeuroMoE as a BIDS App: preprocessing (participant) and the classifier (group) of a BIDS "
                    "dataset, run by Snakemake.",
        epilog="Every other option is passed to Snakemake (listed below). Examples:\n"
               "  neuromoe /data/bids /data/out participant --participant-label 01 02 --cores 4\n"
               "  neuromoe /data/bids /data/out group --cores 8 --use-conda\n"
               "  neuromoe /data/bids /data/out group --profile profiles/slurm --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bids_dir", type=Path, help="the BIDS dataset (raw)")
    p.add_argument("output_dir", type=Path, help="where derivatives/, cache/, model/, evaluation/ and the report go")
    p.add_argument("analysis_level", choices=list(LEVELS), help="participant: preprocessing and cache of the "
                   "selected subjects; group: training, evaluation, report (and any participant output missing)")
    p.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
                   help="only these subjects (labels without 'sub-'); default: every subject")
    p.add_argument("--exclude-participant-label", "--exclude_participant_label", nargs="+", default=[],
                   metavar="LABEL", help="leave these subjects out")
    p.add_argument("--session-label", "--session_label", nargs="+", default=[], metavar="LABEL",
                   help="in a dataset with sessions, only these (labels without 'ses-'); default: every session")
    p.add_argument("--skip", nargs="+", default=[], type=_skip_name, metavar="MAP",
                   help="maps the model does without: FA, MD, AD, RD (DWI), fALFF, ReHo (BOLD; not computed)")
    p.add_argument("--registration", choices=["nonlinear", "affine"], default=None,
                   help="T1w -> MNI (preprocessing.anat.registration); default: nonlinear, unless a --config file "
                        "sets it (the repository's config.yaml says affine for its synthetic demo only)")
    p.add_argument("--derivatives", nargs="+", default=[], type=_derivatives, metavar="TOOL=PATH",
                   help="start from another tool's preprocessed series: fmriprep=PATH (resting BOLD), qsiprep=PATH "
                        "(DWI); where a subject's files are found, that modality is not preprocessed again "
                        "(inputs.derivatives)")
    p.add_argument("--config", action="append", default=[], type=Path, metavar="YAML",
                   help="settings merged over the repository's config.yaml (repeatable; later files win)")
    p.add_argument("--cores", default=None, help="Snakemake's --cores (default: all, unless a --profile sets it)")
    p.add_argument("--profile", default=None, help="a Snakemake profile: a folder, or the repository's "
                   "profiles/local or profiles/slurm")
    p.add_argument("--version", action="version", version=f"neuromoe {__version__}")
    return p


def format_help() -> str:
    """Our options, then Snakemake's (the pass-through ones)."""
    from snakemake.cli import get_argument_parser

    ours = build_parser().format_help()
    theirs = get_argument_parser().format_help()
    return f"{ours}\nSnakemake options (passed through):\n\n{theirs}"


def merge(base: dict, over: Mapping[str, Any]) -> dict:
    """``over`` merged into a copy of ``base``, nested mappings key by key (Snakemake's --configfile rule)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve_config(args: argparse.Namespace, base: Path = REPO / "config.yaml") -> dict:
    """The run's configuration: ``base``, the ``--config`` files, then the command line; validated, defaults
    filled. The app never writes a synthetic cohort: ``synthetic.generate`` is off. The registration to MNI is
    ``--registration``, else a ``--config`` file's, else the workflow's default (nonlinear): ``base``'s affine
    is the synthetic demo's (its brains have the template's shape), never right for a dataset of real brains."""
    from neuromoe.config import AnatConfig, validate_config

    user: dict = {}
    for extra in args.config:
        user = merge(user, read_config_file(extra))
    cfg = merge(read_config_file(base), user)
    user_anat = (user.get("preprocessing") or {}).get("anat") or {}
    registration = args.registration or user_anat.get("registration") or AnatConfig.registration
    cfg.setdefault("preprocessing", {}).setdefault("anat", {})["registration"] = registration
    cfg["bids_dir"] = str(args.bids_dir.resolve())
    cfg["output_dir"] = str(args.output_dir.resolve())
    cfg.setdefault("synthetic", {})["generate"] = False
    if args.participant_label:
        cfg["participant_label"] = [str(x).removeprefix("sub-") for x in args.participant_label]
    if args.exclude_participant_label:
        cfg["exclude_participant_label"] = [str(x).removeprefix("sub-") for x in args.exclude_participant_label]
    for tool, path in getattr(args, "derivatives", []):
        cfg.setdefault("inputs", {}).setdefault("derivatives", {})[tool] = path
    if args.session_label:
        cfg["session_label"] = [str(x).removeprefix("ses-") for x in args.session_label]
    cfg = validate_config(cfg)  # defaults filled: the lists below exist
    for name in args.skip:
        key, value = SKIPPABLE[name]
        kept = [m for m in cfg["cache"][key] if m != value]
        if not kept:
            raise ConfigError(f"--skip leaves cache.{key} empty; the {key.split('_')[0]} expert needs at least "
                              f"one map (keep one of {cfg['cache'][key]})")
        cfg["cache"][key] = kept
    return validate_config(cfg)


def snakemake_command(args: argparse.Namespace, config_file: Path, passthrough: Sequence[str]) -> list[str]:
    """The Snakemake command line of this call: the repository's Snakefile run in OUTPUT_DIR (the folder of
    ``config_file``) with the written configuration. ``--rerun-incomplete``: outputs of a job killed mid-write
    (kill -9, a lost session, an OOM kill) are redone, so the same command always goes on (as make demo and the
    profiles do); without it Snakemake refuses to start until they are cleaned up by hand."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(config_file.parent), "--configfile", str(config_file), "--rerun-incomplete"]
    if args.profile:  # a folder here, one of the repository's (profiles/slurm), or a named profile
        found = [p for p in (Path(args.profile), REPO / args.profile) if p.is_dir()]
        cmd += ["--profile", str(found[0].resolve()) if found else args.profile]
    if args.cores is not None or not args.profile:
        cmd += ["--cores", str(args.cores or "all")]
    return [*cmd, *passthrough, LEVELS[args.analysis_level]]


def _runs_snakemake(pid: str, workdir: Path) -> bool:
    """Whether process ``pid`` (a /proc entry) is a Snakemake whose working directory is ``workdir``."""
    proc = Path("/proc") / pid
    try:
        if Path(os.readlink(proc / "cwd")) != workdir:
            return False
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's
        return False
    names = [Path(a.decode(errors="replace")).name for a in argv if a]
    return "snakemake" in names  # `snakemake ...`, `python -m snakemake ...`, `.../bin/snakemake ...`


def clear_stale_lock(workdir: str | Path) -> bool:
    """Remove the Snakemake lock a killed run left in ``workdir`` (``.snakemake/locks``), when no Snakemake
    process runs there on this machine; returns whether it removed one. A run killed by SIGKILL (or a lost
    session) cannot remove its lock, and the next run would refuse to start until ``snakemake --unlock``.
    Only this machine's processes are visible: with a run on another node sharing the folder, keep using
    ``--unlock`` by hand (never here)."""
    workdir = Path(workdir).resolve()
    locks = workdir / ".snakemake" / "locks"
    held = sorted(locks.glob("*.lock")) if locks.is_dir() else []
    if not held or any(_runs_snakemake(p.name, workdir) for p in Path("/proc").iterdir()
                       if p.name.isdigit() and p.name != str(os.getpid())):
        return False
    for f in held:
        f.unlink(missing_ok=True)
    print(f"neuromoe: removed the lock a stopped run left in {workdir} (no Snakemake process runs there); "
          "its unfinished jobs are redone (--rerun-incomplete)", file=sys.stderr)
    return True


def main(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(format_help())
        return 0
    args, passthrough = build_parser().parse_known_args(list(argv))
    if not (REPO / "Snakefile").exists():
        raise ConfigError(f"the workflow (Snakefile) is not next to the package ({REPO}); install neuromoe from "
                          "a clone of its repository with `pip install -e .`")
    if not args.bids_dir.is_dir():
        raise ConfigError(f"BIDS_DIR {args.bids_dir} is not a folder; give the dataset's root (the folder "
                          "holding participants.tsv and sub-*/)")
    cfg = resolve_config(args)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / CONFIG_NAME
    tmp = config_file.with_suffix(".yaml.tmp")
    tmp.write_text(f"# neuromoe {__version__}: the resolved configuration of the last BIDS-App call\n"
                   f"#   neuromoe {' '.join(argv)}\n"
                   f"# continue with: snakemake --snakefile {REPO / 'Snakefile'} --directory {out} --cores N\n"
                   + yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, config_file)
    cmd = snakemake_command(args, config_file, passthrough)
    clear_stale_lock(out)
    print("neuromoe: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode
