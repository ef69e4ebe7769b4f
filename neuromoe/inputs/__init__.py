"""Inputs: BIDS discovery and validation, the synthetic cohort, the MNI templates, image I/O.

Owns everything the workflow reads before preprocessing. May import only the core modules
(`neuromoe.errors`, `neuromoe.paths`, `neuromoe.config`).
"""
