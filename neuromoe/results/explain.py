"""Per-subject explanations: gate weights and a saliency map per MRI modality, in MNI space.

Saliency method: gradient x input of the target class's log-probability, ``|x * d log P_out[c] / dx|``
summed over the modality's channels. Why this one:

- one forward and one backward pass give the maps of every modality at once. Measured on a shared
  2-core CPU: 1.7 s per subject for the demo model at 32^3, 32 s for the paper-size model (12.8 M
  parameters) at 64^3. Integrated gradients costs one backward per step (x 8-50), and occlusion of
  4^3 patches one forward per patch and modality (3 x 512 at 32^3, 3 x 4,096 at 64^3): minutes to
  hours per subject on a CPU;
- with the cache's normalised maps a zero input is a meaningful "no signal" baseline, and x * grad is
  the first-order share of the output due to each voxel relative to it (integrated gradients with a
  single step);
- it is computed on the mixture's output, so a modality whose expert the gate ignores gets a weak map.

The map is on the model grid (the cohort cache's grid, affine ``grid_affine``: voxel -> MNI mm),
then resampled (linear, so it stays non-negative) to the MNI152 2 mm template grid (99 x 117 x 95)
and written as float32 NIfTI. Group maps average per-subject maps, each first scaled to sum 1, so
every subject weighs the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from nilearn.image import resample_to_img

from neuromoe import MNI_SPACE
from neuromoe.learn.model import MRI_MODALITIES, NeuroMoE, expert_presence


def mni_template() -> nib.Nifti1Image:
    """The MNI152 2009a symmetric T1 template at 2 mm (99 x 117 x 95), as ``neuromoe.inputs.templates`` ships it."""
    from neuromoe.inputs.templates import mni_t1

    return mni_t1()


def _batch(item: Mapping[str, torch.Tensor], model: NeuroMoE,
           device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A CohortDataset item -> (images (1, C, D, H, W) requiring grad, clin (1, F), present (1, E))."""
    cfg = model.cfg
    images = {m: item[m].detach().float().unsqueeze(0).to(device).requires_grad_(True)  # (1, C, D, H, W)
              for m in cfg.mri_experts}
    clin = torch.as_tensor(item["clin"], dtype=torch.float32).reshape(1, -1).to(device)
    mod_present = torch.as_tensor(item.get("present", torch.ones(3, dtype=torch.bool)), dtype=torch.bool)
    present = expert_presence(mod_present.reshape(1, 3), cfg.experts).to(device)  # (1, E)
    return images, clin, present


def saliency(model: NeuroMoE, item: Mapping[str, torch.Tensor],
             target: str | int = "pred") -> tuple[dict[str, np.ndarray], dict]:
    """Gradient x input saliency of one subject on the model grid.

    Args:
        model: a trained NeuroMoE (run in eval mode, its mode restored after; parameters unchanged).
        item: a ``CohortDataset`` item: ``{modality: (C, D, H, W), "clin": (F,), "present": (3,), "label"}``.
        target: ``"pred"`` (the predicted class), ``"true"`` (``item["label"]``) or a class index.

    Returns:
        (``{modality: (D, H, W) float32 >= 0}`` for the MRI experts present, info dict with
        ``target``, ``pred``, ``probs`` (C,), ``gate`` ``{expert: weight}``).
    """
    was_training = model.training
    model.eval()  # no dropout: the explanation is of the deterministic prediction
    device = next(model.parameters()).device
    images, clin, present = _batch(item, model, device)
    try:
        with torch.enable_grad():
            out = model(images, clin, present)
            probs = out.log_probs.detach().exp()[0].cpu().numpy()
            pred = int(probs.argmax())
            if target == "pred":
                cls = pred
            elif target == "true":
                cls = int(item["label"])
            else:
                cls = int(target)
            if not 0 <= cls < model.cfg.n_classes:
                raise ValueError(f"target class {cls} outside 0..{model.cfg.n_classes - 1}")
            grads = torch.autograd.grad(out.log_probs[0, cls], list(images.values()), allow_unused=True)
    finally:
        model.train(was_training)
    maps = {}
    pres = present[0].cpu().numpy()
    for (m, x), g in zip(images.items(), grads, strict=True):
        if not pres[model.cfg.experts.index(m)] or g is None:
            continue  # absent modality: nothing of its input reaches the output
        maps[m] = (x.detach() * g).abs().sum(dim=1)[0].cpu().numpy().astype(np.float32)  # (D, H, W)
    info = {"target": cls, "pred": pred, "probs": probs.astype(float).tolist(),
            "gate": dict(zip(model.cfg.experts, out.gate.detach()[0].cpu().numpy().astype(float).tolist(),
                             strict=True))}
    return maps, info


def to_mni(volume: np.ndarray, grid_affine: np.ndarray,
           reference: nib.Nifti1Image | None = None) -> nib.Nifti1Image:
    """A (D, H, W) map on the model grid (``grid_affine``: voxel -> MNI mm) -> the reference grid.

    Linear interpolation (no negative overshoot); outside the model grid is 0.
    """
    reference = reference if reference is not None else mni_template()
    src = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(grid_affine, dtype=float))
    out = resample_to_img(src, reference, interpolation="linear", force_resample=True, copy_header=True)
    data = np.clip(np.asarray(out.dataobj, dtype=np.float32), 0.0, None)
    return nib.Nifti1Image(data, reference.affine)


def saliency_path(out_prefix: str | Path, modality: str) -> Path:
    """``{out_prefix}_space-<MNI>_desc-<modality>saliency_map.nii.gz``."""
    return Path(f"{out_prefix}_space-{MNI_SPACE}_desc-{modality}saliency_map.nii.gz")


def explain_subject(model: NeuroMoE, item: Mapping[str, torch.Tensor], grid_affine: np.ndarray,
                    out_prefix: str | Path, *, target: str | int = "pred",
                    reference: nib.Nifti1Image | None = None) -> dict[str, Path]:
    """Write one subject's saliency maps (MNI, NIfTI) and gate weights (JSON).

    Args:
        model, item, target: as in ``saliency``.
        grid_affine: (4, 4) voxel -> MNI mm affine of the model grid (the cohort cache's).
        out_prefix: path prefix, e.g. ``results/evaluation/explain/full/sub-01``.
        reference: target grid (default: the MNI152 2 mm template).

    Returns:
        ``{modality: NIfTI path}`` for each MRI modality present, plus ``"json"``: gate weights,
        class probabilities, predicted and target class.
    """
    reference = reference if reference is not None else mni_template()
    maps, info = saliency(model, item, target)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for m, vol in maps.items():
        path = saliency_path(out_prefix, m)
        nib.save(to_mni(vol, grid_affine, reference), path)
        paths[m] = path
    info["modalities"] = sorted(maps, key=MRI_MODALITIES.index)
    info["method"] = "gradient x input, |.| summed over channels, of log P_out[target]"
    json_path = Path(f"{out_prefix}_desc-explain_gates.json")
    json_path.write_text(json.dumps(info, indent=2))
    paths["json"] = json_path
    return paths


def group_average(paths: Sequence[str | Path] | Iterable[nib.Nifti1Image], out_path: str | Path) -> Path:
    """Average of per-subject saliency maps (same grid), each scaled to sum 1 first; written to ``out_path``.

    Raises ``ValueError`` if there is no map, grids differ, or a map is all zero.
    """
    imgs = [p if isinstance(p, nib.Nifti1Image) else nib.load(str(p)) for p in paths]
    if not imgs:
        raise ValueError("no saliency maps to average")
    ref = imgs[0]
    acc = np.zeros(ref.shape, dtype=np.float64)
    for img in imgs:
        if img.shape != ref.shape or not np.allclose(img.affine, ref.affine):
            raise ValueError(f"saliency maps are on different grids: {img.shape} vs {ref.shape}")
        data = np.asarray(img.dataobj, dtype=np.float64)
        total = data.sum()
        if not np.isfinite(total) or total <= 0:
            raise ValueError(f"a saliency map is empty or not finite ({img.get_filename() or 'in memory'})")
        acc += data / total
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image((acc / len(imgs)).astype(np.float32), ref.affine), out_path)
    return out_path


def explain_cohort(model: NeuroMoE, items: Sequence[Mapping[str, torch.Tensor]],
                   participant_ids: Sequence[str], grid_affine: np.ndarray, out_dir: str | Path, *,
                   target: str | int = "pred", reference: nib.Nifti1Image | None = None,
                   figure: bool = True, classes: Sequence[str] | None = None) -> dict[str, Path]:
    """Explain every subject, then write a group-average map per modality, a gate table and a figure.

    Files under ``out_dir``: ``sub-XX_*`` per subject (see ``explain_subject``), ``gates.tsv``
    (participant_id, target, pred (class indices), pred_class, prob_<class>, gate_<expert>; class
    names from ``classes``, else the indices),
    ``group_space-<MNI>_desc-<m>saliency_map.nii.gz`` and ``group_saliency.png`` (orthogonal slices
    over the template).

    Returns ``{"gates": tsv, "<modality>": group NIfTI, ..., "figure": png}``.
    """
    from neuromoe.results.figures import saliency_slices

    reference = reference if reference is not None else mni_template()
    out_dir = Path(out_dir)
    per_mod: dict[str, list[Path]] = {}
    rows = []
    ids = [str(p).removeprefix("sub-") for p in participant_ids]
    if not ids:
        raise ValueError("no subjects to explain")
    if len(ids) != len(items):
        raise ValueError(f"{len(ids)} participant ids but {len(items)} items")
    for pid, item in zip(ids, items, strict=True):
        paths = explain_subject(model, item, grid_affine, out_dir / f"sub-{pid}", target=target,
                                reference=reference)
        info = json.loads(paths["json"].read_text())
        names = list(classes) if classes is not None else [str(k) for k in range(len(info["probs"]))]
        rows.append({"participant_id": pid, "target": info["target"], "pred": info["pred"],
                     "pred_class": names[info["pred"]],
                     **{f"prob_{c}": p for c, p in zip(names, info["probs"], strict=True)},
                     **{f"gate_{e}": w for e, w in info["gate"].items()}})
        for m, p in paths.items():
            if m != "json":
                per_mod.setdefault(m, []).append(p)
    out: dict[str, Path] = {}
    gates = out_dir / "gates.tsv"
    pd.DataFrame(rows).to_csv(gates, sep="\t", index=False)
    out["gates"] = gates
    for m in sorted(per_mod, key=MRI_MODALITIES.index):
        out[m] = group_average(per_mod[m], saliency_path(out_dir / "group", m))
    if figure and per_mod:
        out["figure"] = saliency_slices({m: out[m] for m in per_mod}, out_dir / "group_saliency.png",
                                        template=reference)
    return out


def explain_run(run_dir: str | Path, cache_dir: str | Path, out_dir: str | Path, *, part: str = "test",
                target: str | int = "pred", max_subjects: int | None = None, figure: bool = True,
                device: str = "cpu") -> dict[str, Path]:
    """Explain the ``part`` subjects of a trained run (``neuromoe.learn.train.train_run``'s folder).

    Loads ``model.safetensors`` (weights, configs, the clinical preprocessor fitted on the run's
    training part), opens the cohort cache, takes the subjects the run's ``predictions.tsv`` lists
    for ``part`` (default the test part: explanations of subjects the model did not train on), and
    runs ``explain_cohort`` with the cache's grid affine. ``max_subjects`` keeps the first N (by id).
    """
    from neuromoe.cache.store import open_cohort, unit_ids
    from neuromoe.learn.clinical import ClinicalPreprocessor
    from neuromoe.learn.data import CohortDataset
    from neuromoe.learn.train import load_model

    run_dir = Path(run_dir)
    model, meta = load_model(run_dir / "model.safetensors", device=device)
    cohort = open_cohort(cache_dir, verify=False)
    if list(cohort.labels) != list(meta["classes"]):
        raise ValueError(f"{cache_dir}: classes {cohort.labels} differ from the model's {meta['classes']}")
    pred = pd.read_csv(run_dir / "predictions.tsv", sep="\t", dtype={"participant_id": str, "session_id": str})
    sel = pred[pred["part"] == part]
    units = sel["participant_id"].str.removeprefix("sub-")
    if "session_id" in sel.columns:  # a cohort with sessions: one item per visit, named 01_ses-2
        units = units + "_" + sel["session_id"]
    ids = sorted(units)
    if max_subjects is not None:
        ids = ids[:max_subjects]
    if not ids:
        raise ValueError(f"{run_dir}/predictions.tsv lists no {part!r} subjects to explain")
    row_of = dict(zip(unit_ids(cohort.index), cohort.index["row"].astype(int), strict=True))
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise ValueError(f"subjects {missing[:5]} of {run_dir} are not in the cache {cache_dir}")
    clinical = ClinicalPreprocessor.from_dict(meta["clinical"]).transform(cohort.index)  # (N, F)
    dataset = CohortDataset(cohort, [row_of[i] for i in ids], clinical)
    items = [dataset[k] for k in range(len(dataset))]
    return explain_cohort(model, items, ids, cohort.affine, out_dir, target=target, figure=figure,
                          classes=meta["classes"])
