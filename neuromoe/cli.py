"""``neuromoe`` command line: the entry points users and the workflow's rules call.

Every command turns this package's typed errors into a one-paragraph message and exit status 2,
never a traceback: the message names the subject, the file and the fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from neuromoe.errors import NeuroMoEError


def _load_config(path: str | None) -> dict:
    from neuromoe.config import load_config

    return load_config(path)


def cmd_synth(args: argparse.Namespace) -> None:
    from neuromoe.inputs.synth import SynthParams, make_cohort

    out = make_cohort(args.out_dir, n_subjects=args.subjects, seed=args.seed,
                      params=SynthParams(design_seed=args.design_seed, shape_mm=args.shape_mm),
                      sessions=args.sessions)
    design = "the demo design" if args.design_seed is None else f"design seed {args.design_seed}"
    shape = f", anatomy warped by {args.shape_mm} mm RMS" if args.shape_mm > 0 else ""
    print(f"wrote a synthetic BIDS cohort of {args.subjects} subjects ({design}{shape}) to {out}")


def cmd_validate(args: argparse.Namespace) -> None:
    from neuromoe.inputs.bids import validate_dataset

    cfg = _load_config(args.config)
    if args.official:
        cfg["validation"]["bids_validator"] = True
    ds = validate_dataset(args.bids_dir or cfg["bids_dir"], cfg)
    for w in ds.warnings:
        print(f"warning: {w}")
    units = (f"{len({u.id for u in ds.subjects.values()})} subject(s), {len(ds.subjects)} session(s)"
             if ds.sessions else f"{len(ds.subjects)} subject(s)")
    print(f"{args.bids_dir or cfg['bids_dir']}: {units} ready "
          f"({', '.join(f'{m}: {len(ds.with_modality(m))}' for m in ('anat', 'dwi', 'func'))})")


def cmd_unlock_stale(args: argparse.Namespace) -> None:
    from neuromoe.app import clear_stale_lock

    clear_stale_lock(args.directory)


def cmd_config(args: argparse.Namespace) -> None:
    cfg = _load_config(args.config)
    yaml.safe_dump(cfg, sys.stdout, sort_keys=False)


def cmd_train(args: argparse.Namespace) -> None:
    from neuromoe.learn.train import train_run

    cfg = _load_config(args.config)
    metrics = train_run(args.cache, args.splits, args.split, args.variant, cfg, args.out_dir, device=args.device,
                        threads=args.threads)
    print(f"{args.variant} on {args.split}: test balanced accuracy "
          f"{metrics.get('test', {}).get('balanced_accuracy', float('nan')):.3f}; run folder {args.out_dir}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from neuromoe.results.evaluate import write_evaluation

    written = write_evaluation(args.runs, args.out_dir)
    print(Path(written["ablation_md"]).read_text())


def cmd_predict(args: argparse.Namespace) -> None:
    from neuromoe.results.predict import predict_cohort

    out = predict_cohort(args.model, args.cache, args.out_dir, subjects=args.subjects or None,
                         explain=not args.no_explain, device=args.device)
    print(f"predictions: {out}")


def cmd_check_report(args: argparse.Namespace) -> None:
    from neuromoe.errors import InputError
    from neuromoe.results.qcreport import check_report

    promised = [ln.strip() for ln in Path(args.manifest).read_text().splitlines() if ln.strip()]
    problems = check_report(args.report, promised)
    if problems:
        raise InputError("the report does not hold every file it promises:\n  " + "\n  ".join(problems),
                         path=args.report, fix="rebuild it: snakemake --report " + str(args.report))
    print(f"{args.report}: all {len(promised)} promised files present")


def build_parser() -> argparse.ArgumentParser:
    from neuromoe import __version__

    p = argparse.ArgumentParser(
        prog="neuromoe", description=__doc__.splitlines()[0],
        usage="neuromoe BIDS_DIR OUTPUT_DIR {participant,group} [options]   (the BIDS App: "
              "neuromoe BIDS_DIR OUTPUT_DIR participant --help)\n       neuromoe COMMAND ...")
    p.add_argument("--version", action="version", version=f"neuromoe {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write the synthetic demo BIDS cohort")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--subjects", type=int, default=180)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--design-seed", type=int, default=None,
                   help="draw the cohort design (effect regions, marker mapping) from this seed; "
                        "default: the demo design")
    s.add_argument("--sessions", type=int, default=1, help="sessions (visits) per subject; >1: longitudinal")
    s.add_argument("--shape-mm", type=float, default=0.0,
                   help="RMS displacement (mm) of each subject's anatomy from the template in the brain (a "
                        "smooth invertible warp, ventricles enlarging with age; truth in synth-truth); "
                        "default 0: every subject is the template under a rigid pose")
    s.set_defaults(func=cmd_synth)

    v = sub.add_parser("validate", help="check a BIDS dataset and participants.tsv; list every problem")
    v.add_argument("bids_dir", nargs="?", help="default: bids_dir from the config")
    v.add_argument("--config", default=None, help="config.yaml (default: the repository's)")
    v.add_argument("--official", action="store_true",
                   help="also run the official BIDS validator (bids-validator-deno, an optional extra)")
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("train", help="train one variant on one split of a cohort cache (resumes if interrupted)")
    t.add_argument("--cache", required=True, help="cohort cache folder (results/cache/cohort)")
    t.add_argument("--splits", required=True, help="splits.tsv")
    t.add_argument("--split", required=True, help="split id, e.g. cv-s0-f0")
    t.add_argument("--variant", default="full")
    t.add_argument("--out-dir", required=True, type=Path)
    t.add_argument("--config", default=None)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="tabulate finished runs (ablation table, figures)")
    e.add_argument("runs", nargs="+", help="run folders, or a folder holding them")
    e.add_argument("--out-dir", required=True, type=Path)
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="predict cached subjects with a trained run; writes explanations")
    pr.add_argument("--model", required=True, help="a run folder holding model.safetensors")
    pr.add_argument("--cache", required=True, help="cohort cache of the subjects to predict")
    pr.add_argument("--out-dir", required=True, type=Path)
    pr.add_argument("--subjects", nargs="*", help="only these participant ids")
    pr.add_argument("--no-explain", action="store_true", help="skip the saliency maps")
    pr.add_argument("--device", default="cpu")
    pr.set_defaults(func=cmd_predict)

    r = sub.add_parser("check-report", help="check that a Snakemake report holds every file its manifest lists")
    r.add_argument("report", type=Path, help="the report (.zip or .html)")
    r.add_argument("--manifest", required=True, type=Path, help="results/report_manifest.txt (the workflow writes it)")
    r.set_defaults(func=cmd_check_report)

    u = sub.add_parser("unlock-stale", help="remove the Snakemake lock a killed run left (only when no Snakemake "
                       "runs in that folder on this machine); make demo and the BIDS App do this first")
    u.add_argument("--directory", "-d", default=".", help="the run's working directory (Snakemake's --directory); "
                   "its other arguments may follow and are ignored")
    u.set_defaults(func=cmd_unlock_stale)

    c = sub.add_parser("config", help="print the validated config with defaults filled in")
    c.add_argument("--config", default=None)
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in parser._subparsers._group_actions[0].choices:
        from neuromoe import app  # neuromoe BIDS_DIR OUTPUT_DIR LEVEL ...: the BIDS App

        try:
            return app.main(argv)
        except NeuroMoEError as exc:
            print(f"neuromoe: error: {exc}", file=sys.stderr)
            return 2
    # unlock-stale takes a run's whole Snakemake argument list (make demo passes DEMO_ARGS) and reads --directory
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "unlock-stale":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.func(args)
    except NeuroMoEError as exc:
        print(f"neuromoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
