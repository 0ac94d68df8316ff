"""torchbook.mnist のテスト (小さな合成データで速く)。"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from booktools import data
from torchbook import mnist

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "code" / "torchbook" / "mnist.py"


def write_tiny_mnist(folder: Path, n_train: int = 64, n_test: int = 32, gz: bool = False) -> Path:
    """数字の代わりに「明るい縦線の位置 = ラベル」の小さな IDX データを書きます。"""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for train, n in ((True, n_train), (False, n_test)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        images = torch.randint(0, 30, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, y in enumerate(labels.tolist()):
            images[i, 4:24, 4 + 2 * y] = 255
        img_name, lbl_name = mnist.FILES[train]
        suffix = ".gz" if gz else ""
        data.write_idx(folder / (img_name + suffix), images)
        data.write_idx(folder / (lbl_name + suffix), labels)
    return folder


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_mnist(tmp_path / "tiny")


@pytest.mark.parametrize("name", list(mnist.MODELS))
def test_model_output_shape(name: str) -> None:
    model = mnist.create_model(name)
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    probs = mnist.predict(model, torch.randn(7, 1, 28, 28), batch_size=3)
    assert probs.shape == (7, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(7))


def test_mnistnet_matches_seed_layout() -> None:
    model = mnist.MNISTNet()
    assert model.fc1.in_features == 500 and model.conv1.out_channels == 10
    assert mnist.count_parameters(model) == (10 * 9 + 10) + (20 * 10 * 9 + 20) + (500 * 10 + 10)


@pytest.mark.parametrize("name", list(mnist.MODELS))
def test_one_step_lowers_loss(name: str) -> None:
    torch.manual_seed(0)
    model = mnist.create_model(name)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    before = F.cross_entropy(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    after = F.cross_entropy(model(x), y)
    assert after.item() < before.item()


class FixedLogits(nn.Module):
    """入力の 1 画素目をクラス番号として、そのクラスに高い点をつけるモデル。"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, 0, 0, 0].long()
        return F.one_hot(cls, 10).float() * 5.0


def test_evaluate_on_synthetic_set() -> None:
    x = torch.zeros(8, 1, 28, 28)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]).float()
    y = torch.tensor([0, 1, 2, 3, 4, 5, 9, 9])  # 最後の 2 つは外れ
    result = mnist.evaluate(FixedLogits(), mnist.TensorLoader(x, y, 3), torch.device("cpu"))
    assert result["accuracy"] == pytest.approx(6 / 8)
    expected = F.cross_entropy(FixedLogits()(x), y).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["images"] == 8


def test_cross_entropy_is_nll_of_log_softmax() -> None:
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    torch.testing.assert_close(F.cross_entropy(logits, y),
                               F.nll_loss(F.log_softmax(logits, dim=1), y))


def test_tensor_loader_covers_everything_once() -> None:
    x = torch.arange(10).float().view(10, 1, 1, 1)
    y = torch.arange(10)
    torch.manual_seed(0)
    loader = mnist.TensorLoader(x, y, 4, shuffle=True)
    batches = list(loader)
    assert len(loader) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert torch.equal(torch.cat([b[0] for b in batches]).flatten().long(), seen)
    assert torch.cat([b[1] for b in mnist.TensorLoader(x, y, 4)]).tolist() == list(range(10))


def test_random_affine_moves_but_keeps_the_digit() -> None:
    x = torch.full((16, 1, 28, 28), -0.5)
    x[:, :, 10:18, 10:18] = 2.0  # 端から離れた四角は、動かしても欠けない
    torch.manual_seed(0)
    moved = mnist.random_affine(x)
    assert moved.shape == x.shape
    mass = (moved + 0.5).sum((1, 2, 3)) / (x + 0.5).sum((1, 2, 3))
    assert ((mass > 0.75) & (mass < 1.3)).all()  # 倍率 1±0.1 の 2 乗の範囲ほど
    assert torch.allclose(moved[:, :, 0, 0], torch.tensor(-0.5))  # 隅は背景のまま
    assert (moved - x).abs().amax((1, 2, 3)).min() > 0.1  # どの画像も動いている
    same = mnist.random_affine(x, degrees=0, scale=0, translate=0)
    torch.testing.assert_close(same, x)


def test_split_train_val_is_stratified_disjoint_and_fixed() -> None:
    g = torch.Generator().manual_seed(3)
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(range(50, 150, 10))])
    targets = targets[torch.randperm(len(targets), generator=g)]
    train, val = mnist.split_train_val(targets, 120)
    assert len(val) == 120 and len(train) == len(targets) - 120
    assert sorted(torch.cat([train, val]).tolist()) == list(range(len(targets)))
    share = torch.bincount(targets[val], minlength=10) / torch.bincount(targets, minlength=10)
    assert (share - 120 / len(targets)).abs().max() < 0.02  # どの数字からも同じ割合
    again = mnist.split_train_val(targets, 120)
    assert torch.equal(val, again[1])  # 固定のシードで、いつも同じ分割
    with pytest.raises(ValueError, match="検証の枚数"):
        mnist.split_train_val(targets, 0)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset_reads_tiny_files(tmp_path: Path, gz: bool) -> None:
    folder = write_tiny_mnist(tmp_path / "d", n_train=12, n_test=5, gz=gz)
    ds = mnist.MNISTDataset.from_dir(folder, train=True)
    assert len(ds) == 12
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = data.read_idx(folder / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    torch.testing.assert_close(x[0], (raw[3].float() / 255 - mnist.MEAN) / mnist.STD)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    assert [len(b[1]) for b in loader] == [5, 5, 2]


def test_idx_dataset_finds_torchvision_layout(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path / "MNIST" / "raw", n_train=6, n_test=4)
    assert len(mnist.MNISTDataset.from_dir(tmp_path, train=False)) == 4


def test_data_errors(tmp_path: Path) -> None:
    with pytest.raises(mnist.MissingDataError, match="MNIST/raw") as e:
        mnist.MNISTDataset.from_dir(tmp_path, train=True)
    assert "--" not in str(e.value)  # ライブラリの例外はコマンドラインのオプションを言わない
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"not an idx file")
    with pytest.raises(mnist.DataError, match="IDX"):
        mnist.read_idx(bad)
    good = tmp_path / "ok"
    data.write_idx(good, torch.zeros(3, 28, 28, dtype=torch.uint8))
    good.write_bytes(good.read_bytes()[:-10])  # 途中で切れたファイル
    with pytest.raises(mnist.DataError, match="切れて"):
        mnist.read_idx(good)


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mnist.create_model("ours")
    path = tmp_path / "ours.pt"
    mnist.save_checkpoint(path, model)
    x = torch.randn(4, 1, 28, 28)
    loaded = mnist.create_model("ours")
    checkpoint = mnist.load_checkpoint(loaded, path)
    assert checkpoint["history"] == [] and checkpoint["optimizer"] is None
    assert torch.equal(mnist.predict(model, x), mnist.predict(loaded, x))
    with pytest.raises(mnist.CheckpointError, match="モデル 'ours' の重み") as e:
        mnist.load_checkpoint(mnist.create_model("mnistnet"), path)
    assert e.value.model == "ours" and "--" not in str(e.value)
    junk = tmp_path / "junk.pt"
    torch.save({"model": object}, junk)  # weights_only=True では読めない中身
    with pytest.raises(mnist.CheckpointError, match="読めません"):
        mnist.load_checkpoint(mnist.create_model("ours"), junk)
    text = tmp_path / "notes.pt"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(mnist.CheckpointError, match="読めません"):
        mnist.load_checkpoint(mnist.create_model("ours"), text)


def test_save_is_atomic(monkeypatch, tmp_path: Path) -> None:
    """保存が途中で止まっても、前のチェックポイントは読めるまま残り、一時ファイルも残らない。"""
    path = tmp_path / "m.pt"
    mnist.save_checkpoint(path, mnist.create_model("mnistnet"))
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])  # 書きかけのファイル
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(mnist.CheckpointError, match="保存できませんでした.*disk full"):
        mnist.save_checkpoint(path, mnist.create_model("mnistnet"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """保存したファイルの権限は、ふつうのファイルと同じく umask で決まる (0600 ではない)。"""
    old = os.umask(umask)
    try:
        mnist.save_checkpoint(tmp_path / "m.pt", mnist.create_model("mnistnet"))
        (tmp_path / "plain").write_bytes(b"")  # 比べる相手: ふつうに作ったファイル
    finally:
        os.umask(old)
    mode = (tmp_path / "m.pt").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "plain").stat().st_mode & 0o777


def test_labels_outside_0_to_9_are_refused_when_loading(capsys, tiny: Path) -> None:
    """ラベルに 200 のような値があれば、学習を始める前に 1 行で断る (以前は 1 エポック後に
    IndexError)。"""
    labels = mnist.read_idx(tiny / mnist.FILES[True][1]).clone()
    labels[5] = 200
    data.write_idx(tiny / mnist.FILES[True][1], labels)
    with pytest.raises(mnist.DataError, match=r"0〜9 以外のラベル \[200\]"):
        mnist.MNISTDataset.from_dir(tiny, train=True)
    with pytest.raises(SystemExit) as e:
        mnist.main(["--epochs", "1", str(tiny)])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and "エポック" not in out
    assert len(err.strip().splitlines()) == 1 and "200" in err


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    model = mnist.create_model("mnistnet")
    mnist.save_checkpoint(path, model)
    before = path.read_bytes()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(mnist.TrainingError, match="NaN"):
        mnist.save_checkpoint(path, model)
    assert path.read_bytes() == before


def test_fit_learns_tiny_data(tiny: Path) -> None:
    train = mnist.MNISTDataset.from_dir(tiny, train=True)
    test = mnist.MNISTDataset.from_dir(tiny, train=False)
    torch.manual_seed(0)
    model = mnist.create_model("mnistnet")
    optimizer = mnist.make_optimizer("adam", model.parameters(), 0.01)
    history = list(mnist.fit(model, optimizer,
                             mnist.TensorLoader(train.inputs, train.targets, 16, True),
                             mnist.TensorLoader(test.inputs, test.targets, 1000), epochs=8))
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.5  # 偶然なら 0.1 ほど


def test_cli_argument_errors(capsys: pytest.CaptureFixture, tmp_path: Path, tiny: Path) -> None:
    existing = tmp_path / "old.pt"
    mnist.save_checkpoint(existing, mnist.create_model("mnistnet"))
    readonly = Path("/proc") if os.geteuid() == 0 else tmp_path / "ro"  # root は chmod を無視する
    if os.geteuid() != 0:
        readonly.mkdir()
        readonly.chmod(0o555)
    cases = [
        (["--batch-size", "0"], "--batch-size は 1 以上"),
        (["--lr", "-1"], "--lr は正の有限の数"),
        (["--lr", "inf"], "--lr は正の有限の数"),
        (["--lr", "nan"], "--lr は正の有限の数"),
        (["--epochs", "-2"], "--epochs は 0 以上"),
        (["--epochs", "0"], "--epochs 0・--resume・--extend"),
        (["--no-cuda", "--device", "cuda"], "同時に指定できません"),
        (["--device", "gpu"], "知らないデバイス名"),
        (["--model", "resnet"], "invalid choice"),
        (["--save-model", str(tmp_path / "model")], "拡張子つき"),
        (["--save-model", str(readonly / "m.pt")], "書き込めません"),
        (["--save-model", str(existing)], "--resume"),
        (["--save-model", str(tmp_path / "none.pt"), "--resume"], "がありません"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            mnist.main([*extra, str(tiny)])
        assert e.value.code == 2, extra
        out, err = capsys.readouterr()
        assert message in err, (extra, err)
        assert "エポック" not in out  # 学習を始める前に止まる
    with pytest.raises(SystemExit):
        mnist.main([str(tiny / "nothing")])
    assert "がありません" in capsys.readouterr().err


def test_cli_creates_missing_output_folders_and_shows_defaults(capsys, tmp_path: Path,
                                                              tiny: Path) -> None:
    """出力先の無いフォルダーは作る。--help はすべての既定値とすべての説明を示す。"""
    ckpt = tmp_path / "a" / "b" / "m.pt"
    mnist.main(["--dry-run", "--save-model", str(ckpt), str(tiny)])
    assert ckpt.is_file()
    parser = mnist.build_parser()
    assert all(a.help for a in parser._actions)
    help_text = parser.format_help()
    for option in ("--batch-size", "--lr", "--epochs", "--device", "--seed"):
        assert re.search(re.escape(option) + r"[^\n]*\n?[^-]*\(default: ", help_text), option
    assert "(default: auto)" in help_text  # デバイスは既定で自動


def test_cli_missing_data_and_wrong_checkpoint(capsys, tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(SystemExit) as e:
        mnist.main([str(tmp_path)])  # フォルダーはあるがデータが無い
    assert e.value.code == 1 and "--download" in capsys.readouterr().err
    ckpt = tmp_path / "m.pt"
    mnist.save_checkpoint(ckpt, mnist.create_model("ours"))
    with pytest.raises(SystemExit) as e:
        mnist.main(["--save-model", str(ckpt), "--epochs", "0", str(tiny)])
    assert e.value.code == 1 and "--model ours" in capsys.readouterr().err


def test_cli_calls_the_books_fit(monkeypatch, capsys, tiny: Path) -> None:
    """コマンドラインも、本のページが見せる mnist.fit で学習する (学習ループは 1 つ)。"""
    calls = []
    real_fit = mnist.fit

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(mnist, "fit", spy)
    mnist.main(["--epochs", "1", "--batch-size", "16", str(tiny)])
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert out.count("検証の正解率") == 1 and out.count("テスト正解率") == 1


def test_verbose_logs_the_loss_every_log_interval_batches(capsys, tiny: Path) -> None:
    mnist.main(["--epochs", "1", "--batch-size", "8", "--verbose", "--log-interval", "3",
                str(tiny)])
    out = capsys.readouterr().out
    assert [int(n) for n in re.findall(r"バッチ +(\d+): 損失", out)] == [0, 3, 6]  # 7 バッチ
    with pytest.raises(SystemExit) as e:
        mnist.main(["--log-interval", "0", str(tiny)])
    assert e.value.code == 2


def test_cli_trains_saves_and_evaluates(capsys, tmp_path: Path, tiny: Path) -> None:
    ckpt = tmp_path / "m.pt"
    result = mnist.main(["--epochs", "2", "--batch-size", "16", "--save-model", str(ckpt),
                         str(tiny)])
    out = capsys.readouterr().out
    assert "結果: テスト正解率" in out and "学習時間" in out
    checkpoint = torch.load(ckpt, weights_only=True)
    assert [h["epoch"] for h in checkpoint["history"]] == [1, 2]
    assert checkpoint["optimizer"] is not None and checkpoint["config"]["model"] == "mnistnet"
    before = ckpt.read_bytes()
    again = mnist.main(["--epochs", "0", "--save-model", str(ckpt), str(tiny)])
    assert again["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert ckpt.read_bytes() == before  # 評価だけなら書き換えない


def test_non_finite_training_keeps_the_good_checkpoint(capsys, tmp_path: Path,
                                                       tiny: Path) -> None:
    ckpt = tmp_path / "m.pt"
    mnist.main(["--epochs", "1", "--batch-size", "16", "--save-model", str(ckpt), str(tiny)])
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:  # 大きすぎる学習率で NaN になる
        mnist.main(["--epochs", "1", "--batch-size", "16", "--lr", "1e30", "--force",
                    "--save-model", str(ckpt), str(tiny)])
    assert e.value.code == 1 and "nan" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_resume_equals_uninterrupted_run(monkeypatch, capsys, tmp_path: Path, tiny: Path) -> None:
    """エポック 2 の途中で中断し、--resume で続けた学習は、通しの学習と同じになる。"""
    common = ["--model", "ours", "--augment", "--one-cycle", "--optimizer", "adam",
              "--lr", "0.01", "--batch-size", "16", "--epochs", "3", str(tiny)]
    straight = tmp_path / "straight.pt"
    mnist.main(["--save-model", str(straight), *common])
    resumed = tmp_path / "resumed.pt"
    real_affine, calls = mnist.random_affine, []

    def interrupt_mid_epoch_2(x):  # 56 枚をバッチ 16 で 4 バッチ。6 回目はエポック 2 の途中
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # Ctrl-C
        return real_affine(x)

    monkeypatch.setattr(mnist, "random_affine", interrupt_mid_epoch_2)
    with pytest.raises(SystemExit) as e:
        mnist.main(["--save-model", str(resumed), *common])
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert "中断しました" in err and "--resume" in err and "\n" not in err
    assert len(torch.load(resumed, weights_only=True)["history"]) == 1
    monkeypatch.setattr(mnist, "random_affine", real_affine)
    mnist.main(["--save-model", str(resumed), "--resume", *common])
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["scheduler"] == b["scheduler"]
    for x, y in zip(a["history"], b["history"], strict=True):
        assert x["val_loss"] == y["val_loss"] and x["train_loss"] == y["train_loss"]


def test_resume_refuses_changed_settings_naming_each(capsys, tmp_path: Path, tiny: Path) -> None:
    """学習の結果を決める設定が保存したときと違えば、違う設定を 1 行で全部挙げて断る。"""
    ckpt = tmp_path / "m.pt"
    mnist.main(["--epochs", "2", "--batch-size", "16", "--save-model", str(ckpt), str(tiny)])
    before = ckpt.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mnist.main(["--epochs", "2", "--batch-size", "32", "--lr", "0.02", "--resume",
                    "--save-model", str(ckpt), str(tiny)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "エポック" not in out
    assert len(err.strip().splitlines()) == 1
    assert "--lr (保存 0.01、指定 0.02)" in err and "--batch-size (保存 16、指定 32)" in err
    assert "--epochs" not in err.split(":", 1)[1].split("。")[0]  # 同じ設定は挙げない
    with pytest.raises(SystemExit) as e:  # 終えた学習の --resume は、--extend を案内する
        mnist.main(["--epochs", "2", "--batch-size", "16", "--resume",
                    "--save-model", str(ckpt), str(tiny)])
    assert e.value.code == 2 and "--extend" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --extend でも、エポック数のほかは同じにする
        mnist.main(["--epochs", "3", "--batch-size", "16", "--seed", "2", "--extend",
                    "--save-model", str(ckpt), str(tiny)])
    assert e.value.code == 2 and "--seed (保存 1、指定 2)" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_extend_follows_the_new_schedule(capsys, tmp_path: Path, tiny: Path) -> None:
    """--extend は終えた学習を大きな --epochs まで続け、one-cycle の学習率は新しい総数に沿う。"""
    ckpt = tmp_path / "m.pt"
    common = ["--one-cycle", "--batch-size", "16", "--save-model", str(ckpt), str(tiny)]
    mnist.main(["--epochs", "2", *common])
    with pytest.raises(SystemExit) as e:  # 小さいか同じエポック数では延ばせない
        mnist.main(["--epochs", "2", "--extend", *common])
    assert e.value.code == 2 and "より大きな --epochs" in capsys.readouterr().err
    mnist.main(["--epochs", "3", "--extend", *common])
    checkpoint = torch.load(ckpt, weights_only=True)
    assert [h["epoch"] for h in checkpoint["history"]] == [1, 2, 3]
    assert checkpoint["config"]["epochs"] == 3
    steps = 3 * 4  # 56 枚をバッチ 16 で 4 バッチ
    assert checkpoint["scheduler"]["total_steps"] == steps
    assert checkpoint["scheduler"]["last_epoch"] == steps
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(reference, 0.01, total_steps=steps)
    lrs = [schedule.get_last_lr()[0]]
    for _ in range(steps):
        reference.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lrs[-1])


def test_failed_save_is_one_line_and_keeps_the_previous_checkpoint(monkeypatch, capsys,
                                                                   tmp_path: Path,
                                                                   tiny: Path) -> None:
    """torch.save が書けない (ディスクがいっぱい) とき、1 行で伝え、前のチェックポイントは残る。"""
    ckpt = tmp_path / "m.pt"
    mnist.main(["--epochs", "1", "--batch-size", "16", "--save-model", str(ckpt), str(tiny)])
    before = ckpt.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK")  # 書きかけ
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        mnist.main(["--epochs", "2", "--batch-size", "16", "--force", "--save-model", str(ckpt),
                    str(tiny)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "保存できませんでした" in err and "unexpected pos" in err and "そのまま残って" in err
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "tiny"]  # 書きかけは消す


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE の無い OS")
def test_file_size_limit_is_reported_in_one_line(tmp_path: Path, tiny: Path) -> None:
    """本物の書き込みの失敗 (ファイルの大きさの上限、RLIMIT_FSIZE) でも、1 行で終わる。"""
    import resource

    ckpt = tmp_path / "m.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "code"), "PYTHONDONTWRITEBYTECODE": "1"}
    args = [sys.executable, "-m", "torchbook.mnist", "--batch-size", "16", "--epochs", "1",
            "--save-model", str(ckpt), str(tiny)]
    subprocess.run(args, env=env, capture_output=True, check=True, timeout=120)
    before = ckpt.read_bytes()

    def limit() -> None:  # チェックポイント (約 90 KB) より小さい上限
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))

    proc = subprocess.run([*args, "--force"], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "保存できませんでした" in lines[0] and "そのまま" in lines[0]
    assert ckpt.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_a_resumable_checkpoint(tmp_path: Path) -> None:
    datadir = write_tiny_mnist(tmp_path / "d", n_train=256, n_test=16)
    ckpt = tmp_path / "m.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "code")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchbook.mnist", "--epochs", "200", "--batch-size", "16",
         "--save-model", str(ckpt), str(datadir)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "保存されない"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "中断しました" in lines[0] and "Traceback" not in err
    done = len(torch.load(ckpt, weights_only=True)["history"])
    assert 1 <= done < 200
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_progress_bar_only_in_a_terminal(capsys) -> None:
    """端末でない標準エラー出力 (本のページ・ログ) には、プログレスバーを出さない。"""
    model = mnist.create_model("mnistnet")
    optimizer = mnist.make_optimizer("sgd", model.parameters(), 0.01)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TqdmWarning なども失敗にする
        mnist.train_epoch(model, mnist.TensorLoader(x, y, 4), optimizer, torch.device("cpu"))
    assert capsys.readouterr().err == ""
    assert "tqdm.auto" not in MODULE.read_text(encoding="utf-8")


@pytest.mark.slow
def test_copied_module_runs_alone(tmp_path: Path, tiny: Path) -> None:
    """mnist.py だけを空のフォルダーにコピーして --help と --dry-run が動くこと。"""
    shutil.copy(MODULE, tmp_path / "mnist.py")
    text = (tmp_path / "mnist.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import) torchbook", text, re.MULTILINE)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    run = [sys.executable, "mnist.py"]
    help_ = subprocess.run([*run, "--help"], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=120)
    assert help_.returncode == 0 and "--batch-size" in help_.stdout
    datadir = REPO / "data" if (REPO / "data" / "MNIST" / "manifest.json").exists() else tiny
    dry = subprocess.run([*run, "--dry-run", str(datadir)], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "結果: テスト正解率" in dry.stdout


def test_gzip_reader_matches_plain(tmp_path: Path) -> None:
    x = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    data.write_idx(tmp_path / "a", x)
    with open(tmp_path / "a", "rb") as f, gzip.open(tmp_path / "a.gz", "wb") as g:
        g.write(f.read())
    assert torch.equal(mnist.read_idx(tmp_path / "a"), mnist.read_idx(tmp_path / "a.gz"))


def test_recipe_record_chooses_on_validation_and_tests_once() -> None:
    """第 5 章が読む記録: レシピは検証の平均で選び、テストは選んだレシピだけを複数のシードで。"""
    record = json.loads((REPO / "code" / "torchbook" / "weights" / "mnist_recipe.json")
                        .read_text(encoding="utf-8"))
    assert record["split"]["chosen_by"] == "val" and record["test"]["split"] == "test"
    best = max(record["ablation"], key=lambda r: r["val_mean"])
    assert record["chosen"]["recipe"] == best["recipe"]
    assert all("test" not in key for r in record["ablation"] for key in r)  # 候補にテストは無い
    accs = record["test"]["accuracy"]
    assert len(accs) >= 2 and record["test"]["mean"] == pytest.approx(sum(accs) / len(accs))
    assert record["command"].startswith("python benchmarks/mnist_bench.py ablation")


@pytest.mark.parametrize("page", ["05_mnist.md", "A1_distributed.md"])
def test_pages_leave_thread_settings_to_the_build(page: str) -> None:
    """スレッドの設定はビルド環境のもの。読者が実行する章のコードには書かない。"""
    text = (REPO / "book" / page).read_text(encoding="utf-8")
    for setting in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "set_num_threads"):
        assert setting not in text, setting
