from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.results.explain import explain_run

    explain_run(Path(s.input.run).parent, Path(s.input.cohort[0]).parent, Path(s.output.gates).parent, part="test",
                figure=True)


run(snakemake, main, warm="learn")
