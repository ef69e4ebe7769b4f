# Training: splits (written before any training), one training job per variant x split, and the
# non-deep baseline.
MODEL = f"{OUT}/model"

from neuromoe.learn.splits import planned_split_ids

EV = config["evaluation"]
SPLIT_IDS = planned_split_ids(EV["protocol"], EV["seeds"], EV["folds"])
VARIANTS = list(EV["variants"]) + [f"lambda_{lam:g}" for lam in EV["lambda_sweep"]]
RUN_FILES = [
    "model.safetensors",
    "model.json",
    "metrics.json",
    "predictions.tsv",
    "history.csv",
]
BASELINE_RUNS = (
    expand(f"{MODEL}/baseline/{{split}}/metrics.json", split=SPLIT_IDS)
    if EV["baseline"] != "none"
    else []
)


wildcard_constraints:
    variant="|".join(VARIANTS),
    split="|".join(SPLIT_IDS),


rule splits:
    input:
        index=f"{COHORT}/index.tsv",
    output:
        f"{MODEL}/splits.tsv",
    log:
        f"{LOGS}/splits.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        cfg=stage_config(
            "evaluation.protocol",
            "evaluation.folds",
            "evaluation.seeds",
            "evaluation.val_fraction",
        ),
    script:
        f"{SCRIPTS}/splits.py"


rule train:
    input:
        unpack(adopted_experts),
        cohort=COHORT_READY,
        splits=f"{MODEL}/splits.tsv",
    output:
        [f"{MODEL}/runs/{{variant}}/{{split}}/{f}" for f in RUN_FILES],
    log:
        f"{LOGS}/train/{{variant}}/{{split}}.log",
        benchmark=f"{BENCH}/train/{{variant}}/{{split}}.tsv",
    conda:
        "../../envs/torch.yaml"
    # One intra-op thread: the demo model is tiny and 1 thread is ~7x faster per step than 2 on a
    # shared 2-core box; parallelism comes from running jobs side by side.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1 if config["train"]["device"] == "cuda" else 0,
    params:
        cfg=stage_config("participants", "cache", "model", "train"),
    script:
        f"{SCRIPTS}/train.py"


rule baseline:
    input:
        cohort=COHORT_READY,
        splits=f"{MODEL}/splits.tsv",
    output:
        f"{MODEL}/baseline/{{split}}/metrics.json",
        f"{MODEL}/baseline/{{split}}/predictions.tsv",
    log:
        f"{LOGS}/baseline/{{split}}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=stage_config("participants", "cache"),
    script:
        f"{SCRIPTS}/baseline.py"
