from neuromoe.preproc.derivatives import write_bidsignore, write_dataset_description
from neuromoe.smk import run


def main(s):
    write_dataset_description(s.output[0], s.config)
    write_bidsignore(s.output[1])


run(snakemake, main)
