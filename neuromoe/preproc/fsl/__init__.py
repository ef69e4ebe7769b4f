"""The FSL preprocessing backend (``preprocessing.backend: fsl``): the same stages, outputs and file names as the
python backend, run with FSL's tools.

``tools``: the environment check (``fsl_problems``, ``FSL_FIX``), one argv builder per FSL program, running them.
``transforms``: FLIRT / FNIRT / mcflirt / eddy results <-> ITK transforms and the python backend's motion tables.
``stages``: the three stage drivers (FSL calls, then the python stages' shared tails). docs/preprocessing.md holds
the contract and the transform maths. Needs nipype and fslpy (envs/fsl.yaml); submodules are not imported here.
"""
