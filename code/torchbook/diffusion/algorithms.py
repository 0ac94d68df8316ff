"""DDPM の 2 つのループ: Ho et al. (2020) の Algorithm 1 (学習) と Algorithm 2 (サンプリング)。

学習の CLI (``train``)・2 次元の例 (``toy``)・``sampling.sample(method="ddpm")`` は、どれも
このファイルの関数を呼びます。本に載せている関数が、そのまま実際に動くコードです。

論文の時刻 t = 1..T は、コードでは 0..T-1 の番号です (``schedule`` を参照)。
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .losses import flow_matching_loss, training_loss
from .schedule import NoiseSchedule


def ddpm_train_step(model: nn.Module, sched: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor,
                    optimizer: torch.optim.Optimizer, p_uncond: float = 0.1,
                    generator: torch.Generator | None = None, max_grad_norm: float | None = None,
                    bf16: bool = False) -> float:
    """Algorithm 1 (学習) の繰り返し 1 回。バッチ x_0 の損失を返します (更新の前の値)。

    t ~ 一様、ε ~ N(0, I) を選び、‖ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖² の勾配で 1 ステップ
    進みます (t と ε の選び方と損失は ``losses.training_loss``)。max_grad_norm を渡すと
    勾配のノルムをそこまでに抑え、bf16=True なら順伝播を bf16 の autocast で計算します。
    """
    with torch.autocast(device_type=x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = training_loss(model, sched, x0, y, p_uncond, generator)  # 行 3〜5 の損失
    return optimizer_step(model, optimizer, loss, max_grad_norm)  # 行 5: 勾配で 1 ステップ


def flow_train_step(model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                    optimizer: torch.optim.Optimizer, p_uncond: float = 0.1,
                    generator: torch.Generator | None = None, max_grad_norm: float | None = None,
                    bf16: bool = False, time_sampling: str = "uniform",
                    noise: torch.Tensor | None = None) -> float:
    """フローマッチングの学習の 1 回。Algorithm 1 の損失を ``losses.flow_matching_loss`` に
    替えただけです (t は 0〜1 の実数、予測するのは速度 v = ε - x_0)。
    noise を渡すと、x_0 と決まった組のノイズで学習します (リフロー。``reflow``)。"""
    with torch.autocast(device_type=x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = flow_matching_loss(model, x0, y, p_uncond, generator, time_sampling, noise)
    return optimizer_step(model, optimizer, loss, max_grad_norm)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   max_grad_norm: float | None = None) -> float:
    """損失の勾配で 1 ステップ進め、損失の値を返します (勾配のノルムは max_grad_norm まで)。"""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def ddpm_step(sched: NoiseSchedule, eps: torch.Tensor, t: int, x_t: torch.Tensor,
              noise: torch.Tensor | None = None, clip: bool = True) -> torch.Tensor:
    """DDPM の 1 ステップ: x_t から x_{t-1} を q(x_{t-1} | x_t, x̂_0) に従って引きます。

    x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t を [-1, 1] に切り詰め、事後分布の平均 μ̃ と
    分散 β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t)·β_t を使います。t = 0 (最後) はノイズを足しません。
    """
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
    x0 = sched.predict_x0(x_t, tt, eps)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = sched.posterior_mean(x0, x_t, tt)
    if t == 0:
        return mean
    if noise is None:
        noise = torch.randn_like(x_t)
    return mean + sched.posterior_variance[t].item() ** 0.5 * noise


@torch.no_grad()
def ddpm_sample_loop(predict_eps: Callable[[torch.Tensor, int], torch.Tensor],
                     sched: NoiseSchedule, x_T: torch.Tensor,
                     randn: Callable[[], torch.Tensor] | None = None, clip: bool = True,
                     record: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Algorithm 2 (サンプリング): x_T から t = T, ..., 1 と 1 ステップずつ x_0 まで戻ります。

    predict_eps(x_t, t) は時刻 t (コードの番号) の ε̂ を返す関数、randn() は z ~ N(0, I)
    を返す関数です (省くと ``torch.randn_like``)。record(t, x) を渡すと、各ステップの後に
    呼びます (途中経過の記録用。t はできた x の論文の番号)。
    """
    x = x_T  # 行 1: x_T ~ N(0, I)
    for t in reversed(range(sched.T)):  # 行 2: for t = T, ..., 1
        eps = predict_eps(x, t)
        z = None if t == 0 else randn() if randn else torch.randn_like(x)  # 行 3
        x = ddpm_step(sched, eps, t, x, z, clip)  # 行 4: x_{t-1} = μ̃ + σ_t z
        if record is not None:
            record(t, x)
    return x  # 行 6: x_0
