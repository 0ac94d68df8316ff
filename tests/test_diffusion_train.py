"""torchbook.diffusion.train: 損失と EMA、再開、上書きの拒否、中断 (Ctrl-C) で失わないこと。"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from diffusion_fixtures import fashion_root, tiny_unet

from torchbook.diffusion import train
from torchbook.diffusion.checkpoint import load_checkpoint, read_diffusion
from torchbook.diffusion.losses import training_loss
from torchbook.diffusion.schedule import NoiseSchedule
from torchbook.diffusion.training import EMA
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


def _interrupt_at(monkeypatch, call: int) -> None:
    """ddpm_train_step の call 回目の途中で Ctrl-C (SIGINT) を送ります。"""
    calls = {"n": 0}
    real = train.ddpm_train_step

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "ddpm_train_step", step)


def _weights(path):
    model, _, _ = load_checkpoint(path)
    return model.state_dict()


def test_resume_equals_an_uninterrupted_run_past_warmup(tmp_path, monkeypatch):
    """ウォームアップ (1 ステップ) の後で止めて再開しても、止めなかった学習と同じ重みになる。"""
    common = [*_common(tmp_path), "--warmup", "1", "--save-every", "100"]
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)  # ステップ 3 の途中で Ctrl-C: 3 を終えて保存
        with pytest.raises(SystemExit):
            train.main([*common, "--steps", "6"])
    assert read_diffusion(tmp_path / "last.pt")["step"] == 3
    resumed = train.main([*common, "--steps", "6", "--resume", "--export",
                          str(tmp_path / "ema.pt")])
    assert resumed["step"] == 6
    _, _, ckpt = load_checkpoint(tmp_path / "ema.pt")
    assert ckpt["step"] == 6 and "model" not in ckpt
    info = json.loads((tmp_path / "ema.json").read_text())["train"]
    assert info["command"].startswith("python -m torchbook.diffusion.train ")
    assert "--resume" in info["command"]
    straight = tmp_path / "straight"
    train.main([*_common(straight), "--warmup", "1", "--save-every", "100", "--steps", "6",
                "--export", str(straight / "ema.pt")])
    for a, b in zip(_weights(tmp_path / "ema.pt").values(),
                    _weights(straight / "ema.pt").values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_changed_settings_in_one_line(tmp_path, capsys):
    common = _common(tmp_path)
    train.main([*common, "--steps", "2"])
    for change, flag in [(["--lr", "1e-3"], "--lr"), (["--batch-size", "4"], "--batch-size"),
                         (["--steps", "4"], "--steps"), (["--seed", "3"], "--seed")]:
        with pytest.raises(SystemExit) as e:
            train.parse_args([*common, "--steps", "2", "--resume", *change])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"{flag} " in err and "(保存)" in err, err
    with pytest.raises(SystemExit) as e:  # 別の大きさのモデル
        train.parse_args([*common[:5], "16,64", *common[6:], "--steps", "2", "--resume"])
    assert "--channels [16, 32] (保存) → [16, 64] (指定)" in capsys.readouterr().err


def test_extend_is_explicit_and_only_grows_steps(tmp_path, capsys):
    common = _common(tmp_path)
    train.main([*common, "--steps", "2"])
    with pytest.raises(SystemExit) as e:
        train.parse_args([*common, "--steps", "4", "--extend"])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    for steps in ["2", "1"]:
        with pytest.raises(SystemExit) as e:
            train.parse_args([*common, "--steps", steps, "--resume", "--extend"])
        assert e.value.code == 2 and "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # 延ばすときもほかの設定は同じに
        train.parse_args([*common, "--steps", "4", "--resume", "--extend", "--lr", "1e-3"])
    assert "--lr" in capsys.readouterr().err
    assert train.main([*common, "--steps", "4", "--resume", "--extend"])["step"] == 4
    assert read_diffusion(tmp_path / "last.pt")["config"]["steps"] == 4


def test_resume_with_an_unreadable_checkpoint_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "last.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        train.main([*_common(tmp_path), "--steps", "2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "last.pt" in err[-1] and "読めません" in err[-1]


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
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        with pytest.raises(SystemExit) as e:
            train.main([*common, "--steps", "5", "--save-every", "100"])
    assert e.value.code == 130 and "--resume" in capsys.readouterr().out
    assert read_diffusion(tmp_path / "last.pt")["step"] == 3  # 途中のステップを終えて保存
    assert train.main([*common, "--steps", "5", "--resume"])["step"] == 5
