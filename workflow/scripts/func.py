from neuromoe.smk import inputs, outputs, run


def main(s):
    from neuromoe.preproc.func import run_func

    run_func(inputs(s), outputs(s), s.wildcards.subject, s.params.cfg, threads=s.threads)


run(snakemake, main)
