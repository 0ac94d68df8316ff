"""MNIST の手書き数字認識: データ・モデル・学習・評価・保存・コマンドライン。

このファイルは 1 つだけで動きます。読者のプロジェクトにコピーして使えます
(必要なのは torch・torchvision・tqdm と Python の標準ライブラリだけです)。

    python mnist.py --help
    python mnist.py data/                                   # 基本の MNISTNet (既定)
    python mnist.py --model ours --augment --one-cycle --lr 0.005 --batch-size 128 data/
    python mnist.py --save-model m.pt data/                 # エポックごとに m.pt へ保存
    python mnist.py --save-model m.pt --resume data/        # 中断したところから続ける
    python mnist.py --save-model m.pt --extend --epochs 20 data/  # 20 エポックまで延ばす
    torchrun --nproc_per_node 2 mnist.py --no-shuffle data/  # データ並列 (付録)

``data/`` には IDX 形式の 4 ファイル (``train-images-idx3-ubyte`` など。``.gz`` でも可) を
直接置くか、torchvision と同じ ``data/MNIST/raw/`` に置きます。
訓練データの一部 (既定は 1/8) を、数字の割合を保って検証用に分けます。
エポックごとの成績は検証データで測り、テストデータは最後に 1 回だけ使います。

このプログラムは、Yusuke Shinyama の講義資料「第6回 GPU の仕組みと PyTorch 入門」(2021 年、
クリエイティブ・コモンズ 表示 - 継承 4.0 国際 (CC BY-SA 4.0)) の MNIST の例に沿っています。
基本のモデル ``MNISTNet`` の構成と、コマンドラインのオプションとその既定値が講義資料と同じです。
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

MEAN, STD = 0.1307, 0.3081  # MNIST 訓練画像の画素の平均と標準偏差 (0〜1 の尺度)
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SEED = 0  # 検証データの分け方を決めるシード (学習のシードとは別に固定)


class DataError(RuntimeError):
    """データが見つからない・壊れているときの例外。メッセージに直し方を書きます。"""


class MissingDataError(DataError):
    """データのファイルが見つからないときの例外。"""


class CheckpointError(RuntimeError):
    """チェックポイントが読めない・書けない・モデルに合わないときの例外。

    別のモデルの重みだったときは、そのモデルの名前 (``MODELS`` のキー) を ``model`` に持ちます。
    """

    def __init__(self, message: str, model: str | None = None):
        super().__init__(message)
        self.model = model


class TrainingError(RuntimeError):
    """損失や重みが NaN・inf になったときの例外。"""


# ---------------------------------------------------------------- デバイス
# 次の 4 つは torchbook/device.py の写しです (このファイルだけをコピーしても動くように)。
# "Copied from" の印のある定義は、元と同じ文面であることをテストが確かめます。
# Copied from torchbook.device.KNOWN_TYPES
KNOWN_TYPES = ("cuda", "mps", "cpu")  # get_device が受け付けるデバイスの種類


# Copied from torchbook.device.cuda_available
def cuda_available() -> bool:
    """NVIDIA の GPU (CUDA) が使えるかどうかを返します。"""
    return torch.cuda.is_available()


# Copied from torchbook.device.mps_available
def mps_available() -> bool:
    """Apple の GPU (MPS) が使えるかどうかを返します。"""
    return torch.backends.mps.is_available()


# Copied from torchbook.device.get_device
def get_device(name: str | None = None) -> torch.device:
    """使う計算デバイスを返します。

    ``name`` を省くと cuda → mps → cpu の順に、使える最初のものを選びます。
    ``"cuda"``・``"cuda:1"``・``"mps"``・``"cpu"`` のように名前を指定もできます。
    知らない名前や、この環境で使えないデバイスには直し方つきの例外を出します。
    """
    if name is None:
        if cuda_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(
            f"知らないデバイス名です: {name!r} (使える名前: {', '.join(KNOWN_TYPES)}、"
            "または 'cuda:0' のような番号つきの名前)"
        ) from e
    if device.type not in KNOWN_TYPES:
        raise ValueError(
            f"本書のコードが扱うデバイスは {', '.join(KNOWN_TYPES)} です (渡された名前: {name!r})"
        )
    if device.type == "cuda":
        if not cuda_available():
            raise RuntimeError(
                f"{name!r} を指定しましたが、この環境では CUDA が使えません。"
                "GPU とドライバー、CUDA 版の PyTorch を確認するか、'cpu' を指定してください。"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(
                f"{name!r} を指定しましたが、GPU は {count} 台 (番号 0〜{count - 1}) です。"
            )
    if device.type == "mps" and not mps_available():
        raise RuntimeError(
            f"{name!r} を指定しましたが、この環境では MPS (Apple の GPU) が使えません。"
            "'cpu' を指定してください。"
        )
    return device


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """画像のバッチをデバイスへ送ります。CPU と CUDA では channels_last に並べ替えます。"""
    x = x.to(device, non_blocking=True)
    if device.type in ("cpu", "cuda") and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # 画素ごとにチャンネルを並べる
    return x


# ---------------------------------------------------------------- データ
def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """IDX 形式 (MNIST の配布形式) のファイルを uint8 のテンソルとして読みます。"""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} が壊れています (読めません: {e})。") from e
    # 先頭 4 バイト: 0, 0, 型コード (0x08 = uint8), 次元数。続いて各次元の大きさ (4 バイト)
    zero, code, ndim = struct.unpack(">HBB", data[:4]) if len(data) >= 4 else (1, 0, 0)
    if zero != 0 or code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path} が壊れています (先頭が uint8 の IDX の形式ではありません)。")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != torch.Size(shape).numel():
        raise DataError(f"{path} が壊れています (大きさがヘッダーと合いません。"
                        "途中で切れている可能性があります)。")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def find_idx(datadir: str | os.PathLike, name: str) -> Path:
    """``datadir`` か ``datadir/MNIST/raw`` にある IDX ファイル (``.gz`` 可) を探します。"""
    datadir = Path(datadir)
    for folder in (datadir, datadir / "MNIST" / "raw"):
        for ext in ("", ".gz"):
            if (folder / (name + ext)).exists():
                return folder / (name + ext)
    raise MissingDataError(
        f"{datadir} に MNIST の {name} がありません "
        f"(探した場所: {datadir}/ と {datadir}/MNIST/raw/)。"
    )


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 の画像 (N, 28, 28) を、平均 0・分散 1 ほどの float (N, 1, 28, 28) にします。"""
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1)


class MNISTDataset(Dataset):
    """IDX ファイルから MNIST の (入力, 正解) を読む Dataset。"""

    def __init__(self, images_path: str | os.PathLike, labels_path: str | os.PathLike):
        super().__init__()
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(
                f"画像 {tuple(images.shape)} とラベル {tuple(labels.shape)} の形が合いません。"
            )
        if len(labels) and labels.max() > 9:  # 学習の途中で IndexError になる前に断る
            bad = sorted(set(labels[labels > 9].tolist()))[:5]
            raise DataError(f"{labels_path} に 0〜9 以外のラベル {bad} があります。"
                            "ラベルのファイルが壊れていないか確かめてください。")
        self.inputs = to_inputs(images)  # 全部をメモリに置く (60,000 枚で 190 MB)
        self.targets = labels.long()

    @classmethod
    def from_dir(cls, datadir: str | os.PathLike, train: bool = True) -> MNISTDataset:
        images, labels = FILES[train]
        return cls(find_idx(datadir, images), find_idx(datadir, labels))

    def __len__(self) -> int:
        return len(self.targets)  # 画像の枚数

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.targets[i]  # (正規化した画像, ラベル) の組


def torchvision_mnist(datadir: str | os.PathLike, train: bool = True,
                      download: bool = False) -> Dataset:
    """torchvision の MNIST (``datadir/MNIST/raw`` を読み、無ければダウンロード)。"""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    try:
        return datasets.MNIST(str(datadir), train=train, download=download, transform=transform)
    except RuntimeError as e:  # 見つからない・ダウンロードできない
        raise DataError(f"torchvision の MNIST を用意できません: {e}") from e


def split_train_val(targets: torch.Tensor, n_val: int,
                    seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """数字の割合を保って (層化して) n_val 枚を検証用に分け、(訓練, 検証) の添字を返します。"""
    if not 0 < n_val < len(targets):
        raise ValueError(f"検証の枚数は 1〜{len(targets) - 1} です (渡された値: {n_val})")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(targets), generator=g)  # ランダムに混ぜてから
    order = order[targets[order].argsort(stable=True)]  # 数字ごとにまとめる
    picked = order[torch.linspace(0, len(order) - 1, n_val).long()]  # 等間隔に選ぶ
    is_val = torch.zeros(len(targets), dtype=torch.bool)
    is_val[picked] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


class TensorLoader:
    """メモリ上のテンソルを batch_size 個ずつ区切って返す、DataLoader の軽量版。"""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 shuffle: bool = False):
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)  # バッチの数 (切り上げ)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.targets)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.inputs[idx], self.targets[idx]


def random_affine(x: torch.Tensor, degrees: float = 10.0, scale: float = 0.1,
                  translate: float = 0.1) -> torch.Tensor:
    """バッチの各画像を、ランダムに少し回し・拡大縮小し・ずらします (データ拡張)。

    回転は ±degrees 度、倍率は 1±scale、ずれは画像の幅の ±translate/2 です
    (28 画素なら ±1.4 画素)。背景 (黒) の値で外側を埋めます。
    """
    n = len(x)
    angle = (torch.rand(n) * 2 - 1) * degrees * torch.pi / 180  # -1〜1 の一様乱数から
    s = 1 + (torch.rand(n) * 2 - 1) * scale
    shift = (torch.rand(n, 2) * 2 - 1) * translate
    cos, sin = s * torch.cos(angle), s * torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (N, 2, 3) のアフィン行列
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    background = x.amin()
    return F.grid_sample(x - background, grid, align_corners=False) + background


# ---------------------------------------------------------------- モデル
class MNISTNet(nn.Module):
    """基本の CNN (畳み込み 2 層と全結合 1 層、パラメーター 7,000 個ほど)。"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 3)  # 畳み込み: 入力 1 チャンネル → 10 チャンネル、3×3
        self.pool1 = nn.MaxPool2d(2)  # 最大値プーリング: 縦横を 1/2 に
        self.conv2 = nn.Conv2d(10, 20, 3)  # 畳み込み: 10 → 20 チャンネル、3×3
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(20 * 5 * 5, 10)  # 全結合: 500 → 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))  # (N, 1, 28, 28) → (N, 10, 26, 26) → (N, 10, 13, 13)
        x = self.pool2(F.relu(self.conv2(x)))  # → (N, 20, 11, 11) → (N, 20, 5, 5)
        x = x.flatten(1)  # → (N, 500)
        return self.fc1(x)  # → (N, 10)。softmax は損失関数の側でかける


class FastNet(nn.Module):
    """本書の速い CNN: 幅を広げ、BatchNorm と全結合 2 層を加えたもの。"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 5, bias=False)  # 1 → 24 チャンネル、5×5
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 32, 3, bias=False)  # 24 → 32 チャンネル、3×3
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 5 * 5, 256)  # 800 → 256
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # → (N, 24, 24, 24) → (N, 24, 12, 12)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # → (N, 32, 10, 10) → (N, 32, 5, 5)
        x = F.relu(self.fc1(x.flatten(1)))  # → (N, 256)
        return self.fc2(x)  # → (N, 10)


MODELS = {"mnistnet": MNISTNet, "ours": FastNet}


def create_model(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """名前からモデルを作り、デバイスへ送ります。"""
    if name not in MODELS:
        raise ValueError(f"モデル名は {list(MODELS)} のどれかです (渡された名前: {name!r})")
    model = MODELS[name]().to(device)
    if torch.device(device).type in ("cpu", "cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """DDP で包んだモデルなら中身を、そうでなければそのまま返します。"""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """名前から最適化器を作ります (sgd はモーメンタム 0.9 つき)。"""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    raise ValueError(f"最適化器は sgd, adam, adadelta のどれかです (渡された名前: {name!r})")


# ---------------------------------------------------------------- 学習と評価
def is_main_process() -> bool:
    """表示と保存をするプロセスか (分散学習でなければ真、分散学習なら rank 0 だけ真)。"""
    return not dist.is_initialized() or dist.get_rank() == 0


def train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    augment: bool = False,
    log_interval: int = 0,
) -> dict[str, float]:
    """訓練データを 1 周 (1 エポック) 学習し、平均の損失と正解率を返します。

    端末に出力しているときは、tqdm のプログレスバーを出します。
    ``log_interval`` が正なら、その数のバッチごとに損失を 1 行表示します。
    """
    model.train()  # 訓練モード (Dropout・BatchNorm が訓練時の動きをする)
    show = is_main_process()  # 分散学習では rank 0 だけが表示する
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc="訓練", leave=False, disable=not (show and sys.stderr.isatty()))
    for i, (inputs, targets) in enumerate(bar):
        if augment:
            inputs = random_affine(inputs)
        inputs, targets = to_device(inputs, device), targets.to(device)
        optimizer.zero_grad()  # 1. 前のステップの勾配を消す
        outputs = model(inputs)  # 2. 順伝播
        loss = F.cross_entropy(outputs, targets)  # 3. 損失 (バッチの平均)
        loss.backward()  # 4. 逆伝播で勾配を求める
        optimizer.step()  # 5. 重みを更新する
        if scheduler is not None:
            scheduler.step()  # 学習率をステップごとに変える (one-cycle)
        batch_loss = loss.item()  # GPU から値を取り出すのはバッチごとに 1 回だけ
        total_loss += batch_loss * len(targets)
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += len(targets)
        if not bar.disable:
            bar.set_postfix(loss=f"{batch_loss:.4f}")
        if show and log_interval > 0 and i % log_interval == 0:
            tqdm.write(f"  バッチ {i:5d}: 損失 {batch_loss:.4f}")
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> dict[str, float]:
    """学習に使っていないデータで、平均の損失と正解率を求めます。"""
    model.eval()  # 評価モード
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = to_device(inputs, device), targets.to(device)
        outputs = model(inputs)
        total_loss += F.cross_entropy(outputs, targets, reduction="sum").item()
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += len(targets)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen}


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    device: torch.device | str = "cpu",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    augment: bool = False,
    first_epoch: int = 1,
    log_interval: int = 0,
) -> Iterator[dict[str, float]]:
    """エポックごとに学習と検証をして、そのエポックの成績を 1 つずつ返します。

    ジェネレーターなので、受け取る側がエポックごとに表示や保存をできます
    (``for record in fit(...):``)。まとめて受け取るなら ``list(fit(...))`` です。
    ``first_epoch`` を 2 以上にすると、そのエポックから続けます (再開)。
    ``seconds`` は、この呼び出しで学習にかけた時間の累計です (検証の時間は含めません)。
    """
    device = torch.device(device)
    seconds = 0.0
    for epoch in range(first_epoch, epochs + 1):
        sampler = getattr(train_loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # 分散学習: エポックごとに並びを変える (全ランクで同じ乱数)
        start = time.perf_counter()
        train = train_epoch(model, train_loader, optimizer, device, scheduler, augment,
                            log_interval)
        seconds += time.perf_counter() - start
        val = evaluate(unwrap(model), val_loader, device)  # DDP で包んでいても中身で評価
        yield {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": seconds}


def epoch_line(record: dict[str, float]) -> str:
    """1 エポックの成績 (``fit`` が返す辞書) を、表示用の 1 行にします。"""
    return (f"エポック {record['epoch']:3d}: 訓練の損失 {record['train_loss']:.4f}  "
            f"検証の損失 {record['val_loss']:.4f}  "
            f"検証の正解率 {100 * record['val_accuracy']:.2f} %")


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, device: torch.device | str = "cpu",
            batch_size: int = 1000) -> torch.Tensor:
    """入力 (N, 1, 28, 28) の各クラスの確率 (N, 10) を CPU のテンソルで返します。"""
    model.eval()
    device = torch.device(device)
    probs = [F.softmax(model(to_device(inputs[i : i + batch_size], device)), dim=1).cpu()
             for i in range(0, len(inputs), batch_size)]
    return torch.cat(probs)


# ---------------------------------------------------------------- 保存と読み込み
def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` します。途中で止まっても、前のファイルは壊れません。

    同じフォルダーの一時ファイルに書いてから ``os.replace`` で置き換えます。
    一時ファイルはふつうに作るので、ファイルの権限はほかのファイルと同じく umask で決まります。
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # 他と重ならない名前
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # 置き換えは一瞬で終わる (古いか新しいか、どちらかが必ず残る)
    finally:
        tmp.unlink(missing_ok=True)  # 失敗したときの書きかけを消す


# チェックポイントの形式 (1 つだけ): 次のキーを持つ辞書を torch.save したファイル。
#   "model": モデルの state_dict   "optimizer": 最適化器の state_dict (無ければ None)
#   "scheduler": 学習率スケジューラーの state_dict (無ければ None)
#   "history": エポックごとの成績のリスト (長さ = 終えたエポック数)
#   "config": 学習の設定 (再開のとき、同じ設定かを確かめる)
#   "rng_state": 保存したときの乱数の状態 (再開した学習が、同じ乱数の続きを使うため)
def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    history: list[dict[str, float]] | None = None,
    config: dict | None = None,
) -> None:
    """チェックポイントを保存します。途中で止まっても、前のファイルは壊れません。

    重みに NaN や inf があれば保存せず、例外を出します (前のファイルは残ります)。
    書けなかったとき (ディスクがいっぱい、ファイルの大きさの上限など) は
    :class:`CheckpointError` を出します。
    """
    weights = unwrap(model).state_dict()  # DDP で包んでいれば中身の重み
    if not all(t.isfinite().all() for t in weights.values() if t.is_floating_point()):
        raise TrainingError("重みに NaN か inf があるので保存しません。学習率を下げてください。")
    checkpoint = {
        "model": weights,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": list(history or []),
        "config": dict(config or {}),
        "rng_state": torch.get_rng_state(),
    }
    try:
        atomic_save(checkpoint, path)
    except (OSError, RuntimeError) as e:  # torch.save は書けないと RuntimeError も出す
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip()
        raise CheckpointError(f"{path} に保存できませんでした ({reason.splitlines()[-1]})") from e


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict:
    """チェックポイントを読み込み、モデル (と最適化器・スケジューラー) に戻します。

    戻り値はチェックポイントの辞書です (``history`` と ``config`` を再開に使います)。
    別のモデルの重みなら、どのモデル (``MODELS`` の名前) のものかを添えて断ります。
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # 重みだけを読む
    except FileNotFoundError:
        raise
    except Exception as e:  # 壊れたファイルや、テンソル以外を含むファイル
        raise CheckpointError(f"{path} はチェックポイントとして読めません ({e})。") from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path} は本書の形式 ('model' を持つ辞書) ではありません。")
    state, target = checkpoint["model"], unwrap(model)
    if not _matches(target.state_dict(), state):
        others = [name for name, cls in MODELS.items() if _matches(cls().state_dict(), state)]
        hint = f"モデル {others[0]!r} の重みです" if others else "モデルの定義が違います"
        raise CheckpointError(f"{path} は {type(target).__name__} の重みではありません ({hint})",
                              model=others[0] if others else None)
    target.load_state_dict(state)
    if optimizer is not None and checkpoint.get("optimizer") is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint.get("scheduler") is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    return checkpoint


def _matches(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    return expected.keys() == state.keys() and all(
        expected[k].shape == state[k].shape for k in expected)


# ---------------------------------------------------------------- 分散学習 (付録)
def setup_distributed(device: torch.device) -> tuple[int, int]:
    """torchrun で起動されていればプロセスグループを作り、(rank, world_size) を返します。

    単独のプロセスとして起動されたときは何もせず (0, 1) を返します。
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    present = [n for n in names if n in os.environ]
    if not present:
        return 0, 1
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise RuntimeError(
            f"分散学習の環境変数が足りません (ある: {present}、ない: {missing})。"
            "`torchrun --nproc_per_node N mnist.py ...` で起動するか、"
            "単独で動かすなら RANK などの環境変数を消してください。"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"  # GPU は NCCL、CPU は gloo
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------- コマンドライン
# 学習の結果を決める設定。チェックポイントの "config" に保存し、--resume のとき同じかを確かめる
RUN_SETTINGS = ("model", "optimizer", "lr", "batch_size", "epochs", "one_cycle", "augment",
                "seed", "no_shuffle", "val_size", "train_size", "dry_run")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PyTorch で MNIST を学習・評価します",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="設定と経過を詳しく表示する")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="訓練のバッチサイズ (DDP ではプロセスごと)")
    p.add_argument("--test-batch-size", type=int, default=1000, metavar="N",
                   help="検証・テストのバッチサイズ")
    p.add_argument("--no-shuffle", action="store_true", help="訓練データの順番を混ぜない")
    p.add_argument("--epochs", type=int, default=10, metavar="N",
                   help="エポック数 (0 なら --save-model のモデルを評価するだけ)")
    p.add_argument("--lr", type=float, default=0.01, metavar="LR",
                   help="学習率 (--one-cycle なら最大の学習率)")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="シード")
    p.add_argument("--no-cuda", action="store_true", help="GPU があっても CPU で計算する")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, mps のどれか。auto なら cuda → mps → cpu の順に選ぶ")
    p.add_argument("--dry-run", action="store_true",
                   help="動作確認のため、1 バッチだけで 1 エポック実行する")
    p.add_argument("--log-interval", type=int, default=10, metavar="N",
                   help="--verbose のとき、損失を N バッチごとに表示する")
    p.add_argument("--save-model", metavar="PATH",
                   help="エポックごとにチェックポイントを保存するファイル (例: mnist_net.pt)。"
                   "無いフォルダーは作る")
    p.add_argument("--resume", action="store_true",
                   help="--save-model のファイルから、中断したエポックの続きを学習する "
                   "(学習の設定はすべて保存したときと同じにする)")
    p.add_argument("--extend", action="store_true",
                   help="学習を終えたチェックポイントを、より大きな --epochs まで続ける (ほかの"
                   "設定は同じにする。--one-cycle の学習率は新しいエポック数の予定に沿って変わる)")
    p.add_argument("--force", action="store_true",
                   help="--save-model のファイルがあっても、最初から学習して上書きする")
    p.add_argument("--model", choices=list(MODELS), default="mnistnet", help="モデル")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adadelta"], default="adam",
                   help="最適化器")
    p.add_argument("--one-cycle", action="store_true", help="学習率を one-cycle で変える")
    p.add_argument("--augment", action="store_true", help="少し回し・拡大縮小し・ずらすデータ拡張")
    p.add_argument("--val-size", type=int, default=None, metavar="N",
                   help="訓練データから検証用に分ける枚数 (None なら 1/8)")
    p.add_argument("--train-size", type=int, default=None, metavar="N",
                   help="検証用を除いた訓練データの先頭 N 枚だけを使う (None なら全部)")
    p.add_argument("--download", action="store_true",
                   help="torchvision でダウンロードする (インターネット接続が必要)")
    p.add_argument("datadir", help="MNIST の IDX ファイルがあるフォルダー")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """学習を始める前に引数を確かめ、おかしければ直し方を 1 行で示して終了します (終了コード 2)。"""
    for name in ("batch_size", "test_batch_size", "log_interval", "val_size", "train_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} は 1 以上の整数です (渡された値: {value})")
    if args.epochs < 0:
        parser.error(f"--epochs は 0 以上です (渡された値: {args.epochs})")
    if not (math.isfinite(args.lr) and args.lr > 0):  # inf や nan も断る
        parser.error(f"--lr は正の有限の数です (渡された値: {args.lr})")
    if args.no_cuda and args.device != "auto":
        parser.error("--no-cuda と --device は同時に指定できません")
    if not args.download and not Path(args.datadir).is_dir():
        parser.error(f"datadir {args.datadir!r} がありません (MNIST のあるフォルダーを指定)")
    if (args.resume or args.extend) and args.force:
        parser.error("--resume・--extend と --force は同時に指定できません")
    if args.resume and args.extend:
        parser.error("--resume と --extend のどちらか 1 つを指定してください")
    reads = args.epochs == 0 or args.resume or args.extend  # 保存したファイルを読む場合
    if args.save_model is None:
        if reads:
            parser.error("--epochs 0・--resume・--extend には --save-model PATH (既存のファイル)"
                         " を指定")
        return
    path = Path(args.save_model)
    if path.suffix == "" or path.is_dir():
        parser.error(f"--save-model {path}: 拡張子つきのファイル名にします (例: mnist_net.pt)")
    if reads and not path.is_file():
        parser.error(f"--save-model {path} がありません (--epochs 0・--resume・--extend は"
                     "これを読みます)")
    if args.epochs > 0:
        if path.exists() and not (args.resume or args.extend or args.force):
            parser.error(f"{path} はすでにあります。続きを学習するなら --resume、"
                         "最初からやり直して上書きするなら --force をつけてください")
        try:  # フォルダーを作り、書き込めるかを、学習の前に一時ファイルを作って確かめる
            path.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path.parent).close()
        except OSError as e:
            parser.error(f"--save-model のフォルダー {path.parent} に書き込めません ({e.strerror})")


def check_resume(args: argparse.Namespace, config: dict, checkpoint: dict) -> str | None:
    """再開できるかを確かめ、できなければ理由を 1 行で返します (できれば None)。

    学習の結果を決める設定 (``config``) がすべて保存したときと同じなら再開できます。
    ``--extend`` のときだけ、保存したより大きな ``--epochs`` を受け付けます。
    """
    stored, done = checkpoint.get("config", {}), len(checkpoint.get("history", []))
    changed = [f"{'--' + k.replace('_', '-') if k in RUN_SETTINGS else k} "
               f"(保存 {stored.get(k)}、指定 {v})"
               for k, v in config.items() if stored.get(k) != v
               and not (k == "epochs" and args.extend)]
    if changed:
        return (f"{args.save_model} と学習の設定が違うので続けられません: {', '.join(changed)}。"
                "保存したときと同じ設定にするか、--force で最初から学習してください")
    if args.extend and args.epochs <= stored.get("epochs", 0):
        return (f"--extend には、保存した {stored.get('epochs')} より大きな --epochs を"
                "指定してください")
    if args.resume and done >= args.epochs:
        return (f"{args.save_model} は {done} エポックの学習を終えています。"
                f"延ばすなら --extend --epochs N (N > {done}) を指定してください")
    return None


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        device = get_device("cpu" if args.no_cuda else None if args.device == "auto"
                            else args.device)
        rank, world_size = setup_distributed(device)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # 1 プロセスに 1 GPU
        torch.cuda.set_device(device)
    main_process = rank == 0  # テストの評価・表示・保存は rank 0 だけがする

    # データ: 訓練データを訓練用と検証用に分ける。テストデータは最後に 1 回だけ使う
    try:
        if args.download:
            full_train = torchvision_mnist(args.datadir, True, download=True)
            test_set = torchvision_mnist(args.datadir, False, download=True)
        else:
            full_train = MNISTDataset.from_dir(args.datadir, train=True)
            test_set = MNISTDataset.from_dir(args.datadir, train=False)
        n_val = args.val_size or len(full_train) // 8
        train_idx, val_idx = split_train_val(torch.as_tensor(full_train.targets), n_val)
    except (DataError, ValueError) as e:
        hint = ("インターネットにつながるなら --download で入手できます。"
                if isinstance(e, MissingDataError) else "")
        parser.exit(1, f"エラー: {e}{hint}\n")
    train_idx = train_idx[: args.train_size]
    if args.dry_run:  # 動作確認: 1 バッチずつだけ使う
        train_idx, val_idx = train_idx[: args.batch_size], val_idx[: args.test_batch_size]
        test_set = Subset(test_set, range(min(args.test_batch_size, len(test_set))))
    train_set = Subset(full_train, train_idx.tolist())
    val_set = Subset(full_train, val_idx.tolist())
    sampler = None
    if world_size > 1:  # 各プロセスに訓練データの別々の部分を配る
        sampler = DistributedSampler(train_set, shuffle=not args.no_shuffle, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                              shuffle=sampler is None and not args.no_shuffle)
    val_loader = DataLoader(val_set, batch_size=args.test_batch_size)
    test_loader = DataLoader(test_set, batch_size=args.test_batch_size)

    # モデル・最適化器・スケジューラー (続きから学習するなら、保存した状態に戻す)
    epochs = 1 if args.dry_run and args.epochs > 0 else args.epochs
    torch.manual_seed(args.seed)  # 全プロセスで同じ初期値にする
    model = create_model(args.model, device)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=max(epochs, 1) * len(train_loader))
        if args.one_cycle else None)
    config = {k: getattr(args, k) for k in RUN_SETTINGS} | {"world_size": world_size}
    history: list[dict[str, float]] = []
    if args.resume or args.extend or args.epochs == 0:
        try:
            checkpoint = load_checkpoint(model, args.save_model, optimizer,
                                         None if args.extend else scheduler)
        except CheckpointError as e:
            hint = f"。--model {e.model} を指定してください" if e.model else ""
            parser.exit(1, f"エラー: {e}{hint}\n")
        problem = check_resume(args, config, checkpoint) if args.epochs > 0 else None
        if problem:
            parser.exit(2, f"エラー: {problem}\n")
        history = checkpoint["history"]
        if args.epochs > 0:
            torch.set_rng_state(checkpoint["rng_state"])  # 中断したときの乱数の続きから
        if args.extend and scheduler is not None:  # 学習率は新しい総ステップ数の予定に沿う
            done_steps = checkpoint["scheduler"]["last_epoch"]
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, args.lr, total_steps=epochs * len(train_loader),
                last_epoch=done_steps - 1)
        if main_process:
            print(f"{args.save_model} を読み込みました (エポック {len(history)} まで学習済み)")
    if world_size > 1:  # 勾配をプロセス間で平均する (all-reduce) ラッパー
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if main_process:
        print(f"モデル {args.model} ({count_parameters(model):,} パラメーター)、"
              f"デバイス {device}、プロセス数 {world_size}、訓練 {len(train_set):,} 枚、"
              f"検証 {len(val_set):,} 枚、テスト {len(test_set):,} 枚")
        if args.verbose:
            print("設定:", config)

    # 学習: fit がエポックごとに返す成績を、表示して保存する
    seconds_before = history[-1]["seconds"] if history else 0.0
    try:
        for record in fit(model, optimizer, train_loader, val_loader, epochs, device, scheduler,
                          args.augment, first_epoch=len(history) + 1,
                          log_interval=args.log_interval if args.verbose else 0):
            record["seconds"] += seconds_before  # 中断の前からの累計
            if not math.isfinite(record["train_loss"]):
                raise TrainingError(f"エポック {record['epoch']} で損失が {record['train_loss']} "
                                    "になりました。--lr を小さくしてください")
            if main_process:
                print(epoch_line(record), flush=True)
                if args.save_model:  # 保存できてから記録に加える
                    save_checkpoint(args.save_model, model, optimizer, scheduler,
                                    [*history, record], config)
            history.append(record)
    except KeyboardInterrupt:
        saved = f"エポック {len(history)} までを {args.save_model} に保存済みです。" \
            "同じコマンドに --resume をつけると続きから学習します" \
            if args.save_model and history else "保存したものはありません"
        print(f"\n中断しました。{saved}", file=sys.stderr)
        sys.exit(130)
    except (TrainingError, CheckpointError) as e:
        kept = (f"前の {args.save_model} はそのまま残っています"
                if args.save_model and Path(args.save_model).exists() else "何も保存していません")
        parser.exit(1, f"エラー: {str(e).rstrip('。')}。{kept}\n")

    seconds = history[-1]["seconds"] if history else 0.0
    result = {"train_seconds": seconds, "world_size": world_size, "epochs": len(history)}
    if main_process:  # テストデータで評価するのは、学習が終わってからの 1 回だけ
        test = evaluate(unwrap(model), test_loader, device)
        result.update(test_accuracy=test["accuracy"], test_loss=test["loss"])
        print(f"結果: テスト正解率 {100 * test['accuracy']:.2f} % "
              f"({round(test['accuracy'] * test['images'])}/{test['images']} 枚)、"
              f"学習時間 {seconds:.1f} 秒")
    if world_size > 1:
        dist.barrier()  # rank 0 の評価を待ってから終わる
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
