"""学習の部品: 重みの指数移動平均 (EMA) と学習率のスケジュール。

学習の CLI (``train``) が使い、本にもそのまま載せます。
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EMA:
    """重みの指数移動平均 (EMA)。サンプリングにはこちらの重みを使います。

    学習の初めは減衰率を min(decay, (1 + step) / (10 + step)) に下げます (ウォームアップ)。
    そうしないと、初期値 (ランダムな重み) の影響が長く残ります。
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)  # e ← d·e + (1 - d)·p
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """線形ウォームアップの後、コサインで 0.05 倍まで下げる学習率の倍率。

    形は全体のステップ数 total で決まります。学習を途中から延ばす (total を増やす) と、
    その時点からの学習率は新しい total のコサインに従います。
    """
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup: int,
                 total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_lambda`` の倍率を掛ける学習率のスケジューラー (1 ステップごとに step() を呼ぶ)。"""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, total))
