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


ruleorder: dwi_qsiprep > dwi


rule dwi_qsiprep:
    # A unit QSIPrep preprocessed (inputs.derivatives.qsiprep): tensor maps from its series, no motion correction
    # or registration here. Other units: no such files, so rule dwi (neuromoe.preproc.ingest).
    input:
        unpack(ingested("dwi")),
    output:
        **keys("dwi_", ingested=True),
        qc_dwi_fa=deriv("qc_dwi_fa"),
        qc_dwi_motion=deriv("qc_dwi_motion"),
    log:
        f"{LOGS}/dwi/{UNIT}_qsiprep.log",
        benchmark=f"{BENCH}/dwi/{UNIT}_qsiprep.tsv",
    conda:
        "../../envs/preproc.yaml"
    threads: 1
    resources:
        mem_mb=sized("dwi", "mem_mb"),
        runtime=sized("dwi", "runtime_min"),
    params:
        stage="dwi",
        cfg=stage_config("preprocessing.dwi", "inputs.derivatives"),
    script:
        f"{SCRIPTS}/ingest.py"
