# Anatomical stage: brain extraction and registration of the T1w to the MNI template.


rule anat:
    input:
        t1w=raw("T1w"),
    output:
        **keys("anat_"),
        qc_anat_mask=deriv("qc_anat_mask"),
        qc_anat_reg=deriv("qc_anat_reg"),
    log:
        f"{LOGS}/anat/{UNIT}.log",
        benchmark=f"{BENCH}/anat/{UNIT}.tsv",
    conda:
        PREPROC_ENV
    threads: 1
    resources:
        mem_mb=sized("anat", "mem_mb"),
        runtime=sized("anat", "runtime_min"),
    params:
        cfg=stage_config(*preproc_keys("anat", BACKEND)),
    script:
        f"{SCRIPTS}/anat.py"
