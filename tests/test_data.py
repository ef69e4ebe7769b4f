"""Tests of neuromoe.learn.data: CohortDataset items over a real (small) cohort cache, and read_clinical."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from neuromoe import paths
from neuromoe.cache import store as C
from neuromoe.learn.data import CohortDataset, read_clinical, to_device

GRID = (16, 16, 16)
LABELS = ["HC", "PD", "iRBD"]
SUBJECTS = {"01": "PD", "02": "HC", "03": "iRBD", "04": "PD"}  # sub-02 has no DWI maps
KEYS = {"anat": ["anat_brain_mni"], "dwi": ["dwi_fa_mni", "dwi_md_mni"],
        "func": ["func_falff_mni", "func_reho_mni"]}


def cfg(dtype: str) -> dict:
    return {"cache": {"grid": list(GRID), "dtype": dtype, "dwi_maps": ["FA", "MD"],
                      "func_maps": ["fALFF", "ReHo"]},
            "participants": {"diagnosis_column": "diagnosis", "labels": LABELS,
                             "clinical_columns": ["age", "sex", "moca"]}}


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same four subjects cached as float16 and as bfloat16 (16^3 grid, uncompressed .nii inputs)."""
    from nilearn.datasets import load_mni152_brain_mask

    root = tmp_path_factory.mktemp("data")
    mimg = load_mni152_brain_mask(resolution=2)
    mask = np.asarray(mimg.dataobj) > 0
    rng = np.random.default_rng(3)
    maps = {}
    for sub in SUBJECTS:
        maps[sub] = {m: [paths.derivative(root / "out", sub, k).replace(".nii.gz", ".nii") for k in keys]
                     for m, keys in KEYS.items()}
        for m, files in maps[sub].items():
            if sub == "02" and m == "dwi":
                continue
            for f in files:
                Path(f).parent.mkdir(parents=True, exist_ok=True)
                data = np.where(mask, rng.gamma(4.0, 0.25, mask.shape), 0).astype(np.float32)
                nib.save(nib.Nifti1Image(data, mimg.affine), f)
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in SUBJECTS], "diagnosis": list(SUBJECTS.values()),
                  "age": [60, 65, np.nan, 70], "sex": ["M", "F", "m", np.nan], "moca": [27, 25, 30, 22]}
                 ).to_csv(root / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    out = {}
    for dtype in C.DTYPES:
        records = []
        for sub in SUBJECTS:
            op = {m: root / dtype / f"sub-{sub}" / f"sub-{sub}_{m}.npy" for m in C.MODALITIES}
            C.cache_subject(maps[sub], op, GRID, dtype, sub, patch=4)
            records.append(C.default_record_path(op, sub))
        C.build_cohort(records, root / "participants.tsv", root / dtype / "cohort", cfg(dtype))
        out[dtype] = root / dtype / "cohort"
    return out


@pytest.mark.parametrize("dtype", C.DTYPES)
def test_items_have_contract_shapes_dtypes_labels(caches: dict[str, Path], dtype: str) -> None:
    cc = C.open_cohort(caches[dtype], cfg(dtype))
    clin = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    ds = CohortDataset(cc, rows=[3, 0, 1], clinical=clin)
    assert len(ds) == 3
    item = ds[0]
    assert set(item) == {"anat", "dwi", "func", "present", "clin", "label", "row"}
    tdt = torch.float16 if dtype == "float16" else torch.bfloat16
    assert item["anat"].shape == (1, *GRID) and item["anat"].dtype == tdt
    assert item["dwi"].shape == (2, *GRID) and item["func"].shape == (2, *GRID) and item["dwi"].dtype == tdt
    assert item["present"].dtype == torch.bool and item["present"].shape == (3,)
    assert item["clin"].dtype == torch.float32 and torch.equal(item["clin"], torch.from_numpy(clin[3]))
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    # item i is cache row rows[i]; labels follow the config's class order
    assert [int(ds[i]["row"]) for i in range(3)] == [3, 0, 1]
    assert [int(ds[i]["label"]) for i in range(3)] == [LABELS.index(SUBJECTS[s]) for s in ("04", "01", "02")]
    # values are the cache's, bit for bit (decoded to float32 for the comparison)
    for m in C.MODALITIES:
        assert np.array_equal(item[m].float().numpy(), cc.image(m, 3))


def test_images_are_zero_copy_views_of_the_memmap(caches: dict[str, Path]) -> None:
    for dtype in C.DTYPES:
        ds = CohortDataset(caches[dtype])
        item = ds[2]
        for m in C.MODALITIES:
            view = item[m].view(torch.int16) if dtype == "bfloat16" else item[m]
            assert np.shares_memory(view.numpy(), ds._maps()[m])
        item["anat"].zero_()  # copy-on-write map: never reaches the file
        assert C.open_cohort(caches[dtype]).image("anat", 2).any()


def test_absent_modality_is_zeros_and_flagged(caches: dict[str, Path]) -> None:
    ds = CohortDataset(caches["float16"])
    item = ds[1]  # sub-02: no DWI
    assert item["present"].tolist() == [True, False, True]
    assert not item["dwi"].any() and item["func"].any()
    assert ds[0]["present"].tolist() == [True, True, True]


def test_dataloader_batches_and_device_conversion(caches: dict[str, Path]) -> None:
    cc = C.open_cohort(caches["bfloat16"], cfg("bfloat16"))
    ds = CohortDataset(cc, clinical=np.zeros((4, 3), np.float32))
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["dwi"].shape == (4, 2, *GRID) and batch["present"].shape == (4, 3)
    assert batch["label"].tolist() == [LABELS.index(d) for d in SUBJECTS.values()]
    images, clin, present, label = to_device(batch, ("anat", "dwi", "func", "clin"), torch.device("cpu"))
    assert images["anat"].dtype == torch.float32 and label.dtype == torch.int64 and clin.dtype == torch.float32
    assert present.dtype == torch.bool and present.shape == (4, 4) and present[:, 3].all()  # clin: always
    # bfloat16 keeps 8 significant bits of the float16 cache's values (same inputs, same normalisation)
    f16 = C.open_cohort(caches["float16"]).arrays["func"][:].astype(np.float32)
    assert np.allclose(images["func"].numpy(), f16, rtol=2.0**-8 + 2.0**-11, atol=1e-6)


def test_dataset_pickles_without_the_arrays(caches: dict[str, Path]) -> None:
    ds = CohortDataset(caches["float16"])
    ds[0]  # maps opened
    assert len(pickle.dumps(ds)) < 20_000  # a cohort row alone is 5 x 16^3 x 2 bytes = 40 kB


def test_dataset_argument_errors(caches: dict[str, Path]) -> None:
    cc = C.open_cohort(caches["float16"])
    with pytest.raises(ValueError, match="cache rows"):
        CohortDataset(cc, clinical=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        CohortDataset(cc, clinical=np.full((4, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="rows must be"):
        CohortDataset(cc, rows=[0, 4])
    assert CohortDataset(cc)[0]["clin"].shape == (0,)


def test_read_clinical_encodes_sex_and_keeps_nan(caches: dict[str, Path]) -> None:
    idx = C.open_cohort(caches["float16"]).index
    X = read_clinical(idx, ["age", "sex", "moca"])
    assert list(X.columns) == ["age", "sex", "moca"] and all(X.dtypes == np.float32)
    assert X["sex"].tolist()[:3] == [0.0, 1.0, 0.0] and np.isnan(X["sex"].iloc[3])  # M -> 0, F -> 1
    assert np.isnan(X["age"].iloc[2]) and X["moca"].tolist() == [27, 25, 30, 22]
    with pytest.raises(ValueError, match="not M/F"):
        read_clinical(pd.DataFrame({"sex": ["M", "X"]}), ["sex"])
    with pytest.raises(ValueError, match="non-numeric"):
        read_clinical(pd.DataFrame({"age": ["61", "old"]}), ["age"])
    with pytest.raises(ValueError, match="not in the index"):
        read_clinical(idx, ["bmi"])
