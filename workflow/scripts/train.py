from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.train import train_run

    out_dir = Path(s.output[0]).parent
    train_run(s.params.cache_dir, s.input.splits, s.wildcards.split, s.wildcards.variant, s.params.cfg, out_dir,
              threads=s.threads)


run(snakemake, main)
