from neuromoe.smk import inputs, outputs, run


def main(s):
    from neuromoe.preproc.dwi import run_dwi

    run_dwi(inputs(s), outputs(s), s.wildcards.subject, s.params.cfg, threads=s.threads)


run(snakemake, main)
