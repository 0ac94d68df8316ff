"""潜在拡散の前半: 画像を小さな潜在変数に縮める、KL 正則化つきの自己符号化器 (VAE)。

1×32×32 の画像を、エンコーダーが latent_channels×8×8 の潜在変数 z の分布
q(z|x) = N(μ(x), diag σ²(x)) に写し、デコーダーが z から画像を戻します。

損失は ELBO (証拠下界) の符号を変えたものに重み β を付けた形です::

    L = ‖x - D(z)‖² + β · KL(q(z|x) ‖ N(0, I)),   z = μ + σ·ε  (ε ~ N(0, I))

デコーダーを分散 σ_x² の正規分布 p(x|z) = N(D(z), σ_x² I) と見ると、
-log p(x|z) = ‖x - D(z)‖² / (2σ_x²) + 定数 なので、β = 2σ_x² のとき L/(2σ_x²) は
負の ELBO そのものです。β を小さくすると再構成は鋭くなり、潜在空間は N(0, I) から
離れて不規則になります。β を大きくすると潜在空間は滑らかになり、画像はぼやけます。
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 32


class Encoder(nn.Module):
    """1×32×32 → (μ, log σ²) それぞれ latent_channels×8×8。2 回の stride 2 で縮めます。"""

    def __init__(self, latent_channels: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),  # 32×32
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),  # 16×16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),  # 8×8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * latent_channels, 1),  # μ と log σ² を並べて出す
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # exp で溢れないように


class Decoder(nn.Module):
    """latent_channels×8×8 → 1×32×32。最近傍で 2 倍に広げてから畳み込む、を 2 回。

    生成のたびに 1 回だけ通るので、エンコーダーより細くして軽くしています。
    """

    def __init__(self, latent_channels: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * w, 3, padding=1), nn.SiLU(),  # 8×8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),  # 16×16
            nn.Conv2d(2 * w, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),  # 32×32
            nn.Conv2d(w, w // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w // 2, 1, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    """KL 正則化つきの畳み込み自己符号化器 (VAE)。

    - ``latent_channels``: 潜在変数のチャンネル数 (8×8 の各位置に何個の数を置くか)。
    - ``width``: 畳み込みのチャンネル数の基準。
    - ``latent_scale``: 潜在変数に掛けて標準偏差をおよそ 1 にする数。学習の後に
      ``fit_latent_scale`` で決めます (拡散モデルのノイズ N(0, I) と大きさを揃えるため。
      Stable Diffusion の 0.18215 と同じ役目です)。
    """

    def __init__(self, latent_channels: int = 4, width: int = 32,
                 latent_scale: float = 1.0) -> None:
        super().__init__()
        self.config = {"latent_channels": latent_channels, "width": width}
        self.latent_channels = latent_channels
        self.latent_shape = (latent_channels, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
        self.encoder = Encoder(latent_channels, width)
        self.decoder = Decoder(latent_channels, width)
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """学習用: (再構成 x̂, μ, log σ²) を返します。z は再パラメーター化で引きます。"""
        check_image(x)
        mean, logvar = self.encoder(x)
        z = reparameterize(mean, logvar, generator)
        return self.decoder(z), mean, logvar

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """画像 → 拡散モデルが扱う潜在変数 (latent_scale を掛けた μ。sample=True なら z)。"""
        check_image(x)
        mean, logvar = self.encoder(x)
        z = reparameterize(mean, logvar, generator) if sample else mean
        return z * self.latent_scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """潜在変数 (latent_scale を掛けたもの) → 画像 [-1, 1]。"""
        if z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"潜在変数は (N, {', '.join(map(str, self.latent_shape))}) に"
                             f"してください (受け取ったのは {tuple(z.shape)})")
        return self.decoder(z / self.latent_scale).clamp(-1, 1)


def check_image(x: torch.Tensor) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"画像は (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) にしてください "
                         f"(受け取ったのは {tuple(x.shape)})")


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """再パラメーター化: z = μ + σ·ε (ε ~ N(0, I))。

    乱数を ε に追い出すので、μ と σ に勾配が流れます。
    """
    eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (μ² + σ² - 1 - log σ²)。

    画像ごとに足し、バッチで平均します。
    """
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float())
    return kl.flatten(1).sum(1).mean()


def vae_loss(x: torch.Tensor, x_hat: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(損失, 再構成誤差, KL) を返します。どれも画像 1 枚あたり (画素・潜在の次元で和)。

    再構成誤差は ‖x - x̂‖² (ガウスのデコーダーの -log p(x|z) の定数を除いた部分)、
    損失 = 再構成誤差 + β·KL です (β = 2σ_x² で負の ELBO に比例)。
    """
    rec = F.mse_loss(x_hat.float(), x.float(), reduction="none").flatten(1).sum(1).mean()
    kl = kl_divergence(mean, logvar)
    return rec + beta * kl, rec, kl


@torch.no_grad()
def encode_all(model: Autoencoder, images: torch.Tensor, batch_size: int = 1000,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """画像をまとめて潜在変数 (μ・latent_scale 倍) にします (拡散モデルの学習データ用)。"""
    out = [model.encode(images[i : i + batch_size].to(device)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def fit_latent_scale(model: Autoencoder, images: torch.Tensor, batch_size: int = 1000) -> float:
    """μ の標準偏差の逆数を ``latent_scale`` に設定して返します (z·scale の標準偏差 ≈ 1)。"""
    model.latent_scale.fill_(1.0)
    z = encode_all(model, images, batch_size, next(model.parameters()).device)
    scale = 1.0 / z.float().std().item()
    model.latent_scale.fill_(scale)
    return scale


@torch.no_grad()
def reconstruction_error(model: Autoencoder, images: torch.Tensor,
                         batch_size: int = 1000) -> float:
    """μ を通した再構成 (決定的) の 1 画素あたりの二乗誤差の平均 (画素は [-1, 1])。"""
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        total += F.mse_loss(model.decode(model.encode(x)), x, reduction="sum").item()
    return total / images.numel()
