# Resting-state fMRI stage: dummy scans, realignment, confounds, nuisance regression, fALFF/ReHo, MNI.


rule func:
    input:
        bold=raw("bold"),
        bold_json=raw("bold_json"),
        anat_brain=deriv("anat_brain"),
        anat_mask=deriv("anat_mask"),
        anat_xfm=deriv("anat_xfm"),
    output:
        **keys("func_"),
        qc_func_maps=report(
            deriv("qc_func_maps"),
            category="1. Preprocessing QC",
            subcategory="sub-{subject}",
            caption="../report/qc_func_maps.rst",
        ),
        qc_func_motion=report(
            deriv("qc_func_motion"),
            category="1. Preprocessing QC",
            subcategory="sub-{subject}",
            caption="../report/qc_func_motion.rst",
        ),
    log:
        f"{LOGS}/func/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/func/sub-{{subject}}.tsv"
    conda:
        PREPROC_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        cfg=stage_config(*preproc_keys("func", BACKEND)),
    script:
        f"{SCRIPTS}/func.py"
