# Preprocessing QC for people and the report's promise: one HTML page per subject in the derivatives root
# (full-size figures, fMRIPrep's sub-<label>.html), one contact sheet per QC figure kind in the report (a
# thumbnail per subject; every subject's figures in the report made it 177 MB at 180 subjects), and a
# manifest of every file the report must hold, checked after `snakemake --report` (Makefile: demo).
QC = f"{OUT}/qc"
QC_KINDS = [k for k in paths.OUTPUTS if k.startswith("qc_")]
QC_SHEETS = {kind: f"{QC}/group_{kind[3:]}.png" for kind in QC_KINDS}


rule qc_group:
    input:
        unpack(qc_figures),
    output:
        **{
            kind: report(
                sheet,
                category="1. Preprocessing QC",
                caption=f"../report/{kind}.rst",
            )
            for kind, sheet in QC_SHEETS.items()
        },
        pages=[f"{OUT}/derivatives/neuromoe/sub-{s}.html" for s in SUBJECTS],
    log:
        f"{LOGS}/qc_group.log",
        benchmark=f"{BENCH}/qc_group.tsv",
    conda:
        PREPROC_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    script:
        f"{SCRIPTS}/qc_group.py"


# The methods paragraph a paper needs, from the run's configuration (its params: a changed setting rewrites it).
rule methods:
    output:
        report(
            f"{OUT}/methods.md",
            category="4. Methods",
            caption="../report/methods.rst",
        ),
    log:
        f"{LOGS}/methods.log",
    localrule: True
    conda:
        PREPROC_ENV
    params:
        sections={
            k: config[k]
            for k in (
                "inputs",
                "preprocessing",
                "participants",
                "cache",
                "model",
                "train",
                "evaluation",
            )
        },
    script:
        f"{SCRIPTS}/methods.py"


rule report_manifest:
    input:
        report_promised(),
    output:
        f"{OUT}/report_manifest.txt",
    log:
        f"{LOGS}/report_manifest.log",
    localrule: True
    conda:
        PREPROC_ENV
    script:
        f"{SCRIPTS}/report_manifest.py"
