from pathlib import Path

from neuromoe.smk import run


def main(s):
    from neuromoe.errors import InputError
    from neuromoe.results.qcreport import check_figure

    bad = [f"{p}: {why}" for p in s.input if (why := check_figure(p))]
    if bad:  # a report that silently loses a figure is worse than a failed run
        raise InputError("figures the report promises are not usable:\n  " + "\n  ".join(bad),
                         fix="rerun the rules that write them (snakemake --forcerun <rule>)")
    Path(s.output[0]).write_text("".join(f"{Path(p).name}\n" for p in s.input))


run(snakemake, main)
