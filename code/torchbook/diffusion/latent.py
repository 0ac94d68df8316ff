"""潜在拡散の後半: 自己符号化器の潜在空間 (例: 4×8×8) で学習するフローマッチングのモデル。

``LatentUNet`` は ``unet`` の ResBlock と時刻の埋め込みをそのまま使い、クラスは
``conditioning`` のクロスアテンション (クラス名の文字の列) で受け取る小さな UNet です。
``LatentFlow`` はそれに自己符号化器を添えたもので、``sampling.sample`` から見ると
普通のフローマッチングのモデル (``objective == "flow"``) です。サンプラーは潜在変数の
ノイズから ODE を解き、最後に ``decode_latents`` でデコーダーを通して画像にします。
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import Autoencoder
from .conditioning import CrossAttention, TokenEncoder
from .unet import ResBlock, checked_labels, timestep_embedding, up_path


class LatentUNet(nn.Module):
    """潜在変数 (C×8×8) の速度 v を予測する UNet。解像度は 8×8 → 4×4 → 8×8。

    各 ResBlock の後に CrossAttention を置き、特徴マップの各位置がクラス名の文字の列を
    見て条件を取り込みます (時刻は ResBlock に足す埋め込みのまま)。
    クラスの番号 num_classes が「条件なし」(空の名前) です (classifier-free guidance 用)。
    """

    def __init__(self, in_channels: int = 4, channels: tuple[int, ...] = (32, 64),
                 image_size: int = 8, num_classes: int = 10, groups: int = 8,
                 heads: int = 4, context_dim: int = 64) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "channels": list(channels),
                       "image_size": image_size, "num_classes": num_classes,
                       "groups": groups, "heads": heads, "context_dim": context_dim}
        self.in_channels, self.image_size = in_channels, image_size
        self.null_class = num_classes
        c0 = channels[0]
        emb_dim = 4 * c0
        self.time_dim = c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.tokens = TokenEncoder(context_dim)
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)

        def attn(c: int) -> CrossAttention:
            return CrossAttention(c, context_dim, heads, groups)

        self.down, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), \
            nn.ModuleList()
        c_prev = c0
        for i, c in enumerate(channels):
            self.down.append(ResBlock(c_prev, c, emb_dim, groups))
            self.down_attn.append(attn(c))
            c_prev = c
            self.downsample.append(nn.Identity() if i == len(channels) - 1
                                   else nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(c_prev, c_prev, emb_dim, groups)
        self.mid_attn = attn(c_prev)
        self.up, self.up_attn, self.upsample, self.norm_out, self.conv_out = up_path(
            channels, emb_dim, in_channels, groups, attn=attn)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, 8, 8) の潜在変数 x_t、t: (N,) の時刻 (1000·t)、y: (N,) のクラス。"""
        y = checked_labels(self, x, y)
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        context, pad = self.tokens(y)
        h = self.conv_in(x)
        skips = []
        for block, attn, down in zip(self.down, self.down_attn, self.downsample, strict=True):
            h = attn(block(h, emb), context, pad)
            skips.append(h)
            h = down(h)
        h = self.mid_attn(self.mid(h, emb), context, pad)
        for block, attn, up in zip(self.up, self.up_attn, self.upsample, strict=True):
            h = attn(block(torch.cat([h, skips.pop()], dim=1), emb), context, pad)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LatentFlow(nn.Module):
    """潜在空間のフローマッチングのモデル: LatentUNet + (固定した) 自己符号化器。

    ``sample`` が使う約束 (``objective``、``sample_shape``、``null_class``、
    ``forward(x, t, y)``) は UNet と同じで、``sample_shape`` が潜在変数の形です。
    ``decode_latents`` があるので、``sample`` は最後に潜在変数を画像に戻します。
    """

    objective = "flow"

    def __init__(self, unet: LatentUNet, autoencoder: Autoencoder) -> None:
        super().__init__()
        if unet.in_channels != autoencoder.latent_channels:
            raise ValueError(f"LatentUNet の入力 {unet.in_channels} チャンネルと自己符号化器の"
                             f"潜在変数 {autoencoder.latent_channels} チャンネルが合いません")
        self.unet = unet
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.sample_shape = autoencoder.latent_shape
        self.null_class = unet.null_class
        self.config = {"unet": unet.config, "autoencoder": autoencoder.config,
                       "latent_scale": float(autoencoder.latent_scale)}

    @classmethod
    def from_config(cls, config: dict) -> LatentFlow:
        return cls(LatentUNet(**config["unet"]),
                   Autoencoder(**config["autoencoder"], latent_scale=config["latent_scale"]))

    def train(self, mode: bool = True) -> LatentFlow:
        super().train(mode)
        self.autoencoder.eval()  # 自己符号化器はいつも評価モード (学習しない)
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, y)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """潜在変数 → 画像 [-1, 1] (デコーダーは fp32 で計算します)。"""
        return self.autoencoder.decode(z.float())
