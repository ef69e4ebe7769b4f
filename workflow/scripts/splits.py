from neuromoe.smk import run


def main(s):
    import pandas as pd

    from neuromoe.config import EvaluationConfig
    from neuromoe.learn.splits import make_splits, subject_table, write_splits

    ev = EvaluationConfig.from_config(s.params.cfg)
    index = pd.read_csv(s.input.index, sep="\t", dtype={"participant_id": str})
    index = index[index["label"] >= 0]  # unlabelled subjects are for prediction only
    # split subjects, not sessions: no subject's visits on both sides of a split
    splits = make_splits(subject_table(index), ev.protocol, ev.folds, list(ev.seeds), ev.val_fraction)
    write_splits(splits, s.output[0])


run(snakemake, main)
