"""リフロー (reflow、2-rectified flow): 学習したフローの ODE でノイズと画像を組にし、学び直す。

Liu, Gong, Liu (2022) "Flow Straight and Fast" の手順です。

1. 学習したフローのモデルで、ノイズ ε から ODE を解いて x_0 を作ります (``reflow_pairs``)。
   ε と x_0 は ODE で結ばれた組 (カップリング) です。
2. その組 (ε, x_0) を固定して、フローマッチングの損失で学び直します (``fine_tune_on_pairs``。
   1 回の計算は ``algorithms.flow_train_step`` に noise を渡すだけ)。
3. 経路がどれだけ曲がっているかを ``straightness`` で測ります。

フローの向きは本書の約束どおり t = 1 がノイズ、t = 0 が画像です。

画像のモデルでは、組を ``make_pairs`` CLI で作り、``train --init --pairs`` で学び直します。
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .algorithms import flow_train_step
from .checkpoint import read_checkpoint
from .sampling import DEFAULT_FLOW_METHOD, sample, sample_trajectory

PAIRS_KIND = "torchbook-reflow-pairs-v1"  # 組のファイルの形式の名前


def _check_flow(model: nn.Module) -> None:
    """フローマッチングのモデル (速度 v を予測) でなければ 1 行の ValueError。"""
    if getattr(model, "objective", None) != "flow":
        raise ValueError("リフローにはフローマッチングのモデル (objective='flow') が要ります "
                         f"(受け取ったのは {getattr(model, 'objective', None)!r})")


def noise_and_labels(model: nn.Module, n: int, seed: int, conditional: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """seed から n 個のノイズ (モデルの sample_shape) と一様なクラスを引きます。

    conditional は、クラスを引くか (None: モデルにクラスがあれば引く)。引かないとき y は None。
    """
    num_classes = getattr(model, "null_class", None)
    if conditional is None:
        conditional = num_classes is not None
    if conditional and num_classes is None:
        raise ValueError("conditional=True ですが、モデルにクラスがありません (null_class がない)")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *model.sample_shape), generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen) if conditional else None
    return noise, y


@torch.no_grad()
def reflow_pairs(model: nn.Module, n: int, steps: int = 10, method: str = DEFAULT_FLOW_METHOD,
                 seed: int = 0, conditional: bool | None = None, guidance_scale: float = 1.0,
                 batch_size: int = 500, device: str | torch.device = "cpu", bf16: bool = False,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """今のフローの ODE でノイズと標本を組にします。(ノイズ ε, 標本 x_0, クラス y) を返します。

    ε ~ N(0, I) とクラス y (一様) を seed から引き、ε から ODE を t = 1 から 0 まで
    method・steps で解いた終点を x_0 とします (乱数は ε と y だけなので、同じ seed なら
    同じ組)。x_0 は切り詰めもデコードもしない ODE の終点そのものです (潜在空間のモデルなら
    潜在変数)。conditional は、クラスを渡すか (None: モデルにクラスがあれば渡す)。
    クラスを渡さないとき y は None です。
    """
    _check_flow(model)
    if n < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n・steps・batch_size は 1 以上にしてください "
                         f"({n}, {steps}, {batch_size})")
    noise, y = noise_and_labels(model, n, seed, conditional)
    data, last = [], {}

    def keep_end(k: int, t: float, x: torch.Tensor) -> None:
        if k == steps:  # ODE の最後の x (切り詰め・デコードの前)
            last["x"] = x.float().cpu()

    for i in range(0, n, batch_size):
        yb = y[i : i + batch_size] if y is not None else None
        sample(model, None, len(noise[i : i + batch_size]), y=yb, method=method, steps=steps,
               guidance_scale=guidance_scale, x_T=noise[i : i + batch_size], device=device,
               bf16=bf16, progress=progress, callback=keep_end)
        data.append(last["x"])
    return noise, torch.cat(data), y


def straightness(times: list[float], xs: torch.Tensor) -> tuple[float, float]:
    """離散の経路 xs (K+1, N, ...) (時刻 times[k] の点) の曲がり方を 2 つの数で返します。

    - 直線性 S = ∫ ‖v - (x(1) - x(0))‖² dt (Liu et al. 2022)。v は各区間の速度
      (x_{k+1} - x_k)/(t_{k+1} - t_k)、x(1) - x(0) は始点と終点を結ぶ直線の速度です。
      ‖·‖² は 1 座標あたりの 2 乗平均にし、N 本の経路で平均します。直線なら 0 です。
    - 長さの比: 経路の長さ Σ‖x_{k+1} - x_k‖ ÷ 始点と終点の距離 (経路ごとの比の平均)。
      向きを変えずに進むなら 1 で、曲がるほど大きくなります。
    """
    if len(times) != len(xs) or len(times) < 2:
        raise ValueError(f"times ({len(times)}) と xs ({len(xs)}) は同じ長さ (2 以上) に"
                         "してください")
    xs = xs.double().flatten(2)  # (K+1, N, D)
    t = torch.tensor(times, dtype=torch.float64)
    dt = t[1:] - t[:-1]  # (K,) 負 (t は 1 から 0 へ減る)
    steps = xs[1:] - xs[:-1]  # (K, N, D)
    v = steps / dt[:, None, None]
    chord = (xs[-1] - xs[0]) / (t[-1] - t[0])  # 直線の速度 (N, D)
    s = ((v - chord) ** 2).mean(-1)  # (K, N)
    s = (dt.abs()[:, None] * s).sum(0) / (t[-1] - t[0]).abs()
    length = steps.norm(dim=-1).sum(0)
    ratio = length / (xs[-1] - xs[0]).norm(dim=-1).clamp_min(1e-12)
    return s.mean().item(), ratio.mean().item()


@torch.no_grad()
def measure_straightness(model: nn.Module, n: int = 500, steps: int = 100,
                         method: str = "euler", seed: int = 0, y: torch.Tensor | None = None,
                         device: str | torch.device = "cpu") -> tuple[float, float]:
    """n 本の経路 (ノイズは seed から) を細かい steps ステップで解き、``straightness`` を
    返します。"""
    _check_flow(model)
    _, traj = sample_trajectory(model, None, n, method=method, steps=steps, seed=seed, y=y,
                                device=device)
    return straightness([t for t, _ in traj], torch.stack([x for _, x in traj]))


def fine_tune_on_pairs(model: nn.Module, noise: torch.Tensor, data: torch.Tensor,
                       y: torch.Tensor | None = None, steps: int = 1000, batch_size: int = 512,
                       lr: float = 1e-3, p_uncond: float = 0.0, seed: int = 0) -> list[float]:
    """組 (noise, data) を固定してフローマッチングで学び直します (モデルをその場で更新)。

    毎ステップ組の中からバッチを引き、``flow_train_step`` に noise を渡します。t だけが
    毎回新しく引かれます。学習率はコサインで 0 まで下げます。ステップごとの損失を返します。
    y が None なら「クラスなし」で学習します。
    """
    _check_flow(model)
    if noise.shape != data.shape:
        raise ValueError(f"noise {tuple(noise.shape)} と data {tuple(data.shape)} の形が違います")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps と batch_size は 1 以上にしてください ({steps}, {batch_size})")
    gen = torch.Generator().manual_seed(seed)
    if y is None:
        y = torch.full((len(data),), model.null_class, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        losses.append(flow_train_step(model, data[idx], y[idx], opt, p_uncond, gen,
                                      noise=noise[idx]))
        lr_sched.step()
    model.eval()
    return losses


# ---------------------------------------------------------------- 組のファイル


def read_pairs(path: str | Path) -> dict:
    """``make_pairs`` CLI が書いた組のファイルを読み、形式を確かめて返します。

    noise と data は同じ形 (N, ...)、y は (N,) のクラスか None です。
    """
    pairs = read_checkpoint(path)
    if not isinstance(pairs, dict) or pairs.get("kind") != PAIRS_KIND:
        found = f" ({pairs['kind']})" if isinstance(pairs, dict) and "kind" in pairs else ""
        raise ValueError(f"{path}{found} はリフローの組のファイル ({PAIRS_KIND}) ではありません "
                         "(python -m torchbook.diffusion.make_pairs で作ってください)")
    noise, data, y = pairs["noise"], pairs["data"], pairs.get("y")
    if noise.shape != data.shape or (y is not None and y.shape != (len(data),)):
        raise ValueError(f"{path} の組の形が合いません: noise {tuple(noise.shape)}、"
                         f"data {tuple(data.shape)}、y {None if y is None else tuple(y.shape)}")
    return pairs
