from neuromoe.smk import run


def main(s):
    from neuromoe.cache import build_cohort

    build_cohort(list(s.input.records), s.input.participants, s.params.out_dir, s.params.cfg)


run(snakemake, main)
