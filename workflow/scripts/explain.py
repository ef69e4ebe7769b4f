from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.explain import explain_run

    explain_run(Path(s.input.run).parent, s.params.cache_dir, s.params.out_dir, part="test", figure=True)


run(snakemake, main)
