from neuromoe.smk import outputs, run


def main(s):
    if s.params.cfg["preprocessing"]["backend"] == "fsl":
        from neuromoe.preproc.fsl import run_anat_fsl as run_anat
    else:
        from neuromoe.preproc.anat import run_anat

    run_anat(s.input.t1w, outputs(s), s.wildcards.subject, s.params.cfg, threads=s.threads)


run(snakemake, main)
