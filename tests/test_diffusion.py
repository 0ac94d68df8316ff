"""拡散モデル (torchbook.diffusion) のテスト。diffusers とは数値で突き合わせます。"""

from __future__ import annotations

import math

import pytest
import torch

from torchbook.diffusion.sampling import (
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    guided_eps,
    sample,
)
from torchbook.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas
from torchbook.diffusion.train import EMA, load_checkpoint, save_checkpoint, training_loss
from torchbook.diffusion.unet import UNet, timestep_embedding

torch.set_num_threads(1)


def tiny_unet(seed: int = 0) -> UNet:
    """0 で初期化した層も乱数にした小さな UNet (出力や条件の効果が 0 だと比べる意味がない)。"""
    torch.manual_seed(seed)
    model = UNet(channels=(16, 32)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.05)
    return model


# ---------------------------------------------------------------- スケジュール


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_identities(name):
    s = NoiseSchedule.from_name(name)
    b = s.betas.double()
    torch.testing.assert_close(s.alphas_cumprod.double(), torch.cumprod(1 - b, 0),
                               rtol=1e-5, atol=1e-7)
    assert s.alphas_cumprod_prev[0] == 1  # 最後の一歩は ᾱ = 1 (ノイズなし) へ
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.posterior_variance[0] == 0
    assert (s.posterior_variance[1:] < s.betas[1:]).all()
    assert (s.alphas_cumprod.diff() < 0).all()
    assert s.alphas_cumprod[-1].sqrt() < 0.01  # x_T はほぼ純粋なノイズ


def test_schedule_endpoints_and_errors():
    assert linear_betas()[0].item() == pytest.approx(1e-4)
    assert linear_betas()[-1].item() == pytest.approx(0.02)
    assert cosine_betas().max().item() <= 0.999
    seed_betas = torch.linspace(0.001, 0.01, 1000)
    # seed 003 の β では √ᾱ_T が 0 から遠い
    assert NoiseSchedule(seed_betas).alphas_cumprod[-1].sqrt() > 0.05
    with pytest.raises(ValueError, match="linear"):
        NoiseSchedule.from_name("quadratic")
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.1, 1.5]))


def test_q_sample_mean_and_variance():
    s = NoiseSchedule.from_name("linear")
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.full((n, 1, 2, 2), 0.7)
    for t in [0, 250, 999]:
        tt = torch.full((n,), t)
        xt = s.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        ac = s.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(ac) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ac, abs=0.02 + 0.03 * (1 - ac))


# ---------------------------------------------------------------- diffusers と突き合わせ


def diffusers_schedulers(betas, spacing="trailing"):
    diffusers = pytest.importorskip("diffusers")
    common = {"num_train_timesteps": len(betas), "trained_betas": betas.numpy(),
              "clip_sample": True, "clip_sample_range": 1.0, "prediction_type": "epsilon"}
    ddpm = diffusers.DDPMScheduler(variance_type="fixed_small", **common)
    ddim = diffusers.DDIMScheduler(set_alpha_to_one=True, steps_offset=0,
                                   timestep_spacing=spacing, **common)
    return ddpm, ddim


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_and_ddpm_step_match_diffusers(name):
    s = NoiseSchedule.from_name(name)
    ddpm, _ = diffusers_schedulers(s.betas)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(s.q_sample(x0, t, noise), ddpm.add_noise(x0, noise, t),
                               rtol=1e-5, atol=1e-5)
    for step in [999, 500, 100, 10, 1, 0]:
        x_t = torch.randn(x0.shape, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ref = ddpm.step(eps, step, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
        ours = ddpm_step(s, eps, step, x_t, z)
        # t が小さいと 1 - ᾱ_t ≈ 1e-4 の桁落ちで diffusers (float32 で計算) に 1e-4 程度の
        # 誤差が出ます (こちらは float64 で計算してから float32 に丸めています)
        tol = 1e-5 if step >= 100 else 1e-3
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(eta, spacing):
    s = NoiseSchedule.from_name("cosine")
    _, ddim = diffusers_schedulers(s.betas, spacing)
    ddim.set_timesteps(50)
    times = ddim_timesteps(s.T, 50, spacing)
    assert times == ddim.timesteps.tolist()
    g = torch.Generator().manual_seed(2)
    for i in [0, 25, 49]:
        t = times[i]
        t_prev = times[i + 1] if i + 1 < len(times) else -1
        x_t = torch.randn(3, 1, 8, 8, generator=g)
        eps = torch.randn(x_t.shape, generator=g) * 1.5
        z = torch.randn(x_t.shape, generator=g)
        ref = ddim.step(eps, t, x_t, eta=eta, use_clipped_model_output=True,
                        variance_noise=z if eta > 0 else None).prev_sample
        ours = ddim_step(s, eps, t, t_prev, x_t, eta, z)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 7, 10, 20, 30, 100, 1000])
def test_ddim_trailing_timesteps_match_diffusers(steps):
    _, ddim = diffusers_schedulers(NoiseSchedule.from_name("linear").betas)
    ddim.set_timesteps(steps)
    assert ddim_timesteps(1000, steps) == ddim.timesteps.tolist()


def test_ddim_timesteps_errors():
    assert ddim_timesteps(1000, 10, "leading") == list(range(900, -1, -100))
    assert ddim_timesteps(1000, 10) == list(range(999, 0, -100))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(1000, 10, "uniform")


# ---------------------------------------------------------------- UNet と guidance


def test_timestep_embedding_integer_t():
    e = timestep_embedding(torch.tensor([0, 1, 500, 999]), 32)
    assert e.shape == (4, 32)
    assert (e[1] - e[0]).abs().max() > 0.1  # 隣の整数 t でも区別できる
    e_frac = timestep_embedding(torch.tensor([0, 1, 500, 999]) / 1000, 32)
    assert (e_frac[1] - e_frac[0]).abs().max() < 0.01  # t/T ではほとんど区別できない


def test_unet_shapes_and_errors():
    model = tiny_unet()
    x = torch.randn(2, 1, 32, 32)
    t = torch.tensor([3, 900])
    assert model(x, t, torch.tensor([1, 10])).shape == x.shape
    assert model(x, t).shape == x.shape  # y=None はクラスなし
    with pytest.raises(ValueError, match="32"):
        model(torch.randn(2, 1, 28, 28), t)


def test_guidance_endpoints_and_linearity():
    model = tiny_unet()
    x = torch.randn(3, 1, 32, 32)
    t = torch.tensor([10, 400, 900])
    y = torch.tensor([0, 4, 9])
    with torch.no_grad():
        e_u, e_c = model(x, t, None), model(x, t, y)
        torch.testing.assert_close(guided_eps(model, x, t, y, 0.0), e_u)
        torch.testing.assert_close(guided_eps(model, x, t, y, 1.0), e_c)
        assert (e_c - e_u).abs().max() > 1e-4  # クラスで予測が変わる
        torch.testing.assert_close(guided_eps(model, x, t, y, 3.0), e_u + 3 * (e_c - e_u),
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- 学習と保存


def test_tiny_training_lowers_loss():
    torch.manual_seed(0)
    model = UNet(channels=(16, 32)).train()
    s = NoiseSchedule.from_name("cosine")
    # 合成データ: 左右どちらかに明るい四角がある画像 (クラス = 位置)
    y = torch.randint(0, 2, (64,))
    x0 = -torch.ones(64, 1, 32, 32)
    for i in range(64):
        c = 4 + 16 * y[i].item()
        x0[i, :, 10:22, c : c + 12] = 1

    def eval_loss() -> float:
        with torch.no_grad():
            return training_loss(model, s, x0, y, 0.0, torch.Generator().manual_seed(5)).item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        loss = training_loss(model, s, x0, y, 0.1, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_ema_update():
    model = tiny_unet()
    ema = EMA(model, decay=0.999)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = min(0.999, 2 / 11)  # ウォームアップ中の減衰率
    for e, b, p in zip(ema.model.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, d * b + (1 - d) * p)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_samplers_deterministic_under_seed():
    model = tiny_unet()
    s = NoiseSchedule.from_name("cosine", T=100)
    a = sample(model, s, 2, method="ddim", steps=5, seed=3)
    b = sample(model, s, 2, method="ddim", steps=5, seed=3)
    c = sample(model, s, 2, method="ddim", steps=5, seed=4)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    d1 = sample(model, s, 2, method="ddpm", seed=3, y=torch.tensor([1, 2]), guidance_scale=2)
    d2 = sample(model, s, 2, method="ddpm", seed=3, y=torch.tensor([1, 2]), guidance_scale=2)
    torch.testing.assert_close(d1, d2)
    assert d1.shape == (2, 1, 32, 32) and d1.abs().max() <= 1
    with pytest.raises(ValueError, match="ddim"):
        sample(model, s, 1, method="euler")


def test_sample_from_given_noise():
    model = tiny_unet()
    s = NoiseSchedule.from_name("cosine", T=100)
    x_T = torch.randn((2, 1, 32, 32), generator=torch.Generator().manual_seed(3))
    # seed から引いたノイズを渡せば、seed で生成したのと同じ画像になる
    torch.testing.assert_close(sample(model, s, 2, steps=5, x_T=x_T),
                               sample(model, s, 2, steps=5, seed=3))
    # η = 0 では画像が x_T だけで決まる (seed は使われない)
    torch.testing.assert_close(sample(model, s, 2, steps=5, x_T=x_T, seed=0),
                               sample(model, s, 2, steps=5, x_T=x_T, seed=9))
    # η = 1 では途中のノイズが seed で変わる
    a = sample(model, s, 2, steps=5, eta=1.0, x_T=x_T, seed=0)
    assert not torch.equal(a, sample(model, s, 2, steps=5, eta=1.0, x_T=x_T, seed=9))
    with pytest.raises(ValueError, match="x_T の形"):
        sample(model, s, 3, steps=5, x_T=x_T)


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    model = tiny_unet()
    ema = EMA(model)
    path = tmp_path / "ema.pt"
    save_checkpoint(path, model, ema, "cosine", 1000, {"note": "test"}, ema_only=True)
    loaded, sched, ckpt = load_checkpoint(path)
    assert ckpt["extra"]["note"] == "test" and sched.T == 1000
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), ema.model(x, t))
    # 構造の違うチェックポイント
    bad = torch.load(path, weights_only=True)
    bad["unet"]["channels"] = [32, 64]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="構造"):
        load_checkpoint(tmp_path / "bad.pt")
    # このモジュールのものではないファイル
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="DDPM"):
        load_checkpoint(tmp_path / "plain.pt")


def test_train_cli_resume_and_wrong_architecture(tmp_path):
    from booktools.data import data_root
    from torchbook.diffusion import train

    root = data_root()
    if not (root / "FashionMNIST").exists():
        pytest.skip("Fashion-MNIST がありません")
    common = ["--data-root", str(root), "--out", str(tmp_path), "--channels", "16,32",
              "--threads", "1", "--limit", "64", "--batch-size", "8", "--save-every", "1"]
    first = train.main([*common, "--steps", "2"])
    resumed = train.main([*common, "--steps", "4", "--resume", "--export",
                          str(tmp_path / "ema.pt")])
    assert first["step"] == 2 and resumed["step"] == 4
    model, _, ckpt = load_checkpoint(tmp_path / "ema.pt")
    assert ckpt["step"] == 4 and "model" not in ckpt  # 配布用は EMA の重みだけ
    # 中断して再開しても、中断なしの 4 ステップと同じ重みになる
    straight_dir = tmp_path / "straight"
    straight = [*common[:3], str(straight_dir), *common[4:]]
    train.main([*straight, "--steps", "4", "--export", str(straight_dir / "ema.pt")])
    model_straight, _, _ = load_checkpoint(straight_dir / "ema.pt")
    for a, b in zip(model.state_dict().values(), model_straight.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="別の構造"):
        train.main([*common[:5], "16,64", *common[6:], "--steps", "6", "--resume"])
