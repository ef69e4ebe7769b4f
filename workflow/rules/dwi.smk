# Diffusion stage: b=0 mask, motion correction with b-vector rotation, tensor fit, maps to MNI.


rule dwi:
    input:
        dwi=raw("dwi"),
        bval=raw("bval"),
        bvec=raw("bvec"),
        anat_brain=deriv("anat_brain"),
        anat_mask=deriv("anat_mask"),
        anat_xfm=deriv("anat_xfm"),
    output:
        **keys("dwi_"),
        qc_dwi_fa=deriv("qc_dwi_fa"),
        qc_dwi_motion=deriv("qc_dwi_motion"),
    params:
        cfg=stage_config("preprocessing.backend", "preprocessing.dwi", "preprocessing.fsl"),
    log:
        f"{LOGS}/dwi/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/dwi/sub-{{subject}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        PREPROC_ENV
    script:
        f"{SCRIPTS}/dwi.py"
