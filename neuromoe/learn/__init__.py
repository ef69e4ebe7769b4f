"""Learning: the NeuroMoE network, the cohort dataset, splits, training, checkpoints, metrics, and the
logistic-regression baseline.

May import the core modules, `neuromoe.inputs` and `neuromoe.cache`; never `neuromoe.results`.
"""
