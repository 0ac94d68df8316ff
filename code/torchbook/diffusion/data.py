"""拡散モデルの章で使う Fashion-MNIST の読み込み。

画像は 2 画素ずつ縁を足して 32×32 にし、画素値を [-1, 1] に変換します。
32×32 にするのは、UNet で 2 回半分にしても割り切れる (32→16→8) ようにするためです。
"""

from __future__ import annotations

import os

import torch
from torchvision import datasets, transforms

IMAGE_SIZE = 32
CLASSES = (
    "Tシャツ/トップ", "ズボン", "プルオーバー", "ドレス", "コート",
    "サンダル", "シャツ", "スニーカー", "バッグ", "アンクルブーツ",
)

TRANSFORM = transforms.Compose([
    transforms.Pad(2),  # 28×28 → 32×32 (縁は 0 = 黒)
    transforms.ToTensor(),  # [0, 1]
    transforms.Normalize((0.5,), (0.5,)),  # [-1, 1]
])


def fashion_mnist(root: str | os.PathLike, train: bool = True, download: bool = False):
    """Fashion-MNIST を (1, 32, 32)・[-1, 1] の画像として返すデータセットを作ります。"""
    try:
        return datasets.FashionMNIST(str(root), train=train, download=download, transform=TRANSFORM)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"{root} に Fashion-MNIST がありません。--download を付けてダウンロードするか、"
            "本書のリポジトリでは `python -m booktools.data fashion-mnist` で用意してください。"
        ) from e


def load_tensors(root: str | os.PathLike, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """データセット全体を (N, 1, 32, 32) の float テンソルとラベルにまとめて返します。

    DataLoader を通すより速いため、CPU での学習と評価に使います。
    """
    ds = fashion_mnist(root, train=train)
    x = ds.data.unsqueeze(1).float().div(255)  # (N, 1, 28, 28), [0, 1]
    x = torch.nn.functional.pad(x, (2, 2, 2, 2)) * 2 - 1  # TRANSFORM と同じ結果
    return x, ds.targets.clone()
