"""torch.nn を使わずに、テンソルだけで書いたロジスティック回帰 (MNIST 用)。

PyTorch のチュートリアル "What is torch.nn really?" の前半に当たる内容です。
重みの初期化・log-softmax・負の対数尤度・正解率・SGD を自分で書き、
最後に同じモデルを nn.Linear と optim.SGD で書いた版 (:func:`fit_torch`) と比べます。
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn


def load_mnist(root: str | os.PathLike, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST を (枚数, 784) の float32 (0〜1) と、int64 のラベルで返します。"""
    from torchvision import datasets

    ds = datasets.MNIST(root=str(root), train=train, download=False)
    x = ds.data.reshape(len(ds.data), -1).float() / 255
    return x, ds.targets.long()


def xavier_init(
    n_in: int, n_out: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Xavier (Glorot) の初期化をした重み (n_in, n_out) と、0 のバイアスを返します。

    重みは平均 0、標準偏差 sqrt(2 / (n_in + n_out)) の正規分布から取ります。
    どちらも勾配を記録するテンソル (葉) です。
    """
    std = math.sqrt(2.0 / (n_in + n_out))
    weights = (torch.randn(n_in, n_out, generator=generator) * std).requires_grad_()
    bias = torch.zeros(n_out, requires_grad=True)
    return weights, bias


def naive_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """定義どおりの log-softmax。大きな値で exp があふれ、inf や nan になります。"""
    return x - x.exp().sum(-1).log().unsqueeze(-1)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """最後の次元についての log-softmax (あふれない logsumexp の形)。

    各行の最大値 m を引いてから exp を取ると、exp の引数は 0 以下になり、
    あふれません。log Σ exp(x) = m + log Σ exp(x - m) なので値は変わりません。
    """
    m = x.max(-1, keepdim=True).values.detach()  # m は定数とみなしてよい (勾配は変わらない)
    return x - m - (x - m).exp().sum(-1, keepdim=True).log()


def nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """負の対数尤度: 各行の正解クラスの log 確率を取り出し、符号を変えて平均します。"""
    rows = torch.arange(target.shape[0], device=target.device)
    return -log_probs[rows, target].mean()


def accuracy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """正解率: 各行で最大の値をとるクラスを予測とし、正解と一致する割合を返します。"""
    preds = torch.argmax(out, dim=1)
    return (preds == target).float().mean()


def model(xb: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ロジスティック回帰: 線形変換 xb @ weights + bias のあとに log-softmax。"""
    return log_softmax(xb @ weights + bias)


def fit(
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor,
    lr: float = 0.5,
    epochs: int = 2,
    bs: int = 64,
) -> list[float]:
    """ミニバッチ SGD で weights と bias をその場で更新し、各ステップの損失を返します。

    データは並べ替えず、先頭から bs 個ずつ使います (比較しやすくするため)。
    """
    n = len(x)
    losses = []
    for _ in range(epochs):
        for start in range(0, n, bs):
            xb, yb = x[start : start + bs], y[start : start + bs]
            loss = nll(model(xb, weights, bias), yb)
            loss.backward()  # weights.grad と bias.grad に勾配が入る (足し込まれる)
            with torch.no_grad():  # 更新そのものは計算グラフに記録しない
                weights -= weights.grad * lr
                bias -= bias.grad * lr
                weights.grad.zero_()  # 次のステップのために勾配を 0 に戻す
                bias.grad.zero_()
            losses.append(loss.item())
    return losses


def linear_from(weights: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """自作の重みとバイアスの値を写した nn.Linear を返します。

    nn.Linear の重みは (出力, 入力) の形なので、転置して写します。
    型とデバイスも weights に合わせます。
    """
    n_in, n_out = weights.shape
    layer = nn.Linear(n_in, n_out, dtype=weights.dtype, device=weights.device)
    with torch.no_grad():
        layer.weight.copy_(weights.T)
        layer.bias.copy_(bias)
    return layer


def fit_torch(
    x: torch.Tensor,
    y: torch.Tensor,
    layer: nn.Module,
    lr: float = 0.5,
    epochs: int = 2,
    bs: int = 64,
) -> list[float]:
    """:func:`fit` と同じ学習を nn.Linear・F.cross_entropy・optim.SGD で書いた版です。

    見比べられるように、ループは :func:`fit` とわざと同じ形にしてあります。
    """
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    n = len(x)
    losses = []
    for _ in range(epochs):
        for start in range(0, n, bs):
            xb, yb = x[start : start + bs], y[start : start + bs]
            loss = F.cross_entropy(layer(xb), yb)  # log_softmax と nll_loss をまとめた関数
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses
