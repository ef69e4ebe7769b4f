from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.results.evaluate import write_evaluation

    written = write_evaluation(s.params.run_dirs, Path(s.output.table).parent, figures=True, focus="full")
    missing = [str(p) for p in s.output if not Path(p).exists()]
    if missing:  # a report that silently loses a figure is worse than a failed job
        raise FileNotFoundError(f"evaluation did not write {missing}; it wrote {sorted(map(str, written.values()))}")


run(snakemake, main, warm="learn")
