"""torchbook.diffusion.schedule: スケジュールの恒等式、float64 の係数、diffusers との一致。"""

from __future__ import annotations

import math

import pytest
import torch

from torchbook.diffusion.algorithms import ddpm_step
from torchbook.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_identities(name):
    s = NoiseSchedule.from_name(name)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    assert s.alphas_cumprod_prev[0] == 1  # 最後の一歩は ᾱ = 1 (ノイズなし) へ
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.posterior_variance[0] == 0
    assert (s.posterior_variance[1:] < s.betas[1:]).all()
    assert (s.alphas_cumprod.diff() < 0).all()
    assert s.alphas_cumprod[-1].sqrt() < 0.01  # x_T はほぼ純粋なノイズ


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_coefficients_are_float64_and_exact_at_t0(name):
    s = NoiseSchedule.from_name(name)
    for v in (s.betas, s.alphas_cumprod, s.posterior_variance, s.posterior_mean_coef_x0):
        assert v.dtype == torch.float64
    # t = 0 の事後平均は x_0 そのもの: c0 = 1、ct = 0 (float32 では c0 = 0.99947 だった)
    # 1 - ᾱ_0 ≈ 1e-4 の桁落ちで float64 の丸め誤差 (2e-16) が 1e4 倍ほどに増えるだけ
    assert abs(s.posterior_mean_coef_x0[0].item() - 1) < 1e-11
    assert s.posterior_mean_coef_xt[0].item() == 0
    x0, xt = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(s.posterior_mean(x0, xt, torch.tensor([0, 0])), x0,
                               rtol=0, atol=1e-6)


def test_float32_arithmetic_would_miss_one_at_t0():
    """float32 で同じ式を計算すると t = 0 の係数が 1 から目に見えてずれる (float64 にした理由)。"""
    b = linear_betas().float()
    ac = torch.cumprod(1 - b, 0)
    c0_float32 = (b[0] / (1 - ac[0])).item()
    assert abs(c0_float32 - 1) > 1e-4


def test_schedule_endpoints_and_errors():
    assert linear_betas()[0].item() == pytest.approx(1e-4)
    assert linear_betas()[-1].item() == pytest.approx(0.02)
    assert cosine_betas().max().item() <= 0.999
    article_betas = torch.linspace(0.001, 0.01, 1000)
    # 入門記事「ちょい調べた!拡散モデルとは?【実装編】」の β では √ᾱ_T が 0 から遠い
    assert NoiseSchedule(article_betas).alphas_cumprod[-1].sqrt() > 0.05
    with pytest.raises(ValueError, match="linear"):
        NoiseSchedule.from_name("quadratic")
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="T は 1 以上"):
        NoiseSchedule.from_name("cosine", 0)


def test_q_sample_mean_and_variance():
    s = NoiseSchedule.from_name("linear")
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.full((n, 1, 2, 2), 0.7)
    for t in [0, 250, 999]:
        tt = torch.full((n,), t)
        xt = s.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        assert xt.dtype == torch.float32
        ac = s.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(ac) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ac, abs=0.02 + 0.03 * (1 - ac))


def diffusers_ddpm(betas):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMScheduler(
        num_train_timesteps=len(betas), trained_betas=betas.numpy(), clip_sample=True,
        clip_sample_range=1.0, prediction_type="epsilon", variance_type="fixed_small")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_and_ddpm_step_match_diffusers(name):
    s = NoiseSchedule.from_name(name)
    ddpm = diffusers_ddpm(s.betas)
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
        # 誤差が出ます (こちらは float64 で計算しています)
        tol = 1e-5 if step >= 100 else 1e-3
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name, one_minus_abar0, c0_error", [("cosine", 4.1e-5, 5e-4),
                                                              ("linear", 1e-4, 2e-4)])
def test_float32_note_in_the_docstring(name, one_minus_abar0, c0_error):
    """NoiseSchedule の説明の数 (float32 で計算したときの t = 0 の c0 のずれ) を確かめる。"""
    s = NoiseSchedule.from_name(name)
    b = s.betas.float()
    ac = torch.cumprod(1 - b, 0)
    c0 = torch.cat([torch.ones(1), ac[:-1]]).sqrt() * b / (1 - ac)
    assert (1 - s.alphas_cumprod[0]).item() == pytest.approx(one_minus_abar0, rel=0.05)
    assert abs(c0[0].item() - 1) == pytest.approx(c0_error, rel=0.2)
    assert s.posterior_mean_coef_x0[0].item() == pytest.approx(1.0, abs=1e-12)  # float64
