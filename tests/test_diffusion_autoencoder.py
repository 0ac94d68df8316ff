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


# --- 学習の CLI (train_autoencoder): 再開の約束は train と同じ -----------------------------

def _ae_common(out) -> list[str]:
    from diffusion_fixtures import fashion_root

    return ["--data-root", str(fashion_root()), "--out", str(out), "--threads", "1",
            "--limit", "64", "--val-size", "32", "--batch-size", "8", "--width", "8",
            "--latent-channels", "2", "--device", "cpu", "--no-bf16", "--save-every", "100"]


def test_autoencoder_resume_refuses_changed_settings_in_one_line(tmp_path, capsys):
    from torchbook.diffusion import train_autoencoder

    common = _ae_common(tmp_path)
    train_autoencoder.main([*common, "--steps", "2"])
    capsys.readouterr()
    for change, flag in [(["--lr", "1e-3"], "--lr"), (["--batch-size", "4"], "--batch-size"),
                         (["--steps", "4"], "--steps"), (["--beta", "0.1"], "--beta")]:
        with pytest.raises(SystemExit) as e:
            train_autoencoder.parse_args([*common, "--steps", "2", "--resume", *change])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"{flag} " in err and "(保存)" in err, err


@pytest.mark.slow
def test_autoencoder_ctrl_c_resumes_equal_to_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                   capsys):
    """ステップ 3 の途中の Ctrl-C: 3 を終えて保存し、再開すると止めなかった学習と同じ重み。"""
    import signal

    from torchbook.diffusion import train_autoencoder
    from torchbook.diffusion.checkpoint import read_autoencoder

    calls = {"n": 0}
    real = train_autoencoder.vae_loss

    def loss_with_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    common = _ae_common(tmp_path / "a")
    with monkeypatch.context() as m:
        m.setattr(train_autoencoder, "vae_loss", loss_with_ctrl_c)
        with pytest.raises(SystemExit) as e:
            train_autoencoder.main([*common, "--steps", "5"])
    assert e.value.code == 130 and "--resume" in capsys.readouterr().out
    assert read_autoencoder(tmp_path / "a" / "last.pt")["step"] == 3
    train_autoencoder.main([*common, "--steps", "5", "--resume"])
    train_autoencoder.main([*_ae_common(tmp_path / "b"), "--steps", "5"])
    a = read_autoencoder(tmp_path / "a" / "last.pt")["model"]
    b = read_autoencoder(tmp_path / "b" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
