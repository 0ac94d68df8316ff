"""torchbook.diffusion.checkpoint: 1 つの形式と 1 つの読み込み、原子的な保存、わかる誤り。"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_fixtures import WEIGHTS, tiny_unet
from torch import nn

from torchbook.diffusion import checkpoint
from torchbook.diffusion.checkpoint import (
    atomic_save,
    load_checkpoint,
    save_checkpoint,
)
from torchbook.diffusion.fashion_classifier import FashionClassifier, load_classifier


class _Ema:
    def __init__(self, model):
        self.model, self.step = model, 3


@pytest.mark.slow
def test_round_trip_and_wrong_architecture(tmp_path):
    model = tiny_unet()
    path = tmp_path / "ema.pt"
    save_checkpoint(path, model, _Ema(model), "cosine", 1000, {"note": "test"}, ema_only=True)
    loaded, sched, ckpt = load_checkpoint(path)
    assert ckpt["extra"]["note"] == "test" and sched.T == 1000 and ckpt["ema_step"] == 3
    assert "model" not in ckpt  # 配布用は EMA の重みだけ
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t))
    bad = torch.load(path, weights_only=True)
    bad["unet"]["channels"] = [32, 64]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="構造"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="拡散モデルのチェックポイント"):
        load_checkpoint(tmp_path / "plain.pt")


def test_channels_last_is_decided_by_the_caller(tmp_path):
    model = tiny_unet()
    save_checkpoint(tmp_path / "a.pt", model, _Ema(model), "cosine", 100, ema_only=True)
    plain, _, _ = load_checkpoint(tmp_path / "a.pt")
    cl, _, _ = load_checkpoint(tmp_path / "a.pt", channels_last=True)
    assert plain.conv_in.weight.is_contiguous()
    assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("content", [b"hello, this is text\n", b""])
def test_text_or_empty_file_says_it_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="PyTorch のチェックポイントとして読めません"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="PyTorch のチェックポイントとして読めません"):
        load_classifier(path)


def test_truncated_file_says_so(tmp_path):
    model = tiny_unet()
    path = tmp_path / "cut.pt"
    save_checkpoint(path, model, _Ema(model), "cosine", 100, ema_only=True)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="途中までしか"):
        load_checkpoint(path)


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "keep.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("保存の途中で失敗")

    with pytest.raises(RuntimeError, match="途中で失敗"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]  # 一時ファイルも残らない


def test_shipped_weights_load_with_the_one_loader():
    model, sched, ckpt = load_checkpoint(checkpoint.DEFAULT_CHECKPOINT)
    assert ckpt["kind"] == checkpoint.DDPM_KIND and sched.T == ckpt["T"]
    assert checkpoint.DEFAULT_CHECKPOINT.parent == WEIGHTS
    assert isinstance(load_classifier(), FashionClassifier)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier"):
        load_classifier(tmp_path / "none.pt")
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="構造が違います"):
        load_classifier(tmp_path / "other.pt")


def test_command_line_uses_the_module_name_as_run():
    assert checkpoint.command_line("diffusion.train", ["--steps", "2", "a b"]) == \
        "python -m diffusion.train --steps 2 'a b'"


def test_atomic_write_gives_normal_permissions_and_keeps_the_old_file(tmp_path):
    """一時ファイル (mkstemp) の 0600 ではなく、umask に従う普通の権限で書く。"""
    import os

    from torchbook.diffusion.checkpoint import atomic_write, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~0o022
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)

    def full_disk(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")

    with pytest.raises(OSError, match="前のファイルはそのまま") as e:
        atomic_write(tmp_path / "a.json", full_disk)
    assert "\n" not in str(e.value)
    assert (tmp_path / "a.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # 一時ファイルなし


@pytest.mark.slow
def test_train_under_a_file_size_limit_says_the_checkpoint_is_kept(tmp_path):
    """ファイルの大きさの上限 (RLIMIT_FSIZE) で保存に失敗しても、1 行で伝え last.pt を残す。"""
    resource = pytest.importorskip("resource")
    import signal
    import subprocess
    import sys

    from diffusion_fixtures import fashion_root

    args = ["--data-root", str(fashion_root()), "--out", str(tmp_path), "--channels", "16,32",
            "--threads", "1", "--limit", "64", "--batch-size", "8", "--device", "cpu",
            "--no-bf16"]
    run = [sys.executable, "-m", "torchbook.diffusion.train", *args]
    assert subprocess.run([*run, "--steps", "1"], capture_output=True).returncode == 0
    before = (tmp_path / "last.pt").read_bytes()

    def limit():  # 上限を超えた書き込みは、シグナルで落ちずに EFBIG になるようにする
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run([*run, "--steps", "2", "--resume", "--extend"], capture_output=True,
                       text=True, preexec_fn=limit, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "前のファイルはそのまま" in r.stderr.strip().splitlines()[-1]
    assert (tmp_path / "last.pt").read_bytes() == before


def _tiny_latent_run(seed: int):
    """小さな LatentFlow と、再開用の保存に要る学習の状態 (EMA、最適化器、学習率、乱数)。"""
    from torchbook.diffusion.autoencoder import Autoencoder
    from torchbook.diffusion.latent import LatentFlow, LatentUNet
    from torchbook.diffusion.training import EMA, lr_scheduler

    torch.manual_seed(0)  # 自己符号化器は学習の CLI と同じく、どの実行でも同じもの (--latent)
    autoencoder = Autoencoder(4, width=16, latent_scale=2.0)
    torch.manual_seed(seed)
    model = LatentFlow(LatentUNet(4, (16, 32), heads=2, context_dim=16), autoencoder)
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, ema, opt, lr_scheduler(opt, 2, 10), torch.Generator().manual_seed(seed)


def test_resumable_latent_checkpoint_stores_the_frozen_autoencoder_once(tmp_path):
    """再開用の last.pt: 固定した自己符号化器は ema の中の 1 回だけ (以前は model にも)。"""
    model, ema, opt, sched, gen = _tiny_latent_run(0)
    ema.step = 5
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, ema, "flow", 1000, {}, False, opt, sched, 5, gen, "flow")
    ckpt = torch.load(path, weights_only=True)
    ae_keys = [k for part in ("model", "ema") for k in ckpt[part] if "autoencoder." in k]
    assert ae_keys and all(k.startswith("autoencoder.") for k in ae_keys)
    assert not [k for k in ckpt["model"] if k.startswith("autoencoder")]
    fresh, fresh_ema, fresh_opt, fresh_sched, fresh_gen = _tiny_latent_run(1)
    assert checkpoint.restore_training(ckpt, fresh, fresh_ema, fresh_opt, fresh_sched,
                                       fresh_gen) == 5
    for a, b in ((model, fresh), (ema.model, fresh_ema.model)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(x, y, msg=name)
    assert fresh_ema.step == 5


def test_resumable_save_needs_the_training_state(tmp_path):
    """再開用の保存に最適化器などを渡し忘れると、その場で止める (以前は None を書いた)。"""
    model = tiny_unet()
    with pytest.raises(ValueError, match="ema_only=True"):
        save_checkpoint(tmp_path / "last.pt", model, _Ema(model), "cosine", 100)
    assert not (tmp_path / "last.pt").exists()
