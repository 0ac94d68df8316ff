"""torchbook.diffusion.toy: 2 次元の例の閉じた形のスコア、学習、画像と同じサンプラー。"""

from __future__ import annotations

import pytest
import torch
from diffusion_fixtures import tiny_unet

from torchbook.diffusion import sampling, toy
from torchbook.diffusion.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_name("cosine")


@pytest.fixture(scope="module")
def mix() -> toy.GaussianMixture:
    return toy.ring_mixture()


@pytest.fixture(scope="module")
def trained(mix, sched) -> toy.ToyDenoiser:
    torch.set_num_threads(1)
    model, losses = toy.train_toy(mix, sched)  # 本と同じ設定
    assert len(losses) == 2000
    return model


class IdealDenoiser(torch.nn.Module):
    """ε* (閉じた形) を返すだけの「モデル」。サンプラーそのものの正しさを確かめるのに使います。"""

    def __init__(self, mix, sched):
        super().__init__()
        self.mix, self.sched = mix, sched
        self.sample_shape = (2,)
        self.null_class = mix.num_classes
        self.objective = "eps"

    def forward(self, x, t, y=None):
        if y is not None and (y == self.null_class).all():
            y = None
        return toy.analytic_eps(x, t, self.sched, self.mix, y)


def component_mass(mix: toy.GaussianMixture, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """各点を最も近い成分の中心に割り当てた割合 (K,) と、中心から 3 s 以内の点の割合。"""
    d = ((x.double()[:, None, :] - mix.means[None]) ** 2).sum(-1)
    dist, k = d.min(1)
    mass = torch.bincount(k, minlength=len(mix.means)).double() / len(x)
    return mass, (dist.sqrt() < 3 * mix.std).double().mean().item()


@pytest.mark.parametrize("t", [0, 30, 300, 999])
@pytest.mark.parametrize("conditional", [False, True])
def test_score_is_the_gradient_of_log_density(mix, sched, t, conditional):
    g = torch.Generator().manual_seed(t)
    x = (torch.rand(64, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    y = torch.randint(0, mix.num_classes, (64,), generator=g) if conditional else None
    logp = toy.log_prob(x, t, sched, mix, y)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(toy.score(x.detach(), t, sched, mix, y), grad,
                               rtol=1e-9, atol=1e-9)


def test_log_prob_is_a_normalised_density(mix, sched):
    # 格子の上で密度を積分すると 1 (条件付きでも 1)
    s = torch.linspace(-4, 4, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(s, s)
    cell = (s[1] - s[0]) ** 2
    for t, y in [(400, None), (400, 1), (0, None)]:
        yy = None if y is None else torch.full((len(grid),), y)
        total = (toy.log_prob(grid, t, sched, mix, yy).exp().sum() * cell).item()
        assert total == pytest.approx(1.0, abs=1e-3)


def test_analytic_eps_of_one_gaussian(sched):
    # 成分が 1 つなら ε* = σ_t (x - √ᾱ μ) / (ᾱ s² + 1 - ᾱ) (手で書いた式と一致)
    mu, s = torch.tensor([[0.3, -0.5]], dtype=torch.float64), 0.2
    one = toy.GaussianMixture(mu, s, torch.ones(1, dtype=torch.float64), torch.zeros(1).long())
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    t = torch.arange(0, 1000, 100)
    ab = sched.alphas_cumprod[t][:, None]
    expected = (1 - ab).sqrt() * (x.double() - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)
    torch.testing.assert_close(toy.analytic_eps(x, t, sched, one), expected.float())


def test_analytic_eps_minimises_the_training_loss(mix, sched):
    # ε* は E[ε | x_t]: 少しずらした予測 (縮める・伸ばす) より損失が小さい
    g = torch.Generator().manual_seed(3)
    x0, _ = toy.sample_mixture(mix, 20000, g)
    t = torch.randint(0, sched.T, (20000,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ideal = toy.analytic_eps(sched.q_sample(x0, t, eps), t, sched, mix)
    best = ((ideal - eps) ** 2).mean()
    for c in [0.9, 1.1]:
        assert best < ((c * ideal - eps) ** 2).mean()
    assert best < 0.5 * (eps**2).mean()  # 0 を予測するだけの場合の半分より小さい


def test_sample_mixture_statistics(mix):
    x, comp = toy.sample_mixture(mix, 40000, torch.Generator().manual_seed(0))
    assert x.shape == (40000, 2) and x.dtype == torch.float32
    mass = torch.bincount(comp, minlength=8).double() / len(comp)
    torch.testing.assert_close(mass, mix.weights, atol=0.01, rtol=0)
    for k in [0, 3]:
        pts = x[comp == k].double()
        torch.testing.assert_close(pts.mean(0), mix.means[k], atol=0.005, rtol=0)
        assert pts.std(0).tolist() == pytest.approx([mix.std] * 2, rel=0.05)
    assert (x.abs() > 1).any(1).double().mean() < 1e-3  # ほぼすべて画像と同じ [-1, 1] の中


@pytest.mark.parametrize("kw", [{}, {"eta": 0.0}, {"method": "ddpm"}])
def test_sampler_with_ideal_eps_reproduces_the_mixture(mix, sched, kw):
    # 画像と同じ sample() に理想の ε* を入れると、混合の分布がそのまま出てくる
    x = sampling.sample(IdealDenoiser(mix, sched), sched, 1000, seed=0, **kw)
    assert x.shape == (1000, 2)
    mass, near = component_mass(mix, x)
    torch.testing.assert_close(mass, mix.weights, atol=0.035, rtol=0)
    assert near > 0.95


def test_trained_model_beats_baseline_and_approaches_ideal(mix, sched, trained):
    g = torch.Generator().manual_seed(7)
    x0, comp = toy.sample_mixture(mix, 20000, g)
    t = torch.randint(0, sched.T, (20000,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = sched.q_sample(x0, t, eps)
    with torch.no_grad():
        learned = ((trained(x_t, t) - eps) ** 2).mean().item()
    ideal = ((toy.analytic_eps(x_t, t, sched, mix) - eps) ** 2).mean().item()
    zero = (eps**2).mean().item()  # 何も学ばずに 0 を予測した場合
    assert learned < 0.5 * zero
    assert learned - ideal < 0.1 * (zero - ideal)  # 理想までの隔たりの 1 割未満
    err, ref = toy.eps_error(trained, sched, mix, t=300)
    assert err < 0.1 * ref


def test_sampler_on_trained_model_matches_mixture(mix, sched, trained):
    x = sampling.sample(trained, sched, 1000, method="ddpm", seed=0)
    mass, near = component_mass(mix, x)
    torch.testing.assert_close(mass, mix.weights, atol=0.04, rtol=0)
    assert near > 0.9
    # 山の幅: 最も近い中心までの平均距離がデータに近い (1 つの山なら s·√(π/2))
    spread = torch.cdist(x.double(), mix.means).min(1).values.mean().item()
    assert spread == pytest.approx(mix.std * (torch.pi / 2) ** 0.5, rel=0.15)


def test_guidance_selects_the_class(mix, sched, trained):
    y = torch.zeros(1000, dtype=torch.long)
    in_class = mix.labels == 0
    fractions, spreads = [], []
    for s in [0.0, 1.0, 3.0]:
        x = sampling.sample(trained, sched, 1000, y=y, guidance_scale=s, seed=1)
        mass, _ = component_mass(mix, x)
        fractions.append(mass[in_class].sum().item())
        d = torch.cdist(x.double(), mix.means).min(1).values  # いちばん近い中心までの距離
        spreads.append(d.mean().item())
    assert fractions[0] == pytest.approx(0.5, abs=0.08)  # s = 0: クラスなしの生成
    assert fractions[1] > 0.9  # s = 1: ほぼクラス 0 の成分だけ
    assert fractions[2] >= fractions[1] and fractions[2] > 0.97  # s = 3: さらにクラスらしく
    assert spreads[2] < 0.9 * spreads[1]  # 代わりに山が縮む (多様さが減る)


def test_trajectory_and_shape_checks_for_2d(mix, sched):
    model = IdealDenoiser(mix, sched)
    x, traj = sampling.sample_trajectory(model, sched, 50, every=5, method="ddim", steps=10,
                                         eta=0.0)
    assert [t for t, _ in traj] == [1000, 500, 0]
    assert all(p.shape == (50, 2) for _, p in traj)
    torch.testing.assert_close(traj[-1][1], x)
    with pytest.raises(ValueError, match="x_T の形"):
        sampling.sample(model, sched, 4, x_T=torch.zeros(4, 1, 2, 2))


def test_unet_sample_shape_unchanged(sched):
    model = tiny_unet()
    assert model.sample_shape == (1, 32, 32)
    x = sampling.sample(model, sched, 2, method="ddim", steps=2, eta=0.0, seed=0)
    assert x.shape == (2, 1, 32, 32)
    # η = 0 なら x_T だけで決まる: seed 0 から引いた x_T を渡しても同じ画像
    x_T = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampling.sample(model, sched, 2, steps=2, eta=0.0, x_T=x_T), x)


def test_train_toy_is_deterministic_and_refuses_bad_input(mix, sched):
    a, la = toy.train_toy(mix, sched, steps=5, seed=3)
    b, lb = toy.train_toy(mix, sched, steps=5, seed=3)
    assert la == lb
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="steps"):
        toy.train_toy(mix, sched, steps=0)
