"""Training (neuromoe/learn/train.py), checkpoints (neuromoe/learn/checkpoint.py),
clinical data (neuromoe/learn/clinical.py).

The runs use a real cohort cache built by ``neuromoe.cache.store.build_cohort`` from per-subject tensors written
here (8^3 grid, 24 subjects, a planted class signal), read through ``neuromoe.learn.data.CohortDataset``.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from neuromoe.cache import store as C
from neuromoe.config import ConfigError, TrainConfig
from neuromoe.errors import InputError
from neuromoe.learn.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    read_checkpoint_meta,
    restore_rng_state,
    save_checkpoint,
)
from neuromoe.learn.clinical import ClinicalPreprocessor
from neuromoe.learn.model import ModelConfig, NeuroMoE
from neuromoe.learn.train import (
    HISTORY_COLUMNS,
    EpochSampler,
    StopRun,
    augment,
    check_flip_grid,
    load_model,
    lr_at,
    train_run,
    variant_spec,
)

torch.set_num_threads(1)
GRID = (8, 8, 8)
LABELS = ["HC", "PD", "iRBD"]
N_SUBJECTS = 24
CLIN = ["age", "sex", "updrs3"]


def make_cfg(**train: object) -> dict:
    t = {"epochs": 6, "batch_size": 6, "lr": 3e-3, "weight_decay": 0.01, "warmup_epochs": 1, "patience": 50,
         "balance_lambda": 0.1, "num_workers": 0, "device": "cpu"}
    t.update(train)
    return {"cache": {"grid": list(GRID), "dtype": "float16", "dwi_maps": ["FA", "MD"],
                      "func_maps": ["fALFF", "ReHo"]},
            "participants": {"diagnosis_column": "diagnosis", "labels": LABELS, "clinical_columns": CLIN,
                             "missing_modality": "keep"},
            "model": {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2,
                      "clin_hidden": [16, 8], "expert_hidden": 16, "gate_hidden": 8, "dropout": 0.1,
                      "clin_dropout": 0.3, "gate_dropout": 0.3},
            "train": t}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A cohort cache whose volumes and updrs3 carry the class; sub-05 has no func; plus splits.tsv."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    subs = [f"{i:02d}" for i in range(1, N_SUBJECTS + 1)]
    labels = [i % 3 for i in range(N_SUBJECTS)]
    records = []
    norm = C.normalisation_params()
    for sub, y in zip(subs, labels, strict=True):
        d = root / "subjects" / f"sub-{sub}"
        d.mkdir(parents=True)
        rec = {"subject": sub, "cache_format": C.CACHE_FORMAT, "grid": list(GRID), "dtype": "float16",
               "normalisation": norm, "modalities": {}}
        for m, ch in (("anat", ["T1w"]), ("dwi", ["FA", "MD"]), ("func", ["fALFF", "ReHo"])):
            if sub == "05" and m == "func":
                rec["modalities"][m] = {"channels": ch, "present": False}
                continue
            x = rng.normal(0, 1, (len(ch), *GRID)).astype(np.float32)
            x[:, :4] += 1.5 * (y - 1)  # class signal in one half of every volume
            np.save(d / f"{m}.npy", C.encode(x, "float16"))
            rec["modalities"][m] = {"channels": ch, "present": True, "file": f"{m}.npy"}
        (d / "rec.json").write_text(json.dumps(rec))
        records.append(d / "rec.json")
    age = rng.normal(65, 8, N_SUBJECTS).round(1)
    age[3] = np.nan
    part = pd.DataFrame({"participant_id": [f"sub-{s}" for s in subs],
                         "diagnosis": [LABELS[y] for y in labels], "age": age,
                         "sex": ["M", "F"] * (N_SUBJECTS // 2),
                         "updrs3": [10 * y + rng.normal(0, 3) for y in labels]})
    part.to_csv(root / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    C.build_cohort(records, root / "participants.tsv", root / "cache", make_cfg())
    parts = ["train"] * 12 + ["val"] * 6 + ["test"] * 6  # stratified: labels cycle 0, 1, 2
    pd.DataFrame({"split_id": "holdout-s0", "participant_id": subs, "part": parts}).to_csv(
        root / "splits.tsv", sep="\t", index=False)
    return {"cache": root / "cache", "splits": root / "splits.tsv", "participants": root / "participants.tsv"}


def run(cohort: dict[str, Path], out: Path, variant: str = "full", cfg: dict | None = None,
        **kw: object) -> dict:
    return train_run(cohort["cache"], cohort["splits"], "holdout-s0", variant, cfg or make_cfg(), out,
                     device="cpu", threads=1, progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# Variants, schedule, sampler
# ---------------------------------------------------------------------------------------------
def test_variant_spec() -> None:
    assert variant_spec("full") == (("anat", "dwi", "func", "clin"), True, None)
    assert variant_spec("no_gate") == (("anat", "dwi", "func", "clin"), False, None)
    assert variant_spec("drop_func") == (("anat", "dwi", "clin"), True, None)
    assert variant_spec("only_dwi") == (("dwi",), False, None)
    assert variant_spec("only_clin") == (("clin",), False, None)
    assert variant_spec("lambda_0.0") == (("anat", "dwi", "func", "clin"), True, 0.0)
    assert variant_spec("lambda_1e-2")[2] == 0.01
    for bad in ("fulll", "drop_pet", "only_", "lambda_", "lambda_-1", "lambda_nan", "lambda_x"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_spec(bad)


def test_gated_variants_share_the_ungated_variants_experts_unless_the_gate_trains_with_them() -> None:
    from neuromoe.learn.variants import expert_donor

    demo = ["full", "no_gate", "drop_anat", "only_anat", "only_clin", "lambda_0", "lambda_1"]
    for gate_fit in ("crossfit", "heldout"):
        assert {v: expert_donor(v, demo, gate_fit) for v in demo} == {
            "full": "no_gate", "no_gate": None, "drop_anat": None, "only_anat": None, "only_clin": None,
            "lambda_0": "no_gate", "lambda_1": "no_gate"}
    assert all(expert_donor(v, demo, "joint") is None for v in demo)  # the gate shapes the experts
    assert expert_donor("full", ["full", "only_anat"], "crossfit") is None  # no donor run planned


def test_lr_schedule_warmup_then_cosine() -> None:
    lrs = [lr_at(s, 1.0, 4, 20, 0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # non-increasing after warm-up
    assert math.isclose(lr_at(20, 1.0, 4, 20, 0.1), 0.1)
    assert lr_at(0, 1.0, 0, 10) == 1.0


def test_epoch_sampler_is_a_function_of_seed_and_epoch() -> None:
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    a = list(s)
    assert sorted(a) == list(range(10)) and list(s) == a
    s.set_epoch(3)
    assert list(s) != a
    t = EpochSampler(10, seed=3)
    t.set_epoch(2)
    assert list(t) == a


def test_train_config_checks() -> None:
    """The train section's checks are the schema's (plus min_lr <= lr), each naming the key."""
    assert TrainConfig.of({"lr": 0.5}).lr == 0.5
    assert TrainConfig.from_config(make_cfg(epochs=3)).epochs == 3
    for bad, key in [({"batch_size": 0}, "train.batch_size"), ({"flip_lr": 1.5}, "train.flip_lr"),
                     ({"unrelated": 1}, "unrelated"), ({"lr": 1e-3, "min_lr": 1e-2}, "train.min_lr"),
                     ({"device": "tpu"}, "train.device")]:
        with pytest.raises(ConfigError, match=key):
            TrainConfig.of(bad)


def test_flip_augmentation_mirrors_whole_subjects_left_right() -> None:
    x = torch.arange(2 * 4 * 3 * 2 * 2, dtype=torch.float32).view(2, 4, 3, 2, 2)  # (B, C, D, H, W)
    images = {"anat": x[:, :1], "dwi": x[:, 1:3]}
    assert augment(images, 0.0) is images
    both = augment(images, 1.0)
    assert torch.equal(both["anat"][:, :, 0], x[:, :1, -1]) and torch.equal(both["dwi"], x[:, 1:3].flip(2))
    torch.manual_seed(0)
    big = {"anat": torch.randn(400, 1, 4, 2, 2), "func": torch.randn(400, 2, 4, 2, 2)}
    torch.manual_seed(1)
    out = augment(big, 0.5)
    flipped = [torch.equal(out["anat"][i], big["anat"][i].flip(1)) for i in range(400)]
    # The same subjects are mirrored in every modality, about half of them.
    assert flipped == [torch.equal(out["func"][i], big["func"][i].flip(1)) for i in range(400)]
    assert 150 < sum(flipped) < 250
    torch.manual_seed(1)
    assert torch.equal(augment(big, 0.5)["anat"], out["anat"])  # reproducible from the seed


def test_flip_needs_a_grid_centred_on_the_midline() -> None:
    check_flip_grid([[7.5, 0, 0, -86.25], [0, 7.5, 0, -103.25], [0, 0, 7.5, -81.25], [0, 0, 0, 1]], (24, 24, 24))
    with pytest.raises(ValueError, match="flip_lr.*x = 3.75 mm"):
        check_flip_grid([[7.5, 0, 0, -82.5], [0, 7.5, 0, 0], [0, 0, 7.5, 0], [0, 0, 0, 1]], (24, 24, 24))


# ---------------------------------------------------------------------------------------------
# Clinical preprocessing
# ---------------------------------------------------------------------------------------------
def test_clinical_fit_on_train_only_impute_and_scale() -> None:
    train = pd.DataFrame({"age": [50.0, np.nan, 70.0, 60.0], "sex": ["M", "F", "f", None], "x": [1, 1, 1, 1]})
    test = pd.DataFrame({"age": [np.nan, 1000.0], "sex": ["m", None], "x": [5, np.nan]})
    pre = ClinicalPreprocessor(["age", "sex", "x"]).fit(train)
    assert pre.median["age"] == 60.0 and pre.levels["sex"] == ["m", "f"]  # m -> 0, f -> 1 as neuromoe.learn.data
    xt = pre.transform(train)
    assert xt.dtype == np.float32 and xt.shape == (4, 3) and np.isfinite(xt).all()
    sd = np.std([50.0, 70.0, 60.0])
    np.testing.assert_allclose(xt[:, 0], (np.array([50, 60, 70, 60]) - 60) / sd, rtol=1e-6)
    np.testing.assert_allclose(xt[:, 2], 0.0)  # constant column: scale 1, centred
    x = pre.transform(test)
    assert x[0, 0] == pytest.approx(0.0) and x[1, 0] == pytest.approx((1000 - 60) / sd, rel=1e-6)
    assert pre.mean["age"] == 60.0  # the test rows never changed the fit
    again = ClinicalPreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    np.testing.assert_array_equal(again.transform(test), x)


def test_clinical_errors_name_the_column() -> None:
    with pytest.raises(InputError, match="'moca' has no observed value in the 2 training subjects"):
        ClinicalPreprocessor(["moca"]).fit(pd.DataFrame({"moca": [np.nan, np.nan]}))
    with pytest.raises(InputError, match="not in the table"):
        ClinicalPreprocessor(["moca"]).fit(pd.DataFrame({"age": [1.0]}))
    pre = ClinicalPreprocessor(["sex"]).fit(pd.DataFrame({"sex": ["M", "F"]}))
    with pytest.raises(InputError, match=r"level\(s\) \['x'\] not seen"):
        pre.transform(pd.DataFrame({"sex": ["X"]}))
    with pytest.raises(InputError, match="3 level"):
        ClinicalPreprocessor(["site"]).fit(pd.DataFrame({"site": ["a", "b", "c"]}))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def tiny_model(seed: int = 0) -> NeuroMoE:
    torch.manual_seed(seed)
    return NeuroMoE(ModelConfig(channels={"anat": 1, "dwi": 2, "func": 2}, grid=GRID, n_clinical=3, dim=16,
                                depth=1, heads=2, clin_hidden=(8,), expert_hidden=8, gate_hidden=8))


def batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ({m: torch.randn(2, c, *GRID, generator=g) for m, c in (("anat", 1), ("dwi", 2), ("func", 2))},
            torch.randn(2, 3, generator=g))


def test_checkpoint_round_trip_gives_identical_outputs_and_optimizer(tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, clin = batch()
    for _ in range(2):
        opt.zero_grad()
        model(images, clin).log_probs.sum().backward()
        opt.step()
    rng = capture_rng_state()
    meta = {"epoch": 2, "config": model.cfg.to_dict(), "best": float("inf")}
    save_checkpoint(tmp_path / "ck.safetensors", model.state_dict(), meta, opt.state_dict(), rng)
    assert json.loads((tmp_path / "ck.json").read_text())["epoch"] == 2  # readable sidecar
    assert read_checkpoint_meta(tmp_path / "ck.safetensors")["best"] == float("inf")
    expected_draw = torch.rand(3)

    ck = load_checkpoint(tmp_path / "ck.safetensors")
    model2 = NeuroMoE(ModelConfig.from_dict(ck.meta["config"]))
    model2.load_state_dict(ck.model_state)
    model.eval(), model2.eval()
    assert torch.equal(model(images, clin).log_probs, model2(images, clin).log_probs)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.optimizer_state)
    for m, o in ((model, opt), (model2, opt2)):  # one more identical step on each
        m.train()
        torch.manual_seed(7)
        o.zero_grad()
        m(images, clin).log_probs.sum().backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    restore_rng_state(ck.rng_state)
    assert torch.equal(torch.rand(3), expected_draw)


def test_non_safetensors_checkpoints_are_refused(tmp_path: Path) -> None:
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")  # a pickle zip
    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    (tmp_path / "text.safetensors").write_text("hello, not a checkpoint")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))  # safetensors, not ours
    save_checkpoint(tmp_path / "ok.safetensors", model.state_dict(), {"epoch": 1}, sidecar=False)
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    for name in ("model.pt", "pickle.safetensors", "text.safetensors", "empty.safetensors"):
        with pytest.raises(CheckpointError, match="not a safetensors file"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="not a NeuroMoE checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "truncated.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import neuromoe.learn.checkpoint as ckmod

    path = tmp_path / "last.safetensors"
    save_checkpoint(path, tiny_model(0).state_dict(), {"epoch": 1})
    before = path.read_bytes()

    def crash(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_model(1).state_dict(), {"epoch": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path).meta["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]  # no tmp left


# ---------------------------------------------------------------------------------------------
# train_run
# ---------------------------------------------------------------------------------------------
def test_deterministic_mode_is_set_and_restored_without_loading_torch_compile() -> None:
    """A run switches torch to deterministic algorithms (warning only) and restores the caller's mode, and the
    switch does not import TorchInductor / Dynamo (``torch.use_deterministic_algorithms`` does: 1.6 CPU s in
    every training job, for a flag only torch.compile reads). A fresh interpreter: tests may load them."""
    code = ("import sys, torch\n"
            "from neuromoe.learn.train import deterministic_algorithms\n"
            "deterministic_algorithms(True, warn_only=True)\n"
            "on = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()\n"
            "deterministic_algorithms(False)\n"
            "print(*on, torch.are_deterministic_algorithms_enabled(), 'torch._dynamo' in sys.modules)\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "False", "False"]


def test_training_run_learns_and_writes_its_outputs(cohort: dict[str, Path], tmp_path: Path) -> None:
    t0 = time.time()
    m = run(cohort, tmp_path, cfg=make_cfg(epochs=12, lr=5e-3, batch_size=4))
    assert time.time() - t0 < 30  # seconds, not minutes, on one CPU thread
    hist = pd.read_csv(tmp_path / "history.csv")
    assert list(hist.columns) == HISTORY_COLUMNS and len(hist) == 12
    # Separable toy problem: the training loss falls well below its start (ln 3 ~ 1.10).
    assert hist["train_loss"].iloc[-3:].mean() < 0.6 * hist["train_loss"].iloc[0], hist["train_loss"].tolist()
    assert hist["val_loss"].min() < 0.8 * hist["val_loss"].iloc[0]
    assert m["finished"] and m["val"]["accuracy"] >= 0.6 and m["test"]["n"] == 6
    assert math.isclose(sum(m["test"]["gate_mean"].values()), 1.0, rel_tol=1e-5)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(m))
    pred = pd.read_csv(tmp_path / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    assert list(pred.columns) == ["participant_id", "part", "label", *[f"prob_{c}" for c in LABELS],
                                  *[f"gate_{e}" for e in ("anat", "dwi", "func", "clin")]]
    assert sorted(pred["part"].unique()) == ["test", "val"] and len(pred) == 12
    assert pred["participant_id"].iloc[0] == "13" and set(pred["label"]) <= set(LABELS)
    np.testing.assert_allclose(pred.filter(like="prob_").sum(1), 1.0, atol=1e-4)
    # The shipped model reproduces the predictions; its preprocessor was fitted on the 12 training subjects.
    model, meta = load_model(tmp_path / "model.safetensors")
    assert meta["classes"] == LABELS and meta["epoch"] == m["best_epoch"]
    index = pd.read_csv(cohort["cache"] / "index.tsv", sep="\t")
    assert meta["clinical"]["median"]["updrs3"] == pytest.approx(float(index["updrs3"].iloc[:12].median()))
    assert (tmp_path / "checkpoint" / "best.safetensors").exists()


def test_killed_and_resumed_run_ends_with_the_same_weights(cohort: dict[str, Path], tmp_path: Path) -> None:
    cfg = make_cfg(epochs=4, flip_lr=0.5)  # augmentation draws are replayed on resume too
    run(cohort, tmp_path / "a", cfg=cfg)
    partial = run(cohort, tmp_path / "b", cfg=cfg, max_epochs_this_run=2)
    assert partial == {"finished": False, "epochs_run": 2, "split_id": "holdout-s0", "variant": "full"}
    assert not (tmp_path / "b" / "model.safetensors").exists()

    def kill_after_epoch_3(epoch: int, row: dict) -> None:
        if epoch == 3:
            raise StopRun

    with pytest.raises(StopRun):
        run(cohort, tmp_path / "b", cfg=cfg, on_epoch_end=kill_after_epoch_3)
    run(cohort, tmp_path / "b", cfg=cfg)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (pd.read_csv(tmp_path / d / "history.csv").drop(columns="seconds") for d in "ab")
    pd.testing.assert_frame_equal(ha, hb)
    pa, pb = (pd.read_csv(tmp_path / d / "predictions.tsv", sep="\t") for d in "ab")
    pd.testing.assert_frame_equal(pa, pb)


def test_rerun_after_the_outputs_were_removed_restores_them_from_the_checkpoint(cohort: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    # Snakemake's --rerun-incomplete deletes an interrupted job's outputs, then reruns it; if the kill came
    # after the last epoch's checkpoint, the run resumes as finished and must write every output again.
    cfg = make_cfg(epochs=3)
    run(cohort, tmp_path, cfg=cfg)
    outputs = ["model.safetensors", "model.json", "metrics.json", "predictions.tsv", "history.csv"]
    before = {name: (tmp_path / name).read_bytes() for name in outputs if name != "model.safetensors"}
    for name in outputs:
        (tmp_path / name).unlink()
    run(cohort, tmp_path, cfg=cfg)
    assert all((tmp_path / name).exists() for name in outputs)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "history.csv"),
                                  pd.read_csv(io.BytesIO(before["history.csv"])))
    assert (tmp_path / "predictions.tsv").read_bytes() == before["predictions.tsv"]


def test_heldout_gate_fit_pairs_experts_with_no_gate_and_fits_the_gate_on_val(cohort: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    cfg = make_cfg(epochs=4, lr=5e-3, batch_size=4, gate_fit="heldout", gate_fit_steps=200)
    gates: list[dict[str, torch.Tensor]] = []

    def gate_weights(epoch: int, row: dict) -> None:
        st = load_checkpoint(tmp_path / "checkpoint" / "last.safetensors").model_state
        gates.append({k: v.clone() for k, v in st.items() if k.startswith("gate.")})

    m = run(cohort, tmp_path, cfg=cfg, on_epoch_end=gate_weights)
    # While the experts train, the gate is out of the graph (AdamW skips parameters without a gradient)...
    assert len(gates) == 4 and all(torch.equal(g[k], gates[0][k]) for g in gates for k in gates[0])
    final = {k: v for k, v in load_checkpoint(tmp_path / "model.safetensors").model_state.items()
             if k.startswith("gate.")}
    assert final.keys() == gates[0].keys() and final
    assert any(not torch.equal(final[k], gates[0][k]) for k in final)  # ...and is fitted afterwards,
    # on the validation part: there its mixture beats the uniform one the best epoch was selected on.
    hist = pd.read_csv(tmp_path / "history.csv")
    assert m["val"]["loss"] < hist["val_loss"].iloc[m["best_epoch"] - 1]
    with pytest.raises(ConfigError, match="gate_fit"):
        TrainConfig.of({"gate_fit": "later"})


def test_crossfit_gate_is_fitted_on_predictions_of_models_that_never_saw_the_subject(
        cohort: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuromoe.learn.train

    cfg = make_cfg(epochs=3, lr=5e-3, batch_size=4, gate_fit="crossfit", crossfit_folds=3, select="last",
                   gate_fit_steps=50)
    seen: list[list[int]] = []  # the rows of every dataset built, in creation order

    class Spy(neuromoe.learn.train.CohortDataset):
        def __init__(self, cohort, rows, clinical, *a, **kw):  # noqa: ANN001, ANN002, ANN003
            super().__init__(cohort, rows, clinical, *a, **kw)
            seen.append(list(rows))

    monkeypatch.setattr(neuromoe.learn.train, "CohortDataset", Spy)
    gates: list[dict[str, torch.Tensor]] = []

    def gate_weights(epoch: int, row: dict) -> None:
        st = load_checkpoint(tmp_path / "a" / "checkpoint" / "last.safetensors").model_state
        gates.append({k: v.clone() for k, v in st.items() if k.startswith("gate.")})

    m = run(cohort, tmp_path / "a", cfg=cfg, on_epoch_end=gate_weights)
    train_rows = seen[0]  # train_run builds train, val, test first
    assert len(train_rows) == 12 and len(seen) == 3 + 2 * 3
    folds = [(seen[i], seen[i + 1]) for i in range(3, len(seen), 2)]  # (fitted on, predicted) per fold
    for fit_rows, held_rows in folds:
        assert not set(fit_rows) & set(held_rows)  # no subject predicted by a model that trained on it
        assert sorted(fit_rows + held_rows) == sorted(train_rows)
    assert sorted(r for _, held in folds for r in held) == sorted(train_rows)  # each one predicted once
    # The gate stays out of the experts' training and is fitted afterwards; the run is reproducible.
    assert all(torch.equal(g[k], gates[0][k]) for g in gates for k in gates[0])
    final = load_checkpoint(tmp_path / "a" / "model.safetensors").model_state
    assert any(not torch.equal(final[k], gates[0][k]) for k in gates[0])
    m2 = run(cohort, tmp_path / "b", cfg=cfg)
    assert m2["test"]["loss"] == m["test"]["loss"]
    b = load_checkpoint(tmp_path / "b" / "model.safetensors").model_state
    assert all(torch.equal(final[k], b[k]) for k in final)
    with pytest.raises(ConfigError, match="crossfit_folds"):
        TrainConfig.of({"gate_fit": "crossfit", "crossfit_folds": 1})


def test_gated_run_adopts_the_ungated_runs_experts_and_fits_only_its_gate(cohort: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    cfg = make_cfg(epochs=3, lr=5e-3, batch_size=4, gate_fit="crossfit", crossfit_folds=2, select="last",
                   gate_fit_steps=30)
    donor = run(cohort, tmp_path / "no_gate", "no_gate", cfg=cfg)
    donor_file = tmp_path / "no_gate" / "model.safetensors"
    m = run(cohort, tmp_path / "full", "full", cfg=cfg, experts_from=donor_file)
    theirs = load_checkpoint(donor_file).model_state
    ours = load_checkpoint(tmp_path / "full" / "model.safetensors").model_state
    assert theirs.keys() == {k for k in ours if not k.startswith("gate.")}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the very experts: full - no_gate = the gate
    assert any(k.startswith("gate.") for k in ours)
    assert m["experts_from"] == "no_gate" and m["epochs_run"] == donor["epochs_run"] == 3
    assert m["train_seconds"] == 0.0 < donor["train_seconds"]  # counted once, in the donor's run
    assert not (tmp_path / "full" / "checkpoint").exists()  # no epoch was trained here
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "full" / "history.csv"),
                                  pd.read_csv(tmp_path / "no_gate" / "history.csv"))
    assert m["test"]["loss"] != donor["test"]["loss"]  # the fitted gate weights the experts
    # A donor trained otherwise, or a gated one, is refused by name before anything is written.
    with pytest.raises(CheckpointError, match="train settings"):
        run(cohort, tmp_path / "x", "full", cfg={**cfg, "train": {**cfg["train"], "lr": 1e-3}},
            experts_from=donor_file)
    with pytest.raises(CheckpointError, match="ungated"):
        run(cohort, tmp_path / "y", "full", cfg=cfg, experts_from=tmp_path / "full" / "model.safetensors")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_select_last_keeps_the_final_weights_and_never_stops_early(cohort: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    # patience 1 with a high learning rate: val_loss selection stops at the first epoch that does not improve...
    early = run(cohort, tmp_path / "val_loss", cfg=make_cfg(epochs=5, lr=2e-2, batch_size=4, patience=1))
    assert early["stopped_early"] and early["best_epoch"] < 5
    # ...last runs every epoch and keeps the final weights.
    cfg = make_cfg(epochs=5, lr=2e-2, batch_size=4, patience=1, select="last")
    m = run(cohort, tmp_path, cfg=cfg)
    assert m["epochs_run"] == m["best_epoch"] == 5 and not m["stopped_early"]
    last = load_checkpoint(tmp_path / "checkpoint" / "last.safetensors").model_state
    kept = load_checkpoint(tmp_path / "model.safetensors").model_state
    assert last.keys() == kept.keys() and all(torch.equal(last[k], kept[k]) for k in last)
    assert not (tmp_path / "checkpoint" / "best.safetensors").exists()  # no second copy written per epoch
    hist = pd.read_csv(tmp_path / "history.csv")
    assert m["val"]["loss"] == pytest.approx(hist["val_loss"].iloc[-1], rel=1e-5)
    with pytest.raises(ConfigError, match="train.select"):
        TrainConfig.of({"select": "best"})


def test_resume_refuses_a_checkpoint_of_another_configuration(cohort: dict[str, Path],
                                                              tmp_path: Path) -> None:
    run(cohort, tmp_path, cfg=make_cfg(epochs=3), max_epochs_this_run=1)
    with pytest.raises(CheckpointError, match="another configuration"):
        run(cohort, tmp_path, cfg=make_cfg(epochs=3, lr=1e-2))


def test_single_expert_variant_leaves_out_subjects_without_it(cohort: dict[str, Path],
                                                              tmp_path: Path) -> None:
    m = run(cohort, tmp_path, variant="only_func", cfg=make_cfg(epochs=1))
    assert m["experts"] == ["func"] and m["n_excluded"]["train"] == 1  # sub-05 has no func
    assert m["n"]["train"] == 11 and m["test"]["gate_mean"] == {"func": 1.0}
    cfg = make_cfg(epochs=1)
    cfg["participants"]["missing_modality"] = "exclude"
    m = run(cohort, tmp_path / "ex", variant="only_clin", cfg=cfg)
    assert m["n_excluded"]["train"] == 1


def test_missing_modality_is_masked_for_the_full_model(cohort: dict[str, Path], tmp_path: Path) -> None:
    run(cohort, tmp_path, variant="no_gate", cfg=make_cfg(epochs=1))
    # sub-05 (train) lacks func; check a val/test-like pass through the shipped model on its cache row.
    from neuromoe.learn.data import CohortDataset

    model, meta = load_model(tmp_path / "model.safetensors")
    index = pd.read_csv(cohort["cache"] / "index.tsv", sep="\t")
    pre = ClinicalPreprocessor.from_dict(meta["clinical"])
    ds = CohortDataset(cohort["cache"], [4], pre.transform(index))
    item = ds[0]
    assert not bool(item["present"][2])
    from neuromoe.learn.model import expert_presence

    present = expert_presence(item["present"][None], model.cfg.experts)
    images = {m: item[m][None].float() for m in ("anat", "dwi", "func")}
    out = model(images, item["clin"][None], present)
    torch.testing.assert_close(out.gate, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))


def test_bad_split_and_variant_are_reported(cohort: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        run(cohort, tmp_path, variant="drop_everything")
    with pytest.raises(InputError, match="cv-s9-f9"):
        train_run(cohort["cache"], cohort["splits"], "cv-s9-f9", "full", make_cfg(), tmp_path, device="cpu")


def test_crossfit_on_a_training_part_too_small_to_fold_is_an_early_input_error(cohort: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    """One training subject per class cannot be cut into stratified folds: a clear error before any epoch,
    not scikit-learn's from inside the gate fit after the experts trained."""
    splits = pd.read_csv(cohort["splits"], sep="\t", dtype=str)
    train = splits.index[splits["part"] == "train"]
    splits.loc[train[3:], "part"] = "test"  # labels cycle 0, 1, 2: one training subject per class is left
    small = tmp_path / "splits.tsv"
    splits.to_csv(small, sep="\t", index=False)
    cfg = make_cfg(gate_fit="crossfit", select="last")
    with pytest.raises(InputError, match=r"crossfit[\s\S]*fix: use more subjects"):
        train_run(cohort["cache"], small, "holdout-s0", "full", cfg, tmp_path / "run", device="cpu",
                  progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists()  # nothing trained


def test_screen_experts_look_only_at_training_subjects_and_resume_with_their_voxels(
        cohort: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuromoe.learn.train

    calls: list[list[int]] = []
    real = neuromoe.learn.train.fit_screens

    def spy(model, cache, rows):  # noqa: ANN001
        calls.append(sorted(int(r) for r in rows))
        real(model, cache, rows)

    monkeypatch.setattr(neuromoe.learn.train, "fit_screens", spy)
    cfg = make_cfg(epochs=8, lr=5e-3, batch_size=4, gate_fit="crossfit", crossfit_folds=3, select="last",
                   gate_fit_steps=50)
    cfg["model"].update(encoder="screen", screen_top_k=8, screen_peaks=1)
    m = run(cohort, tmp_path / "a", cfg=cfg)
    train_rows = list(range(12))  # the splits' first 12 subjects, cache rows in id order
    assert calls[0] == train_rows and len(calls) == 1 + 3
    held = [sorted(set(train_rows) - set(c)) for c in calls[1:]]  # each crossfit fold's screen never saw these
    assert all(h and set(c) < set(train_rows) for h, c in zip(held, calls[1:], strict=True))
    assert sorted(r for h in held for r in h) == train_rows
    assert m["val"]["balanced_accuracy"] >= 0.6  # the class signal is in half of every volume
    # Killed after 3 epochs and resumed: the screens come back from the checkpoint, not from a second fit.
    calls.clear()
    assert not run(cohort, tmp_path / "b", cfg=cfg, max_epochs_this_run=3)["finished"]
    assert run(cohort, tmp_path / "b", cfg=cfg)["test"]["loss"] == m["test"]["loss"]
    assert calls[:2] == [train_rows, calls[1]] and len(calls) == 1 + 3  # one fit at epoch 0, then the folds'
    model, _ = load_model(tmp_path / "b" / "model.safetensors")
    ref = load_checkpoint(tmp_path / "a" / "model.safetensors").model_state
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert torch.equal(model.encoders["dwi"].index, ref["encoders.dwi.index"])


def test_screen_refits_weight_each_screen_by_its_responsibilities_and_resume_exactly(
        cohort: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuromoe.learn.train

    calls: list[dict | None] = []
    real = neuromoe.learn.train.fit_screens

    def spy(model, cache, rows, weights=None):  # noqa: ANN001
        calls.append(None if weights is None else {m: np.asarray(w) for m, w in weights.items()})
        real(model, cache, rows, weights)

    monkeypatch.setattr(neuromoe.learn.train, "fit_screens", spy)
    cfg = make_cfg(epochs=4, lr=5e-3, batch_size=4, gate_fit="joint", select="last", screen_refits=1)
    cfg["model"].update(encoder="screen", screen_top_k=8, screen_peaks=1)
    m = run(cohort, tmp_path / "a", cfg=cfg)
    assert m["screen_round"] == 1 and m["epochs_run"] == 8
    hist = pd.read_csv(tmp_path / "a" / "history.csv")
    assert hist["round"].tolist() == [0] * 4 + [1] * 4 and hist["epoch"].tolist() == list(range(1, 9))
    # Round 0 fits the screens on every training subject alike; round 1 on each subject's share of each expert.
    assert calls[0] is None and len(calls) == 2 and set(calls[1]) == {"anat", "dwi", "func"}
    shares = np.stack([calls[1][k] for k in ("anat", "dwi", "func")], 1)
    assert shares.shape[0] == 12 and ((shares >= 0) & (shares <= 1)).all() and shares.sum(1).max() <= 1 + 1e-6
    assert shares.std() > 0.01  # the trained mixture does not share every subject alike
    # Killed at the end of round 0, and again inside round 1: the same model as the uninterrupted run.
    ref = load_checkpoint(tmp_path / "a" / "model.safetensors").model_state
    for stop in (4, 6):
        out = tmp_path / f"stop{stop}"
        assert not run(cohort, out, cfg=cfg, max_epochs_this_run=stop)["finished"]
        assert run(cohort, out, cfg=cfg)["test"]["loss"] == m["test"]["loss"]
        got = load_checkpoint(out / "model.safetensors").model_state
        assert all(torch.equal(v, ref[k]) for k, v in got.items())
    # An ungated single-expert variant has nobody to share subjects with: no refit, one round.
    calls.clear()
    assert run(cohort, tmp_path / "only", "only_dwi", cfg=cfg)["screen_round"] == 0 and calls == [None]
