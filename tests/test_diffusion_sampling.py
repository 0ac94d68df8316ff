"""torchbook.diffusion.sampling: DDIM の一歩と時刻 (diffusers と一致)、シード、既定値。"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusion_fixtures import tiny_unet

from torchbook.diffusion import sample as sample_cli
from torchbook.diffusion import sampling
from torchbook.diffusion.sampling import ddim_step, ddim_timesteps, sample
from torchbook.diffusion.schedule import NoiseSchedule


def diffusers_ddim(betas, spacing="trailing"):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDIMScheduler(
        num_train_timesteps=len(betas), trained_betas=betas.numpy(), clip_sample=True,
        clip_sample_range=1.0, prediction_type="epsilon", set_alpha_to_one=True,
        steps_offset=0, timestep_spacing=spacing)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(eta, spacing):
    s = NoiseSchedule.from_name("cosine")
    ddim = diffusers_ddim(s.betas, spacing)
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
    ddim = diffusers_ddim(NoiseSchedule.from_name("linear").betas)
    ddim.set_timesteps(steps)
    assert ddim_timesteps(1000, steps) == ddim.timesteps.tolist()


def test_ddim_timesteps_errors():
    assert ddim_timesteps(1000, 10, "leading") == list(range(900, -1, -100))
    assert ddim_timesteps(1000, 10) == list(range(999, 0, -100))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(1000, 10, "uniform")


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
    # seed から引いたノイズを渡せば、seed で生成したのと同じ画像になる (η = 0)
    torch.testing.assert_close(sample(model, s, 2, steps=5, eta=0.0, x_T=x_T),
                               sample(model, s, 2, steps=5, eta=0.0, seed=3))
    # η = 0 では画像が x_T だけで決まる (seed は使われない)
    torch.testing.assert_close(sample(model, s, 2, steps=5, eta=0.0, x_T=x_T, seed=0),
                               sample(model, s, 2, steps=5, eta=0.0, x_T=x_T, seed=9))
    # η = 1 では途中のノイズが seed で変わる
    a = sample(model, s, 2, steps=5, eta=1.0, x_T=x_T, seed=0)
    assert not torch.equal(a, sample(model, s, 2, steps=5, eta=1.0, x_T=x_T, seed=9))
    with pytest.raises(ValueError, match="x_T の形"):
        sample(model, s, 3, steps=5, x_T=x_T)


def test_sample_function_and_cli_share_their_defaults():
    """sample() と sample CLI の既定値は sampling.DEFAULT_* の 1 か所で決まる (η も同じ)。"""
    sig = inspect.signature(sample).parameters
    args = sample_cli.parse_args(["--dry-run"])
    for param, option, const in [("eta", "eta", "DEFAULT_ETA"), ("steps", "steps", "DEFAULT_STEPS"),
                                 ("spacing", "spacing", "DEFAULT_SPACING"),
                                 ("guidance_scale", "guidance", "DEFAULT_GUIDANCE")]:
        assert sig[param].default == getattr(args, option) == getattr(sampling, const), param
    # サンプラーの既定はモデルの種類で決まる: 関数も CLI も同じ default_method
    assert sig["method"].default is None and sample_cli.parse_args(["--dry-run"]).method == (
        sampling.DEFAULT_METHOD)
    assert sample_cli.parse_args(["--dry-run", "--method", "euler"]).method == "euler"
