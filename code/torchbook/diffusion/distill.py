"""段階的蒸留 (progressive distillation): 教師の 2 ステップを、生徒が 1 ステップで進みます。

Salimans, Ho (2022) "Progressive Distillation for Fast Sampling of Diffusion Models" の手順を、
フローマッチングのモデル (速度 v を予測) とオイラー法に当てはめたものです。

1. 教師 (学習済みのモデル) の ODE を、幅 Δ のオイラー法 2N ステップで解き、経路の点を
   1 つおきに残します (``teacher_trajectories``)。経路上で隣り合う 2 点は、教師が 2 ステップで
   進む始点と終点です。
2. 生徒 (教師の写し、同じネットワーク) は、始点から幅 2Δ の 1 ステップで、その終点に
   着くように学びます (``distill_round``)。生徒のステップ数は N、つまり半分です。
3. 学んだ生徒を次の教師にして繰り返すと、ステップ数は 16 → 8 → 4 → 2 → 1 と半分ずつ
   減ります (``progressive_distillation``)。

フローの向きは本書の約束どおり t = 1 がノイズ、t = 0 が画像です。形は (N, D) の点でも
(N, C, H, W) の画像 (潜在変数) でも同じように扱います。
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import optimizer_step
from .losses import FLOW_TIME_SCALE
from .reflow import noise_and_labels
from .sampling import flow_step, sample_trajectory


def _check_flow(model: nn.Module) -> None:
    """フローマッチングのモデル (速度 v を予測) でなければ 1 行の ValueError。"""
    if getattr(model, "objective", None) != "flow":
        raise ValueError("段階的蒸留にはフローマッチングのモデル (objective='flow') が要ります "
                         f"(受け取ったのは {getattr(model, 'objective', None)!r})")


@torch.no_grad()
def teacher_trajectories(teacher: nn.Module, n: int, teacher_steps: int, seed: int = 0,
                         conditional: bool | None = None, guidance_scale: float = 1.0,
                         batch_size: int = 500, device: str | torch.device = "cpu",
                         ) -> tuple[list[float], torch.Tensor, torch.Tensor | None]:
    """教師の ODE をオイラー法 teacher_steps ステップで解き、2 ステップごとの点を返します。

    (時刻 times (K+1 個)、点 xs (K+1, n, ...)、クラス y) を返します (K = teacher_steps / 2)。
    xs[k + 1] は、xs[k] から教師が 2 ステップ進んだ点です。ノイズとクラス (一様) は
    seed から引きます。conditional は、クラスを渡すか (None: モデルにクラスがあれば渡す)。
    guidance_scale は教師のガイダンスです (生徒はガイダンス込みの速度をクラス y で学びます)。
    """
    _check_flow(teacher)
    if n < 1 or batch_size < 1 or teacher_steps < 2 or teacher_steps % 2:
        raise ValueError(f"n・batch_size は 1 以上、teacher_steps は 2 以上の偶数にしてください "
                         f"({n}, {batch_size}, {teacher_steps})")
    noise, y = noise_and_labels(teacher, n, seed, conditional)
    parts = []
    for i in range(0, n, batch_size):
        yb = y[i : i + batch_size] if y is not None else None
        _, traj = sample_trajectory(teacher, None, len(noise[i : i + batch_size]), every=2,
                                    method="euler", steps=teacher_steps, y=yb,
                                    guidance_scale=guidance_scale,
                                    x_T=noise[i : i + batch_size], device=device)
        parts.append(torch.stack([x.float() for _, x in traj]))
    times = [t for t, _ in traj]
    return times, torch.cat(parts, dim=1), y


def distill_round(teacher: nn.Module, n_student_steps: int, n: int = 4000, train_steps: int = 500,
                  batch_size: int = 512, lr: float = 1e-3, seed: int = 0,
                  conditional: bool | None = None, guidance_scale: float = 1.0,
                  device: str | torch.device = "cpu") -> tuple[nn.Module, list[float]]:
    """蒸留の 1 回。教師の 2n_student_steps ステップを n_student_steps ステップで進む生徒を
    作り、(生徒 (eval モード), ステップごとの損失) を返します。教師は変えません。

    生徒は教師の写しから始めます。経路の点 x (時刻 t) と、教師が 2 ステップ進んだ点
    x_2 (時刻 t - 2Δ) の組から、生徒の 1 ステップ x + (t_next - t)·v が x_2 に着く速度
    v* = (x_2 - x) / (t_next - t) を目標にし、‖v_θ(x, t) - v*‖² で学びます。
    学習率はコサインで 0 まで下げます。
    """
    if n_student_steps < 1 or train_steps < 1:
        raise ValueError(f"n_student_steps と train_steps は 1 以上にしてください "
                         f"({n_student_steps}, {train_steps})")
    times, xs, y = teacher_trajectories(teacher, n, 2 * n_student_steps, seed, conditional,
                                        guidance_scale, device=device)
    xs, t = xs.to(device), torch.tensor(times, device=device)
    y = y.to(device) if y is not None else None
    student = copy.deepcopy(teacher).train()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, train_steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(train_steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen).to(device)
        k = torch.randint(0, n_student_steps, (batch_size,), generator=gen).to(device)
        x, x_2 = xs[k, idx], xs[k + 1, idx]  # 教師の 2 ステップの始点と終点
        dt = (t[k + 1] - t[k]).view(-1, *[1] * (x.dim() - 1))  # -2Δ (点でも画像でも)
        target = (x_2 - x) / dt  # 1 ステップで x_2 に着く速度
        yb = y[idx] if y is not None else None
        loss = F.mse_loss(student(x, t[k] * FLOW_TIME_SCALE, yb).float(), target)
        losses.append(optimizer_step(student, opt, loss))
        lr_sched.step()
    return student.eval(), losses


def progressive_distillation(model: nn.Module, start_steps: int = 16, end_steps: int = 1,
                             **options) -> dict[int, nn.Module]:
    """蒸留を繰り返し、ステップ数を start_steps から end_steps まで半分ずつ減らします。

    {ステップ数: そのステップ数で使う生徒} を返します (start_steps には元のモデル)。
    各回の生徒が次の回の教師です。回ごとに経路のノイズを変えます (回 r は seed + r)。
    options は ``distill_round`` に渡します。
    """
    _check_flow(model)
    seed = options.pop("seed", 0)
    steps = start_steps
    while steps > end_steps and steps % 2 == 0:
        steps //= 2
    if end_steps < 1 or steps != end_steps or start_steps == end_steps:
        raise ValueError(f"start_steps ({start_steps}) は end_steps ({end_steps}) の 2 倍・4 倍・"
                         "8 倍…にしてください (end_steps は 1 以上)")
    models = {start_steps: model}
    steps, r = start_steps, 0
    while steps > end_steps:
        steps //= 2
        models[steps], _ = distill_round(models[2 * steps], steps, seed=seed + r, **options)
        r += 1
    return models


@torch.no_grad()
def two_step_gap(teacher: nn.Module, student: nn.Module, n_student_steps: int, n: int = 1000,
                 seed: int = 1, conditional: bool | None = None,
                 guidance_scale: float = 1.0) -> float:
    """生徒の 1 ステップ (幅 2Δ) と、教師の 2 ステップ (幅 Δ) の着く先の差 (2 乗平均の平方根)。

    教師の経路の点 (ノイズとクラスは seed から) を始点にし、生徒の全ステップで平均します。
    蒸留の前 (生徒 = 教師) なら、オイラー法の幅を倍にしたときの誤差です。
    conditional と guidance_scale は ``teacher_trajectories`` と同じです。
    """
    _check_flow(student)
    times, xs, y = teacher_trajectories(teacher, n, 2 * n_student_steps, seed, conditional,
                                        guidance_scale)

    def predict(x: torch.Tensor, t: float) -> torch.Tensor:  # 生徒はガイダンスなしで呼ぶ
        return student(x, torch.full((n,), t * FLOW_TIME_SCALE), y).float()

    sq = [(flow_step(predict, xs[k], times[k], times[k + 1]) - xs[k + 1]).pow(2).mean()
          for k in range(n_student_steps)]
    return torch.stack(sq).mean().sqrt().item()
