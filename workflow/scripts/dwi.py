from neuromoe.preproc import run_stage
from neuromoe.smk import inputs, outputs, run


def main(s):
    run_stage("dwi", inputs(s), outputs(s), s.wildcards.subject, s.params.cfg, threads=s.threads)


run(snakemake, main)
