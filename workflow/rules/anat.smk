# Anatomical stage: brain extraction and registration of the T1w to the MNI template.


rule anat:
    input:
        t1w=raw("T1w"),
    output:
        **keys("anat_"),
        qc_anat_mask=report(
            deriv("qc_anat_mask"),
            category="1. Preprocessing QC",
            subcategory="sub-{subject}",
            caption="../report/qc_anat_mask.rst",
        ),
        qc_anat_reg=report(
            deriv("qc_anat_reg"),
            category="1. Preprocessing QC",
            subcategory="sub-{subject}",
            caption="../report/qc_anat_reg.rst",
        ),
    log:
        f"{LOGS}/anat/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/anat/sub-{{subject}}.tsv"
    conda:
        PREPROC_ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    params:
        cfg=stage_config(*preproc_keys("anat", BACKEND)),
    script:
        f"{SCRIPTS}/anat.py"
