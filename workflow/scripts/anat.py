from neuromoe.preproc import run_stage
from neuromoe.smk import inputs, outputs, run, unit


def main(s):
    run_stage("anat", inputs(s), outputs(s), unit(s), s.params.cfg, threads=s.threads)


run(snakemake, main)
