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
        qc_dwi_fa=report(
            deriv("qc_dwi_fa"),
            category="1. Preprocessing QC",
            subcategory="sub-{subject}",
            caption="../report/qc_dwi_maps.rst",
        ),
        qc_dwi_motion=report(
            deriv("qc_dwi_motion"),
            category="1. Preprocessing QC",
            subcategory="sub-{subject}",
            caption="../report/qc_dwi_motion.rst",
        ),
    log:
        f"{LOGS}/dwi/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/dwi/sub-{{subject}}.tsv"
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
