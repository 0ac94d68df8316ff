"""Ho et al. (2020) の Algorithm 1・2 (algorithms.py) が、学習の CLI・toy・sample() の中身。"""

from __future__ import annotations

import torch
from diffusion_fixtures import tiny_unet

from torchbook.diffusion import algorithms, sampling, toy, train
from torchbook.diffusion.losses import training_loss
from torchbook.diffusion.schedule import NoiseSchedule


def test_train_step_is_one_gradient_step_of_the_simple_loss():
    sched = NoiseSchedule.from_name("cosine", 50)
    a, b = tiny_unet(1).train(), tiny_unet(1).train()
    x0, y = torch.rand(4, 1, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3])
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    loss = algorithms.ddpm_train_step(a, sched, x0, y, opt_a, 0.1,
                                      torch.Generator().manual_seed(3))
    # 同じ乱数で手で 1 歩: 損失 → 勾配 → 更新
    ref = training_loss(b, sched, x0, y, 0.1, torch.Generator().manual_seed(3))
    ref.backward()
    opt_b.step()
    assert loss == ref.item()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_ddpm_sample_equals_algorithm_2_on_images_and_on_the_toy():
    for model, sched in [(tiny_unet(), NoiseSchedule.from_name("cosine", 20)),
                         (toy.ToyDenoiser().eval(), NoiseSchedule.from_name("cosine", 30))]:
        n = 3
        gen = torch.Generator().manual_seed(5)
        shape = (n, *model.sample_shape)

        def randn(shape=shape, gen=gen):
            return torch.randn(shape, generator=gen)

        def predict(x, t, model=model, n=n):
            return model(x, torch.full((n,), t, dtype=torch.long), None)

        x_T = randn()
        ours = algorithms.ddpm_sample_loop(predict, sched, x_T, randn).clamp(-1, 1)
        torch.testing.assert_close(sampling.sample(model, sched, n, method="ddpm", seed=5), ours,
                                   rtol=0, atol=0)


def test_sample_loop_records_paper_times():
    sched = NoiseSchedule.from_name("linear", 10)
    seen = []
    algorithms.ddpm_sample_loop(lambda x, t: torch.zeros_like(x), sched, torch.zeros(2, 2),
                                record=lambda t, x: seen.append(t))
    assert seen == list(range(9, -1, -1))
    _, traj = sampling.sample_trajectory(toy.ToyDenoiser().eval(), sched, 2, every=5,
                                         method="ddpm")
    assert [t for t, _ in traj] == [10, 5, 0]


def test_training_cli_and_toy_call_algorithm_1(monkeypatch):
    """train.main と toy.train_toy は algorithms の関数を呼ぶ (本に載せたコードが動くコード)。"""
    calls = []
    real = algorithms.ddpm_train_step

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "ddpm_train_step", spy)
    monkeypatch.setattr(toy, "ddpm_train_step", spy)
    train.main(["--dry-run", "--device", "cpu", "--channels", "16,32", "--no-bf16"])
    assert len(calls) == 2
    toy.train_toy(toy.ring_mixture(), NoiseSchedule.from_name("cosine", 20), steps=3,
                  batch_size=8)
    assert len(calls) == 5
