# Resting-state fMRI stage: dummy scans, realignment, confounds, nuisance regression, fALFF/ReHo, MNI.


rule func:
    input:
        bold=raw("bold"),
        bold_json=raw("bold_json"),
        anat_brain=anat("anat_brain"),
        anat_mask=anat("anat_mask"),
        anat_xfm=anat("anat_xfm"),
    output:
        **keys("func_"),
        qc_func_maps=deriv("qc_func_maps"),
        qc_func_motion=deriv("qc_func_motion"),
    log:
        f"{LOGS}/func/{UNIT}.log",
        benchmark=f"{BENCH}/func/{UNIT}.tsv",
    conda:
        PREPROC_ENV
    threads: 1
    resources:
        mem_mb=sized("func", "mem_mb"),
        runtime=sized("func", "runtime_min"),
    params:
        cfg=stage_config(*preproc_keys("func", BACKEND)),
    script:
        f"{SCRIPTS}/func.py"


ruleorder: func_fmriprep > func


rule func_fmriprep:
    # A unit fMRIPrep preprocessed (inputs.derivatives.fmriprep): fALFF/ReHo from its series, no realignment or
    # registration here. Other units: no such files, so rule func (neuromoe.preproc.ingest).
    input:
        unpack(ingested("func")),
        raw_json=raw("bold_json"),
    output:
        **keys("func_", ingested=True),
        qc_func_maps=deriv("qc_func_maps"),
        qc_func_motion=deriv("qc_func_motion"),
    log:
        f"{LOGS}/func/{UNIT}_fmriprep.log",
        benchmark=f"{BENCH}/func/{UNIT}_fmriprep.tsv",
    conda:
        "../../envs/preproc.yaml"
    threads: 1
    resources:
        mem_mb=sized("func", "mem_mb"),
        runtime=sized("func", "runtime_min"),
    params:
        stage="func",
        cfg=stage_config("preprocessing.func", "inputs.derivatives"),
    script:
        f"{SCRIPTS}/ingest.py"
