"""The methods paragraph a paper needs (``results/methods.md``), written from the run's resolved configuration and
the versions installed, as fMRIPrep's boilerplate: which stages ran, with which algorithms and parameters, the
template and space, the model, the training and the evaluation protocol, with references.

``methods_text(cfg)`` is a pure function of the validated config (and of ``versions()``), so a changed parameter
changes the text and an unchanged run writes the same bytes (no date, no machine).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

from neuromoe import MNI_SPACE

PACKAGES = ("neuromoe", "snakemake", "torch", "numpy", "scipy", "nibabel", "SimpleITK", "dipy", "nilearn",
            "scikit-learn")
REFERENCES = {
    "neuromoe": "NeuroMoE: a mixture-of-experts transformer for multimodal neuroimaging (arXiv:2506.14970).",
    "snakemake": "Mölder F, et al. Sustainable data analysis with Snakemake. F1000Research 10:33 (2021).",
    "torch": "Paszke A, et al. PyTorch: an imperative style, high-performance deep learning library. NeurIPS (2019).",
    "mni": "Fonov V, et al. Unbiased average age-appropriate atlases for pediatric studies. NeuroImage 54:313 "
           "(2011) (ICBM 2009a nonlinear symmetric template).",
    "n4": "Tustison NJ, et al. N4ITK: improved N3 bias correction. IEEE TMI 29:1310 (2010).",
    "sitk": "Lowekamp BC, et al. The design of SimpleITK. Front Neuroinform 7:45 (2013).",
    "demons": "Vercauteren T, et al. Diffeomorphic demons: efficient non-parametric image registration. "
              "NeuroImage 45:S61 (2009).",
    "mattes": "Mattes D, et al. PET-CT image registration in the chest using free-form deformations. IEEE TMI "
              "22:120 (2003).",
    "fmriprep": "Esteban O, et al. fMRIPrep: a robust preprocessing pipeline for functional MRI. Nat Methods "
                "16:111 (2019).",
    "qsiprep": "Cieslak M, et al. QSIPrep: an integrative platform for preprocessing and reconstructing diffusion "
               "MRI data. Nat Methods 18:775 (2021).",
    "dti": "Basser PJ, Mattiello J, LeBihan D. MR diffusion tensor spectroscopy and imaging. Biophys J 66:259 "
           "(1994).",
    "dipy": "Garyfallidis E, et al. Dipy, a library for the analysis of diffusion MRI data. Front Neuroinform "
            "8:8 (2014).",
    "falff": "Zou QH, et al. An improved approach to detection of amplitude of low-frequency fluctuation (ALFF) "
             "for resting-state fMRI: fractional ALFF. J Neurosci Methods 172:137 (2008).",
    "reho": "Zang Y, et al. Regional homogeneity approach to fMRI data analysis. NeuroImage 22:394 (2004).",
    "fd": "Power JD, et al. Spurious but systematic correlations in functional connectivity MRI networks arise "
          "from subject motion. NeuroImage 59:2142 (2012).",
    "nilearn": "Abraham A, et al. Machine learning for neuroimaging with scikit-learn. Front Neuroinform 8:14 (2014).",
    "fsl": "Jenkinson M, et al. FSL. NeuroImage 62:782 (2012); Smith SM. Fast robust automated brain extraction. "
           "Hum Brain Mapp 17:143 (2002).",
    "vit": "Dosovitskiy A, et al. An image is worth 16x16 words: transformers for image recognition at scale. "
           "ICLR (2021).",
    "moe": "Jacobs RA, et al. Adaptive mixtures of local experts. Neural Comput 3:79 (1991).",
}


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` ("not installed" for one that is not)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _list(items: Any) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _preprocessing(cfg: Mapping[str, Any], v: Mapping[str, str], cite: list[str]) -> list[str]:
    pre = cfg["preprocessing"]
    fsl, anat, dwi, func = pre["fsl"], pre["anat"], pre["dwi"], pre["func"]
    nonlinear = anat["registration"] == "nonlinear"
    if pre["backend"] == "fsl":
        cite += ["fsl"]
        t1 = (f"The T1-weighted image was skull-stripped with FSL `bet` (fractional intensity threshold "
              f"{fsl['bet_frac']:g}, vertical gradient {fsl['bet_gradient']:g}"
              f"{', robust centre estimation' if fsl['bet_robust'] else ''}) and registered to the {MNI_SPACE} "
              f"template with `flirt` (12 degrees of freedom)"
              + (" followed by `fnirt` (config T1_2_MNI152_2mm)" if nonlinear else "") + ".")
        dw = (f"Diffusion-weighted images were corrected for head motion and eddy currents with FSL "
              f"`{fsl['dwi_correction']}` (b-vectors rotated accordingly), skull-stripped with `bet` on the mean "
              f"b=0 image, and a diffusion tensor was fitted with `dtifit`"
              f"{' (weighted least squares)' if dwi['fit_method'] == 'WLS' else ''}")
        bo = "Resting-state BOLD series were realigned with FSL `mcflirt` and skull-stripped with `bet`"
    else:
        cite += ["n4", "sitk", "mattes"] + (["demons"] if nonlinear else [])
        t1 = (f"The T1-weighted image was corrected for intensity non-uniformity (N4) and skull-stripped by "
              f"registering the {MNI_SPACE} template to the head and refining the warped template brain mask on "
              f"the image's intensities; the brain was then registered to the template brain (SimpleITK "
              f"{v['SimpleITK']}, Mattes mutual information, affine with 12 degrees of freedom"
              + ("; then a dense displacement field estimated with symmetric-forces demons after a smooth "
                 "intensity-bias correction, two rounds" if nonlinear else "") + ").")
        how = {"WLS": "weighted least squares", "OLS": "ordinary least squares",
               "NLLS": "non-linear least squares"}.get(dwi["fit_method"], dwi["fit_method"])
        dw = (f"Diffusion-weighted images were realigned rigidly to the mean b=0 image (mutual information), "
              f"b-vectors rotated with each volume's rotation, and a diffusion tensor fitted by {how} "
              f"(b-values at or below {dwi['b0_threshold']:g} s/mm^2 taken as b=0; "
              + (f"dipy {v['dipy']}'s TensorModel)" if dwi["fit_method"] == "NLLS"
                 else f"matching dipy {v['dipy']}'s TensorModel)"))
        bo = "Resting-state BOLD series were realigned rigidly to their middle volume and skull-stripped (nilearn)"
        cite += ["dipy", "nilearn"]
    cite += ["dti", "falff", "reho", "fd"]
    nuisance = {"motion": "the six realignment parameters", "wm": "the mean white-matter signal",
                "csf": "the mean CSF signal"}
    dw += "; fractional anisotropy, mean, axial and radial diffusivity were computed from its eigenvalues."
    bo += (f", after discarding {func['dummy_scans']} initial volumes. Framewise displacement and DVARS were "
           f"computed; {_list(nuisance[n] for n in func['nuisance']) if func['nuisance'] else 'no regressor'} "
           f"{'were' if len(func['nuisance']) > 1 else 'was'} regressed out, and the fractional amplitude of "
           f"low-frequency fluctuations (fALFF, {func['band_hz'][0]:g}-{func['band_hz'][1]:g} Hz) and regional "
           f"homogeneity (ReHo, Kendall's W over 27 voxels) were computed.")
    space = (f"Every map was resampled to {MNI_SPACE} (2 mm) in a single interpolation through the composition "
             f"of its rigid registration to the T1-weighted image (mutual information) and the T1w-to-template "
             f"transform.")
    out = [t1, dw, bo, space]
    ingested = {k: v for k, v in ((cfg.get("inputs") or {}).get("derivatives") or {}).items() if v}
    if "fmriprep" in ingested:
        cite.append("fmriprep")
        out.append("Where fMRIPrep's preprocessed resting-state BOLD was available, fALFF and ReHo were computed "
                   "from it instead (the same regression with fMRIPrep's motion, white-matter and CSF regressors, "
                   "the volumes it flagged as non-steady-state discarded) and reached the template through "
                   "fMRIPrep's transforms; the subjects concerned are those whose map sidecars cite bids:fmriprep.")
    if "qsiprep" in ingested:
        cite.append("qsiprep")
        out.append("Where QSIPrep's preprocessed DWI was available, the tensor was fitted to it instead and the "
                   "maps reached the template through QSIPrep's transforms (sidecars citing bids:qsiprep).")
    return out


def methods_text(cfg: Mapping[str, Any], v: Mapping[str, str] | None = None) -> str:
    """The methods section (markdown) of a run with the validated config ``cfg``; ``v``: package versions
    (``versions()`` by default)."""
    v = dict(v or versions())
    cite: list[str] = ["mni"]
    pre = cfg["preprocessing"]
    parts = [f"# Methods\n\nGenerated by neuromoe {v['neuromoe']} from this run's configuration. Processing ran "
             f"in Snakemake {v['snakemake']} (preprocessing backend: {pre['backend']}).\n"]
    cite.insert(0, "snakemake")
    parts.append("## Preprocessing\n\n" + " ".join(_preprocessing(cfg, v, cite)) + "\n")
    c, m, t, e = cfg["cache"], cfg["model"], cfg["train"], cfg["evaluation"]
    grid = "x".join(str(g) for g in c["grid"])
    parts.append(f"## Model inputs\n\nThe MNI-space maps were resampled to a {grid} grid, masked to the brain and "
                 f"robustly z-scored per image (median and scaled MAD), giving the experts' inputs: T1w; "
                 f"{_list(c['dwi_maps'])} (diffusion); {_list(c['func_maps'])} (BOLD). Clinical and serum "
                 f"features: {_list(cfg['participants']['clinical_columns'])}.\n")
    encoder = m.get("encoder", "vit")
    encoders = {"vit": f"a 3D vision transformer on {m['patch_size']}x{m['patch_size']}x{m['patch_size']} "
                       f"patches (width {m['dim']}, depth {m['depth']}, {m['heads']} heads)",
                "cnn": "a 3D convolutional network",
                "screen": "a read-out of the voxels screened on each run's training subjects (docs/model.md)"}
    enc = encoders.get(encoder, encoder)
    cite += ["moe"] + (["vit"] if encoder == "vit" else [])
    parts.append(f"## Model\n\nNeuroMoE (PyTorch {v['torch']}): one expert per MRI modality, each {enc}, an "
                 f"expert on the clinical features, and a gating network driven by the clinical features that "
                 f"weights the experts' predictions. Training: AdamW (learning rate {t['lr']:g}, weight decay "
                 f"{t['weight_decay']:g}), up to {t['epochs']} epochs (batch {t['batch_size']}, warm-up "
                 f"{t['warmup_epochs']}), class-weighted cross-entropy plus a load-balancing term (lambda "
                 f"{t['balance_lambda']:g}); gate fit: {t['gate_fit']}; model selection: {t['select']}.\n")
    seeds = f"seed {e['seeds'][0]}" if len(e["seeds"]) == 1 else f"repeated over seeds {_list(e['seeds'])}"
    protocol = (f"{e['folds']}-fold stratified cross-validation ({seeds})" if e["protocol"] == "cv"
                else "a single stratified hold-out split")
    baseline = (" A logistic regression on the clinical features and regional means is the baseline."
                if e.get("baseline") == "logreg" else "")
    parts.append(f"## Evaluation\n\n{protocol}, with {e['val_fraction']:g} of each training part held out for "
                 f"validation; balanced accuracy on the test parts, for the variants {_list(e['variants'])}."
                 f"{baseline}\n")
    parts.append("## Software\n\n" + "\n".join(f"- {k} {val}" for k, val in v.items()) + "\n")
    refs = [REFERENCES["neuromoe"], REFERENCES["torch"]] + [REFERENCES[k] for k in dict.fromkeys(cite)]
    parts.append("## References\n\n" + "\n".join(f"{i}. {r}" for i, r in enumerate(refs, 1)) + "\n")
    return "\n".join(parts)
