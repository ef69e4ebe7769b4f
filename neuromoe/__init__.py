"""NeuroMoE: from a BIDS dataset to a trained, evaluated mixture-of-experts classifier."""

__version__ = "0.1.0"

# The template every "MNI" output is in: the ICBM 2009a nonlinear symmetric T1 that nilearn ships
# (file mni_icbm152_t1_tal_nlin_sym_09a). TemplateFlow calls it MNI152NLin2009aSym.
MNI_SPACE = "MNI152NLin2009aSym"
