from neuromoe.smk import run


def main(s):
    from neuromoe.predict import predict_cohort

    predict_cohort(s.params.model_dir, s.params.cache_dir, s.params.out_dir, explain=True)


run(snakemake, main)
