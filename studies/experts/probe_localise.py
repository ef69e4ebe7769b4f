"""Probe: is the planted signal still in the cache, and can a reader find where it is?

usage: probe_localise.py signal      per region and channel: d' (affected vs not) of the true-region mean and
                                     of single voxels, raw and smoothed (sigma 1 voxel)
       probe_localise.py readers     5-fold CV (seed 0) test balanced accuracy of one reader per modality,
                                     on all test subjects and on those whose latent profile is that modality
       probe_localise.py tail        readers on peaks of a label-aware tail statistic (patients minus controls
                                     beyond |z| > t), fixed settings and chosen by inner CV
       probe_localise.py moe         the oracle's small mixture (bench/generality.py oracle_fit's network) fed
                                     the image read-outs of the true regions, screened voxels, tail peaks, or
                                     label-free PCA scores (PROBE_MOE_CASES=n: the first n cases only;
                                     PROBE_MOE_ONLY=text: the cases whose name holds it)

``PROBE_EVERY=k`` keeps every k-th subject (the same design at 1/k of the size).
Runs on a workflow folder cached up to ``cache/cohort`` (``PROBE_WORKDIR``, default /tmp/tune90) and its
BIDS cohort (``PROBE_BIDS``, default $PROBE_WORKDIR/bids), whose synth-truth names the regions and who is
affected. Nothing of the product is changed; sklearn readers on the decoded cache, seconds per reader.
"""
import itertools
import os
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from neuromoe.cache.store import MODALITIES, decode, open_cohort
from neuromoe.inputs import templates as tpl
from neuromoe.inputs.synth import read_design, read_truth
from neuromoe.learn.screen import robust_z, take_peaks  # the product's, so probe and product agree

W = Path(os.environ.get("PROBE_WORKDIR", "/tmp/tune90"))
BIDS = Path(os.environ.get("PROBE_BIDS", W / "bids"))
warnings.filterwarnings("ignore")

cohort = open_cohort(W / "results/cache/cohort", verify=False)
design = read_design(BIDS)
subjects = cohort.index["participant_id"].tolist()
truth = {s: read_truth(BIDS, s.removeprefix("sub-")) for s in subjects}
profile = np.array([truth[s]["profile"] for s in subjects])
y = cohort.y
mask = cohort.mask.astype(bool)
X = {m: decode(np.asarray(cohort.arrays[m]), cohort.dtype) for m in MODALITIES}  # (N, C, D, H, W)
# PROBE_EVERY=k: every k-th subject only (a smaller cohort of the same design; ids in the cache's order)
KEEP = np.arange(0, len(y), int(os.environ.get("PROBE_EVERY", 1)))
subjects, profile, y = [subjects[i] for i in KEEP], profile[KEEP], y[KEEP]
X = {m: a[KEEP] for m, a in X.items()}
folds = StratifiedKFold(5, shuffle=True, random_state=0)


def region_weight(m: str, role: str | None = None) -> np.ndarray:
    """Soft bilateral sphere(s) of the true effect region(s) on the model grid."""
    roles = [role] if role else ["A", "B"]
    return sum(tpl.roi_weight(design.effect_rois(m)[r], cohort.affine, cohort.grid) for r in roles)


def dprime(a: np.ndarray, affected: np.ndarray) -> np.ndarray:
    pooled = np.sqrt(0.5 * (a[affected].var(0, ddof=1) + a[~affected].var(0, ddof=1))) + 1e-6
    return (a[affected].mean(0) - a[~affected].mean(0)) / pooled


def signal() -> None:
    like = nib.Nifti1Image(np.zeros(cohort.grid, np.float32), cohort.affine)
    for m in MODALITIES:
        smooth = ndimage.gaussian_filter(X[m], (0, 0, 1, 1, 1))
        for role in "AB":
            roi = design.effect_rois(m)[role]
            affected = np.array([truth[s]["affected"][m][role] for s in subjects])
            w = np.asarray(tpl.roi_mask(roi, like), np.float32) * mask  # the region's tissue on the grid
            inside, outside = (region_weight(m, role) > 0.5) & mask, (region_weight(m) == 0) & mask
            for ch, name in enumerate(cohort.channels[m]):
                mean_d = dprime((X[m][:, ch] * w).sum((1, 2, 3)) / w.sum(), affected)
                raw, sm = dprime(X[m][:, ch], affected), dprime(smooth[:, ch], affected)
                print(f"{m:4s} {role} {roi.name:20s} {name:5s} affected {affected.sum():3d}/{len(y)}  "
                      f"region mean d' {mean_d:+6.2f} | voxel d' median / extreme: raw {np.median(raw[inside]):+5.2f} "
                      f"/ {raw[inside][np.argmax(np.abs(raw[inside]))]:+6.2f}, smoothed {np.median(sm[inside]):+5.2f} "
                      f"/ {sm[inside][np.argmax(np.abs(sm[inside]))]:+6.2f} | outside |d'| p99 raw "
                      f"{np.percentile(np.abs(raw[outside]), 99):.2f}")


def voxels(m: str, sigma: float = 0.0) -> np.ndarray:
    a = ndimage.gaussian_filter(X[m], (0, 0, sigma, sigma, sigma)) if sigma else X[m]
    return a[:, :, mask].reshape(len(a), -1)


def true_regions(m: str) -> np.ndarray:
    feats = []
    for role in "AB":
        w = region_weight(m, role) * mask
        feats.append((X[m] * w).sum((2, 3, 4)) / w.sum())
    return np.concatenate(feats, 1)


def logreg(c: float) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight="balanced", max_iter=3000)


def peak_features(m: str, z: np.ndarray, peaks: list) -> tuple[np.ndarray, float]:
    """The z of every channel at the peaks, (N, C * peaks), and the fraction of peaks in a true region."""
    hit = float(np.mean([region_weight(m)[p] > 0.5 for p in peaks]))
    return np.stack([z[:, :, i, j, kk] for i, j, kk in peaks], -1).reshape(len(y), -1), hit


def deviation_peaks(m: str, sigma: float, t: float, k: int, edge_min: int):
    """A label-free localiser: robust z of every voxel against the training fold (median, MAD), voxels
    ranked by the fraction of training subjects beyond |z| > t (a focal change in some subjects makes that
    fraction large), ``k`` peaks at least 2 voxels apart and ``edge_min`` voxels inside the brain mask;
    features: the z of every channel at the peaks."""
    a = ndimage.gaussian_filter(X[m], (0, 0, sigma, sigma, sigma)) if sigma else X[m]
    edge = ndimage.distance_transform_edt(mask)

    def fit_features(tr):
        z, peaks = robust_z(a, a[tr]), []
        peaks += take_peaks(np.where(mask & (edge >= edge_min), (np.abs(z[tr]) > t).mean(0).max(0), -np.inf), k)
        return peak_features(m, z, peaks)
    return fit_features


READERS = {
    "true regions (the oracle's read-out), logistic": lambda m: (
        true_regions(m), make_pipeline(StandardScaler(), logreg(1.0))),
    "all voxels, L2 logistic (C 0.01)": lambda m: (voxels(m), make_pipeline(StandardScaler(), logreg(0.01))),
    "all voxels smoothed 1 voxel, L2 logistic": lambda m: (
        voxels(m, 1.0), make_pipeline(StandardScaler(), logreg(0.01))),
    "ANOVA top 50 voxels (smoothed), logistic": lambda m: (voxels(m, 1.0), make_pipeline(
        StandardScaler(), SelectKBest(f_classif, k=50), logreg(0.1))),
    "ANOVA top 200 voxels (smoothed), logistic": lambda m: (voxels(m, 1.0), make_pipeline(
        StandardScaler(), SelectKBest(f_classif, k=200), logreg(0.05))),
}


def score(pred: np.ndarray, m: str) -> str:
    own = profile == m
    return f"{m} {100 * balanced_accuracy_score(y, pred):5.1f} own {100 * (pred[own] == y[own]).mean():5.1f}"


def readers() -> None:
    for name, make in READERS.items():
        row = []
        for m in MODALITIES:
            feats, est = make(m)
            pred = np.zeros_like(y)
            for tr, te in folds.split(feats, y):
                pred[te] = est.fit(feats[tr], y[tr]).predict(feats[te])
            row.append(score(pred, m))
        print(f"{name:48s}", " | ".join(row), flush=True)
    for sigma, t, k, edge_min in itertools.product([0.0, 0.7, 1.0], [3.0, 4.0], [4, 8], [0, 2]):
        row = []
        for m in MODALITIES:
            fit_features, pred, hits = deviation_peaks(m, sigma, t, k, edge_min), np.zeros_like(y), []
            for tr, te in folds.split(y, y):
                feats, hit = fit_features(tr)
                hits.append(hit)
                pred[te] = make_pipeline(StandardScaler(), logreg(0.1)).fit(feats[tr], y[tr]).predict(feats[te])
            row.append(score(pred, m) + f" in-region {np.mean(hits):.2f}")
        print(f"deviation peaks sigma {sigma} |z|>{t} k {k} edge>={edge_min}".ljust(48), " | ".join(row), flush=True)


def tail_peaks(m: str, sigma: float, t: float, k: int, edge_min: int = 2):
    """Peaks of a label-aware tail statistic: per voxel and class c in (PD, iRBD), the fraction of class-c
    training subjects beyond |z| > t minus that of the controls (a change in some patients only), the k best
    separated peaks per class; features: the z of every channel at the peaks."""
    a = ndimage.gaussian_filter(X[m], (0, 0, sigma, sigma, sigma)) if sigma else X[m]
    edge = ndimage.distance_transform_edt(mask)

    def fit_features(tr):
        z, peaks = robust_z(a, a[tr]), []
        ztr, ytr = z[tr], y[tr]
        for c in (1, 2):
            lo = (ztr[ytr == c] < -t).mean(0) - (ztr[ytr == 0] < -t).mean(0)
            hi = (ztr[ytr == c] > t).mean(0) - (ztr[ytr == 0] > t).mean(0)
            peaks += take_peaks(np.where(mask & (edge >= edge_min), np.maximum(lo, hi).max(0), -np.inf), k)
        return peak_features(m, z, peaks)
    return fit_features


def tail() -> None:
    grid = list(itertools.product([0.0, 0.7], [2.0, 3.0], [1, 2]))

    def fit_predict(m, cfg, tr, te):
        feats, hit = tail_peaks(m, *cfg)(tr)
        return make_pipeline(StandardScaler(), logreg(0.1)).fit(feats[tr], y[tr]).predict(feats[te]), hit
    for cfg in [*grid, "inner CV"]:
        row = []
        for m in MODALITIES:
            pred, hits = np.zeros_like(y), []
            for tr, te in folds.split(y, y):
                chosen = cfg
                if cfg == "inner CV":  # the setting with the best inner 3-fold balanced accuracy
                    inner = StratifiedKFold(3, shuffle=True, random_state=1)
                    chosen = max(grid, key=lambda g: np.mean([balanced_accuracy_score(
                        y[tr[ite]], fit_predict(m, g, tr[itr], tr[ite])[0]) for itr, ite in inner.split(tr, y[tr])]))
                pred[te], hit = fit_predict(m, chosen, tr, te)
                hits.append(hit)
            row.append(score(pred, m) + f" in-region {np.mean(hits):.2f}")
        print(f"tail peaks {cfg}".ljust(40), " | ".join(row), flush=True)


def moe() -> None:
    import torch
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from generality import oracle_fit  # the oracle's network, fed image features here

    torch.set_num_threads(1)
    idx = cohort.index.iloc[KEEP]
    clin = idx[["age", "updrs3", "moca", "rbdsq", "serum_nfl", "serum_asyn"]].to_numpy(float)
    clin[:, 4:] = np.log(clin[:, 4:])
    clin = np.c_[clin, (idx["sex"] == "M").to_numpy(float)]  # the oracle's columns, imputed and scaled there
    variants = {"full": (*MODALITIES, "clin"), "no_gate": (*MODALITIES, "clin"),
                **{f"only_{m}": (m,) for m in MODALITIES}}

    def pca(k):
        def make(tr):
            out = {}
            for m in MODALITIES:
                v = voxels(m)
                out[m] = PCA(k, random_state=0).fit(v[tr] - v[tr].mean(0)).transform(v - v[tr].mean(0))
            return out
        return make
    def anova(k):
        def make(tr):
            out = {}
            for m in MODALITIES:
                v = voxels(m, 1.0)
                out[m] = v[:, SelectKBest(f_classif, k=k).fit(v[tr], y[tr]).get_support()]
            return out
        return make
    def union(tr):  # both localisers' features: the mean-difference screen and the tail peaks
        out = {}
        for m in MODALITIES:
            v = voxels(m, 1.0)
            screened = v[:, SelectKBest(f_classif, k=50).fit(v[tr], y[tr]).get_support()]
            out[m] = np.concatenate([screened, tail_peaks(m, 0.7, 2.0, 2)(tr)[0]], 1)
        return out
    def product(sigma, top_k=50, peaks=2, threshold=2.0):  # neuromoe.learn.screen, as model.encoder screen fits it
        import torch

        from neuromoe.learn.screen import VoxelScreen

        def make(tr):
            out = {}
            for m in MODALITIES:
                scr = VoxelScreen(X[m].shape[1], cohort.grid, 3, top_k, peaks, threshold, sigma)
                vol = torch.from_numpy(X[m])
                scr.fit(vol[tr], y[tr], mask)
                out[m] = scr(vol).numpy()
            return out
        return make
    cases = [("true-region image read-outs", lambda tr: {m: true_regions(m) for m in MODALITIES}),
             *[(f"model.encoder screen, sigma {s}", product(s)) for s in (1.0, 0.7)],
             *[(f"model.encoder screen, top_k {k}, peaks {p}", product(1.0, k, p)) for k, p in
               ((20, 2), (50, 4), (20, 4), (100, 2))],
             ("ANOVA top 50 + tail peaks (0.7, |z|>2, 2)", union),
             *[(f"ANOVA top {k} voxels (train fold)", anova(k)) for k in (20, 50)],
             *[(f"PCA {k} per modality (train fold)", pca(k)) for k in (3, 5, 10)]]
    only = os.environ.get("PROBE_MOE_ONLY", "")  # cases whose name contains this text
    for name, make in [c for c in cases if only in c[0]][:int(os.environ.get("PROBE_MOE_CASES", len(cases)))]:
        res = {v: [] for v in variants}
        for tr_all, te in folds.split(y, y):
            tr, va = train_test_split(tr_all, test_size=0.2, stratify=y[tr_all], random_state=0)
            feats = {m: (f - f[tr].mean(0)) / (f[tr].std(0) + 1e-6) for m, f in make(tr).items()}
            for v, experts in variants.items():
                res[v].append(oracle_fit(feats, clin, y, tr, va, te, experts, v == "full", seed=0)[0])
        print(f"{name:36s}", "  ".join(f"{v} {100 * np.mean(a):.1f}" for v, a in res.items()), flush=True)


if __name__ == "__main__":
    {"signal": signal, "readers": readers, "tail": tail, "moe": moe}[sys.argv[1]]()
