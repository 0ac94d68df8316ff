"""torchbook.diffusion.data: 無いデータ・壊れたデータ・範囲外のラベルを、直し方つきで知らせる。"""

from __future__ import annotations

import shutil
import struct

import pytest
from diffusion_fixtures import fashion_root

from torchbook.diffusion.data import load_tensors

FILES = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture
def copied_root(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        shutil.copy(fashion_root() / "FashionMNIST" / "raw" / name, raw / name)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]:
        (raw / name).write_bytes(b"")  # 訓練データは使わないが、存在の確認だけは通す
    return tmp_path


def test_missing_data_recommends_the_download_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download") as e:
        load_tensors(tmp_path, train=False)
    assert "python -m" not in str(e.value) and "booktools" not in str(e.value)


def test_a_file_as_data_root_is_explained(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="ファイルです"):
        load_tensors(f, train=False)


def test_truncated_file_is_reported_as_corrupt(copied_root):
    images = copied_root / "FashionMNIST" / "raw" / FILES[0]
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="壊れています"):
        load_tensors(copied_root, train=False)


def test_labels_out_of_range_are_reported_as_corrupt(copied_root):
    labels = copied_root / "FashionMNIST" / "raw" / FILES[1]
    data = bytearray(labels.read_bytes())
    magic, n = struct.unpack(">II", data[:8])
    assert magic == 2049 and n == 10_000
    data[8 + 5] = 12  # 6 枚目のラベルを範囲外に
    labels.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="範囲外.*壊れています"):
        load_tensors(copied_root, train=False)
