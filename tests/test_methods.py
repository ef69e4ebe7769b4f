"""results/methods.md: the methods paragraph, written from the run's configuration (neuromoe.results.methods)."""

from __future__ import annotations

import copy

import yaml
from conftest import REPO

from neuromoe.config import validate_config
from neuromoe.results.methods import methods_text, versions

VERSIONS = {k: "1.0" for k in versions()}  # fixed, so the tests compare settings only


def config(**sections) -> dict:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    for dotted, value in sections.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return validate_config(cfg)


def test_the_text_names_each_stage_its_parameters_and_references() -> None:
    text = methods_text(config(), VERSIONS)
    for part in ("## Preprocessing", "## Model", "## Evaluation", "## References", "MNI152NLin2009aSym",
                 "0.01-0.08 Hz", "4 initial volumes", "5-fold stratified cross-validation", "arXiv:2506.14970",
                 "Snakemake 1.0", "fractional ALFF", "Regional homogeneity"):
        assert part in text, part
    assert text == methods_text(copy.deepcopy(config()), VERSIONS)  # no date, no machine: same run, same bytes


def test_a_changed_parameter_changes_the_text() -> None:
    base = methods_text(config(), VERSIONS)
    band = methods_text(config(preprocessing__func__band_hz=[0.01, 0.1]), VERSIONS)
    assert band != base and "0.01-0.1 Hz" in band and "0.01-0.08 Hz" not in band
    fsl = methods_text(config(preprocessing__backend="fsl"), VERSIONS)
    fsl2 = methods_text(config(preprocessing__backend="fsl", preprocessing__fsl__bet_frac=0.3), VERSIONS)
    assert "fractional intensity threshold 0.5" in fsl and "fractional intensity threshold 0.3" in fsl2
    nonlinear = methods_text(config(preprocessing__anat__registration="nonlinear"), VERSIONS)
    assert "demons" in nonlinear and "demons" not in base and "Vercauteren" in nonlinear
    assert "dipy 1.0" in base and "`dtifit`" in fsl and "`dtifit`" not in base
    fmriprep = methods_text(config(inputs__derivatives__fmriprep="/data/fmriprep"), VERSIONS)
    assert "fMRIPrep's preprocessed resting-state BOLD" in fmriprep and "Esteban O" in fmriprep
    assert "fMRIPrep" not in base and "QSIPrep" not in fmriprep
