# The derivatives folder's own metadata.


rule dataset_description:
    output:
        f"{OUT}/derivatives/neuromoe/dataset_description.json",
        f"{OUT}/derivatives/neuromoe/.bidsignore",
    log:
        f"{LOGS}/dataset_description.log",
    localrule: True
    conda:
        "../../envs/preproc.yaml"
    params:
        # what the file says (a changed source dataset rewrites it)
        bids=config["bids_dir"],
        derivatives=config["inputs"]["derivatives"],
    script:
        f"{SCRIPTS}/dataset_description.py"
