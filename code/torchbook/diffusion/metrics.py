"""生成画像の品質指標 FID と KID、分類器による正解率。

どちらも画像を分類器の特徴空間 (``FashionClassifier.features``、128 次元) に写し、
本物の画像の特徴と生成画像の特徴の「分布の違い」を測ります。値は小さいほど良い指標です。

- FID (Fréchet Inception Distance): 両方の特徴を多変量正規分布で近似し、その 2 つの
  正規分布のフレシェ距離 (2-ワッサースタイン距離の 2 乗) を求めます。
- KID (Kernel Inception Distance): 3 次の多項式カーネルによる MMD² の不偏推定量です。
  枚数が少なくても偏りがなく、平均と標準偏差を添えて報告できます。

FID は枚数が少ないと大きめに出る (偏りがある) ため、生成画像の FID は必ず
「同じ枚数の本物どうしの FID (参照レベル)」とそのばらつきと並べて示します
(``real_reference``)。参照に使う本物の画像は、テスト画像をクラスごとに半分ずつ分けた
``val`` (選ぶため) と ``test`` (報告するため) のどちらかです。選ぶのは val の値だけです。
test は val で測った候補のすべてについて記録しますが、どの選択も test の値を読みません。
"""

from __future__ import annotations

import torch
from torch import nn

# ---------------------------------------------------------------- 特徴を作る分類器

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
    """(N, 1, 32, 32)・[-1, 1] の画像を 10 クラスに分ける小さな CNN (約 25 万パラメータ)。

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


# ---------------------------------------------------------------- FID と KID


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """画像 (N, 1, 32, 32) を分類器の特徴 (N, D) に変換します (float64、CPU 上)。"""
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    feats = []
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size].to(device, torch.float32)
        feats.append(model.features(xb).double().cpu())
    return torch.cat(feats)


def _mean_cov(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """特徴の平均 (D,) と不偏共分散行列 (D, D) を float64 で返します。"""
    f = feats.double()
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"特徴は (N, D) で N >= 2 にしてください (形 {tuple(f.shape)})")
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (len(f) - 1)


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    """半正定値の対称行列の平方根。固有値の小さな負の誤差は 0 に切り上げます。"""
    w, v = torch.linalg.eigh(mat)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(
    mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """2 つの正規分布 N(mu_a, cov_a), N(mu_b, cov_b) のフレシェ距離。

    d² = |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr( (S_a^½ S_b S_a^½)^½ )

    最後の項は S_a S_b の行列平方根のトレースと同じ値です。対称行列
    S_a^½ S_b S_a^½ の固有値 (0 以上) の平方根の和として計算すると、非対称な行列の
    平方根を求めるより数値的に安定します。
    """
    sqrt_a = _sqrt_psd(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle = (middle + middle.T) / 2  # 丸め誤差で崩れた対称性を戻す
    tr_covmean = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return max(d2.item(), 0.0)


def fid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """特徴 (N_a, D) と (N_b, D) に正規分布を当てはめ、そのフレシェ距離 (FID) を返します。"""
    mu_a, cov_a = _mean_cov(feats_a)
    mu_b, cov_b = _mean_cov(feats_b)
    return frechet_distance(mu_a, cov_a, mu_b, cov_b)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """3 次の多項式カーネル k(x, y) = (x·y / D + 1)³ の行列 (N_x, N_y)。"""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """MMD² の不偏推定量 (同じ分布なら期待値が 0 で、負の値も出ます)。

    MMD² = 平均_{i≠j} k(x_i, x_j) + 平均_{i≠j} k(y_i, y_j) - 2 平均_{i,j} k(x_i, y_j)
    """
    m, n = len(x), len(y)
    k_xx = polynomial_kernel(x, x)
    k_yy = polynomial_kernel(y, y)
    k_xy = polynomial_kernel(x, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))  # 対角 (i = j) を除く
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return (term_xx + term_yy - 2 * k_xy.mean()).item()


def kid(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: 大きさ subset_size の部分集合を n_subsets 回選び、MMD² の平均と標準偏差を返します。

    部分集合の大きさは両方の枚数の半分までに切り詰めます (全体を選ぶと毎回同じ部分集合になり、
    標準偏差が 0 になってしまうため)。乱数は ``seed`` で固定します。
    """
    a, b = feats_a.double(), feats_b.double()
    size = min(subset_size, len(a) // 2, len(b) // 2)
    if size < 2:
        raise ValueError("KID には両方とも 4 枚以上の特徴が必要です")
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([
        mmd2_unbiased(
            a[torch.randperm(len(a), generator=gen)[:size]],
            b[torch.randperm(len(b), generator=gen)[:size]],
        )
        for _ in range(n_subsets)
    ], dtype=torch.float64)
    std = values.std().item() if n_subsets > 1 else 0.0
    return values.mean().item(), std


def fid_kid(feats_a: torch.Tensor, feats_b: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """FID と KID (平均・標準偏差) をまとめて辞書で返します。"""
    kid_mean, kid_std = kid(feats_a, feats_b, seed=seed)
    return {"fid": fid(feats_a, feats_b), "kid_mean": kid_mean, "kid_std": kid_std,
            "n_a": len(feats_a), "n_b": len(feats_b)}


SPLIT_SEED = 0  # val/test の分け方を決めるシード (変えると別の分割になります)
SPLITS = ("val", "test")


def split_matrix(labels: torch.Tensor, split: str, seed: int = SPLIT_SEED,
                 num_classes: int = 10) -> torch.Tensor:
    """テスト画像をクラスごとに半分ずつ ``val`` と ``test`` に分け、split 側の添字を返します。

    返すのは (num_classes, 1 クラスの枚数) の行列で、行 c がクラス c の画像の添字
    (シードで決まる順) です。Fashion-MNIST のテスト画像 10,000 枚なら (10, 500) です。
    サンプラーの選択 (η・ステップ数・guidance) は val で、選んだものの報告は test で行います。
    """
    if split not in SPLITS:
        raise ValueError(f"split は {' か '.join(SPLITS)} です (受け取ったのは {split!r})")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        half = len(idx) // 2
        rows.append(idx[:half] if split == "val" else idx[half : 2 * half])
    per_class = min(len(r) for r in rows)
    return torch.stack([r[:per_class] for r in rows])


def balanced_blocks(labels: torch.Tensor, split: str, n: int,
                    seed: int = SPLIT_SEED) -> list[torch.Tensor]:
    """split を、重ならない・クラスの枚数がそろった n 枚ずつの組 (添字) に分けます。

    組 0 が生成画像と比べる参照集合、組 1, 2, ... が本物どうしの比較に使う集合です。
    """
    mat = split_matrix(labels, split, seed)
    k = mat.shape[0]
    if n < 2 * k or n % k:
        raise ValueError(
            f"n はクラス数 {k} の倍数で {2 * k} 以上にしてください (受け取ったのは {n})")
    per = n // k
    count = mat.shape[1] // per
    if count < 2:
        raise ValueError(f"{split} ({mat.numel()} 枚) からは重ならない {n} 枚の組を 2 つ取れません"
                         f" (n は {k * (mat.shape[1] // 2)} 以下にしてください)")
    return [mat[:, b * per : (b + 1) * per].T.flatten() for b in range(count)]


def real_reference(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    split: str,
    n: int,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict:
    """本物どうしの FID/KID (同じ枚数 n での「参照レベル」) とそのばらつきを返します。

    参照集合 (組 0) と、重ならないほかの組 1, 2, ... との FID をそれぞれ測ります。
    ``fid``・``kid_*`` は組 1 との値、``fid_blocks`` はすべての組との値です。
    生成画像の FID がこの範囲に入っていれば、この枚数では本物と見分けがつかないことになります
    (下限ではありません。本物どうしの値も組によって揺れます)。
    """
    blocks = balanced_blocks(labels, split, n)
    feats = [extract_features(model, images[b], batch_size, device) for b in blocks]
    values = [fid(feats[0], f) for f in feats[1:]]
    res = fid_kid(feats[0], feats[1], seed=seed)
    v = torch.tensor(values, dtype=torch.float64)
    res.update(split=split, fid_blocks=values, fid_mean=v.mean().item(),
               fid_std=v.std().item() if len(v) > 1 else 0.0,
               fid_min=v.min().item(), fid_max=v.max().item())
    return res


def score_samples(model: nn.Module, samples: torch.Tensor, reference: torch.Tensor,
                  batch_size: int = 500, device: str | torch.device | None = None,
                  seed: int = 0) -> dict[str, float]:
    """生成画像 samples と本物の参照画像 reference の FID/KID を返します。"""
    feats_s = extract_features(model, samples, batch_size, device)
    feats_r = extract_features(model, reference, batch_size, device)
    return fid_kid(feats_r, feats_s, seed=seed)


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> float:
    """分類器が images を labels のクラスと判定した割合 (0〜1)。

    クラスを指定して生成した画像が、指定どおりのクラスに見えるかを測るのに使います。
    """
    if device is None:
        device = next(model.parameters()).device
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size].to(device, torch.float32)
        pred = model(xb).argmax(1).cpu()
        correct += (pred == labels[i : i + batch_size].cpu()).sum().item()
    return correct / len(images)
