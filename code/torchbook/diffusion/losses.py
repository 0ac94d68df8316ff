"""拡散モデルの損失: DDPM の ε 予測と、フローマッチングの速度 v 予測。

どちらも (モデル, 画像 x_0, クラス y) から 1 バッチの損失を返す関数です。
学習の CLI (``train``) と 2 次元の例 (``toy``) が同じものを使います。
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .schedule import NoiseSchedule

FLOW_TIME_SCALE = 1000.0  # フローの時刻 t ∈ [0, 1] を UNet には 1000·t として渡す


def training_loss(model: nn.Module, sched: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor,
                  p_uncond: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε 予測の損失 ‖ε - ε_θ(x_t, t, y)‖² (Ho et al. 2020 の「単純な損失」)。

    t は 0〜T-1 の整数を一様に選びます。p_uncond の割合でラベルを「クラスなし」に
    置き換え、同じモデルに条件なしの予測も学ばせます (classifier-free guidance 用)。
    """
    n = x0.shape[0]
    t = torch.randint(0, sched.T, (n,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    drop = torch.rand(n, generator=generator).to(x0.device) < p_uncond
    y = torch.where(drop, torch.full_like(y, model.null_class), y)
    x_t = sched.q_sample(x0, t, noise)
    return F.mse_loss(model(x_t, t, y).float(), noise)


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                       p_uncond: float = 0.1, generator: torch.Generator | None = None,
                       time_sampling: str = "uniform",
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """フローマッチング (rectified flow) の損失 ‖v - v_θ(x_t, t, y)‖²。

    x_t = (1 - t)·x_0 + t·ε は x_0 (t = 0) と純粋なノイズ ε (t = 1) を結ぶ直線上の点で、
    その速度 v = dx_t/dt = ε - x_0 を予測させます。t は 0〜1 から選びます:
    "uniform" は一様、"logit-normal" は sigmoid(N(0, 1)) で中ほどの t を多めにします
    (Esser et al. 2024)。ラベルを落とす扱いは ``training_loss`` と同じです。
    noise を渡すと ε を引かずにそれを使います (リフローでは x_0 と組にした ε。``reflow``)。
    """
    n = x0.shape[0]
    if time_sampling == "uniform":
        t = torch.rand(n, generator=generator).to(x0.device)
    elif time_sampling == "logit-normal":
        t = torch.sigmoid(torch.randn(n, generator=generator)).to(x0.device)
    else:
        raise ValueError(f"time_sampling は 'uniform' か 'logit-normal' です ({time_sampling!r})")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise の形 {tuple(noise.shape)} が x0 の形 {tuple(x0.shape)} と違います")
    drop = torch.rand(n, generator=generator).to(x0.device) < p_uncond
    y = torch.where(drop, torch.full_like(y, model.null_class), y)
    tb = t.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)  # 画像 (N, C, H, W) でも点 (N, D) でも
    x_t = (1 - tb) * x0 + tb * noise
    return F.mse_loss(model(x_t, t * FLOW_TIME_SCALE, y).float(), noise - x0)
