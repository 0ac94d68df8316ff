"""2 次元の小さな例: ガウス混合のデータと、それを学ぶ MLP のノイズ予測器。

画像と同じ ``NoiseSchedule``・``algorithms`` (DDPM の学習とサンプリング)・``sampling.sample``
をそのまま使います。
違うのはデータ (2 次元の点)、ネットワーク (UNet の代わりの MLP)、学習の設定 (学習率、
p_uncond = 0.5、EMA も勾配の切り詰めもなし) です。

データを等方的な正規分布の混合 x_0 ~ Σ_k π_k N(μ_k, s² I) にしたのは、ノイズを加えた
分布 p_t も閉じた形で分かるからです。x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε は
x_t ~ Σ_k π_k N(√ᾱ_t μ_k, (ᾱ_t s² + 1 - ᾱ_t) I) に従います。そのスコア ∇ log p_t(x_t) から、
理想のノイズ予測 ε*(x_t, t) = -√(1 - ᾱ_t) ∇ log p_t(x_t) を計算できます (``analytic_eps``)。
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import ddpm_train_step, flow_train_step
from .schedule import NoiseSchedule
from .unet import timestep_embedding


@dataclass(frozen=True)
class GaussianMixture:
    """等方的な正規分布の混合。成分 k は平均 means[k]、標準偏差 std、重み weights[k]。

    labels[k] は成分 k のクラスです (条件付き生成と ガイダンスの例に使います)。
    """

    means: torch.Tensor  # (K, D)
    std: float
    weights: torch.Tensor  # (K,)、和は 1
    labels: torch.Tensor  # (K,)、0 始まりの整数

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def ring_mixture(k: int = 8, radius: float = 0.75, std: float = 0.08,
                 num_classes: int = 2) -> GaussianMixture:
    """半径 radius の円周上に等間隔に並ぶ k 個の正規分布 (重みは等しい)。

    成分 i のクラスは i % num_classes です (既定では隣どうしが別のクラス)。
    既定の大きさでは、点はほぼすべて [-1, 1] に収まります (画像の画素値と同じ範囲。
    サンプラーは x̂_0 をこの範囲に切り詰めます)。
    """
    angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return GaussianMixture(means=means, std=std, weights=torch.full((k,), 1.0 / k,
                           dtype=torch.float64), labels=torch.arange(k) % num_classes)


def sample_mixture(mix: GaussianMixture, n: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """混合から n 点を引きます。点 (n, D) (float32) と、各点の成分の番号 (n,) を返します。"""
    comp = torch.multinomial(mix.weights, n, replacement=True, generator=generator)
    noise = torch.randn(n, mix.means.shape[1], generator=generator, dtype=torch.float64)
    return (mix.means[comp] + mix.std * noise).float(), comp


def _component_logits(x: torch.Tensor, abar: torch.Tensor, mix: GaussianMixture,
                      y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p_t の各成分について log(π_k N(x; √ᾱ μ_k, v I)) (N, K) と、平均 (N, K, D)、分散 v (N, 1)。

    y を渡すと、クラス y[i] に属さない成分の値を -∞ にします (p_t(x | y) の成分だけ残す)。
    """
    abar = abar.to(x.device)
    a = abar.sqrt()[:, None, None]
    var = (abar * mix.std**2 + 1 - abar)[:, None]
    centers = a * mix.means.to(x.device)[None]
    d = x.shape[1]
    sq = ((x[:, None, :] - centers) ** 2).sum(-1)
    log_norm = d / 2 * torch.log(2 * math.pi * var)
    logits = mix.weights.to(x.device).log()[None] - sq / (2 * var) - log_norm
    if y is not None:
        keep = mix.labels.to(x.device)[None, :] == y[:, None]
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits, centers, var


def _abar(sched: NoiseSchedule, t: torch.Tensor | int, n: int) -> torch.Tensor:
    """時刻 t (整数か (N,) の整数) の ᾱ_t を (N,) の float64 で返します。"""
    t = torch.as_tensor(t, dtype=torch.long).cpu().expand(n)
    return sched.alphas_cumprod[t]


def log_prob(x_t: torch.Tensor, t: torch.Tensor | int, sched: NoiseSchedule,
             mix: GaussianMixture, y: torch.Tensor | None = None) -> torch.Tensor:
    """ノイズを加えた分布の対数密度 log p_t(x_t) (y を渡すと log p_t(x_t | y))。(N,)、float64。"""
    x = x_t.double()
    logits, _, _ = _component_logits(x, _abar(sched, t, len(x)), mix, y)
    norm = 0.0 if y is None else torch.log(
        (mix.weights[None] * (mix.labels[None] == y[:, None].cpu())).sum(1)).to(x.device)
    return logits.logsumexp(1) - norm


def score(x_t: torch.Tensor, t: torch.Tensor | int, sched: NoiseSchedule, mix: GaussianMixture,
          y: torch.Tensor | None = None) -> torch.Tensor:
    """スコア ∇ log p_t(x_t) の閉じた形 (N, D)、float64。

    混合の各成分の勾配 (√ᾱ μ_k - x) / v を、その点が成分 k から来た確率 (責任度) で平均します。
    """
    x = x_t.double()
    logits, centers, var = _component_logits(x, _abar(sched, t, len(x)), mix, y)
    resp = logits.softmax(1)  # (N, K)
    return (resp[:, :, None] * (centers - x[:, None, :])).sum(1) / var


def analytic_eps(x_t: torch.Tensor, t: torch.Tensor | int, sched: NoiseSchedule,
                 mix: GaussianMixture, y: torch.Tensor | None = None) -> torch.Tensor:
    """理想のノイズ予測 ε*(x_t, t) = -√(1 - ᾱ_t) ∇ log p_t(x_t) (N, D)。x_t と同じ dtype。

    損失 ‖ε - ε_θ(x_t, t)‖² を最小にする関数そのもの (E[ε | x_t]) です。
    """
    sigma = (1 - _abar(sched, t, len(x_t))).sqrt()[:, None].to(x_t.device)
    return (-sigma * score(x_t, t, sched, mix, y)).to(x_t.dtype)


class ToyDenoiser(nn.Module):
    """2 次元の点 x_t のノイズ ε を予測する小さな MLP (UNet の代わり)。

    時刻 t は UNet と同じ正弦波の埋め込みにし、クラス埋め込み (最後の番号 = クラスなし) と
    足して、各層の入力に加えます。``sample_shape`` と ``null_class`` があるので、
    ``sampling.sample`` と ``guided_eps`` を UNet と同じように使えます。
    objective="flow" にすると、同じネットワークでフローマッチングの速度 v を予測します
    (時刻は UNet と同じく 1000·t を受け取ります)。
    """

    def __init__(self, dim: int = 2, hidden: int = 64, depth: int = 3, num_classes: int = 2,
                 time_dim: int = 32, objective: str = "eps") -> None:
        super().__init__()
        if objective not in ("eps", "flow"):
            raise ValueError(f"objective は 'eps' か 'flow' です (受け取ったのは {objective!r})")
        self.sample_shape = (dim,)
        self.objective = objective  # 何を予測するか (sample() はこれに合うサンプラーを選ぶ)
        self.num_classes = num_classes
        self.null_class = num_classes
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, D) の x_t、t: (N,) の整数時刻、y: (N,) のクラス (None ならクラスなし)。"""
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_emb(y)
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(F.silu(h + emb))  # 残差接続。時刻とクラスは毎層で足し直す
        return self.out(F.silu(h))


def train_toy(mix: GaussianMixture, sched: NoiseSchedule | None, steps: int = 2000,
              batch_size: int = 512, lr: float = 1e-2, p_uncond: float = 0.5,
              seed: int = 0, hidden: int = 64) -> tuple[ToyDenoiser, list[float]]:
    """画像と同じ学習の 1 回 (``algorithms.ddpm_train_step``) で ToyDenoiser を学習します。

    データは毎ステップ混合から新しく引きます。学習率はコサインで 0 まで下げます。
    学習したモデル (eval モード) と、ステップごとの損失を返します。
    sched=None ならフローマッチングのモデル (``algorithms.flow_train_step``) を学習します。
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps と batch_size は 1 以上にしてください ({steps}, {batch_size})")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ToyDenoiser(dim=mix.means.shape[1], hidden=hidden, num_classes=mix.num_classes,
                        objective="flow" if sched is None else "eps")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        x0, comp = sample_mixture(mix, batch_size, gen)
        if sched is None:  # フローマッチング: 損失だけが違う (algorithms.flow_train_step)
            losses.append(flow_train_step(model, x0, mix.labels[comp], opt, p_uncond, gen))
        else:  # 画像と同じ Algorithm 1 の 1 回 (algorithms.ddpm_train_step)
            losses.append(ddpm_train_step(model, sched, x0, mix.labels[comp], opt, p_uncond, gen))
        lr_sched.step()
    return model.eval(), losses


@torch.no_grad()
def eps_error(model: nn.Module, sched: NoiseSchedule, mix: GaussianMixture, t: int, n: int = 2000,
              seed: int = 0, conditional: bool = False) -> tuple[float, float]:
    """時刻 t の x_t ~ p_t での、学習した ε_θ と理想の ε* の差の 2 乗平均 (1 次元あたり)。

    (誤差, ε* の 2 乗平均) を返します。後者で割れば相対誤差です。conditional=True なら
    各点のクラスを渡し、p_t(x_t | y) の ε* と比べます。
    """
    gen = torch.Generator().manual_seed(seed)
    x0, comp = sample_mixture(mix, n, gen)
    tt = torch.full((n,), t, dtype=torch.long)
    x_t = sched.q_sample(x0, tt, torch.randn(x0.shape, generator=gen))
    yy = mix.labels[comp] if conditional else None
    ideal = analytic_eps(x_t, tt, sched, mix, yy)
    learned = model(x_t, tt, yy).float()
    return ((learned - ideal) ** 2).mean().item(), (ideal**2).mean().item()


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """同じ数の点の集まり a, b (N, D) の間のスライス・ワッサースタイン距離 (2 乗平均の平方根)。

    ランダムな向き n_proj 本に点を射影し、1 次元では並べ替えて順に組にすれば最適な
    輸送になることを使います。分布が同じなら 0 に近く、ずれるほど大きくなります。
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a {tuple(a.shape)} と b {tuple(b.shape)} は同じ (N, D) の形に"
                         "してください")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a.double() @ dirs).sort(dim=0).values
    pb = (b.double() @ dirs).sort(dim=0).values
    return ((pa - pb) ** 2).mean().sqrt().item()
