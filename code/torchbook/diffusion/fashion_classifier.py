"""FID・KID の特徴を作る Fashion-MNIST の分類器: ネットワークと、その重みの読み込み。

FID や KID は画像をこの分類器の最後から 2 番目の層 (128 次元) に写して比べます
(``metrics``)。学習の CLI は ``classifier``、ファイル形式は ``checkpoint`` にあります。
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import WEIGHTS_DIR, read_checkpoint

DEFAULT_CLASSIFIER = WEIGHTS_DIR / "fashion_classifier.pt"

FEATURE_DIM = 128


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 畳み込み → BatchNorm → ReLU → 2×2 最大プーリング (縦横が半分になります)。"""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionClassifier(nn.Module):
    """(N, 1, 32, 32)・[-1, 1] の画像を 10 クラスに分ける小さな CNN (約 25 万パラメーター)。

    最初の畳み込みはストライド 2 で 32×32 → 16×16 に縮めます (CPU では大きな特徴マップの
    読み書きが一番遅いため)。続けて 8×8 → 4×4 と縮め、全結合層で 128 次元の特徴にしてから
    10 クラスのロジットを出します。``features`` がその 128 次元を返します。
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, dropout: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 24, 4, stride=2, padding=1, bias=False),  # (N, 24, 16, 16)
            nn.BatchNorm2d(24),
            nn.ReLU(inplace=True),
            conv_block(24, 48),  # (N, 48, 8, 8)
            conv_block(48, 96),  # (N, 96, 4, 4)
            nn.Flatten(),  # (N, 1536)
            nn.Linear(96 * 4 * 4, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),  # ここまでが特徴 (N, feature_dim)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """最後から 2 番目の層の特徴 (N, feature_dim) を返します。FID/KID はこれを使います。"""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ロジット (N, 10) を返します。"""
        return self.head(self.dropout(self.features(x)))


def load_classifier(path: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu") -> FashionClassifier:
    """学習済みの分類器を読み込み、評価モード (eval) で返します。

    ``path`` を省くと、このフォルダーの ``weights/fashion_classifier.pt`` を読みます。
    """
    path = Path(path) if path is not None else DEFAULT_CLASSIFIER
    if not path.is_file():
        raise FileNotFoundError(
            f"分類器の重み {path} がありません。このフォルダーの classifier モジュールで"
            "学習して保存するか、path に分類器の重みを渡してください")
    state = read_checkpoint(path)
    model = FashionClassifier()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} は FashionClassifier の重みではありません (構造が違います)"
                         ) from e
    return model.to(device).eval()
