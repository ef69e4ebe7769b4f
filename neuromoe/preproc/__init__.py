"""Preprocessing stages of the python backend (PyPI packages only).

One module per stage: ``anat`` (brain extraction, T1w -> MNI), ``dwi``, ``func``, ``motion``, with the
shared SimpleITK tools in ``registration`` and the QC figures in ``qc``. The FSL backend (``fsl``) writes
the same files under the same names (see ``neuromoe.paths``).

Submodules are not imported here: importing SimpleITK, dipy or matplotlib costs seconds, and a rule
should pay only for the stage it runs.
"""
