"""DPM-Solver++(2M): diffusers の DPMSolverMultistepScheduler と 1 ステップずつ一致するか。

本物の UNet の代わりに、x と t の決まった 1 次式を返す偽のモデルで両方を動かし、
同じ x_T から出た途中の x をすべて比べます (diffusers はテストだけの依存です)。
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchbook.diffusion.sampling import (
    ddim_step,
    ddim_timesteps,
    dpm_data_prediction,
    dpm_solver_pp_2m_step,
    nfe,
    sample,
    sample_trajectory,
)
from torchbook.diffusion.schedule import NoiseSchedule

SIZE = 8
NULL = 10


class LinearEps(nn.Module):
    """ε̂(x, t, y) = (x - α_t d) / σ_t、d = a_y + b_y(t) · x (x の 1 次式) を返す偽のモデル。

    こう作るとデータの予測 x̂_0 がちょうど d になります。d は一部が [-1, 1] の外に出るので、
    切り詰め (clip) の有無で結果が変わります。y = NULL (クラスなし) も別の式です。
    """

    in_channels, image_size, null_class = 1, SIZE, NULL
    sample_shape = (1, SIZE, SIZE)
    objective = "eps"

    def __init__(self, sched: NoiseSchedule) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(NULL + 1, 1, SIZE, SIZE, generator=g, dtype=torch.float64) * 0.9
        self.b = torch.linspace(-0.3, 0.3, NULL + 1, dtype=torch.float64)
        self.sched = sched
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        y = torch.full((len(x),), NULL) if y is None else y
        ac = self.sched.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        w = self.b[y].view(-1, 1, 1, 1) * (1 - t.double().view(-1, 1, 1, 1) / self.sched.T)
        d = self.a[y] + w * x.double()
        return ((x.double() - ac.sqrt() * d) / (1 - ac).sqrt()).float()


def diffusers_dpm(sched: NoiseSchedule, clip: bool):
    diffusers = pytest.importorskip("diffusers")
    dpm = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=sched.T, trained_betas=sched.betas.numpy(),
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        prediction_type="epsilon", timestep_spacing="trailing", lower_order_final=True,
        final_sigmas_type="zero", thresholding=clip, sample_max_value=1.0)
    # diffusers は trained_betas を float32 にしてから ᾱ を累積積で作ります。本書は float64 で
    # 作るので、T-1 付近の ᾱ ≈ 2e-9 がわずかにずれ、1/α_t ≈ 2 万倍に拡大されて x が 1e-3 ほど
    # 食い違います (測った値: 5 ステップで 1.5e-3)。比べたいのはソルバーなので同じ ᾱ を渡します
    # (set_timesteps はこの ᾱ から σ を作り、float32 に丸めます。残る差は 2e-6 以下)。
    dpm.alphas_cumprod = sched.alphas_cumprod.clone()
    # thresholding=True, sample_max_value=1.0 は分位点 s を [1, 1] に収めるので、
    # x̂_0 を [-1, 1] に切り詰めるのと同じ計算です (diffusers のコメントにもそうあります)。
    return dpm


def run_diffusers(dpm, model: LinearEps, x_T: torch.Tensor, steps: int, y, s: float):
    """diffusers のスケジューラーを回し、時刻と各ステップ後の x を返します。guidance は手で合成。"""
    dpm.set_timesteps(steps)
    x, xs = x_T.clone(), []
    for t in dpm.timesteps:
        tt = torch.full((len(x),), int(t))
        if y is None:
            eps = model(x, tt, None)
        else:
            eps_c, eps_u = model(x, tt, y), model(x, tt, None)
            eps = eps_u + s * (eps_c - eps_u)
        x = dpm.step(eps, t, x).prev_sample
        xs.append(x)
    return dpm.timesteps.tolist(), xs


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("guidance", [None, 2.5])
def test_dpm_solver_matches_diffusers_step_by_step(steps, clip, guidance):
    sched = NoiseSchedule.from_name("cosine")
    model = LinearEps(sched)
    x_T = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    y = None if guidance is None else torch.tensor([0, 3, 7, 9])
    s = 1.0 if guidance is None else guidance
    times, ref = run_diffusers(diffusers_dpm(sched, clip), model, x_T, steps, y, s)
    # 時刻: diffusers の trailing と本書の ddim_timesteps は同じ番号 (0..T-1) を返す
    assert times == ddim_timesteps(sched.T, steps, "trailing")
    _, traj = sample_trajectory(model, sched, len(x_T), y=y, guidance_scale=s,
                                method="dpm++2m", steps=steps, x_T=x_T, clip=clip)
    ours = [x for _, x in traj[1:]]
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale, msg=f"ステップ {i}")
    if clip:
        assert ours[-1].abs().max() <= 1
    else:
        assert ours[-1].abs().max() > 1  # 切り詰めなければ d の外れ値が残る (比べる意味がある)


def test_comparison_can_fail():
    """2 次の補正を消すと (= 毎回 1 次) diffusers と食い違う: 上の比較は見逃さない。"""
    sched = NoiseSchedule.from_name("cosine")
    model = LinearEps(sched)
    x_T = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    _, ref = run_diffusers(diffusers_dpm(sched, False), model, x_T, 10, None, 1.0)
    times = ddim_timesteps(sched.T, 10)
    x = x_T
    for i, t in enumerate(times):
        eps = model(x, torch.full((2,), t), None)
        x0 = dpm_data_prediction(sched, eps, t, x, clip=False)
        x = dpm_solver_pp_2m_step(sched, x, x0, t, times[i + 1] if i + 1 < 10 else -1)
    assert (x - ref[-1]).abs().max() > 1e-3


def test_first_order_step_is_ddim_eta0():
    """1 次のステップ (前の x̂_0 なし) は DDIM η = 0 と同じ式です。"""
    sched = NoiseSchedule.from_name("cosine")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, SIZE, SIZE, generator=g)
    eps = torch.randn(x.shape, generator=g)
    for clip in (False, True):
        x0 = dpm_data_prediction(sched, eps, 700, x, clip)
        ours = dpm_solver_pp_2m_step(sched, x, x0, 700, 500)
        torch.testing.assert_close(ours, ddim_step(sched, eps, 700, 500, x, 0.0, clip=clip))


def test_guidance_one_is_the_conditional_path():
    sched = NoiseSchedule.from_name("cosine")
    model = LinearEps(sched)
    y = torch.tensor([1, 4])
    a = sample(model, sched, 2, y=y, guidance_scale=1.0, method="dpm++2m", steps=7, seed=5)
    calls = model.calls
    b = sample(model, sched, 2, y=y, guidance_scale=1.0 + 1e-9, method="dpm++2m", steps=7, seed=5)
    c = sample(model, sched, 2, y=y, guidance_scale=2.0, method="dpm++2m", steps=7, seed=5)
    assert calls == 7  # s = 1 は条件付きの予測だけ (1 ステップ 1 回)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().max() > 1e-2
    assert nfe("dpm++2m", 7) == 7


def test_dpm_solver_refuses_flow_and_runs_from_seed():
    sched = NoiseSchedule.from_name("cosine", T=100)
    model = LinearEps(sched)
    a = sample(model, sched, 2, method="dpm++2m", steps=4, seed=3)
    torch.testing.assert_close(a, sample(model, sched, 2, method="dpm++2m", steps=4, seed=3))
    with pytest.raises(ValueError, match="ノイズスケジュール"):
        sample(model, None, 2, method="dpm++2m", steps=4)
