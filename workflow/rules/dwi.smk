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
    log:
        f"{LOGS}/dwi/sub-{{subject}}.log",
        benchmark=f"{BENCH}/dwi/sub-{{subject}}.tsv",
    conda:
        PREPROC_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        cfg=stage_config(*preproc_keys("dwi", BACKEND)),
    script:
        f"{SCRIPTS}/dwi.py"
