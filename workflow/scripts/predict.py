from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.results.predict import predict_cohort

    predict_cohort(Path(s.input.model).parent, Path(s.input.cohort[0]).parent, Path(s.output[0]).parent,
                   explain=True)


run(snakemake, main, warm="learn")
