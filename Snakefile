# NeuroMoE workflow: BIDS (T1w, DWI, resting BOLD) + participants.tsv -> MNI maps -> patch cache
# -> NeuroMoE training -> evaluation, report, prediction.  See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/anat.smk"
include: "workflow/rules/dwi.smk"
include: "workflow/rules/func.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),


rule participant:
    # The BIDS App's participant level (neuromoe BIDS_DIR OUTPUT_DIR participant): preprocessing, maps and the
    # per-subject cache of the selected subjects; `snakemake` alone (rule all) is the group level.
    input:
        participant_targets(),
