from neuromoe.smk import outputs, run


def main(s):
    from neuromoe.preproc.anat import run_anat

    run_anat(s.input.t1w, outputs(s), s.wildcards.subject, s.params.cfg)


run(snakemake, main)
