"""Probe: does refitting each modality's screen on the subjects its expert explains (EM for a mixture of
experts) find the regions a screen fitted on everyone misses?

usage: probe_em.py     5-fold CV (seed 0) of the oracle's small mixture (bench/generality.py oracle_fit's network,
                       copied here so it can return the training subjects' gate and expert log-probs) fed the
                       screen's read-outs; round 0 fits the screens unweighted, each later round weights every
                       training subject by its responsibility of that expert (gate x P_expert(true class),
                       normalised) from the previous round's model. Prints test balanced accuracy per round and
                       whether each class's tail peaks hit its true region ("hits", anat A/B, dwi A/B, func A/B).

Knobs (environment): EM_ROUNDS (refits, default 2), EM_TOPK (ANOVA voxels, 50), EM_FDR (> 0: keep ANOVA voxels
only at this Benjamini-Hochberg FDR; hits are then not comparable), EM_STAT (tail | t | tt: the peak statistic),
EM_WEIGHT (resp | gate), plus probe_localise.py's PROBE_WORKDIR / PROBE_BIDS / PROBE_EVERY. The product's
version is ``train.screen_refits`` + ``model.screen_fdr`` (neuromoe.learn.screen, neuromoe.learn.train).
"""

import math
import os
import sys

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

from neuromoe.learn.model import MoEOutput, class_weights, moe_loss
from neuromoe.learn.screen import EDGE_MIN, gaussian_kernel, smooth, take_peaks

# probe_localise's loading (cohort cache, truth, folds, region_weight), not its command line
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_localise as P  # noqa: E402 - importing it loads the cohort named by PROBE_WORKDIR

torch.set_num_threads(1)
SM = {m: smooth(torch.from_numpy(P.X[m]), torch.from_numpy(gaussian_kernel(1.0))).numpy() for m in P.MODALITIES}
EDGE = P.ndimage.distance_transform_edt(P.mask) >= EDGE_MIN


def wquant(a, w, q):
    o = np.argsort(a, axis=0)
    ws = w[o]
    cw = np.cumsum(ws, 0)
    i = np.argmax(cw >= q * cw[-1:], axis=0)
    return np.take_along_axis(a, o, 0)[i, np.arange(a.shape[1])] if a.ndim == 2 else None


TOP_K = int(os.environ.get("EM_TOPK", 50))


def fit_w(sm, yy, w, top_k=TOP_K, peaks=2, t=2.0, ref="all"):
    n, c = sm.shape[:2]
    grid = sm.shape[2:]
    flat = sm.reshape(n, c, -1)[:, :, P.mask.ravel()].reshape(n, -1)  # (N, C*V)
    W = w.sum()
    gm = (w[:, None] * flat).sum(0) / W
    ssb = 0
    ssw = 0
    for k in range(3):
        s = yy == k
        wk = w[s]
        mk = (wk[:, None] * flat[s]).sum(0) / wk.sum()
        ssb = ssb + wk.sum() * (mk - gm) ** 2
        ssw = ssw + (wk[:, None] * (flat[s] - mk) ** 2).sum(0)
    f = ssb / (ssw + 1e-12)
    order = np.argsort(-f, kind="stable")[:top_k]
    Q = float(os.environ.get("EM_FDR", 0))
    if Q > 0:
        from scipy.stats import f as fdist

        neff = W**2 / (w @ w)
        p = fdist.sf(f * (neff - 3) / 2, 2, neff - 3)
        ps = np.sort(p)
        m_ = len(ps)
        ok = ps <= Q * np.arange(1, m_ + 1) / m_
        kmax = int(np.nonzero(ok)[0].max() + 1) if ok.any() else 0
        order = order[: min(top_k, kmax)]
        NSEL.append(len(order))
    v = int(P.mask.sum())
    inside = np.flatnonzero(P.mask.ravel())
    chosen = [int(ch * math.prod(grid) + inside[j]) for ch, j in zip(order // v, order % v, strict=True)]
    a = sm.reshape(n, -1)
    rw = w if ref == "all" else w * (yy == 0)
    med = wquant(a, rw, 0.5)
    mad = 1.4826 * wquant(np.abs(a - med), rw, 0.5)
    z = ((a - med) / (mad + 1e-3)).reshape(sm.shape)
    for cls in (1, 2):
        wi, w0 = w * (yy == cls), w * (yy == 0)

        def fr(ww, b):
            return (ww[:, None, None, None, None] * b).sum(0) / ww.sum()

        lo = fr(wi, z < -t) - fr(w0, z < -t)
        hi = fr(wi, z > t) - fr(w0, z > t)
        st = np.maximum(lo, hi).max(0)
        if STAT in ("t", "tt"):
            m1 = fr(wi, sm)
            m0 = fr(w0, sm)
            v1 = fr(wi, (sm - m1) ** 2)
            v0 = fr(w0, (sm - m0) ** 2)
            ne1 = wi.sum() ** 2 / (wi**2).sum()
            ne0 = w0.sum() ** 2 / (w0**2).sum()
            tt = np.abs(m1 - m0) / np.sqrt(v1 / ne1 + v0 / ne0 + 1e-12)
            st = tt.max(0) if STAT == "t" else tt.max(0) / 4 + st
        for p in take_peaks(np.where(EDGE, st, -np.inf), peaks):
            vox = int(np.ravel_multi_index(p, grid))
            chosen += [ch * math.prod(grid) + vox for ch in range(c)]
    return np.asarray(chosen)


def hits(m, idx):
    g = math.prod(P.cohort.grid)
    vox = idx[TOP_K:] % g
    out = []
    for k, role in ((0, "A"), (1, "B")):
        own = ((P.region_weight(m, role) > 0.5) & P.mask).ravel()
        pv = vox[k * 2 * P.X[m].shape[1] : (k + 1) * 2 * P.X[m].shape[1]]
        out.append(int(own[pv].any()))
    return out


idx_clin = P.cohort.index.iloc[P.KEEP]
clin = idx_clin[["age", "updrs3", "moca", "rbdsq", "serum_nfl", "serum_asyn"]].to_numpy(float)
clin[:, 4:] = np.log(clin[:, 4:])
clin = np.c_[clin, (idx_clin["sex"] == "M").to_numpy(float)]
EXPERTS = (*P.MODALITIES, "clin")


def fit_moe(feats, tr, va, seed=0, epochs=300, gate=True):
    med = np.nanmedian(clin[tr], axis=0)
    c = np.where(np.isnan(clin), med, clin)
    c = (c - c[tr].mean(0)) / (c[tr].std(0) + 1e-6)
    ft = {m: torch.tensor(f, dtype=torch.float32) for m, f in feats.items()}
    ct, yt = torch.tensor(c, dtype=torch.float32), torch.tensor(P.y).long()
    torch.manual_seed(seed)
    heads = nn.ModuleList(
        [
            nn.Sequential(nn.Linear(ft[e].shape[1] if e in ft else ct.shape[1], 16), nn.ReLU(), nn.Linear(16, 3))
            for e in EXPERTS
        ]
    )
    gnet = nn.Sequential(nn.Linear(ct.shape[1], 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
    opt = torch.optim.AdamW(list(heads.parameters()) + list(gnet.parameters()), 3e-3, weight_decay=1e-2)
    weight = class_weights(P.y[tr], 3)
    nets = nn.ModuleList([heads, gnet])

    def fwd(i):
        inputs = [ft[e][i] if e in ft else ct[i] for e in EXPERTS]
        lp = torch.stack([F.log_softmax(h(x), -1) for x, h in zip(inputs, heads, strict=True)], 1)
        lw = F.log_softmax(gnet(ct[i]), -1) if gate else torch.full((len(i), 4), -math.log(4))
        return MoEOutput(torch.logsumexp(lw.unsqueeze(-1) + lp, 1), lw.exp(), lp)

    best, state = float("inf"), None
    for _ in range(epochs):
        nets.train()
        loss, _ = moe_loss(fwd(tr), yt[tr], weight, balance_lambda=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nets.eval()
        with torch.no_grad():
            vl = moe_loss(fwd(va), yt[va], weight)[0].item()
        if vl < best:
            best, state = vl, {k: v.clone() for k, v in nets.state_dict().items()}
    nets.load_state_dict(state)
    nets.eval()
    return fwd


def feats_of(idxs, tr):
    out = {}
    for m in P.MODALITIES:
        f = SM[m].reshape(len(P.y), -1)[:, idxs[m]]
        out[m] = (f - f[tr].mean(0)) / (f[tr].std(0) + 1e-6)
    return out


STAT = os.environ.get("EM_STAT", "tail")
NSEL = []
MODE = os.environ.get("EM_WEIGHT", "resp")
ROUNDS = int(os.environ.get("EM_ROUNDS", 2))
res = {r: [] for r in range(ROUNDS + 1)}
H = {r: [] for r in range(ROUNDS + 1)}
for fold, (tr_all, te) in enumerate(P.folds.split(P.y, P.y)):
    tr, va = train_test_split(tr_all, test_size=0.2, stratify=P.y[tr_all], random_state=0)
    w = {m: np.ones(len(tr)) for m in P.MODALITIES}
    for r in range(ROUNDS + 1):
        idxs = {m: fit_w(SM[m][tr], P.y[tr], w[m]) for m in P.MODALITIES}
        H[r].append(sum([hits(m, idxs[m]) for m in P.MODALITIES], []))
        f = fit_moe(feats_of(idxs, tr), tr, va)
        with torch.no_grad():
            out = f(te)
            acc = balanced_accuracy_score(P.y[te], out.log_probs.argmax(1).numpy())
            res[r].append(acc)
            o = f(tr)
            g = o.gate.numpy()
            post = g * np.exp(o.expert_log_probs.numpy()[np.arange(len(tr)), :, P.y[tr]])
            post /= post.sum(1, keepdims=True)
        wt = post if MODE == "resp" else g
        w = {m: wt[:, k] for k, m in enumerate(P.MODALITIES)}
    print(fold, " ".join(f"r{r} {res[r][-1]:.3f} hits {H[r][-1]}" for r in res), flush=True)
print("selected per fit", NSEL)
print("MEAN", " ".join(f"r{r} {100 * np.mean(res[r]):.1f} hits {np.mean(H[r]):.2f}" for r in res))
