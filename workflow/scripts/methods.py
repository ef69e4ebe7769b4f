from pathlib import Path

from neuromoe.results.methods import methods_text
from neuromoe.smk import run

run(snakemake, lambda s: Path(s.output[0]).write_text(methods_text(s.params.sections)))
