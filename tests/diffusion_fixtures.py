"""拡散モデルのテストが共有する小道具 (conftest.py ではなく、使うテストが import します)。"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchbook.diffusion as pkg
from torchbook.diffusion.unet import UNet

SRC = Path(pkg.__file__).resolve().parent
WEIGHTS = SRC / "weights"


def tiny_unet(seed: int = 0) -> UNet:
    """0 で初期化した層も乱数にした小さな UNet (出力や条件の効果が 0 だと比べる意味がない)。"""
    torch.manual_seed(seed)
    model = UNet(channels=(16, 32)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.05)
    return model


def fashion_root() -> Path:
    """Fashion-MNIST のあるフォルダー (無ければテストを飛ばします)。"""
    root = Path(os.environ.get("TORCHBOOK_DATA", Path(__file__).resolve().parents[1] / "data"))
    if not (root / "FashionMNIST" / "raw").is_dir():
        pytest.skip("Fashion-MNIST がありません")
    return root


def run_module(module: str, *args: str, cwd: Path | None = None,
               pythonpath: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m module args`` を別のプロセスで実行します (1 スレッド)。"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
