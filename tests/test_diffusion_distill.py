"""torchbook.diffusion.distill: 段階的蒸留 (教師の 2 ステップを生徒の 1 ステップに)。"""

from __future__ import annotations

import pytest
import torch
from diffusion_fixtures import tiny_unet

from torchbook.diffusion import distill, sampling, toy
from torchbook.diffusion.losses import FLOW_TIME_SCALE


class _LinearField(torch.nn.Module):
    """学習できる速度の場 v(x, t) = a·x + b (時刻によらない)。クラスはありません。"""

    sample_shape = (2,)
    objective = "flow"

    def __init__(self, a: float, b: tuple[float, float]) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, x, t, y=None):
        return self.a * x + self.b


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_linear_field_student_takes_the_two_teacher_steps_exactly():
    # 幅 h のオイラー法 2 ステップ: x_2 = (1+ah)² x + (2+ah) h b。幅 2h の 1 ステップで同じ点に
    # 着く場は a' = a + a²h/2、b' = (1 + ah/2) b (教師 4 ステップ → 生徒 2 ステップなら h = -1/4)
    a, b, h = 1.0, (0.3, -0.2), -1 / 4
    teacher = _LinearField(a, b)
    before = _params(teacher)
    student, losses = distill.distill_round(teacher, 2, n=256, train_steps=400, batch_size=64,
                                            lr=0.05)
    assert student.a.item() == pytest.approx(a + a * a * h / 2, abs=2e-3)
    torch.testing.assert_close(student.b.detach(), (1 + a * h / 2) * torch.tensor(b),
                               atol=2e-3, rtol=0)
    assert losses[-1] < 1e-4 < losses[0]
    for p, q in zip(before, teacher.parameters(), strict=True):  # 教師は変わらない
        torch.testing.assert_close(p, q.detach())
    assert distill.two_step_gap(teacher, student, 2, n=200) < 1e-3 < distill.two_step_gap(
        teacher, teacher, 2, n=200)


def test_constant_field_is_reproduced():
    # 一定の速度ならオイラー法は厳密: 2 ステップも幅 2 倍の 1 ステップも同じ点に着く
    teacher = _LinearField(0.0, (0.5, 0.25))
    student, losses = distill.distill_round(teacher, 1, n=64, train_steps=20, batch_size=32)
    assert losses[0] < 1e-12  # 目標の速度は教師の場そのもの (更新の前の損失が 0)
    for p, q in zip(teacher.parameters(), student.parameters(), strict=True):
        # Adam は 0 に近い勾配でも 1 回に lr ほど動くので、20 回 × 1e-3 の範囲で同じ
        torch.testing.assert_close(p, q, atol=0.02, rtol=0)
    assert distill.two_step_gap(teacher, teacher, 1, n=50) < 1e-6


def test_trajectory_points_are_two_teacher_steps_apart_with_guidance():
    torch.manual_seed(0)
    teacher = toy.ToyDenoiser(hidden=8, objective="flow").eval()
    times, xs, y = distill.teacher_trajectories(teacher, 5, 4, seed=3, guidance_scale=2.0,
                                                batch_size=2)
    assert times == [1.0, 0.5, 0.0] and xs.shape == (3, 5, 2) and y.shape == (5,)
    again = distill.teacher_trajectories(teacher, 5, 4, seed=3, guidance_scale=2.0, batch_size=5)
    torch.testing.assert_close(again[1], xs)  # バッチの分け方によらない

    def predict(x, t):
        return sampling.guided_eps(teacher, x, torch.full((5,), t * FLOW_TIME_SCALE), y, 2.0)

    for k in range(2):  # xs[k + 1] は xs[k] から教師 (ガイダンス込み) が 2 ステップ進んだ点
        x = xs[k]
        for t, t_next in [(times[k], (times[k] + times[k + 1]) / 2),
                          ((times[k] + times[k + 1]) / 2, times[k + 1])]:
            x = sampling.flow_step(predict, x, t, t_next)
        torch.testing.assert_close(x, xs[k + 1], atol=1e-5, rtol=1e-5)
    _, _, none = distill.teacher_trajectories(teacher, 5, 2, conditional=False)
    assert none is None


def test_one_round_on_the_toy_shrinks_the_two_step_gap():
    teacher, _ = toy.train_toy(toy.ring_mixture(), None, steps=300, hidden=32)
    before = _params(teacher)
    student, _ = distill.distill_round(teacher, 2, n=1000, train_steps=200, batch_size=256,
                                       conditional=False)
    gap_before = distill.two_step_gap(teacher, teacher, 2, n=500)
    gap_after = distill.two_step_gap(teacher, student, 2, n=500)
    assert gap_after < 0.5 * gap_before
    for p, q in zip(before, teacher.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach())


def test_eps_models_are_refused_with_one_line():
    eps_model = toy.ToyDenoiser(hidden=8, objective="eps")
    calls = [lambda: distill.distill_round(eps_model, 1),
             lambda: distill.teacher_trajectories(eps_model, 4, 2),
             lambda: distill.progressive_distillation(eps_model, 4, 1),
             lambda: distill.two_step_gap(eps_model, eps_model, 1)]
    for call in calls:
        with pytest.raises(ValueError, match="objective='flow'") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(("start", "end"), [(12, 1), (4, 4), (2, 4), (4, 0)])
def test_bad_step_counts_are_refused(start, end):
    model = toy.ToyDenoiser(hidden=8, objective="flow")
    with pytest.raises(ValueError, match="start_steps"):
        distill.progressive_distillation(model, start, end)


def test_progressive_rounds_halve_the_steps():
    torch.manual_seed(0)
    model = toy.ToyDenoiser(hidden=8, objective="flow").eval()
    models = distill.progressive_distillation(model, 8, 1, n=32, train_steps=2, batch_size=8)
    assert sorted(models) == [1, 2, 4, 8] and models[8] is model
    assert all(not m.training for m in models.values())
    assert not torch.equal(models[1].out.weight, model.out.weight)


def test_images_conditional_with_guidance():
    unet = tiny_unet()  # 出力の層も乱数 (0 なら教師の経路が動かない)
    unet.objective = "flow"  # 同じ UNet で速度を予測させる
    times, xs, y = distill.teacher_trajectories(unet, 3, 2, guidance_scale=2.0)
    assert len(times) == 2 and xs.shape == (2, 3, 1, 32, 32) and y.shape == (3,)
    student, losses = distill.distill_round(unet, 1, n=3, train_steps=2, batch_size=2, lr=1e-2,
                                            guidance_scale=2.0)
    assert len(losses) == 2 and type(student) is type(unet) and student is not unet
    assert not torch.equal(student.conv_out.weight, unet.conv_out.weight)
    out = sampling.sample(student, None, 3, y=y, method="euler", steps=1)
    assert out.shape == (3, 1, 32, 32)
    assert distill.two_step_gap(unet, student, 1, n=2, guidance_scale=2.0) > 0
