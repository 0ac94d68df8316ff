"""torchbook.diffusion.autoencoder: 形、KL、小さなデータでの再構成、符号化と復号の往復。"""

from __future__ import annotations

import math

import pytest
import torch

from torchbook.diffusion.autoencoder import (
    Autoencoder,
    fit_latent_scale,
    kl_divergence,
    reconstruction_error,
    vae_loss,
)


def blobs(n: int = 64, seed: int = 0) -> torch.Tensor:
    """合成データ: 位置がばらばらの明るい四角 ([-1, 1]、1×32×32)。"""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 32, 32)
    for i, (r, c) in enumerate(torch.randint(2, 18, (n, 2), generator=g).tolist()):
        x[i, :, r : r + 12, c : c + 12] = 1
    return x


@pytest.mark.parametrize("channels", [2, 4])
def test_shapes(channels):
    model = Autoencoder(channels, width=16).eval()
    x = blobs(3)
    x_hat, mean, logvar = model(x)
    assert x_hat.shape == x.shape and mean.shape == logvar.shape == (3, channels, 8, 8)
    z = model.encode(x)
    assert z.shape == (3, *model.latent_shape) == (3, channels, 8, 8)
    img = model.decode(z)
    assert img.shape == x.shape and img.min() >= -1 and img.max() <= 1


def test_wrong_shapes_are_refused_in_one_line():
    model = Autoencoder(4, width=16)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        model.encode(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\)"):
        model.decode(torch.zeros(2, 2, 8, 8))


def test_kl_closed_form():
    zeros = torch.zeros(5, 4, 8, 8)
    assert kl_divergence(zeros, zeros).item() == 0  # q = N(0, 1) そのもの
    # KL(N(1, 1) ‖ N(0, 1)) = 1/2 (1 次元あたり)、画像 1 枚は 4·8·8 次元
    assert math.isclose(kl_divergence(zeros + 1, zeros).item(), 0.5 * 256, rel_tol=1e-6)
    # KL(N(0, e) ‖ N(0, 1)) = (e - 1 - 1) / 2
    assert math.isclose(kl_divergence(zeros, zeros + 1).item(), 256 * (math.e - 2) / 2,
                        rel_tol=1e-6)


def test_loss_is_reconstruction_plus_beta_kl():
    torch.manual_seed(0)
    x, x_hat = blobs(4), torch.randn(4, 1, 32, 32)
    mean, logvar = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)
    loss, rec, kl = vae_loss(x, x_hat, mean, logvar, beta=0.25)
    assert math.isclose(rec.item(), ((x - x_hat) ** 2).sum().item() / 4, rel_tol=1e-5)
    assert math.isclose(loss.item(), rec.item() + 0.25 * kl.item(), rel_tol=1e-6)


def test_tiny_training_reconstructs_and_kl_weight_matters():
    """β を大きくすると KL が小さくなる (潜在が N(0, I) に近づく) 代わりに再構成が悪くなる。"""
    x = blobs(32)
    results = {}
    for beta in (1e-3, 3.0):
        torch.manual_seed(0)
        model = Autoencoder(2, width=16)
        before = reconstruction_error(model.eval(), x)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(60):
            loss, _, _ = vae_loss(x, *model(x, g), beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            kl = kl_divergence(*model.encoder(x)).item()
        results[beta] = (before, reconstruction_error(model, x), kl)
    before, after, kl_small = results[1e-3]
    assert after < 0.5 * before
    assert results[3.0][2] < 0.5 * kl_small
    assert results[3.0][1] > after


def test_round_trip_does_not_depend_on_latent_scale():
    """latent_scale は encode で掛け decode で割るだけ: 往復の画像は同じで z の大きさが変わる。"""
    torch.manual_seed(0)
    model = Autoencoder(4, width=16).eval()
    x = blobs(8)
    round_trip = model.decode(model.encode(x))
    scale = fit_latent_scale(model, x)
    z = model.encode(x)
    assert scale != 1.0 and math.isclose(z.std().item(), 1.0, rel_tol=1e-3)
    torch.testing.assert_close(model.decode(z), round_trip, atol=1e-5, rtol=0)
