"""Precision defaults on GPUs: train autocasts to bf16 where the GPU supports it (float32 master weights) unless told
otherwise, and CUDA matmuls run in TF32. Decided from the device; checked here with the device's answers replaced
(no GPU on CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm2slm_cli import runtime
from llm2slm_cli.config import TrainConfig
from llm2slm_cli.stages.train import default_mixed_precision


def _config(**kw) -> TrainConfig:
    return TrainConfig(inputs=[Path(__file__)], slm="tiny-gpt2", out=Path("/nonexistent"), **kw)


@pytest.mark.parametrize("gpu,bf16,device,given,env,want", [
    (False, False, "auto", None, None, None),      # a CPU: no autocast
    (True, True, "auto", None, None, "bf16"),      # an Ampere-or-later GPU: bf16
    (True, False, "auto", None, None, None),       # a GPU without bf16 (e.g. a T4): float32
    (True, True, "cpu", None, None, None),         # --device cpu on a GPU machine
    (True, True, "auto", "no", None, "no"),        # --mixed-precision wins
    (False, False, "auto", "bf16", None, "bf16"),  # ... also on a CPU
    (True, True, "auto", None, "fp16", None),      # accelerate launch --mixed_precision fp16: left to accelerate
])
def test_train_autocasts_to_bf16_by_default_only_on_gpus_that_have_it(monkeypatch, gpu, bf16, device, given, env,
                                                                      want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    if env:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert default_mixed_precision(_config(device=device, mixed_precision=given)) == want


def test_cuda_devices_turn_tf32_on(monkeypatch):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert runtime.device("auto") == torch.device("cuda")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        assert runtime.device("cpu") == torch.device("cpu") and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
