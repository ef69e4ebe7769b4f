# Patch tensor cache: per subject (model grid, masked, robust z-scored, uncompressed), then per cohort
# (one memory-mapped array per modality + index.tsv + manifest.json with checksums).
CACHE = f"{OUT}/cache"
COHORT = f"{CACHE}/cohort"

COHORT_FILES = [f"{COHORT}/{m}.npy" for m in MODALITIES] + [
    f"{COHORT}/mask.npy",
    f"{COHORT}/index.tsv",
    f"{COHORT}/manifest.json",
]


rule cache_subject:
    input:
        unpack(cache_subject_inputs),
    output:
        # a folder: an absent modality writes no tensor, so the file set varies by subject
        directory(f"{CACHE}/subjects/sub-{{subject}}"),
    log:
        f"{LOGS}/cache_subject/sub-{{subject}}.log",
        benchmark=f"{BENCH}/cache_subject/sub-{{subject}}.tsv",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        cfg=stage_config("cache", "model.patch_size"),
        present=lambda wc: {m: DATASET.subjects[wc.subject].has(m) for m in MODALITIES},
    script:
        f"{SCRIPTS}/cache_subject.py"


rule cache_cohort:
    input:
        records=expand(f"{CACHE}/subjects/sub-{{subject}}", subject=SUBJECTS),
        participants=f"{BIDS}/participants.tsv",
    output:
        COHORT_FILES,
    log:
        f"{LOGS}/cache_cohort.log",
        benchmark=f"{BENCH}/cache_cohort.tsv",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        cfg=stage_config("cache", "model.patch_size", "participants"),
    script:
        f"{SCRIPTS}/cache_cohort.py"
