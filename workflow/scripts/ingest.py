from neuromoe.preproc.ingest import run_ingested
from neuromoe.smk import inputs, outputs, run, unit


def main(s):
    run_ingested(s.params.stage, inputs(s), outputs(s), unit(s), s.params.cfg, threads=s.threads)


run(snakemake, main)
