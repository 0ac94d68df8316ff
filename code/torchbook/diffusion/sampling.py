"""逆過程によるサンプリング: DDPM、DDIM、DPM-Solver++(2M)、classifier-free guidance。

フローマッチングのモデル (速度 v を予測) には、常微分方程式 dx/dt = v を t = 1 から 0 へ
解くオイラー法とホイン法を用意します。
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from .algorithms import ddpm_sample_loop
from .losses import FLOW_TIME_SCALE
from .schedule import NoiseSchedule

# サンプラーの既定値 (sample() と CLI の両方がこれを使います)
DEFAULT_METHOD = "ddim"  # ε を予測するモデル (DDPM) の既定
DEFAULT_FLOW_METHOD = "heun"  # フローマッチングのモデルの既定
DEFAULT_STEPS = 50
DEFAULT_ETA = 1.0  # η = 1: DDPM と同じ分散のノイズを各ステップで足す
DEFAULT_SPACING = "trailing"
DEFAULT_GUIDANCE = 1.0  # s = 1: 条件付きモデルそのもの
EPS_METHODS = ("ddpm", "ddim", "dpm++2m")  # ε を予測するモデル (DDPM) 用
FLOW_METHODS = ("euler", "heun")  # フローマッチングのモデル用


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


def ddim_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """DDIM で通る時刻 (大きい順、コードの番号 0..T-1)。

    - "trailing" (既定): T-1 から T/steps おきに下る。最初の 1 ステップが純粋なノイズに
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

    - 1 次 (x0_last が無い最初の 1 ステップと、x_0 へ着く最後の 1 ステップ。DDIM η=0 と同じ式):
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
    t_next = 0 の最後の 1 ステップはオイラー法)。
    """
    v = predict(x, t)
    x_next = x + (t_next - t) * v
    if method == "heun" and t_next > 0:
        v_next = predict(x_next, t_next)
        x_next = x + (t_next - t) * (v + v_next) / 2
    return x_next


def nfe(method: str, steps: int, T: int = 1000) -> int:
    """サンプラーがネットワークを何回評価するか (ガイダンスの 2 倍のバッチも 1 回と数える)。"""
    if method == "ddpm":
        return T
    if method == "heun":
        return 2 * steps - 1
    return steps


def default_method(objective: str) -> str:
    """モデルの学習の目的 ("eps" か "flow") に合う既定のサンプラー。"""
    return DEFAULT_FLOW_METHOD if objective == "flow" else DEFAULT_METHOD


def check_sampler(model: nn.Module, sched: NoiseSchedule | None, method: str | None) -> str:
    """モデル (``model.objective``) とサンプラー・スケジュールが合うか確かめ、method を返します。

    ε を予測するモデル ("eps") には EPS_METHODS とノイズスケジュール、フローマッチングの
    モデル ("flow") には FLOW_METHODS と sched=None が要ります。method=None なら既定を選びます。
    合わない組み合わせは 1 行の ValueError で止めます (違うサンプラーの画像を黙って返さない)。
    """
    objective = getattr(model, "objective", None)
    if objective not in ("eps", "flow"):
        raise ValueError(f"model.objective は 'eps' か 'flow' にしてください ({objective!r})")
    method = default_method(objective) if method is None else method
    methods = FLOW_METHODS if objective == "flow" else EPS_METHODS
    if method not in methods:
        raise ValueError(f"method={method!r} は使えません: objective={objective!r} のモデルには "
                         f"{'・'.join(methods)} のどれかです")
    if (objective == "flow") != (sched is None):
        need = "sched=None" if objective == "flow" else "ノイズスケジュール (NoiseSchedule)"
        raise ValueError(f"objective={objective!r} のモデルには {need} を渡してください")
    return method


def to_images(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """サンプラーの最後の x を画像にします: 潜在空間のモデル (``decode_latents`` を持つ) なら
    デコーダーを通し、画素のモデルなら [-1, 1] に切り詰めます。"""
    decode = getattr(model, "decode_latents", None)
    return (decode(x) if decode is not None else x.clamp(-1, 1)).cpu()


@torch.no_grad()
def sample(model: nn.Module, sched: NoiseSchedule | None, n: int, *, y: torch.Tensor | None = None,
           guidance_scale: float = DEFAULT_GUIDANCE, method: str | None = None,
           steps: int = DEFAULT_STEPS, eta: float = DEFAULT_ETA, spacing: str = DEFAULT_SPACING,
           seed: int | None = 0, device: str | torch.device = "cpu", bf16: bool = False,
           progress: bool = False, x_T: torch.Tensor | None = None, clip: bool = True,
           callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """純粋なノイズ x_T ~ N(0, I) から n 個の標本 (n, *model.sample_shape)・[-1, 1] を作ります。

    潜在空間のモデル (``latent.LatentFlow``) では x_T は潜在変数の形で、返すのは
    デコーダーを通した画像です (``to_images``)。

    サンプラーの種類はモデルの ``model.objective`` に合わせます (UNet・ToyDenoiser の
    コンストラクターと ``checkpoint.load_checkpoint`` が設定します。``check_sampler``)。

    - method: ε 予測のモデル ("eps") には "ddpm"・"ddim"・"dpm++2m"、フローマッチングの
      モデル ("flow"、sched=None) には "euler"・"heun"。None なら DEFAULT_METHOD か
      DEFAULT_FLOW_METHOD。合わない組み合わせは ValueError です。
    - "ddpm": T ステップの祖先サンプリング (``algorithms.ddpm_sample_loop``。steps は無視)。
    - "ddim": steps ステップの DDIM (eta=0 で決定的、時刻の選び方は spacing)。
      既定値 (DEFAULT_*) は CLI と共通です。
    - "dpm++2m": steps ステップの DPM-Solver++(2M) (決定的。時刻は DDIM と同じ spacing、
      最初と最後の 1 ステップは 1 次)。eta は使いません。
    - "euler" / "heun": steps ステップで ODE を t = 1 から 0 へ解きます (eta と spacing は
      使いません)。
    - clip: ε 予測のサンプラーで x̂_0 を [-1, 1] に切り詰めるか (既定 True。
      ``dpm_data_prediction`` を参照)。
    - y: クラス (n,)。None ならクラスなし。guidance_scale は ``guided_eps`` を参照。
    - seed: 同じ seed なら同じ画像 (乱数は CPU の torch.Generator で作ってから移します)。
    - x_T: 出発点のノイズ (n, C, H, W)。省くと seed から引きます。η = 0 の DDIM では
      x_T だけで画像が決まるので、x_T を補間すると画像が滑らかに移り変わります。
    - callback(i, t, x): 出発点 (i = 0) と i ステップ目の後に呼びます。t は論文の番号
      (x_T の T から x_0 の 0 まで。フローでは 1 から 0 の時刻)。途中経過を残すなら
      ``sample_trajectory`` を使います。
    """
    method = check_sampler(model, sched, method)
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
    dev_type = torch.device(device).type
    record = callback or (lambda i, t, x: None)

    def predict(x: torch.Tensor, t: float | int) -> torch.Tensor:
        """時刻 t (ε 予測なら整数の番号、フローなら 0〜1) でのモデルの予測 (ガイダンス込み)。"""
        if sched is None:
            tt = torch.full((n,), t * FLOW_TIME_SCALE, device=device)
        else:
            tt = torch.full((n,), t, dtype=torch.long, device=device)
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=bf16):
            return guided_eps(model, x, tt, y, guidance_scale)

    if method in FLOW_METHODS:
        times = flow_times(steps)
        record(0, 1.0, x)
        for i in tqdm(range(steps), desc=method, disable=not progress):
            x = flow_step(predict, x, times[i], times[i + 1], method)
            record(i + 1, times[i + 1], x)
        return to_images(model, x)
    record(0, sched.T, x)
    if method == "ddpm":
        bar = tqdm(total=sched.T, desc=method, disable=not progress)

        def after_step(t: int, x: torch.Tensor) -> None:
            bar.update(1)
            record(sched.T - t, t, x)

        x = ddpm_sample_loop(predict, sched, x, randn, clip, after_step)
        bar.close()
        return to_images(model, x)
    times = ddim_timesteps(sched.T, steps, spacing)
    x0_last = None  # DPM-Solver++ が覚えておく 1 つ前の x̂_0
    for i, t in enumerate(tqdm(times, desc=method, disable=not progress)):
        eps = predict(x, t)
        t_prev = times[i + 1] if i + 1 < len(times) else -1
        if method == "ddim":
            x = ddim_step(sched, eps, t, t_prev, x, eta, randn() if eta > 0 else None, clip)
        else:
            x0 = dpm_data_prediction(sched, eps, t, x, clip)
            x = dpm_solver_pp_2m_step(sched, x, x0, t, t_prev, x0_last, times[i - 1] if i else None)
            x0_last = x0
        # 論文の番号 (1..T、x_0 が 0) で記録する。コードの t から 1 ステップ戻った x は論文の x_t
        record(i + 1, t_prev + 1, x)
    return to_images(model, x)


@torch.no_grad()
def sample_trajectory(model: nn.Module, sched: NoiseSchedule | None, n: int, every: int = 1,
                      **options) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor]]]:
    """``sample`` と同じ画像と、every ステップごとの途中経過 [(t, x_t), ...] を返します。

    t は論文の番号 (x_T の T から x_0 の 0 まで。フローでは 1 から 0 の時刻) で、
    最初の要素は出発点のノイズです。options は ``sample`` と同じです。
    """
    if every < 1:
        raise ValueError(f"every は 1 以上にしてください (受け取ったのは {every})")
    traj: list[tuple[float, torch.Tensor]] = []

    def record(i: int, t: float, x: torch.Tensor) -> None:
        if i == 0 or i % every == 0:
            traj.append((t, x.cpu()))

    return sample(model, sched, n, callback=record, **options), traj


@torch.no_grad()
def sample_many(model: nn.Module, sched: NoiseSchedule | None, n: int, batch_size: int = 500,
                seed: int = 0, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """n 枚をバッチに分けて生成します (バッチ i は seed + i)。評価用の大量生成に使います。"""
    out = []
    for b, i in enumerate(range(0, n, batch_size)):
        yb = y[i : i + batch_size] if y is not None else None
        out.append(sample(model, sched, min(batch_size, n - i), y=yb, seed=seed + b, **kwargs))
    return torch.cat(out)
