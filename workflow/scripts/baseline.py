from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.learn.baseline import run_baseline

    run_baseline(Path(s.input.cohort[0]).parent, s.input.splits, s.wildcards.split, s.params.cfg,
                 Path(s.output[0]).parent)


run(snakemake, main, warm="learn")
