"""torchbook.diffusion.device のテスト: bf16 を既定で使うのは、装置が直接計算できるときだけ。"""

import torch

from torchbook.diffusion import device as D


def fake_pre_ampere(including_emulation: bool = True) -> bool:
    """T4・V100 の振る舞い: エミュレーションを数えると True、数えなければ False。"""
    return including_emulation


def test_cuda_bf16_ignores_emulation(monkeypatch):
    """Ampere より前の GPU では、エミュレーションで計算できても bf16 を既定にしない。"""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_pre_ampere)
    assert D.bf16_supported(torch.device("cuda")) is False


def test_cuda_bf16_native(monkeypatch):
    """bf16 の演算器を持つ GPU (Ampere 以降) では bf16 を既定にする。"""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert D.bf16_supported(torch.device("cuda")) is True


def test_mps_never_defaults_to_bf16():
    assert D.bf16_supported(torch.device("mps")) is False
