"""フローマッチング: 損失の中身、オイラー法とホイン法、チェックポイントの種類、学習途中の見本。"""

from __future__ import annotations

import pytest
import torch
from diffusion_fixtures import fashion_root, tiny_unet

from torchbook.diffusion import losses, sampling, train
from torchbook.diffusion.checkpoint import (
    FLOW_KIND,
    load_checkpoint,
    objective_of,
    read_diffusion,
)
from torchbook.diffusion.schedule import NoiseSchedule


class _Velocity(torch.nn.Module):
    """x_0 が 1 点 (すべて c) のときの正確な速度 v = (x_t - c) / t を返すモデル。"""

    in_channels, image_size, null_class = 1, 32, 10
    sample_shape = (1, 32, 32)
    objective = "flow"

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x, t, y=None):
        tt = (t / sampling.FLOW_TIME_SCALE).view(-1, 1, 1, 1)
        return (x - self.c) / tt


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_flow_sampler_follows_straight_paths(method):
    # x_0 が 1 点なら経路は直線なので、オイラー法でも 1 ステップで正確に x_0 に着く
    out = sampling.sample(_Velocity(0.25), None, 3, method=method, steps=4, seed=0)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


def test_heun_is_second_order_where_euler_is_first():
    # dx/dt = x (速度が位置に比例) を t = 1 → 0 へ: 正解は x(0) = x(1)·e^{-1}
    x1 = torch.ones(1, 1, 32, 32)

    def predict(x, t):
        return x

    def solve(method, steps):
        x, times = x1, sampling.flow_times(steps)
        for i in range(steps):
            x = sampling.flow_step(predict, x, times[i], times[i + 1], method)
        return (x[0, 0, 0, 0] - torch.exp(torch.tensor(-1.0))).abs().item()

    # 最後の一歩がオイラー法なので、ホイン法も steps を倍にして誤差がおよそ 1/2〜1/4
    assert solve("euler", 20) / solve("euler", 40) == pytest.approx(2, rel=0.1)
    assert solve("heun", 20) < solve("euler", 20) / 3


def test_nfe_counts_network_evaluations():
    calls = []

    class Counting(_Velocity):
        def forward(self, x, t, y=None):
            calls.append(1)
            return super().forward(x, t, y)

    for method, steps in [("euler", 5), ("heun", 5)]:
        calls.clear()
        sampling.sample(Counting(0.0), None, 2, method=method, steps=steps)
        assert len(calls) == sampling.nfe(method, steps)
    assert sampling.nfe("ddim", 20) == 20 and sampling.nfe("ddpm", 0, T=1000) == 1000


def test_flow_methods_and_models_must_match():
    sched = NoiseSchedule.from_name("cosine", 10)
    with pytest.raises(ValueError, match="euler"):
        sampling.sample(tiny_unet(), sched, 1, method="euler", steps=2)
    with pytest.raises(ValueError, match="ノイズスケジュール"):
        sampling.sample(tiny_unet(), None, 1, method="ddim", steps=2)


def test_the_model_decides_its_sampler():
    """サンプラーはモデルの objective で決まり、合わない組み合わせは 1 行の ValueError。"""
    sched = NoiseSchedule.from_name("cosine", 10)
    flow_model, ddpm_model = tiny_unet(), tiny_unet()
    flow_model.objective = "flow"
    with pytest.raises(ValueError, match="objective='flow'") as e:  # 以前は DDIM の画像を返した
        sampling.sample(flow_model, sched, 1, method="ddim", steps=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="objective='flow'.*sched=None"):
        sampling.sample(flow_model, sched, 1, method="heun", steps=2)
    with pytest.raises(ValueError, match="objective='eps'") as e:  # 以前はオイラー法で解いた
        sampling.sample(ddpm_model, None, 1, method="euler", steps=2)
    assert "\n" not in str(e.value)
    # 既定のサンプラーはモデルで決まる: フローなら DEFAULT_FLOW_METHOD (以前は DDIM で失敗)
    x = sampling.sample(flow_model, None, 2, steps=3, seed=1)
    want = sampling.sample(flow_model, None, 2, steps=3, seed=1,
                           method=sampling.DEFAULT_FLOW_METHOD)
    torch.testing.assert_close(x, want)
    assert x.shape == (2, 1, 32, 32)
    assert sampling.default_method("eps") == sampling.DEFAULT_METHOD
    bare = torch.nn.Linear(2, 2)  # objective を持たないモデルは推測せずに止める
    with pytest.raises(ValueError, match="model.objective"):
        sampling.sample(bare, sched, 1)


def test_flow_loss_targets_the_velocity():
    # モデルが正しい速度 ε - x_0 を返せば損失は 0 になる (x_0 がすべて 0 なら v = x_t / t)
    model = _Velocity(0.0)
    x0 = torch.zeros(16, 1, 32, 32)
    loss = losses.flow_matching_loss(model, x0, torch.zeros(16, dtype=torch.long), 0.0,
                                    torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    loss_wrong = losses.flow_matching_loss(_Velocity(0.5), x0, torch.zeros(16, dtype=torch.long),
                                          0.0, torch.Generator().manual_seed(0))
    assert loss_wrong.item() > 0.1


def test_logit_normal_time_sampling_favours_the_middle():
    seen = []

    class Recording(_Velocity):
        def forward(self, x, t, y=None):
            seen.append(t / sampling.FLOW_TIME_SCALE)
            return super().forward(x, t, y)

    x0 = torch.zeros(4000, 1, 2, 2)
    for mode in ["uniform", "logit-normal"]:
        losses.flow_matching_loss(Recording(0.0), x0, torch.zeros(4000, dtype=torch.long), 0.0,
                                 torch.Generator().manual_seed(0), mode)
    uniform, logit = seen
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()  # noqa: E731
    assert middle(uniform) == pytest.approx(0.5, abs=0.03)
    assert middle(logit) > 0.6  # sigmoid(N(0,1)) の中ほど: P(|z| < log 3) ≈ 0.73
    with pytest.raises(ValueError, match="time_sampling"):
        losses.flow_matching_loss(Recording(0.0), x0, torch.zeros(4000, dtype=torch.long), 0.0,
                                 None, "cosine")


def _common(out) -> list[str]:
    return ["--data-root", str(fashion_root()), "--out", str(out), "--channels", "16,32",
            "--threads", "1", "--limit", "64", "--batch-size", "8", "--save-every", "2",
            "--device", "cpu", "--objective", "flow", "--no-bf16"]


def test_flow_training_exports_a_flow_checkpoint_with_previews(tmp_path):
    train.main([*_common(tmp_path), "--steps", "4", "--export", str(tmp_path / "ema.pt")])
    model, sched, ckpt = load_checkpoint(tmp_path / "ema.pt")
    assert sched is None and ckpt["kind"] == FLOW_KIND and objective_of(ckpt) == "flow"
    assert sorted(ckpt["previews"]) == [2, 4]
    img = ckpt["previews"][4]
    assert img.dtype == torch.uint8 and img.shape == (10, 1, 32, 32)
    # 見本は決まったノイズから作るので、同じ重みなら同じ画像になる
    # (学習中は channels_last なので、丸めの境目で 1 階調ずれることだけは許す)
    again = train.preview(model, None, torch.device("cpu"))
    assert (again.int() - img.int()).abs().max() <= 1
    assert ckpt["extra"]["cpu_seconds"] > 0
    out = sampling.sample(model, sched, 2, method="heun", steps=2)
    assert out.shape == (2, 1, 32, 32)


def test_resume_refuses_another_objective(tmp_path, capsys):
    train.main([*_common(tmp_path), "--steps", "2"])
    assert objective_of(read_diffusion(tmp_path / "last.pt")) == "flow"
    eps_args = [a for a in _common(tmp_path) if a not in ("--objective", "flow", "--no-bf16")]
    with pytest.raises(SystemExit) as e:
        train.main([*eps_args, "--steps", "2", "--resume"])
    assert e.value.code == 2 and "--objective flow (保存) → eps (指定)" in capsys.readouterr().err
