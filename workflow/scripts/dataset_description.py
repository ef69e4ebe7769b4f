from neuromoe.preproc.derivatives import write_dataset_description
from neuromoe.smk import run

run(snakemake, lambda s: write_dataset_description(s.output[0], s.config))
