"""The gate fitted alone to frozen experts (``train.gate_fit: heldout`` / ``crossfit``; docs/model.md), and the
posterior routing of trained subjects (``responsibilities``, for ``train.screen_refits``)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from neuromoe.learn.data import to_device
from neuromoe.learn.model import MoEOutput, NeuroMoE, moe_loss


@torch.no_grad()
def expert_log_probs(model: NeuroMoE, loader: DataLoader, dev: torch.device
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eval-mode pass -> (experts' log-probs (N, E, C) float32, clin (N, F), present (N, E), y (N,))."""
    lps, clins, presents, ys = [], [], [], []
    model.eval()
    for batch in loader:
        images, clin, present, y = to_device(batch, model.cfg.experts, dev)
        lps.append(model(images, clin, present, uniform_weights=True).expert_log_probs.float())
        clins.append(clin)
        presents.append(present)
        ys.append(y)
    return torch.cat(lps), torch.cat(clins), torch.cat(presents), torch.cat(ys)


def fit_gate_to(gate: torch.nn.Module, expert_log_probs: Tensor, clin: Tensor, present: Tensor, y: Tensor,
                weights: Tensor | None, balance_lambda: float, steps: int, seed: int, lr: float = 1e-2,
                weight_decay: float = 1e-2) -> list[float]:
    """``steps`` full-batch AdamW steps of ``gate`` (clinical -> expert logits) on the paper's loss
    (class-weighted NLL of the mixture + lambda * R_balance) with fixed experts' log-probabilities
    (N, E, C); ``present`` (N, E) masks absent experts. The gate is left in eval mode; returns the losses.
    """
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    gate.train()
    losses = []
    for _ in range(steps):
        logits = gate(clin).float().masked_fill(~present, float("-inf"))  # absent experts: weight 0
        log_w = F.log_softmax(logits, dim=-1)
        out = MoEOutput(torch.logsumexp(log_w.unsqueeze(-1) + expert_log_probs, dim=1), log_w.exp(),
                        expert_log_probs)
        loss, _ = moe_loss(out, y, weights, balance_lambda)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    gate.eval()
    return losses


def fit_gate(model: NeuroMoE, loader: DataLoader, dev: torch.device, weights: Tensor | None,
             balance_lambda: float, steps: int, seed: int, lr: float = 1e-2, weight_decay: float = 1e-2
             ) -> list[float]:
    """Fit only ``model.gate`` to the frozen experts on ``loader``'s subjects (``gate_fit: heldout``).

    The experts' log-probabilities are computed once (eval mode), then ``fit_gate_to`` fits the gate. A
    gate fitted on the training part learns which expert memorised each subject best; fitted on subjects
    the experts did not train on, it learns which expert is right for whom (studies/fusion/README.md).
    Returns the loss per step.
    """
    losses = fit_gate_to(model.gate, *expert_log_probs(model, loader, dev), weights, balance_lambda, steps,
                         seed, lr, weight_decay)
    model.eval()
    return losses


@torch.no_grad()
def responsibilities(model: NeuroMoE, loader: DataLoader, dev: torch.device) -> Tensor:
    """Eval-mode pass -> (N, E) float32: each expert's share in explaining each subject's true class, the
    posterior of the mixture's routing ``w_m P_m(y | x) / sum_k w_k P_k(y | x)`` (the E-step of EM for a
    mixture of experts, Jordan & Jacobs 1994). An ungated model routes uniformly over the present experts;
    absent experts get 0. Rows in ``loader`` order, which must carry labels (training subjects)."""
    out = []
    model.eval()
    for batch in loader:
        images, clin, present, y = to_device(batch, model.cfg.experts, dev)
        o = model(images, clin, present)
        joint = torch.log(o.gate.float()) + o.expert_log_probs.float()[torch.arange(len(y)), :, y]
        out.append(torch.softmax(joint.masked_fill(~present, float("-inf")), dim=1).cpu())
    return torch.cat(out)
