"""NeuroMoE: a transformer mixture of experts over MRI modalities and clinical features (one module).

    anat (B,1,D,H,W)  -> Conv3d patch embed + 3D pos. emb. -> K pre-norm blocks -> LN, pool -> h_anat
    dwi, func         -> (same, own weights)                                      -> h_dwi, h_func
    (model.encoder: cnn -> ConvEncoder; screen -> VoxelScreen, voxels fitted on the training subjects)
    clin (B,F)        -> FCN                                                      -> h_clin
    expert_m: FFN(h_m) -> logits_m (B,C);   gate: softmax(MLP(clin)) (B,E), absent experts masked
    log P_out = logsumexp_m(log w_m + log_softmax(logits_m))

The structure, its sources and the choices beyond the paper: docs/model.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from neuromoe.learn.screen import VoxelScreen
from neuromoe.learn.variants import EXPERTS, MRI_MODALITIES  # noqa: F401 - re-exported: the canonical orders

POOLINGS = ("mean", "max", "flat")  # token pooling choices of VolumeEncoder
ENCODERS = ("vit", "cnn", "screen")  # per-modality encoder: the paper's transformer, a small 3D CNN, or a
# supervised voxel screen fitted on the training subjects (neuromoe.learn.screen)


@dataclass
class ModelConfig:
    """Every size of the network; validated on construction (ValueError names the bad value).

    ``channels`` gives the input channels per MRI modality (only the experts used need one), ``grid``
    the input volume (D, H, W) in voxels, each divisible by ``patch_size``. Defaults are the paper's.
    """

    channels: dict[str, int] = field(default_factory=lambda: {"anat": 1, "dwi": 2, "func": 2})
    grid: tuple[int, int, int] = (64, 64, 64)
    n_clinical: int = 7
    n_classes: int = 3
    experts: tuple[str, ...] = EXPERTS
    use_gate: bool = True
    patch_size: int = 4
    dim: int = 256
    depth: int = 4
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # residual, MLP and expert-head dropout
    attn_dropout: float = 0.0  # dropout_p of the attention; >0 is slow on CPU (docs/model.md)
    clin_hidden: tuple[int, ...] = (128, 64)
    expert_hidden: int = 128
    gate_hidden: int = 64
    clin_dropout: float = 0.3
    gate_dropout: float = 0.3
    pooling: str = "mean"  # token pooling of each encoder: mean (paper) | max | flat (see VolumeEncoder)
    flat_channels: int = 4  # pooling "flat": features kept per token before the position-wise readout
    encoder: str = "vit"  # vit (the paper's) | cnn (ConvEncoder: conv stages, then the same pooling)
    cnn_channels: tuple[int, ...] = (16, 32, 32)  # encoder cnn: width of each conv-ReLU-maxpool stage
    screen_top_k: int = 50  # encoder screen: voxels of largest ANOVA F per modality
    screen_peaks: int = 2  # encoder screen: tail peaks per patient class (every channel at each)
    screen_threshold: float = 2.0  # encoder screen: |robust z| of a tail
    screen_sigma: float = 1.0  # encoder screen: Gaussian smoothing (grid voxels) before reading
    screen_fdr: float = 0.0  # encoder screen: ANOVA voxels kept only if significant at this BH FDR (0: top_k always)

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)
        self.experts = tuple(self.experts)
        self.clin_hidden = tuple(int(h) for h in self.clin_hidden)
        self.cnn_channels = tuple(int(c) for c in self.cnn_channels)
        self.channels = {str(k): int(v) for k, v in self.channels.items()}
        if len(self.grid) != 3 or any(g < 1 for g in self.grid):
            raise ValueError(f"grid must be 3 positive ints (D, H, W), got {self.grid}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if any(g % self.patch_size for g in self.grid):
            raise ValueError(f"grid {self.grid} is not divisible by patch_size {self.patch_size}")
        if not self.experts:
            raise ValueError("experts is empty; use a non-empty subset of " + str(EXPERTS))
        unknown = [e for e in self.experts if e not in EXPERTS]
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; allowed: {EXPERTS}")
        if list(self.experts) != [e for e in EXPERTS if e in self.experts]:
            raise ValueError(f"experts {self.experts} must be unique and in the canonical order {EXPERTS}")
        for m in self.mri_experts:
            if self.channels.get(m, 0) < 1:
                raise ValueError(f"expert {m!r} needs channels[{m!r}] >= 1, got channels={self.channels}")
        for name in ("dim", "depth", "heads", "expert_hidden", "gate_hidden", "flat_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"heads {self.heads} does not divide dim {self.dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not self.clin_hidden or any(h < 1 for h in self.clin_hidden):
            raise ValueError(f"clin_hidden must be a non-empty list of positive ints, got {self.clin_hidden}")
        for name in ("dropout", "attn_dropout", "clin_dropout", "gate_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "cnn":
            if not self.cnn_channels or any(c < 1 for c in self.cnn_channels):
                raise ValueError(f"cnn_channels must be a non-empty list of positive ints, got {self.cnn_channels}")
            if any(g % 2 ** len(self.cnn_channels) for g in self.grid):
                raise ValueError(f"encoder cnn halves the grid {len(self.cnn_channels)} times (one per "
                                 f"cnn_channels entry): grid {self.grid} must be divisible by "
                                 f"{2 ** len(self.cnn_channels)}")
        if self.encoder == "screen":
            if self.screen_top_k < 0 or self.screen_peaks < 0 or self.screen_top_k + self.screen_peaks < 1:
                raise ValueError("encoder screen needs screen_top_k >= 0 and screen_peaks >= 0, not both 0; got "
                                 f"{self.screen_top_k} and {self.screen_peaks}")
            if self.screen_threshold <= 0 or self.screen_sigma < 0:
                raise ValueError(f"screen_threshold must be > 0 and screen_sigma >= 0, got "
                                 f"{self.screen_threshold} and {self.screen_sigma}")
            if not 0 <= self.screen_fdr < 1:
                raise ValueError(f"screen_fdr must be in [0, 1), got {self.screen_fdr}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.n_clinical < 0:
            raise ValueError(f"n_clinical must be >= 0, got {self.n_clinical}")
        if self.n_clinical == 0 and ("clin" in self.experts or self.use_gate):
            raise ValueError("n_clinical is 0 but the clinical expert or the gate needs clinical features; "
                             "set participants.clinical_columns or use a variant without them")

    @property
    def mri_experts(self) -> tuple[str, ...]:
        """The MRI modalities among the experts, canonical order."""
        return tuple(e for e in self.experts if e in MRI_MODALITIES)

    @property
    def n_tokens(self) -> int:
        """Positions per MRI modality at the encoder's output: prod(grid / patch_size) for the ViT,
        prod(grid / 2^stages) for the CNN."""
        step = self.patch_size if self.encoder == "vit" else 2 ** len(self.cnn_channels)
        return math.prod(g // step for g in self.grid)

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples as lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of ``to_dict``; an unknown key raises ValueError naming it (no silent typos)."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown model config key(s) {extra}; allowed: {sorted(known)}")
        return cls(**d)


@dataclass
class MoEOutput:
    """Network output. E = len(cfg.experts) in cfg.experts order, C = n_classes; float32."""

    log_probs: Tensor  # (B, C)    log P_out
    gate: Tensor  # (B, E)         w, rows sum to 1, 0 for absent experts
    expert_log_probs: Tensor  # (B, E, C)  log P_m (meaningless but finite for absent experts)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernels)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.heads, self.attn_dropout = cfg.heads, cfg.attn_dropout

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Linear -> GELU -> Linear -> Dropout, hidden = mlp_ratio * dim."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.fc = nn.Linear(cfg.dim, hidden)
        self.proj = nn.Linear(hidden, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.dim), SelfAttention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VolumeEncoder(nn.Module):
    """One MRI modality (B, C_in, D, H, W) -> (B, dim): patch tokens + learnable 3D positions, pooled.

    ``cfg.pooling``: ``mean`` (the paper's) averages the tokens; ``max`` takes each feature's largest token value;
    ``flat`` keeps ``flat_channels`` features of every token and reads them out with one linear layer over all
    positions (N * flat_channels -> dim). Why and what it costs: docs/model.md.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int) -> None:
        super().__init__()
        p = cfg.patch_size
        self.tokens_grid = tuple(g // p for g in cfg.grid)  # (gd, gh, gw)
        self.patch = nn.Conv3d(in_channels, cfg.dim, kernel_size=p, stride=p)
        self.pos = nn.Parameter(torch.zeros(1, *self.tokens_grid, cfg.dim))  # (1, gd, gh, gw, dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.pooling = cfg.pooling
        if cfg.pooling == "flat":
            self.reduce = nn.Linear(cfg.dim, cfg.flat_channels)  # per token
            self.readout = nn.Linear(cfg.n_tokens * cfg.flat_channels, cfg.dim)  # over positions

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, D, H, W) -> (B, dim)."""
        x = self.patch(x)  # (B, dim, gd, gh, gw)
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim), tokens in (gd, gh, gw) row-major order
        x = self.drop(x + self.pos.view(1, -1, C))  # pos (1, N, dim), same token order
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.pooling == "flat":
            return self.readout(self.reduce(x).flatten(1))  # (B, N * flat_channels) -> (B, dim)
        return x.amax(dim=1) if self.pooling == "max" else x.mean(dim=1)  # (B, dim)


class ConvEncoder(nn.Module):
    """One MRI modality (B, C_in, D, H, W) -> (B, dim) with a small 3D CNN (``model.encoder: cnn``).

    One stage per ``cnn_channels`` entry: 3^3 convolution, ReLU, 2^3 max-pool (so the grid must divide by
    2^stages), then the pooling of ``VolumeEncoder`` over the remaining positions (``flat``: a linear read-out
    of every position's features; ``mean`` / ``max``: over positions, then a linear map to ``dim``).
    Convolutions share their weights over space, so what a focal change looks like is learned once for every
    place; studies/experts/README.md says what it does for the experts.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for width in cfg.cnn_channels:
            layers += [nn.Conv3d(c, width, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool3d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.pooling = cfg.pooling
        self.drop = nn.Dropout(cfg.dropout)
        self.readout = nn.Linear(c * cfg.n_tokens if cfg.pooling == "flat" else c, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, D, H, W) -> (B, dim)."""
        x = self.features(x).flatten(2)  # (B, C, positions)
        if self.pooling == "flat":
            x = x.flatten(1)
        else:
            x = x.amax(dim=2) if self.pooling == "max" else x.mean(dim=2)
        return self.readout(self.drop(x))


def _fcn(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout for each consecutive pair of ``sizes``."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _encoder(cfg: ModelConfig, in_channels: int) -> nn.Module:
    if cfg.encoder == "screen":
        return VoxelScreen(in_channels, cfg.grid, cfg.n_classes, cfg.screen_top_k, cfg.screen_peaks,
                           cfg.screen_threshold, cfg.screen_sigma, cfg.screen_fdr)
    return (VolumeEncoder if cfg.encoder == "vit" else ConvEncoder)(cfg, in_channels)


class NeuroMoE(nn.Module):
    """The mixture of experts; ``forward(images, clin, present) -> MoEOutput``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoders = nn.ModuleDict({m: _encoder(cfg, cfg.channels[m]) for m in cfg.mri_experts})
        self.clin_encoder = (_fcn([cfg.n_clinical, *cfg.clin_hidden], cfg.clin_dropout)
                             if "clin" in cfg.experts else None)
        heads = {}
        for m in cfg.experts:
            d_in = cfg.clin_hidden[-1] if m == "clin" else self._width(m)
            heads[m] = nn.Sequential(nn.Linear(d_in, cfg.expert_hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(cfg.expert_hidden, cfg.n_classes))
        self.heads = nn.ModuleDict(heads)
        self.gate = (nn.Sequential(nn.Linear(cfg.n_clinical, cfg.gate_hidden), nn.ReLU(),
                                   nn.Dropout(cfg.gate_dropout), nn.Linear(cfg.gate_hidden, len(cfg.experts)))
                     if cfg.use_gate else None)
        # Transformer linears: N(0, 0.02) as nanoGPT/ViT. The small FCNs (clinical, heads, gate) keep torch's
        # fan-in init: at width 8-128, four 0.02-scaled layers in a row would start with vanishing gradients.
        self.encoders.apply(self._init_weights)

    def _width(self, modality: str) -> int:
        """Features an MRI encoder hands its expert head: ``dim``, or a screen's voxel count."""
        return getattr(self.encoders[modality], "n_features", self.cfg.dim)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, images: dict[str, Tensor], clin: Tensor, present: Tensor | None = None,
                uniform_weights: bool = False) -> MoEOutput:
        """Mixture prediction.

        Args:
            images: ``{modality: (B, channels[m], D, H, W)}`` for every MRI expert (others are ignored).
            clin: (B, F) preprocessed clinical features (gate input and clinical-expert input).
            present: (B, E) bool, E = len(cfg.experts); False masks that expert (weight 0, gate renormalised).
                None: all present. Every row needs at least one expert present.
            uniform_weights: weight the experts present equally and leave the gate out of the graph (expert
                training under ``train.gate_fit: heldout`` or ``crossfit``; what ``use_gate=False`` always does).
        """
        cfg = self.cfg
        B, E = clin.shape[0], len(cfg.experts)
        if clin.shape[1:] != (cfg.n_clinical,):
            raise ValueError(f"clin has shape {tuple(clin.shape)}, expected (B, {cfg.n_clinical})")
        if present is not None:
            if present.shape != (B, E) or present.dtype != torch.bool:
                raise ValueError(f"present must be a bool tensor (B, E) = ({B}, {E}), "
                                 f"got {present.dtype} {tuple(present.shape)}")
            if not bool(present.any(dim=1).all()):
                raise ValueError("a sample has no expert present; drop it or use a variant with its "
                                 "modalities")
        logits = []
        for i, m in enumerate(cfg.experts):
            if m == "clin":
                h = self.clin_encoder(clin)  # (B, clin_hidden[-1])
            else:
                if m not in images:
                    raise ValueError(f"images has no {m!r} volume (has {sorted(images)})")
                x = images[m]
                want = (B, cfg.channels[m], *cfg.grid)
                if tuple(x.shape) != want:
                    raise ValueError(f"images[{m!r}] has shape {tuple(x.shape)}, expected {want}")
                if present is not None:  # absent input -> zeros, so nothing of it reaches the output
                    x = torch.where(present[:, i].view(B, 1, 1, 1, 1), x, 0.0)
                h = self.encoders[m](x)  # (B, dim)
            logits.append(self.heads[m](h))  # (B, C)
        expert_lp = F.log_softmax(torch.stack(logits, dim=1).float(), dim=-1)  # (B, E, C)
        if self.gate is not None and not uniform_weights:
            gate_logits = self.gate(clin).float()  # (B, E)
        else:
            gate_logits = clin.new_zeros(B, E).float()
        if present is not None:
            gate_logits = gate_logits.masked_fill(~present, float("-inf"))  # (B, E)
        log_w = F.log_softmax(gate_logits, dim=-1)  # (B, E), -inf for absent experts
        log_probs = torch.logsumexp(log_w.unsqueeze(-1) + expert_lp, dim=1)  # (B, C)
        return MoEOutput(log_probs=log_probs, gate=log_w.exp(), expert_log_probs=expert_lp)

    def estimate_flops(self) -> int:
        """Forward FLOPs per sample (2 per multiply-add of every matmul/conv; norms and softmax ignored).

        A training step costs about 3x this (backward = 2x forward), as in nanoGPT's ``estimate_mfu``.
        """
        cfg = self.cfg
        N, d, p3 = cfg.n_tokens, cfg.dim, cfg.patch_size ** 3
        hidden = int(cfg.mlp_ratio * d)
        per_block = 2 * N * (d * 3 * d + d * d + 2 * d * hidden) + 2 * 2 * N * N * d  # linears + QK^T + AV
        flops = 0
        for m in cfg.mri_experts:
            if cfg.encoder == "cnn":
                flops += self._cnn_flops(cfg.channels[m])
                continue
            if cfg.encoder == "screen":
                flops += self.encoders[m].flops()
                continue
            flops += 2 * N * cfg.channels[m] * p3 * d + cfg.depth * per_block
            if cfg.pooling == "flat":
                flops += 2 * N * d * cfg.flat_channels + 2 * N * cfg.flat_channels * d  # reduce + readout
        if "clin" in cfg.experts:
            sizes = [cfg.n_clinical, *cfg.clin_hidden]
            flops += sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        for m in cfg.experts:
            d_in = cfg.clin_hidden[-1] if m == "clin" else self._width(m)
            flops += 2 * (d_in * cfg.expert_hidden + cfg.expert_hidden * cfg.n_classes)
        if cfg.use_gate:
            flops += 2 * (cfg.n_clinical * cfg.gate_hidden + cfg.gate_hidden * len(cfg.experts))
        return flops

    def _cnn_flops(self, in_channels: int) -> int:
        """Forward FLOPs of one ConvEncoder: every 3^3 convolution at its stage's resolution + the read-out."""
        cfg, flops, c = self.cfg, 0, in_channels
        voxels = math.prod(cfg.grid)
        for width in cfg.cnn_channels:
            flops += 2 * voxels * c * width * 27
            voxels //= 8
            c = width
        return flops + 2 * (c * cfg.n_tokens if cfg.pooling == "flat" else c) * cfg.dim

    def estimate_mfu(self, samples_per_step: int, seconds_per_step: float, peak_flops: float) -> float:
        """Model FLOPs utilisation of a training step: 3 * forward FLOPs * samples / time / peak FLOP/s."""
        return 3 * self.estimate_flops() * samples_per_step / seconds_per_step / peak_flops


def expert_presence(modality_present: Tensor, experts: tuple[str, ...]) -> Tensor:
    """(B, 3) bool over (anat, dwi, func), as the cohort cache gives it -> (B, E) over ``experts``.

    The clinical expert is always present (its features are imputed).
    """
    cols = [modality_present[:, MRI_MODALITIES.index(m)] if m in MRI_MODALITIES
            else torch.ones_like(modality_present[:, 0]) for m in experts]
    return torch.stack(cols, dim=1).bool()  # (B, E)


def balance_loss(gate: Tensor) -> Tensor:
    """R_balance = (1/E) sum_k (mean over batch of w_k - 1/E)^2 for gate (B, E); in [0, (E-1)/E^2]."""
    E = gate.shape[1]
    return ((gate.mean(dim=0) - 1.0 / E) ** 2).mean()


def moe_loss(out: MoEOutput, y: Tensor, class_weights: Tensor | None = None,
             balance_lambda: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """L = WCE(P_out, y) + lambda * R_balance.

    WCE is ``F.nll_loss(log P_out, y, weight=a)``: the class-weighted mean sum_i a_{y_i} (-log P_out[i, y_i])
    / sum_i a_{y_i}, normalised by the sum of the weights in the batch (torch's convention), so a batch of
    one class has the same scale as an unweighted NLL.

    Args:
        out: model output (log_probs (B, C), gate (B, E)).
        y: (B,) long class indices.
        class_weights: (C,) a_c from ``class_weights`` on the training fold; None = unweighted.
        balance_lambda: weight of R_balance.
    Returns:
        (scalar loss tensor, {"wce", "balance": detached scalar tensors}): tensors, not floats, so a training
        step never waits for the device (``float()`` of a CUDA tensor is a host sync).
    """
    wce = F.nll_loss(out.log_probs, y, weight=class_weights)
    balance = balance_loss(out.gate)
    loss = wce + balance_lambda * balance
    return loss, {"wce": wce.detach(), "balance": balance.detach()}


def class_weights(labels: Tensor | list[int], n_classes: int) -> Tensor:
    """a_c = N / (C * N_c) over the training fold's labels -> (C,) float32.

    A class with no training sample cannot be weighted (or learned): ValueError naming it.
    """
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if y.numel() and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes - 1}], got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    counts = torch.bincount(y, minlength=n_classes).float()  # (C,)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"class(es) {empty} have no sample in the training fold; cannot weight them")
    return (y.numel() / (n_classes * counts)).float()
