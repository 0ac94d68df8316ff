"""拡散モデルの章で使う Fashion-MNIST の読み込み。

画像は 2 画素ずつ縁を足して 32×32 にし、画素値を [-1, 1] に変換します。
32×32 にするのは、UNet で 2 回半分にしても割り切れる (32→16→8) ようにするためです。
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision import datasets

CLASSES = (
    "Tシャツ/トップ", "ズボン", "プルオーバー", "ドレス", "コート",
    "サンダル", "シャツ", "スニーカー", "バッグ", "アンクルブーツ",
)

NUM_CLASSES = len(CLASSES)


def fashion_mnist(root: str | os.PathLike, train: bool = True, download: bool = False):
    """torchvision の Fashion-MNIST のデータセット (28×28 の uint8 とラベル) を作ります。

    download=True なら、root に無いときに torchvision がダウンロードします (約 30 MB)。
    モデルに渡す形 (32×32・[-1, 1]) にするのは ``load_tensors`` です。
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"データのフォルダー {root} がファイルです。フォルダーを指定してください")
    try:
        ds = datasets.FashionMNIST(str(root), train=train, download=download)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # 無い、または途中で切れたなど
        if download and "download" in str(e).lower():  # torchvision: "Error downloading ..."
            raise OSError(
                f"Fashion-MNIST をダウンロードできませんでした ({' '.join(str(e).split())})。"
                "ネットワークにつながる計算機でダウンロード (CLI なら --download) し、できた "
                f"FashionMNIST フォルダーをこの計算機の {root} の下へコピーしてください") from e
        if isinstance(e, RuntimeError) and "not found" in str(e).lower():
            raise FileNotFoundError(
                f"{root / 'FashionMNIST' / 'raw'} に Fashion-MNIST がありません。"
                "download=True (CLI なら --download) で torchvision がダウンロードします "
                "(約 30 MB)。別の場所にあるなら root (CLI なら --data-root) にそのフォルダーを"
                "渡してください") from e
        raise ValueError(f"{root / 'FashionMNIST'} のファイルが壊れています ({e})。そのフォルダーを"
                         "消してから、ダウンロードし直してください (CLI なら --download)") from e
    check_labels(ds.targets, root)
    return ds


def check_labels(labels: torch.Tensor, root: str | os.PathLike) -> None:
    """ラベルが 0〜9 の範囲にあるかを確かめます (範囲外ならデータが壊れています)。"""
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        raise ValueError(
            f"{root} の Fashion-MNIST のラベルに範囲外の値 ({labels[bad][0].item()} など "
            f"{int(bad.sum())} 個) があります。データが壊れています: FashionMNIST フォルダーを"
            "消してから、ダウンロードし直してください (CLI なら --download)")


def load_tensors(root: str | os.PathLike, train: bool = True,
                 download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """データセット全体を (N, 1, 32, 32) の float テンソルとラベルにまとめて返します。

    DataLoader を通すより速いため、CPU での学習と評価に使います。
    """
    ds = fashion_mnist(root, train=train, download=download)
    x = ds.data.unsqueeze(1).float().div(255)  # (N, 1, 28, 28), [0, 1]
    x = torch.nn.functional.pad(x, (2, 2, 2, 2)) * 2 - 1  # 縁に 2 画素 (黒) → 32×32, [-1, 1]
    return x, ds.targets.clone()
