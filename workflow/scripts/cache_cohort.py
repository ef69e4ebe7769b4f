from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.cache.store import build_cohort

    build_cohort(list(s.input.records), s.input.participants, Path(s.output[0]).parent, s.params.cfg)


run(snakemake, main)
