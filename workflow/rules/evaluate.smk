# Evaluation: the ablation tables and figures over every run, explanations of the full model, and
# prediction of new subjects.
EVAL = f"{OUT}/evaluation"
# `snakemake predict --config bids_dir=NEW output_dir=NEW_OUT predict_model=RUN_DIR` predicts a new dataset
# with a run trained elsewhere; by default, the full model of the first split of this workflow.
PREDICT_MODEL = config.get("predict_model") or f"{MODEL}/runs/full/{SPLIT_IDS[0]}"


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
        cohort=COHORT_READY,
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
        cohort=COHORT_READY,
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
