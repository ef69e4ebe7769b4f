# Model side: splits (written before any training), one training job per variant x split, the
# non-deep baseline, the evaluation tables and figures, explanations.
MODEL = f"{OUT}/model"
EVAL = f"{OUT}/evaluation"

from neuromoe.learn.splits import split_id_for

EV = config["evaluation"]
SPLIT_IDS = (
    [split_id_for("cv", s, f) for s in EV["seeds"] for f in range(EV["folds"])]
    if EV["protocol"] == "cv"
    else [split_id_for("holdout", s) for s in EV["seeds"]]
)
VARIANTS = list(EV["variants"]) + [f"lambda_{lam:g}" for lam in EV["lambda_sweep"]]
# `snakemake predict --config bids_dir=NEW output_dir=NEW_OUT predict_model=RUN_DIR` predicts a new dataset
# with a run trained elsewhere; by default, the full model of the first split of this workflow.
PREDICT_MODEL = config.get("predict_model") or f"{MODEL}/runs/full/{SPLIT_IDS[0]}"
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
        cohort=COHORT_FILES,
        splits=f"{MODEL}/splits.tsv",
    output:
        [f"{MODEL}/runs/{{variant}}/{{split}}/{f}" for f in RUN_FILES],
    log:
        f"{LOGS}/train/{{variant}}/{{split}}.log",
    benchmark:
        f"{BENCH}/train/{{variant}}/{{split}}.tsv"
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
        cohort=COHORT_FILES,
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


rule evaluate:
    input:
        runs=expand(
            f"{MODEL}/runs/{{variant}}/{{split}}/metrics.json",
            variant=VARIANTS,
            split=SPLIT_IDS,
        ),
        baseline=BASELINE_RUNS,
    output:
        table=report(
            f"{EVAL}/ablation.md",
            category="3. Evaluation",
            caption="../report/ablation.rst",
        ),
        tsv=f"{EVAL}/ablation.tsv",
        per_run=f"{EVAL}/per_run.tsv",
        predictions=f"{EVAL}/subject_predictions.tsv",
        ablation_png=report(
            f"{EVAL}/ablation_balanced_accuracy.png",
            category="3. Evaluation",
            caption="../report/ablation_figure.rst",
        ),
        confusion=report(
            f"{EVAL}/confusion_full.png",
            category="3. Evaluation",
            caption="../report/confusion.rst",
        ),
        roc=report(
            f"{EVAL}/roc_full.png",
            category="3. Evaluation",
            caption="../report/roc.rst",
        ),
        calibration=report(
            f"{EVAL}/calibration_full.png",
            category="3. Evaluation",
            caption="../report/calibration.rst",
        ),
        gates=report(
            f"{EVAL}/gates_full.png",
            category="3. Evaluation",
            caption="../report/gates.rst",
        ),
        curves=report(
            f"{EVAL}/training_curves_full.png",
            category="3. Evaluation",
            caption="../report/curves.rst",
        ),
    log:
        f"{LOGS}/evaluate.log",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        run_dirs=lambda wc, input: [
            str(Path(p).parent) for p in input.runs + input.baseline
        ],
    script:
        f"{SCRIPTS}/evaluate.py"


rule explain:
    input:
        run=f"{MODEL}/runs/full/{SPLIT_IDS[0]}/model.safetensors",
        cohort=COHORT_FILES,
    output:
        figure=report(
            f"{EVAL}/explain/group_saliency.png",
            category="3. Evaluation",
            caption="../report/saliency.rst",
        ),
        gates=f"{EVAL}/explain/gates.tsv",
    log:
        f"{LOGS}/explain.log",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    script:
        f"{SCRIPTS}/explain.py"


rule predict:
    input:
        model=lambda wc: f"{PREDICT_MODEL}/model.safetensors",
        cohort=COHORT_FILES,
    output:
        f"{OUT}/predict/predictions.tsv",
    log:
        f"{LOGS}/predict.log",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    script:
        f"{SCRIPTS}/predict.py"
