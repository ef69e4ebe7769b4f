"""The patch-tensor cache: MNI maps resampled onto the model grid, normalised, stored per subject and
per cohort as memory-mapped arrays with a checksummed manifest.

May import the core modules and `neuromoe.inputs`; never the model or the results.
"""
