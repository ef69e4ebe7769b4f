# Diffusion stage: b=0 mask, motion correction with b-vector rotation, tensor fit, maps to MNI.


rule dwi:
    input:
        dwi=raw("dwi"),
        bval=raw("bval"),
        bvec=raw("bvec"),
        anat_brain=anat("anat_brain"),
        anat_mask=anat("anat_mask"),
        anat_xfm=anat("anat_xfm"),
    output:
        **keys("dwi_"),
        qc_dwi_fa=deriv("qc_dwi_fa"),
        qc_dwi_motion=deriv("qc_dwi_motion"),
    log:
        f"{LOGS}/dwi/{UNIT}.log",
        benchmark=f"{BENCH}/dwi/{UNIT}.tsv",
    conda:
        PREPROC_ENV
    threads: 1
    resources:
        mem_mb=sized("dwi", "mem_mb"),
        runtime=sized("dwi", "runtime_min"),
    params:
        cfg=stage_config(*preproc_keys("dwi", BACKEND)),
    script:
        f"{SCRIPTS}/dwi.py"
