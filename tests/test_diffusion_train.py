"""torchbook.diffusion.train: 損失と EMA、再開、上書きの拒否、中断 (Ctrl-C) で失わないこと。"""

from __future__ import annotations

import json

import pytest
import torch
from diffusion_fixtures import fashion_root, tiny_unet

from torchbook.diffusion import train
from torchbook.diffusion.checkpoint import load_checkpoint, read_diffusion
from torchbook.diffusion.losses import training_loss
from torchbook.diffusion.schedule import NoiseSchedule
from torchbook.diffusion.train import EMA
from torchbook.diffusion.unet import UNet


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


def _common(out) -> list[str]:
    return ["--data-root", str(fashion_root()), "--out", str(out), "--channels", "16,32",
            "--threads", "1", "--limit", "64", "--batch-size", "8", "--save-every", "1",
            "--device", "cpu"]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    common = _common(tmp_path)
    first = train.main([*common, "--steps", "2"])
    resumed = train.main([*common, "--steps", "4", "--resume", "--export",
                          str(tmp_path / "ema.pt")])
    assert first["step"] == 2 and resumed["step"] == 4
    model, _, ckpt = load_checkpoint(tmp_path / "ema.pt")
    assert ckpt["step"] == 4 and "model" not in ckpt
    info = json.loads((tmp_path / "ema.json").read_text())["train"]
    assert info["command"].startswith("python -m torchbook.diffusion.train ")
    assert "--resume" in info["command"]
    straight_dir = tmp_path / "straight"
    train.main([*_common(straight_dir), "--steps", "4", "--export",
                str(straight_dir / "ema.pt")])
    model_straight, _, _ = load_checkpoint(straight_dir / "ema.pt")
    for a, b in zip(model.state_dict().values(), model_straight.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(SystemExit, match="別の構造"):
        train.main([*common[:5], "16,64", *common[6:], "--steps", "6", "--resume"])


def test_refuses_to_overwrite_an_earlier_run(tmp_path, capsys):
    common = _common(tmp_path)
    train.main([*common, "--steps", "1"])
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main([*common, "--steps", "1"])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == before
    train.main([*common, "--steps", "1", "--force", "--seed", "5"])  # 明示すれば上書き
    assert (tmp_path / "last.pt").read_bytes() != before


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--out", str(tmp_path), "--resume"])
    assert e.value.code == 2 and "再開できません" in capsys.readouterr().err


def test_export_never_replaces_an_unrelated_json(tmp_path, capsys):
    notes = tmp_path / "model.json"
    notes.write_text('{"my": "notes"}')
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "model.pt")])
    assert e.value.code == 2 and "model.json" in capsys.readouterr().err
    assert json.loads(notes.read_text()) == {"my": "notes"}


def test_ctrl_c_saves_a_resumable_state(tmp_path, monkeypatch, capsys):
    common = _common(tmp_path)
    calls = {"n": 0}
    real_step = train.ddpm_train_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "ddpm_train_step", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main([*common, "--steps", "5", "--save-every", "100"])
    assert e.value.code == 130 and "--resume" in capsys.readouterr().out
    assert read_diffusion(tmp_path / "last.pt")["step"] == 2  # 終えた 2 ステップは残る
    monkeypatch.setattr(train, "ddpm_train_step", real_step)
    assert train.main([*common, "--steps", "5", "--resume"])["step"] == 5
