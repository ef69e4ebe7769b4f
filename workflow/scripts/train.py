from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.learn.train import train_run

    cache_dir = Path(s.input.cohort[0]).parent
    out_dir = Path(s.output[0]).parent
    train_run(cache_dir, s.input.splits, s.wildcards.split, s.wildcards.variant, s.params.cfg, out_dir,
              threads=s.threads, experts_from=getattr(s.input, "experts_from", None))


run(snakemake, main, warm="learn")
