"""逆過程によるサンプリング: DDPM、DDIM、DPM-Solver++(2M)、classifier-free guidance。

フローマッチングのモデル (速度 v を予測) には、常微分方程式 dx/dt = v を t = 1 から 0 へ
解くオイラー法とホイン法を用意します。
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from .schedule import NoiseSchedule

# サンプラーの既定値 (sample() と CLI の両方がこれを使います)
DEFAULT_METHOD = "ddim"
DEFAULT_STEPS = 50
DEFAULT_ETA = 1.0  # η = 1: DDPM と同じ分散のノイズを各ステップで足す
DEFAULT_SPACING = "trailing"
DEFAULT_GUIDANCE = 1.0  # s = 1: 条件付きモデルそのもの
EPS_METHODS = ("ddpm", "ddim", "dpm++2m")  # ε を予測するモデル (DDPM) 用
FLOW_METHODS = ("euler", "heun")  # フローマッチングのモデル用
FLOW_TIME_SCALE = 1000.0  # フローの時刻 t ∈ [0, 1] を UNet には 1000·t として渡す


def guided_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
               y: torch.Tensor | None, guidance_scale: float = 1.0) -> torch.Tensor:
    """classifier-free guidance 付きの ε の予測。

    本書の約束: ε̂ = ε_u + s · (ε_c - ε_u)  (ε_u はクラスなし、ε_c はクラス y の予測)。
    s = 0 でクラスなしのモデル、s = 1 で条件付きモデルそのもの、s > 1 でクラスらしさを強調。
    (もう 1 つの流儀 (1 + w)·ε_c - w·ε_u とは s = 1 + w の関係です。)
    """
    if y is None or guidance_scale == 0:
        return model(x, t, None).float()
    if guidance_scale == 1:
        return model(x, t, y).float()
    null = torch.full_like(y, model.null_class)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()
    eps_c, eps_u = out.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


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


def ddim_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """DDIM で通る時刻 (大きい順、コードの番号 0..T-1)。

    - "trailing" (既定): T-1 から T/steps おきに下る。最初の一歩が純粋なノイズに
      いちばん近い t = T-1 から始まるので、少ないステップでも x_T と食い違いません
      (Lin et al. 2024。diffusers の timestep_spacing="trailing" に当たります)。
    - "leading": 0 から T/steps おきに上る (DDIM の原論文と diffusers の既定)。
      ステップが少ないと最初の t が T-1 から離れます。
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps は 1〜{T} にしてください (受け取ったのは {steps})")
    if spacing == "trailing":
        return [round(T - i * T / steps) - 1 for i in range(steps)]
    if spacing == "leading":
        ratio = T // steps
        return [i * ratio for i in reversed(range(steps))]
    raise ValueError(f"spacing は 'trailing' か 'leading' です (受け取ったのは {spacing!r})")


def ddim_step(sched: NoiseSchedule, eps: torch.Tensor, t: int, t_prev: int,
              x_t: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None,
              clip: bool = True) -> torch.Tensor:
    """DDIM の 1 ステップ: 時刻 t から t_prev (< t、-1 なら x_0) へ跳びます。

    x_{t'} = √ᾱ_{t'} x̂_0 + √(1-ᾱ_{t'}-σ²) ε̂ + σ z、
    σ = η √((1-ᾱ_{t'})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t'})。
    η = 0 でノイズを足さない決定的な写像、η = 1 で DDPM と同じ分散になります。
    x̂_0 を切り詰めたときは ε̂ も x̂_0 から計算し直します。
    """
    ac = sched.alphas_cumprod[t].item()
    ac_prev = sched.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    x0 = (x_t - (1 - ac) ** 0.5 * eps) / ac**0.5
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - ac**0.5 * x0) / (1 - ac) ** 0.5
    var = (1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)
    std = eta * var**0.5
    x_prev = ac_prev**0.5 * x0 + (1 - ac_prev - std**2) ** 0.5 * eps
    if eta > 0 and t_prev >= 0:
        if noise is None:
            noise = torch.randn_like(x_t)
        x_prev = x_prev + std * noise
    return x_prev


def dpm_alpha_sigma(sched: NoiseSchedule, t: int) -> tuple[float, float]:
    """時刻 t (コードの番号。-1 は x_0) の α_t = √ᾱ_t と σ_t = √(1-ᾱ_t)。"""
    if t < 0:
        return 1.0, 0.0
    ac = sched.alphas_cumprod[t].item()
    return ac**0.5, (1 - ac) ** 0.5


def dpm_data_prediction(sched: NoiseSchedule, eps: torch.Tensor, t: int, x_t: torch.Tensor,
                        clip: bool = True) -> torch.Tensor:
    """ε の予測からデータの予測 x̂_0 = (x_t - σ_t ε̂) / α_t を作ります (clip なら [-1, 1] に)。

    DPM-Solver++ はこの x̂_0 を積分します。diffusers の既定 (thresholding=False) は
    切り詰めませんが、画素空間のモデルでは t = T-1 の α_t ≈ 5e-5 で ε̂ の誤差が 2 万倍に
    なるので、本書は DDIM と同じく切り詰めを既定にします (diffusers の thresholding=True,
    sample_max_value=1.0 と同じ計算)。
    """
    alpha, sigma = dpm_alpha_sigma(sched, t)
    x0 = (x_t - sigma * eps) / alpha
    return x0.clamp(-1, 1) if clip else x0


def dpm_lambda(sched: NoiseSchedule, t: int) -> float:
    """λ_t = log(α_t / σ_t) (対数 SNR の半分)。t が小さい (きれい) ほど大きく、x_0 では +∞。"""
    alpha, sigma = dpm_alpha_sigma(sched, t)
    return math.log(alpha / sigma) if sigma > 0 else math.inf


def dpm_solver_pp_2m_step(sched: NoiseSchedule, x_t: torch.Tensor, x0: torch.Tensor, t: int,
                          t_next: int, x0_last: torch.Tensor | None = None,
                          t_last: int | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) の 1 ステップ: 時刻 t から t_next (< t、-1 なら x_0) へ進みます。

    x0 は時刻 t でのデータの予測 x̂_0、x0_last と t_last は 1 つ前のステップ (t より大きい
    時刻) のものです。
    h = λ_{t'} - λ_t として、線形の部分は厳密に解き、x̂_0 の積分だけを近似します:

    - 1 次 (x0_last が無い最初の一歩と、x_0 へ着く最後の一歩。DDIM η=0 と同じ式):
      x_{t'} = (σ_{t'}/σ_t) x_t + α_{t'} (1 - e^{-h}) x̂_0
    - 2 次 (多段法): 前の x̂_0 との差で傾きを見積もり、r = (λ_t - λ_{t_last}) / h として
      D = x̂_0 + (x̂_0 - x̂_0^{last}) / (2r) を x̂_0 の代わりに使います。
    """
    alpha_next, sigma_next = dpm_alpha_sigma(sched, t_next)
    _, sigma = dpm_alpha_sigma(sched, t)
    if t_next < 0:  # σ = 0 (h = ∞): x_0 の予測そのものに着く
        return x0
    lam, lam_next = dpm_lambda(sched, t), dpm_lambda(sched, t_next)
    h = lam_next - lam
    d = x0
    if x0_last is not None:
        r = (lam - dpm_lambda(sched, t_last)) / h
        d = x0 + (x0 - x0_last) / (2 * r)
    return (sigma_next / sigma) * x_t + alpha_next * (-math.expm1(-h)) * d


def flow_times(steps: int) -> list[float]:
    """フローマッチングの ODE を解く時刻 1 = t_0 > t_1 > ... > t_steps = 0 (等間隔)。"""
    if steps < 1:
        raise ValueError(f"steps は 1 以上にしてください (受け取ったのは {steps})")
    return [1 - i / steps for i in range(steps + 1)]


def flow_step(predict, x: torch.Tensor, t: float, t_next: float,
              method: str = "euler") -> torch.Tensor:
    """フローの ODE dx/dt = v(x, t) を t から t_next (< t) へ 1 ステップ進めます。

    predict(x, t) が速度 v を返す関数です。オイラー法は始点の傾き v だけを使い
    (1 回の評価)、ホイン法は仮に進んだ先の傾きとの平均を使います (2 回。ただし
    t_next = 0 の最後の一歩はオイラー法)。
    """
    v = predict(x, t)
    x_next = x + (t_next - t) * v
    if method == "heun" and t_next > 0:
        v_next = predict(x_next, t_next)
        x_next = x + (t_next - t) * (v + v_next) / 2
    return x_next


def nfe(method: str, steps: int, T: int = 1000) -> int:
    """サンプラーがネットワークを何回評価するか (guidance の 2 倍のバッチも 1 回と数える)。"""
    if method == "ddpm":
        return T
    if method == "heun":
        return 2 * steps - 1
    return steps


@torch.no_grad()
def sample(model: nn.Module, sched: NoiseSchedule | None, n: int, *, y: torch.Tensor | None = None,
           guidance_scale: float = DEFAULT_GUIDANCE, method: str = DEFAULT_METHOD,
           steps: int = DEFAULT_STEPS, eta: float = DEFAULT_ETA,
           spacing: str = DEFAULT_SPACING, seed: int | None = 0, device: str | torch.device = "cpu",
           bf16: bool = False, trajectory_every: int | None = None, progress: bool = False,
           x_T: torch.Tensor | None = None, clip: bool = True):
    """純粋なノイズ x_T ~ N(0, I) から n 個の標本 (n, *model.sample_shape)・[-1, 1] を作ります。

    - method="ddpm": T ステップの祖先サンプリング (steps は無視)。
    - method="ddim": steps ステップの DDIM (eta=0 で決定的、時刻の選び方は spacing)。
      既定値 (DEFAULT_*) は CLI と共通です。
    - method="dpm++2m": steps ステップの DPM-Solver++(2M) (決定的。時刻は DDIM と同じ spacing、
      最初と最後の一歩は 1 次)。eta は使いません。
    - clip: ε 予測のサンプラーで x̂_0 を [-1, 1] に切り詰めるか (既定 True。
      ``dpm_data_prediction`` を参照)。
    - method="euler" / "heun": フローマッチングのモデル用 (sched=None)。steps ステップで
      ODE を t = 1 から 0 へ解きます (eta と spacing は使いません)。
    - y: クラス (n,)。None ならクラスなし。guidance_scale は ``guided_eps`` を参照。
    - seed: 同じ seed なら同じ画像 (乱数は CPU の torch.Generator で作ってから移します)。
    - x_T: 出発点のノイズ (n, C, H, W)。省くと seed から引きます。η = 0 の DDIM では
      x_T だけで画像が決まるので、x_T を補間すると画像が滑らかに移り変わります。
    - trajectory_every: 指定すると (画像, [(t, x_t), ...]) を返します (途中経過の記録)。
      t は論文の番号 (x_T の T から x_0 の 0 まで) です。
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (n, *model.sample_shape)  # UNet なら (n, C, H, W)、2 次元の例なら (n, 2)

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device)

    if x_T is None:
        x = randn()
    elif tuple(x_T.shape) == shape:
        x = x_T.to(device)
    else:
        raise ValueError(f"x_T の形 {tuple(x_T.shape)} がモデルの入力 {shape} と合いません")
    if y is not None:
        y = y.to(device)
    if (method in FLOW_METHODS) != (sched is None):
        raise ValueError(f"method={method!r} は使えません: フローマッチングのモデル "
                         f"(sched=None) には {FLOW_METHODS}、DDPM には {EPS_METHODS} です")
    dev_type = torch.device(device).type

    def predict(x: torch.Tensor, t: float | int) -> torch.Tensor:
        """時刻 t (ε 予測なら整数の番号、フローなら 0〜1) でのモデルの予測 (guidance 込み)。"""
        if sched is None:
            tt = torch.full((n,), t * FLOW_TIME_SCALE, device=device)
        else:
            tt = torch.full((n,), t, dtype=torch.long, device=device)
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=bf16):
            return guided_eps(model, x, tt, y, guidance_scale)

    if method in FLOW_METHODS:
        times = flow_times(steps)
        traj = [(1.0, x.cpu())] if trajectory_every else None
        for i in tqdm(range(steps), desc=method, disable=not progress):
            x = flow_step(predict, x, times[i], times[i + 1], method)
            if trajectory_every and (i + 1) % trajectory_every == 0:
                traj.append((times[i + 1], x.cpu()))
        x = x.clamp(-1, 1).cpu()
        return (x, traj) if trajectory_every else x
    if method == "ddpm":
        times = list(reversed(range(sched.T)))
    elif method in EPS_METHODS:
        times = ddim_timesteps(sched.T, steps, spacing)
    else:
        raise ValueError(f"method は {EPS_METHODS} のどれかです (受け取ったのは {method!r})")
    traj = [(sched.T, x.cpu())] if trajectory_every else None
    x0_last = None  # DPM-Solver++ が覚えておく 1 つ前の x̂_0
    for i, t in enumerate(tqdm(times, desc=method, disable=not progress)):
        eps = predict(x, t)
        t_prev = times[i + 1] if i + 1 < len(times) else -1
        if method == "ddpm":
            x = ddpm_step(sched, eps, t, x, randn() if t > 0 else None, clip)
        elif method == "ddim":
            x = ddim_step(sched, eps, t, t_prev, x, eta, randn() if eta > 0 else None, clip)
        else:
            x0 = dpm_data_prediction(sched, eps, t, x, clip)
            x = dpm_solver_pp_2m_step(sched, x, x0, t, t_prev, x0_last, times[i - 1] if i else None)
            x0_last = x0
        if trajectory_every and (i + 1) % trajectory_every == 0:
            # 論文の番号 (1..T、x_0 が 0) で記録する。コードの t から 1 歩戻った x は論文の x_t
            traj.append((t if method == "ddpm" else t_prev + 1, x.cpu()))
    x = x.clamp(-1, 1).cpu()
    return (x, traj) if trajectory_every else x


@torch.no_grad()
def sample_many(model: nn.Module, sched: NoiseSchedule, n: int, batch_size: int = 500,
                seed: int = 0, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """n 枚をバッチに分けて生成します (バッチ i は seed + i)。評価用の大量生成に使います。"""
    out = []
    for b, i in enumerate(range(0, n, batch_size)):
        yb = y[i : i + batch_size] if y is not None else None
        out.append(sample(model, sched, min(batch_size, n - i), y=yb, seed=seed + b, **kwargs))
    return torch.cat(out)
