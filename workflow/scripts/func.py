from neuromoe.smk import inputs, outputs, run


def main(s):
    if s.params.cfg["preprocessing"]["backend"] == "fsl":
        from neuromoe.preproc.fsl import run_func_fsl as run_func
    else:
        from neuromoe.preproc.func import run_func

    run_func(inputs(s), outputs(s), s.wildcards.subject, s.params.cfg, threads=s.threads)


run(snakemake, main)
