# Patch tensor cache: per subject (model grid, masked, robust z-scored, uncompressed), then per cohort
# (one memory-mapped array per modality + index.tsv + manifest.json with checksums).
CACHE = f"{OUT}/cache"
COHORT = f"{CACHE}/cohort"

COHORT_FILES = [f"{COHORT}/{m}.npy" for m in MODALITIES] + [
    f"{COHORT}/mask.npy",
    f"{COHORT}/index.tsv",
    f"{COHORT}/manifest.json",
]
# What the jobs reading the cache ask for: one file of cache_cohort (which writes them all), since
# Snakemake compares each requested file with every input of its producer (all subjects' records).
COHORT_READY = [f"{COHORT}/manifest.json"]


rule cache_subject:
    input:
        unpack(cache_subject_inputs),
    output:
        # a folder: an absent modality writes no tensor, so the file set varies by subject
        directory(f"{CACHE}/subjects/{UNIT}"),
    log:
        f"{LOGS}/cache_subject/{UNIT}.log",
        benchmark=f"{BENCH}/cache_subject/{UNIT}.tsv",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        cfg=stage_config("cache", "model.patch_size"),
        present=lambda wc: {m: unit_of(wc).has(m) for m in MODALITIES},
    script:
        f"{SCRIPTS}/cache_subject.py"


rule cache_cohort:
    input:
        records=[f"{CACHE}/subjects/sub-{s}" for s in SUBJECTS],
        participants=f"{BIDS}/participants.tsv",
        # per-visit clinical values (sub-*/sub-*_sessions.tsv) that override participants.tsv's
        sessions=SESSION_TABLES,
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
