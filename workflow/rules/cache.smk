# Patch tensor cache: per subject (model grid, masked, robust z-scored, uncompressed), then per cohort
# (one memory-mapped array per modality + index.tsv + manifest.json with checksums).
CACHE = f"{OUT}/cache"
COHORT = f"{CACHE}/cohort"

from neuromoe.cache import subject_maps

COHORT_FILES = [f"{COHORT}/{m}.npy" for m in MODALITIES] + [
    f"{COHORT}/mask.npy",
    f"{COHORT}/index.tsv",
    f"{COHORT}/manifest.json",
]


def cache_subject_inputs(wildcards):
    """The MNI maps of the modalities this subject has (an absent one is recorded absent)."""
    sub = DATASET.subjects[wildcards.subject]
    return {
        f"{m}_{i}": p
        for m, maps in subject_maps(OUT, wildcards.subject, config).items()
        if sub.has(m)
        for i, p in enumerate(maps)
    }


rule cache_subject:
    input:
        unpack(cache_subject_inputs),
    output:
        record=f"{CACHE}/subjects/sub-{{subject}}/sub-{{subject}}_desc-cache.json",
    log:
        f"{LOGS}/cache_subject/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/cache_subject/sub-{{subject}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        cfg=stage_config("cache", "model.patch_size"),
        present=lambda wc: {m: DATASET.subjects[wc.subject].has(m) for m in MODALITIES},
        maps=lambda wc: subject_maps(OUT, wc.subject, config),
    script:
        f"{SCRIPTS}/cache_subject.py"


rule cache_cohort:
    input:
        records=expand(rules.cache_subject.output.record, subject=SUBJECTS),
        participants=f"{BIDS}/participants.tsv",
    output:
        COHORT_FILES,
    log:
        f"{LOGS}/cache_cohort.log",
    benchmark:
        f"{BENCH}/cache_cohort.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        cfg=stage_config("cache", "model.patch_size", "participants"),
        out_dir=COHORT,
    script:
        f"{SCRIPTS}/cache_cohort.py"
