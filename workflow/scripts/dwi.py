from neuromoe.smk import inputs, outputs, run


def main(s):
    if s.params.cfg["preprocessing"]["backend"] == "fsl":
        from neuromoe.preproc.fsl import run_dwi_fsl as run_dwi
    else:
        from neuromoe.preproc.dwi import run_dwi

    run_dwi(inputs(s), outputs(s), s.wildcards.subject, s.params.cfg, threads=s.threads)


run(snakemake, main)
