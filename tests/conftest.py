"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# Seed of the shared tiny cohort. Chosen (by searching subject plans, which costs no images) so that its
# six subjects (2 HC, 2 PD, 2 iRBD) hold, for every modality, a patient whose latent profile is that
# modality and a control without a change in the matching region: tests/test_synth.py measures the
# planted effects on these images. It checks that precondition first, so a generator change that breaks
# it fails with that message rather than with a missing effect.
SYNTH_COHORT_SEED = 3
SYNTH_COHORT_SUBJECTS = 6


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic BIDS cohort (6 subjects, 2 per group, all modalities, default SynthParams), built
    once per test session. Treat it as read-only: copy it before planting faults."""
    from neuromoe.synth import make_cohort

    # Two processes: on a 2-core CI machine this halves the wait; the bytes are the same as with one.
    return make_cohort(tmp_path_factory.mktemp("synth") / "bids", SYNTH_COHORT_SUBJECTS, seed=SYNTH_COHORT_SEED,
                       n_jobs=2)
