"""Saliency finds a planted effect; explanation files are NIfTI in MNI space with the gate weights."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nilearn.image import resample_to_img

from neuromoe import MNI_SPACE
from neuromoe.learn.model import ModelConfig, NeuroMoE, moe_loss
from neuromoe.results.explain import explain_cohort, explain_subject, group_average, mni_template, saliency, to_mni

G = 16  # model grid for the test (voxels per axis)
# voxel -> MNI mm for the 16^3 grid: ~12 mm voxels spanning the template's bounding box
GRID_AFFINE = np.array([[12.0, 0, 0, -90], [0, 14.0, 0, -126], [0, 0, 11.0, -72], [0, 0, 0, 1]])
# The planted region: one 4^3 block, off-centre on every axis so a flipped or transposed axis misses it.
REGION = (slice(4, 8), slice(8, 12), slice(8, 12))


def planted_cohort(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Masked noise "brains" (N(0, 0.5) inside a sphere, 0 outside, as the cache masks); class 1 adds
    +1.5 inside REGION. Returns X (n, 1, G, G, G), y (n,), region mask, brain mask."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    z, yy, x = np.meshgrid(*[np.arange(G)] * 3, indexing="ij")
    brain = ((z - 7.5) ** 2 + (yy - 7.5) ** 2 + (x - 7.5) ** 2) < 8 ** 2
    region = np.zeros((G, G, G), bool)
    region[REGION] = True
    X = rng.normal(0.0, 0.5, (n, G, G, G)).astype(np.float32)
    X[y == 1] += 1.5 * region
    X *= brain
    return torch.from_numpy(X[:, None]), torch.from_numpy(y), region, brain


def tiny_anat_model() -> NeuroMoE:
    cfg = ModelConfig(channels={"anat": 1}, grid=(G, G, G), n_clinical=0, n_classes=2, experts=("anat",),
                      use_gate=False, dim=32, depth=1, heads=2, mlp_ratio=2, dropout=0.0, expert_hidden=16)
    return NeuroMoE(cfg)


def item_of(X: torch.Tensor, y: torch.Tensor, i: int) -> dict:
    return {"anat": X[i], "clin": torch.zeros(0), "present": torch.ones(3, dtype=torch.bool), "label": y[i]}


def mni_ratio(maps: list, region: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    """Mean saliency inside REGION / outside it (whole grid; inside the brain), MNI maps (paths or images)."""
    ref = mni_template()

    def on_mni(mask: np.ndarray) -> np.ndarray:
        img = nib.Nifti1Image(mask.astype(np.uint8), GRID_AFFINE)
        return resample_to_img(img, ref, interpolation="nearest", force_resample=True,
                               copy_header=True).get_fdata() > 0

    inside, in_brain = on_mni(region), on_mni(brain)
    data = [np.asarray((m if isinstance(m, nib.Nifti1Image) else nib.load(m)).dataobj) for m in maps]
    sal = np.mean([d / d.sum() for d in data], axis=0)
    return (float(sal[inside].mean() / sal[~inside].mean()),
            float(sal[inside].mean() / sal[~inside & in_brain].mean()))


def test_saliency_peaks_in_the_planted_region(tmp_path) -> None:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and shares the machine
    try:
        _train_and_check(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _train_and_check(tmp_path) -> None:
    X, y, region, brain = planted_cohort(160, seed=0)
    Xt, yt, _, _ = planted_cohort(40, seed=1)
    model = tiny_anat_model()
    untrained = tiny_anat_model()
    untrained.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(12):  # ~1 s on one CPU thread
        model.train()
        for idx in torch.randperm(len(y)).split(16):
            loss, _ = moe_loss(model({"anat": X[idx]}, torch.zeros(len(idx), 0)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model({"anat": Xt}, torch.zeros(len(yt), 0)).log_probs.argmax(1) == yt).float().mean()
    assert acc >= 0.9, f"the tiny model did not learn the planted effect (held-out accuracy {acc:.2f})"

    class1 = [i for i in range(len(yt)) if yt[i] == 1][:6]
    paths = [explain_subject(model, item_of(Xt, yt, i), GRID_AFFINE, tmp_path / f"sub-{i:02d}", target="true")
             for i in class1]
    ratio_all, ratio_brain = mni_ratio([p["anat"] for p in paths], region, brain)
    # The planted block holds >= 3x the mean saliency of the rest of the grid, and of the rest of the brain.
    print(f"saliency inside/outside: whole grid {ratio_all:.1f}, brain {ratio_brain:.1f}")
    assert ratio_all >= 3.0 and ratio_brain >= 3.0, (ratio_all, ratio_brain)

    # Control: the same inputs through the untrained network. The bright block alone (x in x*grad) gives
    # far less concentration, so the ratio above comes from what the model learned.
    ctrl = [to_mni(saliency(untrained, item_of(Xt, yt, i), "true")[0]["anat"], GRID_AFFINE) for i in class1]
    _, ctrl_brain = mni_ratio(ctrl, region, brain)
    print(f"untrained control, brain: {ctrl_brain:.1f}")
    assert ratio_brain >= 2.0 * ctrl_brain, (ratio_brain, ctrl_brain)

    # The peak of the group map lies in the planted block (in model-grid voxels).
    grp = nib.load(group_average([p["anat"] for p in paths], tmp_path / "group.nii.gz"))
    peak = np.unravel_index(np.argmax(grp.get_fdata()), grp.shape)
    peak_mm = nib.affines.apply_affine(grp.affine, peak)
    peak_vox = nib.affines.apply_affine(np.linalg.inv(GRID_AFFINE), peak_mm)
    for ax, sl in enumerate(REGION):
        assert sl.start - 1 <= peak_vox[ax] <= sl.stop, (peak_vox, REGION)


def multimodal_model() -> NeuroMoE:
    cfg = ModelConfig(channels={"anat": 1, "dwi": 2}, grid=(8, 8, 8), n_clinical=3, n_classes=3,
                      experts=("anat", "dwi", "clin"), use_gate=True, dim=8, depth=1, heads=2, mlp_ratio=2,
                      clin_hidden=(8,), expert_hidden=8, gate_hidden=8)
    torch.manual_seed(1)
    return NeuroMoE(cfg)


def multimodal_item(dwi_present: bool, label: int = 2) -> dict:
    g = torch.Generator().manual_seed(label)
    return {"anat": torch.randn(1, 8, 8, 8, generator=g), "dwi": torch.randn(2, 8, 8, 8, generator=g),
            "func": torch.zeros(2, 8, 8, 8), "clin": torch.randn(3, generator=g),
            "present": torch.tensor([True, dwi_present, False]), "label": torch.tensor(label)}


def test_explain_subject_writes_mni_maps_and_gates(tmp_path) -> None:
    model = multimodal_model()
    affine = np.diag([22.0, 27.0, 20.0, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    paths = explain_subject(model, multimodal_item(True), affine, tmp_path / "sub-07")
    assert set(paths) == {"anat", "dwi", "json"}
    assert paths["anat"].name == f"sub-07_space-{MNI_SPACE}_desc-anatsaliency_map.nii.gz"
    img = nib.load(paths["dwi"])
    ref = mni_template()
    assert img.shape == ref.shape == (99, 117, 95) and np.allclose(img.affine, ref.affine)
    data = img.get_fdata()
    assert data.min() >= 0 and data.max() > 0 and img.get_data_dtype() == np.float32
    info = json.loads(paths["json"].read_text())
    assert set(info["gate"]) == {"anat", "dwi", "clin"}
    assert sum(info["gate"].values()) == pytest.approx(1, abs=1e-5)
    assert info["pred"] == int(np.argmax(info["probs"])) and info["target"] == info["pred"]

    # an absent modality: no map, gate weight exactly 0; target="true" follows the label
    paths = explain_subject(model, multimodal_item(False, label=1), affine, tmp_path / "sub-08",
                            target="true")
    assert set(paths) == {"anat", "json"}
    info = json.loads(paths["json"].read_text())
    assert info["gate"]["dwi"] == 0.0 and info["target"] == 1
    with pytest.raises(ValueError, match="target class"):
        saliency(model, multimodal_item(True), target=5)


def test_explain_cohort_group_maps_table_and_figure(tmp_path) -> None:
    model = multimodal_model()
    affine = np.diag([22.0, 27.0, 20.0, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    items = [multimodal_item(True, 0), multimodal_item(False, 1), multimodal_item(True, 2)]
    out = explain_cohort(model, items, ["01", "sub-02", "03"], affine, tmp_path)
    assert set(out) == {"gates", "anat", "dwi", "figure"}
    gates = pd.read_csv(out["gates"], sep="\t", dtype={"participant_id": str})
    assert list(gates["participant_id"]) == ["01", "02", "03"] and gates.loc[1, "gate_dwi"] == 0.0
    grp = nib.load(out["anat"]).get_fdata()
    assert grp.sum() == pytest.approx(1.0, rel=1e-3)  # mean of maps each scaled to sum 1
    assert out["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no subjects"):
        explain_cohort(model, [], [], affine, tmp_path / "empty")
    with pytest.raises(ValueError, match="no saliency maps"):
        group_average([], tmp_path / "none.nii.gz")


def small_cohort(root, n_per_class: int = 4, grid: tuple[int, int, int] = (8, 8, 8)) -> dict:
    """A real cohort cache (``build_cohort``) from hand-written subject tensors, plus a holdout split."""
    from neuromoe.cache import store as C
    from neuromoe.learn.splits import make_splits, write_splits

    labels = ["HC", "PD", "iRBD"]
    cfg = {"cache": {"grid": list(grid), "dtype": "float16", "dwi_maps": ["FA", "MD"],
                     "func_maps": ["fALFF", "ReHo"]},
           "participants": {"diagnosis_column": "diagnosis", "labels": labels,
                            "clinical_columns": ["age", "updrs3"], "missing_modality": "keep"},
           "model": {"patch_size": 4, "dim": 8, "depth": 1, "heads": 2, "mlp_ratio": 2, "clin_hidden": [8],
                     "expert_hidden": 8, "gate_hidden": 8},
           "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 1, "patience": 5,
                     "device": "cpu"}}
    rng = np.random.default_rng(0)
    subs = [f"{i + 1:02d}" for i in range(3 * n_per_class)]
    dx = [i % 3 for i in range(len(subs))]
    records = []
    for sub, y in zip(subs, dx, strict=True):
        d = root / "subjects" / f"sub-{sub}"
        d.mkdir(parents=True)
        rec = {"subject": sub, "cache_format": C.CACHE_FORMAT, "grid": list(grid), "dtype": "float16",
               "normalisation": C.normalisation_params(), "modalities": {}}
        for m, ch in (("anat", ["T1w"]), ("dwi", ["FA", "MD"]), ("func", ["fALFF", "ReHo"])):
            x = rng.normal(0, 1, (len(ch), *grid)).astype(np.float32)
            x[:, :4] += 1.0 * (y - 1)
            np.save(d / f"{m}.npy", C.encode(x, "float16"))
            rec["modalities"][m] = {"channels": ch, "present": True, "file": f"{m}.npy"}
        (d / "rec.json").write_text(json.dumps(rec))
        records.append(d / "rec.json")
    part = pd.DataFrame({"participant_id": [f"sub-{s}" for s in subs], "diagnosis": [labels[y] for y in dx],
                         "age": rng.normal(65, 8, len(subs)).round(1), "updrs3": [10.0 * y for y in dx]})
    part.to_csv(root / "participants.tsv", sep="\t", index=False)
    C.build_cohort(records, root / "participants.tsv", root / "cache", cfg)
    write_splits(make_splits(part, "holdout", seeds=[0]), root / "splits.tsv")
    return {"cfg": cfg, "cache": root / "cache", "splits": root / "splits.tsv"}


def test_explain_run_on_a_trained_run(tmp_path) -> None:
    from neuromoe.learn.train import train_run
    from neuromoe.results.explain import explain_run

    co = small_cohort(tmp_path)
    run = tmp_path / "model" / "full" / "holdout-s0"
    train_run(co["cache"], co["splits"], "holdout-s0", "full", co["cfg"], run, device="cpu", threads=1,
              progress=False)
    out = explain_run(run, co["cache"], tmp_path / "explain", max_subjects=2, figure=False)
    assert set(out) == {"gates", "anat", "dwi", "func"}
    gates = pd.read_csv(out["gates"], sep="\t", dtype={"participant_id": str})
    test_ids = pd.read_csv(run / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    test_ids = sorted(test_ids.loc[test_ids["part"] == "test", "participant_id"])[:2]
    assert list(gates["participant_id"]) == test_ids
    assert {"prob_HC", "prob_PD", "prob_iRBD", "gate_anat", "gate_clin", "pred_class"} <= set(gates.columns)
    assert np.allclose(gates.filter(like="gate_").sum(axis=1), 1.0, atol=1e-5)
    # the probabilities match the run's own predictions (same model, same clinical preprocessing)
    pred = pd.read_csv(run / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    pred = pred.set_index("participant_id")
    assert np.allclose(gates.set_index("participant_id")[["prob_HC", "prob_PD", "prob_iRBD"]],
                       pred.loc[test_ids, ["prob_HC", "prob_PD", "prob_iRBD"]], atol=1e-4)
    name = f"sub-{test_ids[0]}_space-{MNI_SPACE}_desc-funcsaliency_map.nii.gz"
    sub_map = nib.load(tmp_path / "explain" / name)
    assert sub_map.shape == (99, 117, 95) and sub_map.get_fdata().max() > 0
