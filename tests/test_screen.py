"""The supervised voxel screen (``model.encoder: screen``): it finds focal changes that only some patients
carry, reads the same places after a checkpoint round trip, and never looks at subjects it was not fitted on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from neuromoe.learn.model import ModelConfig, NeuroMoE
from neuromoe.learn.screen import (
    VoxelScreen,
    fit_screen,
    gaussian_kernel,
    smooth,
    take_peaks,
    weighted_f,
    weighted_median,
)

GRID = (12, 12, 12)


def ball(centre: tuple[int, int, int], radius: float = 1.5) -> np.ndarray:
    idx = np.indices(GRID)
    return sum((idx[i] - c) ** 2 for i, c in enumerate(centre)) <= radius ** 2


def planted(n_per_class: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(N, 2, 12^3) noise volumes and labels HC/PD/iRBD (0/1/2). A third of the PD subjects carry a -5 SD
    change at region ``pd`` (channel 1), a third of the iRBD subjects +5 SD at ``irbd`` (channel 0); every
    PD subject is 1.5 SD brighter at ``mean`` (channel 0), a change of the class mean."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], n_per_class)
    x = rng.standard_normal((len(y), 2, *GRID)).astype(np.float32)
    regions = {"pd": ball((3, 4, 6)), "irbd": ball((8, 7, 4)), "mean": ball((6, 8, 8))}
    carriers = {1: np.flatnonzero(y == 1)[::3], 2: np.flatnonzero(y == 2)[::3]}
    x[carriers[1][:, None], 1, regions["pd"]] -= 5.0
    x[carriers[2][:, None], 0, regions["irbd"]] += 5.0
    x[np.flatnonzero(y == 1)[:, None], 0, regions["mean"]] += 1.5
    return x, y, regions


def test_smoothing_is_a_gaussian_filter() -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, *GRID)).astype(np.float32)
    taps = gaussian_kernel(1.0)
    assert taps.sum() == pytest.approx(1.0) and len(taps) == 7
    got = smooth(torch.from_numpy(x), torch.from_numpy(taps)).numpy()
    want = ndimage.gaussian_filter(x, (0, 0, 1.0, 1.0, 1.0), mode="constant", truncate=3.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(gaussian_kernel(0.0), [1.0])  # sigma 0: no smoothing
    np.testing.assert_array_equal(smooth(torch.from_numpy(x), torch.ones(1)).numpy(), x)


def test_peaks_are_the_largest_values_and_kept_apart() -> None:
    stat = np.zeros(GRID)
    stat[2, 2, 2], stat[2, 3, 2], stat[9, 9, 9] = 5.0, 4.0, 3.0
    assert take_peaks(stat, 2) == [(2, 2, 2), (9, 9, 9)]  # (2, 3, 2) is too close to the first
    assert take_peaks(np.full(GRID, -np.inf), 3) == []


def test_screen_finds_changes_that_only_some_patients_carry() -> None:
    x, y, regions = planted()
    mask = np.ones(GRID, bool)
    idx = fit_screen(x, y, mask, n_classes=3, top_k=5, peaks=1, threshold=2.0)
    assert len(idx) == 5 + 1 * 2 * 2  # top_k, then every channel of one peak per patient class
    ch, vox = np.divmod(idx, np.prod(GRID))
    where = np.stack(np.unravel_index(vox, GRID), 1)
    in_region = {name: r[tuple(where.T)] for name, r in regions.items()}
    # The class-mean change is what the ANOVA ranks first; the tail peaks land on the rare focal changes.
    assert in_region["mean"][:5].all() and (ch[:5] == 0).all()
    assert in_region["pd"][5:7].all() and in_region["irbd"][7:9].all()
    # Without the tail screen, the rare changes are not among the ANOVA's best voxels.
    assert not (in_region["pd"][:5] | in_region["irbd"][:5]).any()


def test_screen_needs_controls_and_keeps_its_size_when_a_class_is_absent() -> None:
    x, y, _ = planted(n_per_class=3)
    with pytest.raises(ValueError, match="reference class 0"):
        fit_screen(x[3:], y[3:], np.ones(GRID, bool), 3, 5, 1, 2.0)  # no controls
    assert len(fit_screen(x[:6], y[:6], np.ones(GRID, bool), 3, 5, 1, 2.0)) == 5 + 2 * 2  # no iRBD


def tiny_screen_model(seed: int = 0) -> NeuroMoE:
    torch.manual_seed(seed)
    return NeuroMoE(ModelConfig(channels={"anat": 1, "dwi": 2, "func": 2}, grid=GRID, n_clinical=4, n_classes=3,
                                dim=8, heads=2, clin_hidden=(8,), expert_hidden=8, gate_hidden=8,
                                encoder="screen", screen_top_k=6, screen_peaks=1)).eval()


def test_fitted_screens_travel_with_the_weights() -> None:
    x, y, _ = planted()
    images = {"anat": torch.from_numpy(x[:, :1]), "dwi": torch.from_numpy(x), "func": torch.from_numpy(x)}
    clin = torch.randn(len(y), 4)
    model = tiny_screen_model()
    with pytest.raises(RuntimeError, match="not fitted"):
        model(images, clin)
    for m, enc in model.encoders.items():
        enc.fit(images[m][::2], y[::2], np.ones(GRID, bool))
    feats = model.encoders["dwi"](images["dwi"][::2])
    assert feats.shape == (45, 6 + 1 * 2 * 2)
    np.testing.assert_allclose(feats.mean(0), 0.0, atol=1e-4)  # standardised on the fitting subjects
    out = model(images, clin)
    again = tiny_screen_model(seed=1)  # other random weights, unfitted screens
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(images, clin).log_probs, out.log_probs)
    assert isinstance(again.encoders["anat"], VoxelScreen) and bool(again.encoders["anat"].fitted)
    assert model.estimate_flops() > 0


def test_screen_reads_float32_under_a_bf16_autocast() -> None:
    x, y, _ = planted()
    scr = VoxelScreen(2, GRID, 3, 5, 1, 2.0, 1.0)
    scr.fit(torch.from_numpy(x), y, np.ones(GRID, bool))
    want = scr(torch.from_numpy(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scr(torch.from_numpy(x))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_a_training_part_without_controls_is_an_input_error_naming_the_modality() -> None:
    from types import SimpleNamespace

    from neuromoe.errors import InputError
    from neuromoe.learn.screen import fit_screens

    x, y, _ = planted(n_per_class=3)
    cache = SimpleNamespace(root="cache", y=y, mask=np.ones(GRID, bool), dtype="float16",
                            present=np.ones((len(y), 3), bool),
                            arrays={"anat": x[:, :1].astype(np.float16), "dwi": x.astype(np.float16),
                                    "func": x.astype(np.float16)})
    with pytest.raises(InputError, match="(?s)modality anat, 6 training subjects.*fix:"):
        fit_screens(tiny_screen_model(), cache, rows=np.arange(3, 9))  # PD and iRBD only


def test_weighted_statistics_reduce_to_the_unweighted_ones() -> None:
    from sklearn.feature_selection import f_classif

    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((31, 40)), np.arange(31) % 3
    np.testing.assert_allclose(weighted_f(x, y, np.full(31, 0.7)), f_classif(x, y)[0], rtol=1e-10)
    np.testing.assert_array_equal(weighted_median(x, np.ones(31)), np.median(x, axis=0))
    w = (np.arange(31) >= 20).astype(float)  # weight 0 leaves a subject out
    np.testing.assert_array_equal(weighted_median(x, w), np.median(x[20:], axis=0))
    np.testing.assert_allclose(weighted_f(x, y, w), f_classif(x[20:], y[20:])[0], rtol=1e-10)


def test_weights_find_a_change_that_only_the_weighted_subjects_carry() -> None:
    """The refit of a screen (train.screen_refits) weights the subjects its expert explains: a change carried by
    every PD patient of that group wins over one that a larger, mixed group carries more often in all."""
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1, 2], 30)
    group = np.arange(90) % 3 == 0  # the subjects this expert explains (a third of each class)
    x = rng.standard_normal((90, 1, *GRID)).astype(np.float32)
    own, decoy = ball((3, 4, 6)), ball((8, 8, 7))
    x[np.flatnonzero((y == 1) & group)[:, None], 0, own] -= 6.0  # every PD patient of the group
    others = np.flatnonzero((y == 1) & ~group)
    x[others[: int(0.6 * len(others))][:, None], 0, decoy] -= 6.0  # 60 % of the other PD patients
    mask = np.ones(GRID, bool)

    def pd_peak(weights: np.ndarray | None) -> tuple[int, ...]:
        idx = fit_screen(x, y, mask, n_classes=3, top_k=1, peaks=1, threshold=2.0, weights=weights)
        return tuple(int(i) for i in np.unravel_index(idx[1], GRID))

    assert decoy[pd_peak(None)]  # unweighted: 0.4 of all PD beyond the tail at the decoy, 0.33 at the own
    assert own[pd_peak(np.where(group, 1.0, 0.05))]
    with pytest.raises(ValueError, match="weights"):
        fit_screen(x, y, mask, 3, 1, 1, 2.0, weights=-np.ones(90))


def test_fdr_keeps_only_significant_anova_voxels_and_reads_empty_slots_as_zero() -> None:
    """screen_fdr: a cohort whose class means do not differ anywhere reads no ANOVA voxel (no noise features
    for a small cohort's head to overfit); a real mean change is still read."""
    from neuromoe.learn.screen import benjamini_hochberg

    assert benjamini_hochberg(np.array([0.001, 0.008, 0.039, 0.041, 0.9]), 0.05) == 2
    assert benjamini_hochberg(np.array([0.5, 0.9]), 0.05) == 0
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1, 2], 20)
    noise = rng.standard_normal((60, 1, *GRID)).astype(np.float32)
    mask = np.ones(GRID, bool)
    idx = fit_screen(noise, y, mask, n_classes=3, top_k=10, peaks=1, threshold=2.0, fdr=0.05)
    assert len(idx) == 10 + 2 and (idx[:10] == -1).all() and (idx[10:] >= 0).all()
    x, y2, regions = planted(n_per_class=20)
    idx = fit_screen(x, y2, mask, n_classes=3, top_k=10, peaks=1, threshold=2.0, fdr=0.05)
    live = idx[:10][idx[:10] >= 0]
    vox = live % np.prod(GRID)
    planted_any = (regions["mean"] | regions["pd"] | regions["irbd"]).ravel()
    assert len(live) and planted_any[vox].all() and regions["mean"].ravel()[vox].any()
    scr = VoxelScreen(1, GRID, 3, top_k=10, peaks=1, threshold=2.0, sigma=0.0, fdr=0.05)
    scr.fit(torch.from_numpy(noise), y, mask)
    out = scr(torch.from_numpy(noise))
    assert torch.isfinite(out).all() and (out[:, :10] == 0).all() and out[:, 10:].abs().sum() > 0


def test_reading_the_chosen_voxels_equals_smoothing_the_whole_volume() -> None:
    """The forward pass smooths only where the screen reads (edges and corners included): the same values as
    the whole-volume smoothing the fit uses."""
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((3, 2, *GRID)).astype(np.float32))
    for sigma in (0.0, 1.0, 1.5):
        scr = VoxelScreen(2, GRID, 3, top_k=4, peaks=1, threshold=2.0, sigma=sigma)
        corners = [0, int(np.ravel_multi_index((11, 11, 11), GRID)), int(np.ravel_multi_index((0, 5, 11), GRID))]
        picks = corners + [int(np.prod(GRID)) + 7, 2 * int(np.prod(GRID)) - 1] + list(rng.integers(0, 2 * 12**3, 3))
        scr.index.copy_(torch.tensor(picks[: scr.n_features]))
        want = scr.smoothed(x).flatten(1)[:, scr.index]
        torch.testing.assert_close(scr.read(x), want, rtol=1e-5, atol=1e-5)
