"""torchbook.mnist のテスト (小さな合成データで速く)。"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
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
    result = mnist.evaluate(FixedLogits(), mnist.tensor_batches(x, y, 3), torch.device("cpu"))
    assert result["accuracy"] == pytest.approx(6 / 8)
    expected = F.cross_entropy(FixedLogits()(x), y).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["images"] == 8


def test_cross_entropy_is_nll_of_log_softmax() -> None:
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    torch.testing.assert_close(F.cross_entropy(logits, y),
                               F.nll_loss(F.log_softmax(logits, dim=1), y))


def test_tensor_batches_cover_everything_once() -> None:
    x = torch.arange(10).float().view(10, 1, 1, 1)
    y = torch.arange(10)
    g = torch.Generator().manual_seed(0)
    batches = list(mnist.tensor_batches(x, y, 4, shuffle=True, generator=g))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b[0] for b in batches]).flatten().long(), seen)


def test_random_affine_moves_but_keeps_the_digit() -> None:
    x = torch.full((16, 1, 28, 28), -0.5)
    x[:, :, 10:18, 10:18] = 2.0  # 端から離れた四角は、動かしても欠けない
    g = torch.Generator().manual_seed(0)
    moved = mnist.random_affine(x, generator=g)
    assert moved.shape == x.shape
    mass = (moved + 0.5).sum((1, 2, 3)) / (x + 0.5).sum((1, 2, 3))
    assert ((mass > 0.75) & (mass < 1.3)).all()  # 倍率 1±0.1 の 2 乗の範囲ほど
    assert torch.allclose(moved[:, :, 0, 0], torch.tensor(-0.5))  # 隅は背景のまま
    assert (moved - x).abs().amax((1, 2, 3)).min() > 0.1  # どの画像も動いている
    same = mnist.random_affine(x, degrees=0, scale=0, translate=0)
    torch.testing.assert_close(same, x)


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
    with pytest.raises(mnist.DataError, match="--download"):
        mnist.MNISTDataset.from_dir(tmp_path, train=True)
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
    mnist.save_checkpoint(model, path)
    x = torch.randn(4, 1, 28, 28)
    loaded = mnist.load_checkpoint(mnist.create_model("ours"), path)
    assert torch.equal(mnist.predict(model, x), mnist.predict(loaded, x))
    with pytest.raises(mnist.CheckpointError, match="--model ours"):
        mnist.load_checkpoint(mnist.create_model("mnistnet"), path)
    junk = tmp_path / "junk.pt"
    torch.save({"model": object}, junk)  # weights_only=True では読めない中身
    with pytest.raises(mnist.CheckpointError, match="読めません"):
        mnist.load_checkpoint(mnist.create_model("ours"), junk)


def test_fit_learns_tiny_data(tiny: Path) -> None:
    train = mnist.MNISTDataset.from_dir(tiny, train=True)
    test = mnist.MNISTDataset.from_dir(tiny, train=False)
    torch.manual_seed(0)
    model = mnist.create_model("mnistnet")
    history = mnist.fit(model, (train.inputs, train.targets), (test.inputs, test.targets),
                        epochs=8, batch_size=16, lr=0.01, augment=False)
    assert len(history) == 8
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5  # 偶然なら 0.1 ほど


def test_cli_argument_errors(capsys: pytest.CaptureFixture, tiny: Path) -> None:
    cases = [
        (["--batch-size", "0"], "--batch-size は 1 以上"),
        (["--lr", "-1"], "--lr は正の数"),
        (["--epochs", "-2"], "--epochs は 0 以上"),
        (["--epochs", "0"], "--epochs 0 は"),
        (["--no-cuda", "--device", "cuda"], "同時に指定できません"),
        (["--model", "resnet"], "invalid choice"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            mnist.main([*extra, str(tiny)])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mnist.main([str(tiny / "nothing")])
    assert "がありません" in capsys.readouterr().err


def test_cli_missing_data_and_wrong_checkpoint(capsys, tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(SystemExit) as e:
        mnist.main([str(tmp_path)])  # ディレクトリはあるがデータが無い
    assert e.value.code == 1 and "--download" in capsys.readouterr().err
    ckpt = tmp_path / "m.pt"
    mnist.save_checkpoint(mnist.create_model("ours"), ckpt)
    with pytest.raises(SystemExit) as e:
        mnist.main(["--save-model", str(ckpt), "--dry-run", str(tiny)])
    assert e.value.code == 1 and "--model ours" in capsys.readouterr().err


def test_cli_trains_saves_and_evaluates(capsys, tmp_path: Path, tiny: Path) -> None:
    ckpt = tmp_path / "m.pt"
    result = mnist.main(["--epochs", "2", "--batch-size", "16", "--save-model", str(ckpt),
                         str(tiny)])
    out = capsys.readouterr().out
    assert ckpt.exists() and "結果: テスト正解率" in out and "学習時間" in out
    again = mnist.main(["--epochs", "0", "--save-model", str(ckpt), str(tiny)])
    assert again["test_accuracy"] == pytest.approx(result["test_accuracy"])


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
