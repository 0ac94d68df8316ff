"""torchbook.diffusion.reflow: ODE で作る組、直線性の物差し、組での学び直し (2 次元の例)。"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from diffusion_fixtures import tiny_unet

from torchbook.diffusion import losses, make_pairs, reflow, sampling, toy, train
from torchbook.diffusion.checkpoint import (
    FLOW_KIND,
    load_checkpoint,
    read_diffusion,
    save_checkpoint,
)
from torchbook.diffusion.schedule import NoiseSchedule
from torchbook.diffusion.training import EMA


class _Field(torch.nn.Module):
    """式で決めた速度の場 v(x, t) を返す 2 次元の「フローのモデル」。"""

    sample_shape = (2,)
    objective = "flow"
    null_class = 2

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x, t, y=None):
        if self.kind == "constant":  # どの点も同じ向き・同じ速さ: 経路は直線で速度も一定
            return torch.tensor([0.3, -0.2]).expand_as(x)
        if self.kind == "radial":  # dx/dt = x: 原点からの半直線上を進む (向きは一定、速さは変わる)
            return x
        return torch.stack([-x[:, 1], x[:, 0]], dim=1)  # 回転: 円弧を描く


@pytest.fixture(scope="module")
def mix() -> toy.GaussianMixture:
    return toy.ring_mixture()


def test_pairs_are_deterministic_and_carry_labels():
    torch.manual_seed(0)
    model = toy.ToyDenoiser(hidden=8, objective="flow").eval()
    a = reflow.reflow_pairs(model, 7, steps=3, seed=5, batch_size=3)
    b = reflow.reflow_pairs(model, 7, steps=3, seed=5, batch_size=7)  # バッチの分け方によらない
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q)
    noise, data, y = a
    assert noise.shape == data.shape == (7, 2) and y.shape == (7,)
    assert set(y.tolist()) <= {0, 1}
    c = reflow.reflow_pairs(model, 7, steps=3, seed=6)
    assert not torch.equal(c[0], noise)
    # 組の標本は、同じノイズ・同じクラスから sample() で解いた ODE の終点そのもの
    _, traj = sampling.sample_trajectory(model, None, 7, y=y, method="heun", steps=3, x_T=noise)
    torch.testing.assert_close(data, traj[-1][1])
    _, _, y_none = reflow.reflow_pairs(model, 4, steps=2, conditional=False)
    assert y_none is None


def test_pairs_are_the_exact_ode_endpoint_for_a_known_field():
    # 速度が一定 c なら、t = 1 のノイズから t = 0 までで x_0 = ε - c (切り詰めない)
    noise, data, _ = reflow.reflow_pairs(_Field("constant"), 5, steps=4, method="euler",
                                         conditional=False)
    torch.testing.assert_close(data, noise - torch.tensor([0.3, -0.2]))


def test_pairs_refuse_eps_models_and_bad_sizes():
    with pytest.raises(ValueError, match="objective='flow'"):
        reflow.reflow_pairs(toy.ToyDenoiser(hidden=8), 4)
    with pytest.raises(ValueError, match="1 以上"):
        reflow.reflow_pairs(_Field("constant"), 0)


@pytest.mark.parametrize(("kind", "zero_s", "unit_ratio"),
                         [("constant", True, True), ("radial", False, True),
                          ("rotate", False, False)])
def test_straightness_measures(kind, zero_s, unit_ratio):
    s, ratio = reflow.measure_straightness(_Field(kind), n=50, steps=40)
    # 一定の速度なら S = 0・比 1。半直線は比 1 だが速さが変わるので S > 0。円弧はどちらも曲がる
    assert (s < 1e-10) == zero_s
    assert (abs(ratio - 1) < 1e-6) == unit_ratio
    assert ratio >= 1 - 1e-9


def test_straightness_of_a_known_arc():
    # 半径 1 の円周を 1/4 周: 長さ π/2、弦の長さ √2
    times = torch.linspace(1, 0, 201).tolist()
    angle = torch.linspace(0, math.pi / 2, 201, dtype=torch.float64)
    xs = torch.stack([angle.cos(), angle.sin()], dim=1)[:, None, :]
    _, ratio = reflow.straightness(times, xs)
    assert ratio == pytest.approx((math.pi / 2) / math.sqrt(2), rel=1e-4)
    with pytest.raises(ValueError, match="同じ長さ"):
        reflow.straightness(times[:-1], xs)


def test_flow_loss_with_given_noise_on_points():
    # 決まった組 (x_0, ε) なら、正確な速度 ε - x_0 を返すモデルの損失は 0 (2 次元の点でも)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))

    class Exact(torch.nn.Module):
        null_class = 2

        def forward(self, x, t, y=None):
            tt = (t / losses.FLOW_TIME_SCALE)[:, None]
            return (x - x0) / tt  # x_t = x_0 + t(ε - x_0) から ε - x_0 を戻す

    loss = losses.flow_matching_loss(Exact(), x0, torch.zeros(6, dtype=torch.long), 0.0,
                                     torch.Generator().manual_seed(2), noise=eps)
    assert loss.item() < 1e-8
    with pytest.raises(ValueError, match="noise の形"):
        losses.flow_matching_loss(Exact(), x0, torch.zeros(6, dtype=torch.long), noise=eps[:3])


def test_train_toy_flow_variant(mix):
    a, la = toy.train_toy(mix, None, steps=5, seed=3, hidden=8)
    b, lb = toy.train_toy(mix, None, steps=5, seed=3, hidden=8)
    assert a.objective == "flow" and la == lb
    eps_model, _ = toy.train_toy(mix, NoiseSchedule.from_name("cosine"), steps=2, hidden=8)
    assert eps_model.objective == "eps"
    with pytest.raises(ValueError, match="objective"):
        toy.ToyDenoiser(objective="v")


def test_reflow_straightens_the_toy_flow(mix):
    torch.set_num_threads(1)
    model, _ = toy.train_toy(mix, None, steps=400, batch_size=256, hidden=32)
    before = reflow.measure_straightness(model, n=300, steps=40)
    noise, data, _ = reflow.reflow_pairs(model, 2000, steps=20, method="euler", conditional=False,
                                         batch_size=2000)
    student = copy.deepcopy(model)
    ft = reflow.fine_tune_on_pairs(student, noise, data, steps=300, batch_size=256)
    after = reflow.measure_straightness(student, n=300, steps=40)
    assert after[0] < 0.5 * before[0]
    assert after[1] < before[1]
    assert ft[-1] < ft[0]
    # 元のモデルは変わらない (学び直すのは写し)
    assert reflow.measure_straightness(model, n=300, steps=40) == before
    with pytest.raises(ValueError, match="形が違います"):
        reflow.fine_tune_on_pairs(student, noise, data[:5])


def test_sliced_wasserstein(mix):
    a = toy.sample_mixture(mix, 500, torch.Generator().manual_seed(0))[0]
    assert toy.sliced_wasserstein(a, a) == 0.0
    shift = torch.tensor([0.3, 0.4])  # 長さ 0.5 のずれ: 射影の 2 乗平均は 0.5² / 2
    assert toy.sliced_wasserstein(a, a + shift, n_proj=4000) == pytest.approx(0.5 / math.sqrt(2),
                                                                              rel=0.05)
    with pytest.raises(ValueError, match="同じ"):
        toy.sliced_wasserstein(a, a[:10])


# ---------------------------------------------------------------- CLI (reflow と train --pairs)


def _save_tiny(path, objective: str = "flow", seed: int = 0) -> None:
    """小さな UNet (16, 32) を配布用のチェックポイントとして保存します。"""
    model = tiny_unet(seed)
    model.objective = objective
    save_checkpoint(path, model, EMA(model, 0.9), "flow" if objective == "flow" else "cosine",
                    1000, ema_only=True, objective=objective)


def _reflow_args(tmp_path, out="pairs.pt", *extra) -> list[str]:
    return ["--checkpoint", str(tmp_path / "flow.pt"), "--out", str(tmp_path / out), "--n", "5",
            "--steps", "2", "--batch-size", "3", "--threads", "1", "--device", "cpu",
            "--no-bf16", *extra]


def test_reflow_cli_writes_deterministic_pairs_with_provenance(tmp_path):
    _save_tiny(tmp_path / "flow.pt")
    info = make_pairs.main(_reflow_args(tmp_path))
    pairs = reflow.read_pairs(tmp_path / "pairs.pt")
    assert pairs["noise"].shape == pairs["data"].shape == (5, 1, 32, 32)
    assert pairs["y"].shape == (5,)
    prov = json.loads((tmp_path / "pairs.json").read_text())["reflow_pairs"]
    assert prov["n"] == 5 and prov["method"] == "heun" and prov["steps"] == 2
    assert prov == info and prov["command"].startswith("python -m torchbook.diffusion.make_pairs")
    make_pairs.main(_reflow_args(tmp_path, "again.pt"))
    again = reflow.read_pairs(tmp_path / "again.pt")
    for k in ("noise", "data", "y"):
        torch.testing.assert_close(again[k], pairs[k])
    # 組の画像は、同じモデルで同じノイズから解いた ODE の終点
    model, _, _ = load_checkpoint(tmp_path / "flow.pt")
    _, traj = sampling.sample_trajectory(model, None, 5, y=pairs["y"], steps=2,
                                         x_T=pairs["noise"])
    torch.testing.assert_close(pairs["data"], traj[-1][1])


def test_reflow_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    _save_tiny(tmp_path / "flow.pt")
    _save_tiny(tmp_path / "eps.pt", objective="eps")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "taken.pt").write_bytes(b"x")
    cases = [
        (["--n", "0"], "--n"),
        (["--steps", "-1"], "--steps"),
        (["--method", "ddim"], "--method"),
        (["--checkpoint", str(tmp_path / "eps.pt")], "torchbook-ddpm-v1"),
        (["--checkpoint", str(tmp_path / "text.pt")], "読めません"),
        (["--checkpoint", str(tmp_path / "none.pt")], "ありません"),
        (["--out", str(tmp_path / "taken.pt")], "--force"),
        (["--out", str(tmp_path / "pairs.txt")], ".pt"),
    ]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as e:
            make_pairs.main([*_reflow_args(tmp_path), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and needle in err[-1] and "Traceback" not in "".join(err), err
    assert not (tmp_path / "pairs.pt").exists()
    assert (tmp_path / "taken.pt").read_bytes() == b"x"


def _train_args(tmp_path, *extra) -> list[str]:
    return ["--init", str(tmp_path / "flow.pt"), "--pairs", str(tmp_path / "pairs.pt"),
            "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
            "--channels", "16,32", "--threads", "1", "--device", "cpu", "--no-bf16",
            "--warmup", "1", *extra]


def test_train_fine_tunes_from_a_flow_checkpoint_on_pairs(tmp_path, capsys):
    _save_tiny(tmp_path / "flow.pt")
    make_pairs.main(_reflow_args(tmp_path))
    train.main(_train_args(tmp_path, "--lr", "1e-9"))
    last = read_diffusion(tmp_path / "run" / "last.pt")
    assert last["kind"] == FLOW_KIND
    assert last["config"]["init"] == str(tmp_path / "flow.pt")
    assert last["config"]["pairs"] == str(tmp_path / "pairs.pt")
    # 学習率がほぼ 0 なので、重みは --init のまま (乱数の初期値からではない)
    init = read_diffusion(tmp_path / "flow.pt")["ema"]
    for name, w in last["model"].items():
        torch.testing.assert_close(w, init[name], rtol=0, atol=1e-6)
    capsys.readouterr()
    # --resume は --pairs と --init も比べる
    _save_tiny(tmp_path / "other.pt", seed=1)
    with pytest.raises(SystemExit) as e:
        train.parse_args([*_train_args(tmp_path, "--lr", "1e-9", "--resume")[:1],
                          str(tmp_path / "other.pt"),
                          *_train_args(tmp_path, "--lr", "1e-9", "--resume")[2:]])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "--init" in err and "(保存)" in err, err


def test_train_refuses_bad_reflow_options_in_one_line(tmp_path, capsys):
    _save_tiny(tmp_path / "flow.pt")
    _save_tiny(tmp_path / "eps.pt", objective="eps")
    make_pairs.main(_reflow_args(tmp_path))
    cases = [
        (["--objective", "eps"], "--objective eps"),
        (["--init", str(tmp_path / "eps.pt")], "torchbook-ddpm-v1"),
        (["--init", str(tmp_path / "none.pt")], "ありません"),
        (["--pairs", str(tmp_path / "flow.pt")], "torchbook-flow-v1"),
        (["--channels", "16,64"], "--channels 16,32"),
    ]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as e:
            train.parse_args([*_train_args(tmp_path), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and needle in err[-1] and "Traceback" not in "".join(err), err
    assert not (tmp_path / "run" / "last.pt").exists()
