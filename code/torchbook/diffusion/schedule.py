"""ノイズスケジュールと前向き過程 q(x_t | x_0)。

時刻 t は 0 始まりの整数 0, 1, ..., T-1 です (diffusers と同じ)。論文の t = 1..T は
ここでは t - 1 に当たります。``alphas_cumprod[t]`` が論文の ᾱ_{t+1} です。
"""

from __future__ import annotations

import math

import torch


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM (Ho et al. 2020) の線形スケジュール: β を beta_start から beta_end まで等間隔に。"""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) のコサインスケジュール。

    ᾱ(t) = f(t) / f(0)、f(t) = cos²((t/T + s) / (1 + s) · π/2) を決めてから
    β_t = 1 - ᾱ(t+1) / ᾱ(t) を逆算します。最後の方で β が 1 に近づくので max_beta で抑えます。
    """
    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(name: str, T: int = 1000) -> torch.Tensor:
    """名前 ("linear" か "cosine") から β の列 (T,) を作ります。"""
    if name == "linear":
        return linear_betas(T)
    if name == "cosine":
        return cosine_betas(T)
    raise ValueError(f"未知のスケジュール {name!r} です ('linear' か 'cosine')")


class NoiseSchedule:
    """β_t から導かれる量をまとめて持つクラス。係数はすべて float64 で計算して保持します。

    - ``alphas_cumprod[t]`` = ᾱ_t = Π_{s≤t} (1 - β_s)
    - ``alphas_cumprod_prev[t]`` = ᾱ_{t-1} (t = 0 では 1。最後の一歩はノイズなしの x_0 へ進む)
    - ``posterior_variance[t]`` = β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t
    - ``posterior_mean_coef_x0[t]``, ``posterior_mean_coef_xt[t]``: 事後分布の平均
      μ̃_t = c0 · x_0 + ct · x_t の係数。t = 0 では c0 = 1、ct = 0 です。

    float32 で計算すると 1 - ᾱ_0 の桁落ちで、t = 0 の c0 が 1 からずれます (本書のコサインでは
    1 - ᾱ_0 ≈ 4.1e-5 で約 5e-4、線形では 1 - ᾱ_0 = 1e-4 で約 2e-4)。
    使うときに入力と同じ dtype (普通は float32) に丸めます。
    """

    def __init__(self, betas: torch.Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas は 0 < β < 1 の 1 次元テンソルにしてください")
        self.T = len(betas)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        # 先頭に 1 を足して 1 つずらす。ac[t - 1] と書くと t = 0 で ac[-1] (最後の値!) を読む
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.betas = betas
        self.alphas = alphas
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ac).sqrt()
        self.rsqrt_alphas_cumprod = ac.rsqrt()  # 1 / √ᾱ_t (x_0 の逆算で使う)
        self.posterior_variance = (1 - ac_prev) / (1 - ac) * betas
        self.posterior_mean_coef_x0 = ac_prev.sqrt() * betas / (1 - ac)
        self.posterior_mean_coef_xt = alphas.sqrt() * (1 - ac_prev) / (1 - ac)
        self.snr = ac / (1 - ac)

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> NoiseSchedule:
        """``NoiseSchedule.from_name("cosine")`` のように名前から作ります。"""
        if T < 1:
            raise ValueError(f"T は 1 以上にしてください (受け取ったのは {T})")
        return cls(make_betas(name, T))

    def _at(self, values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """values[t] を x と同じ dtype・デバイスにし、(N, 1, 1, 1) に整形して返します。"""
        v = values[t.cpu()].to(x.dtype)  # float64 のまま GPU へ送らない (MPS は float64 不可)
        return v.to(x.device).view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """前向き過程の閉じた形: x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε。"""
        a = self._at(self.sqrt_alphas_cumprod, t, x0)
        s = self._at(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * x0 + s * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """ε の予測から x_0 を逆算します: x_0 = (x_t - √(1 - ᾱ_t) · ε) / √ᾱ_t。"""
        s = self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        inv_a = self._at(self.rsqrt_alphas_cumprod, t, x_t)
        return (x_t - s * eps) * inv_a

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
        """q(x_{t-1} | x_t, x_0) の平均 μ̃_t(x_t, x_0) = c0 · x_0 + ct · x_t。"""
        c0 = self._at(self.posterior_mean_coef_x0, t, x_t)
        ct = self._at(self.posterior_mean_coef_xt, t, x_t)
        return c0 * x0 + ct * x_t
