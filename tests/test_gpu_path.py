"""The GPU path of training: bf16 autocast, a step that never waits for the device, checkpoints that move between
devices. Marked ``cuda``: they run on a CUDA device when torch sees one (``bench/gpu_check.py`` runs them there
first), else on the CPU, where the same code runs with CPU bf16 kernels, so they cannot rot on a CI machine
without a GPU. ``NEUROMOE_CHECK_DEVICE=cpu`` forces the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from neuromoe.learn.checkpoint import save_checkpoint
from neuromoe.learn.model import ModelConfig, NeuroMoE
from neuromoe.learn.train import load_model, train_step

pytestmark = pytest.mark.cuda

CH = {"anat": 1, "dwi": 2, "func": 2}
# bf16 keeps 8 bits of mantissa: the class probabilities of a small model under autocast stay within this of
# the float32 forward's (measured on CPU: ~0.005)
BF16_PROB_ATOL = 0.03


@pytest.fixture(scope="module")
def dev() -> torch.device:
    forced = os.environ.get("NEUROMOE_CHECK_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cfg() -> ModelConfig:
    return ModelConfig(channels=CH, grid=(8, 8, 8), n_clinical=5, n_classes=3, dim=32, depth=2, heads=4,
                       mlp_ratio=2, clin_hidden=(16, 8), expert_hidden=16, gate_hidden=8)


def _batch(cfg: ModelConfig, b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(b, c, *cfg.grid, generator=g).to(torch.float16) for m, c in CH.items()}
    batch["clin"] = torch.randn(b, cfg.n_clinical, generator=g)
    batch["present"] = torch.ones(b, 3, dtype=torch.bool)
    batch["label"] = torch.arange(b) % cfg.n_classes
    batch["row"] = torch.arange(b)
    if dev_is_cuda():
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def dev_is_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("NEUROMOE_CHECK_DEVICE", "cuda") == "cuda"


def _images(batch: dict[str, torch.Tensor], dev: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return {m: batch[m].to(dev).float() for m in CH}, batch["clin"].to(dev)


def test_bf16_forward_agrees_with_float32(dev: torch.device) -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = NeuroMoE(cfg).to(dev).eval()
    images, clin = _images(_batch(cfg), dev)
    with torch.no_grad():
        ref = model(images, clin).log_probs.exp()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            low = model(images, clin).log_probs.float().exp()
    diff = (ref - low).abs().max().item()
    print(f"{dev}: bf16 vs float32 probabilities, max |diff| {diff:.4f}")
    assert diff < BF16_PROB_ATOL
    assert (ref.argmax(1) == low.argmax(1)).float().mean().item() >= 0.8


def test_training_step_keeps_its_results_on_the_device_and_learns(dev: torch.device) -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = NeuroMoE(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=dev.type == "cuda" or None)
    batch = _batch(cfg)
    first = train_step(model, opt, batch, dev, None, 0.1, grad_clip=1.0, flip_lr=0.5)
    # nothing converted to a Python number inside the step (on CUDA that would be a host sync)
    assert all(isinstance(v, torch.Tensor) for v in first.values())
    assert first["loss"].device.type == dev.type
    if dev.type == "cuda":  # and CUDA's own check: any synchronising call in the step raises
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(model, opt, batch, dev, None, 0.1, grad_clip=1.0, flip_lr=0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for _ in range(10):
        last = train_step(model, opt, batch, dev, None, 0.1, grad_clip=1.0)
    assert torch.isfinite(last["loss"]) and last["loss"].item() < first["loss"].item()


def test_a_checkpoint_written_on_the_device_predicts_the_same_on_the_cpu(dev: torch.device, tmp_path) -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = NeuroMoE(cfg).to(dev).eval()
    path = save_checkpoint(tmp_path / "model.safetensors", model.state_dict(), {"model_config": cfg.to_dict()})
    back, _ = load_model(path, device="cpu")
    images, clin = _images(_batch(cfg, seed=1), dev)
    with torch.no_grad():
        on_dev = model(images, clin).log_probs.float().cpu()
        on_cpu = back({m: x.cpu() for m, x in images.items()}, clin.cpu()).log_probs
    assert all(t.device.type == "cpu" for t in back.state_dict().values())
    # float32 both; only the kernels differ (cuBLAS / cuDNN against the CPU's)
    torch.testing.assert_close(on_cpu, on_dev, atol=1e-4, rtol=1e-4)
    assert torch.equal(on_cpu.argmax(1), on_dev.argmax(1))
