"""時刻とクラスで条件付けした小さな UNet (ε を予測します)。"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """整数の時刻 t (N,) を正弦波の埋め込み (N, dim) にします (Python のループなし)。

    周波数は 1 から 1/max_period まで等比で並びます。t は 0〜T-1 の整数のまま渡します
    (t/T のように 0〜1 に縮めると、いちばん速い周波数でも隣り合う時刻 t と t+1 の角度の差が
    1/T ラジアンになり、隣どうしの埋め込みがほとんど同じになります。離れた時刻は区別できます)。
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 畳み込み を 2 回。途中で時刻・クラスの埋め込みを足します。"""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # 学習開始時は恒等写像に近いブロックにする
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]  # チャンネルごとのバイアスとして足す
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def checked_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """入力 x の形を確かめ (違えば 1 行の ValueError)、クラス y を返します。

    y が None なら「クラスなし」(model.null_class) です。UNet と LatentUNet が共有します。
    """
    c, s = model.in_channels, model.image_size
    if x.shape[1:] != (c, s, s):
        raise ValueError(
            f"入力は (N, {c}, {s}, {s}) にしてください (受け取ったのは {tuple(x.shape)})")
    if y is None:
        y = torch.full((x.shape[0],), model.null_class, dtype=torch.long, device=x.device)
    return y


def up_path(channels: tuple[int, ...], emb_dim: int, out_channels: int, groups: int = 8,
            dropout: float = 0.0, attn: Callable[[int], nn.Module] | None = None
            ) -> tuple[nn.ModuleList, nn.ModuleList | None, nn.ModuleList, nn.GroupNorm, nn.Conv2d]:
    """UNet の上りの道と出力の層を作ります (``UNet`` と ``latent.LatentUNet`` が使います)。

    解像度ごとに、スキップ接続を連結した分だけ入力の多い ResBlock、``attn`` があればその層、
    2 倍の拡大 (いちばん上は ``nn.Identity``) を作ります。最後に GroupNorm と、0 で初期化した
    出力の畳み込みを作ります。戻り値 (up, up_attn, upsample, norm_out, conv_out) は呼ぶ側が
    同じ名前の属性にします (チェックポイントのキー名になります)。attn がなければ up_attn は None。
    """
    up, up_attn, upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    c_prev = channels[-1]  # 中央のブロックの出力
    for i, c in reversed(list(enumerate(channels))):
        up.append(ResBlock(c_prev + c, c, emb_dim, groups, dropout))  # 下りの同じ解像度と連結
        if attn is not None:
            up_attn.append(attn(c))
        upsample.append(
            nn.Identity() if i == 0
            else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                               nn.Conv2d(c, channels[i - 1], 3, padding=1)))
        c_prev = channels[i - 1] if i > 0 else c
    norm_out = nn.GroupNorm(groups, channels[0])
    conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)
    nn.init.zeros_(conv_out.weight)  # 学習開始時の予測は 0
    nn.init.zeros_(conv_out.bias)
    return up, (up_attn if attn is not None else None), upsample, norm_out, conv_out


class UNet(nn.Module):
    """解像度を半分ずつ縮めて戻す UNet (既定では 16×16 → 8×8 → 4×4)。

    - ``patch_size``: 最初に画像を patch_size×patch_size の小区画に分け、区画の画素を
      チャンネルに並べ替えます (``pixel_unshuffle``。1×32×32 → 4×16×16)。最後に逆の並べ替え
      (``pixel_shuffle``) で 32×32 に戻します。畳み込みの計算量が 1/4 になり、CPU で
      学習できる速さになります。GPU なら ``patch_size=1`` (32×32 のまま) も選べます。

    - ``channels``: 各解像度のチャンネル数 (既定 (32, 64, 128))。
    - ``num_classes``: クラス数。クラス埋め込みは num_classes + 1 個で、最後の番号
      (= num_classes) が「クラスなし」です (classifier-free guidance 用)。
    - ``objective``: 学習の目的。"eps" (ε を予測する DDPM) か "flow" (速度 v を予測する
      フローマッチング)。ネットワークの形は同じで、``sampling.sample`` がサンプラーを選びます。
    - 正規化は GroupNorm (バッチ内のほかの画像、つまりほかのノイズの強さに影響されない)。
    """

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 128),
                 num_classes: int = 10, image_size: int = 32, groups: int = 8,
                 dropout: float = 0.0, patch_size: int = 2, objective: str = "eps") -> None:
        super().__init__()
        if objective not in ("eps", "flow"):
            raise ValueError(f"objective は 'eps' か 'flow' です (受け取ったのは {objective!r})")
        self.objective = objective  # 何を予測するか。sample() はこれに合うサンプラーを選ぶ
        self.config = {"in_channels": in_channels, "channels": list(channels),
                       "num_classes": num_classes, "image_size": image_size,
                       "groups": groups, "dropout": dropout, "patch_size": patch_size}
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.sample_shape = (in_channels, image_size, image_size)  # sample() が作る 1 枚の形
        self.null_class = num_classes
        self.patch_size = patch_size
        c_io = in_channels * patch_size**2
        c0 = channels[0]
        emb_dim = 4 * c0
        self.time_dim = c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(c_io, c0, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c_prev = c0
        for i, c in enumerate(channels):
            self.down.append(ResBlock(c_prev, c, emb_dim, groups, dropout))
            c_prev = c
            last = i == len(channels) - 1
            self.downsample.append(
                nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(c_prev, c_prev, emb_dim, groups, dropout)
        self.up, _, self.upsample, self.norm_out, self.conv_out = up_path(
            channels, emb_dim, c_io, groups, dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) の x_t、t: (N,) の整数時刻、y: (N,) のクラス (None ならクラスなし)。"""
        y = checked_labels(self, x, y)
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_emb(y)
        h = self.conv_in(F.pixel_unshuffle(x, self.patch_size))
        skips = []
        for block, down in zip(self.down, self.downsample, strict=True):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block, up in zip(self.up, self.upsample, strict=True):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = up(h)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.patch_size)


def trace_shapes(model: UNet, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None = None) -> list[dict]:
    """1 回の順伝播で、ブロックごとの入力と出力の形とパラメーター数を実行順に記録します。

    forward フックで測るので、``UNet.forward`` を書き換えずに形を追えます。
    ``pixel_unshuffle`` と ``pixel_shuffle`` はモジュールではなく関数なので、``conv_in`` の
    入力と最後の出力から行を作ります。``nn.Identity`` (何もしない層) は表に入れません。
    各行は {"name", "in", "out", "params"} の辞書です (形はタプル)。
    """
    rows: list[dict] = []
    blocks = []
    for name, child in model.named_children():
        items = (list(child.named_children()) if isinstance(child, nn.ModuleList)
                 else [("", child)])
        for i, m in items:
            if not isinstance(m, nn.Identity):
                blocks.append((f"{name}.{i}" if i else name, m))

    def hook(name: str, n_params: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            rows.append({"name": name, "in": tuple(inputs[0].shape),
                         "out": tuple(output.shape), "params": n_params})
        return record

    handles = [m.register_forward_hook(hook(name, sum(p.numel() for p in m.parameters())))
               for name, m in blocks]
    try:
        with torch.no_grad():
            out = model(x, t, y)
    finally:
        for h in handles:
            h.remove()
    i = next(k for k, r in enumerate(rows) if r["name"] == "conv_in")
    rows.insert(i, {"name": "pixel_unshuffle", "in": tuple(x.shape),
                    "out": rows[i]["in"], "params": 0})
    rows.append({"name": "pixel_shuffle", "in": rows[-1]["out"], "out": tuple(out.shape),
                 "params": 0})
    return rows
