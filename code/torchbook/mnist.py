"""MNIST の手書き数字認識: データ・モデル・学習・評価・保存・コマンドライン。

このファイルは 1 つだけで動きます。読者のプロジェクトにコピーして使えます
(必要なのは torch・torchvision・tqdm と Python の標準ライブラリだけです)。

    python mnist.py --help
    python mnist.py data/                                  # 本書の MNISTNet (既定)
    python mnist.py --model ours --augment --one-cycle --lr 0.003 --batch-size 128 data/
    torchrun --nproc_per_node 2 mnist.py --no-shuffle data/  # データ並列 (付録)

``data/`` には IDX 形式の 4 ファイル (``train-images-idx3-ubyte`` など。``.gz`` でも可) を
直接置くか、torchvision と同じ ``data/MNIST/raw/`` に置きます。
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

MEAN, STD = 0.1307, 0.3081  # MNIST 訓練画像の画素の平均と標準偏差 (0〜1 の尺度)
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(RuntimeError):
    """データが見つからない・壊れているときの例外。メッセージに直し方を書きます。"""


class CheckpointError(RuntimeError):
    """チェックポイントがモデルに合わないときの例外。"""


# ---------------------------------------------------------------- デバイス
def pick_device(name: str | None = None, no_cuda: bool = False) -> torch.device:
    """計算に使うデバイスを選びます (指定がなければ cuda → mps → cpu の順)。"""
    if name not in (None, "auto"):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA が使えません。--device cpu を指定してください。")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("MPS (Apple GPU) が使えません。--device cpu を指定してください。")
        return device
    if torch.cuda.is_available() and not no_cuda:
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """画像のバッチをデバイスへ送ります。CPU と CUDA では channels_last に並べ替えます。"""
    x = x.to(device, non_blocking=True)
    if device.type in ("cpu", "cuda") and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # 畳み込みが速くなる並び
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
        raise DataError(f"{path} を読めません ({e})。ファイルを入れ直してください。") from e
    # 先頭 4 バイト: 0, 0, 型コード (0x08 = uint8), 次元数。続いて各次元の大きさ (4 バイト)
    zero, code, ndim = struct.unpack(">HBB", data[:4]) if len(data) >= 4 else (1, 0, 0)
    if zero != 0 or code != 0x08 or not 1 <= ndim <= 3:
        raise DataError(f"{path} は IDX 形式の uint8 データではありません。")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != torch.Size(shape).numel():
        raise DataError(f"{path} の大きさがヘッダーと合いません。途中で切れていませんか。")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def find_idx(datadir: str | os.PathLike, name: str) -> Path:
    """``datadir`` か ``datadir/MNIST/raw`` にある IDX ファイル (``.gz`` 可) を探します。"""
    datadir = Path(datadir)
    candidates = [d / (name + ext) for d in (datadir, datadir / "MNIST" / "raw")
                  for ext in ("", ".gz")]
    for path in candidates:
        if path.exists():
            return path
    raise DataError(
        f"{datadir} に MNIST の {name} がありません "
        f"(探した場所: {datadir}/ と {datadir}/MNIST/raw/)。"
        "インターネットにつながるなら --download をつけて実行してください。"
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
        self.inputs = to_inputs(images)  # 全部をメモリに置く (60,000 枚で 190 MB)
        self.targets = labels.long()

    @classmethod
    def from_dir(cls, datadir: str | os.PathLike, train: bool = True) -> MNISTDataset:
        images, labels = FILES[train]
        return cls(find_idx(datadir, images), find_idx(datadir, labels))

    def __len__(self) -> int:
        # データの個数を返す。
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # i 番目の (入力, 正解) の組を返す。
        return self.inputs[i], self.targets[i]


def torchvision_mnist(datadir: str | os.PathLike, train: bool = True,
                      download: bool = False) -> Dataset:
    """torchvision の MNIST (``datadir/MNIST/raw`` を読み、無ければダウンロード)。"""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    try:
        return datasets.MNIST(str(datadir), train=train, download=download, transform=transform)
    except RuntimeError as e:  # 見つからない・ダウンロードできない
        raise DataError(f"torchvision の MNIST を用意できません: {e}") from e


def tensor_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                   shuffle: bool = False,
                   generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """メモリ上のテンソルを batch_size 個ずつに区切って返します (DataLoader の軽量版)。"""
    order = torch.randperm(len(inputs), generator=generator) if shuffle else None
    for start in range(0, len(inputs), batch_size):
        if order is None:
            yield inputs[start : start + batch_size], targets[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield inputs[idx], targets[idx]


def random_affine(x: torch.Tensor, degrees: float = 10.0, scale: float = 0.1,
                  translate: float = 0.1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """バッチの各画像を、ランダムに少し回し・拡大縮小し・ずらします (データ拡張)。

    回転は ±degrees 度、倍率は 1±scale、ずれは画像の幅の ±translate/2 です
    (28 画素なら ±1.4 画素)。背景 (黒) の値で外側を埋めます。
    """
    n = len(x)

    def uniform(*shape: int) -> torch.Tensor:  # -1〜1 の一様乱数
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = uniform(n) * degrees * torch.pi / 180
    s = 1 + uniform(n) * scale
    shift = uniform(n, 2) * translate
    cos, sin = s * torch.cos(angle), s * torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (N, 2, 3) のアフィン行列
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    background = x.amin()
    return F.grid_sample(x - background, grid, align_corners=False) + background


# ---------------------------------------------------------------- モデル
class MNISTNet(nn.Module):
    """本書の基本の CNN (畳み込み 2 層と全結合 1 層、パラメーター 7,000 個ほど)。"""

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


# ---------------------------------------------------------------- 学習と評価
def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    augment: bool = False,
    generator: torch.Generator | None = None,
    log_interval: int = 10,
    dry_run: bool = False,
    progress: bool = False,
    verbose: bool = False,
) -> dict[str, float]:
    """1 エポック分の訓練をして、平均損失と (訓練中の) 正解率を返します。"""
    model.train()  # 訓練モード (Dropout・BatchNorm が訓練時の動きをする)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(batches, desc="訓練", leave=False, disable=not progress)
    for i, (inputs, targets) in enumerate(bar):
        if augment:
            inputs = random_affine(inputs, generator=generator)
        inputs, targets = to_device(inputs, device), targets.to(device)
        optimizer.zero_grad()  # 1. 前のステップの勾配を消す
        outputs = model(inputs)  # 2. 順伝播
        loss = F.cross_entropy(outputs, targets)  # 3. 損失 (バッチの平均)
        loss.backward()  # 4. 逆伝播で勾配を求める
        optimizer.step()  # 5. 重みを更新する
        if scheduler is not None:
            scheduler.step()  # 学習率をステップごとに変える (one-cycle)
        n = len(targets)
        total_loss += loss.item() * n
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += n
        if i % log_interval == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if verbose:
                tqdm.write(f"  バッチ {i:5d}  画像 {seen:7d} 枚  損失 {loss.item():.4f}")
        if dry_run:
            break
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, dry_run: bool = False) -> dict[str, float]:
    """テストデータで平均損失と正解率を求めます。"""
    model.eval()  # 評価モード
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, targets in batches:
        inputs, targets = to_device(inputs, device), targets.to(device)
        outputs = model(inputs)
        total_loss += F.cross_entropy(outputs, targets, reduction="sum").item()
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += len(targets)
        if dry_run:
            break
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen}


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, device: torch.device | str = "cpu",
            batch_size: int = 1000) -> torch.Tensor:
    """入力 (N, 1, 28, 28) の各クラスの確率 (N, 10) を CPU のテンソルで返します。"""
    model.eval()
    device = torch.device(device)
    probs = [F.softmax(model(to_device(inputs[i : i + batch_size], device)), dim=1).cpu()
             for i in range(0, len(inputs), batch_size)]
    return torch.cat(probs)


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """名前から最適化器を作ります。"""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    raise ValueError(f"最適化器は sgd, adam, adadelta のどれかです (渡された名前: {name!r})")


# 本書の速いレシピ (オフラインの 8,000 枚で 20 秒以内に 99 % を目指して選んだ値)
FAST_RECIPE = {"epochs": 8, "batch_size": 128, "lr": 5e-3, "optimizer": "adam",
               "one_cycle": True, "augment": True, "seed": 1}


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    epochs: int = 8,
    optimizer: str = "adam",
    lr: float = 5e-3,
    batch_size: int = 128,
    one_cycle: bool = True,
    augment: bool = True,
    seed: int = 1,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """メモリ上のテンソルで学習し、エポックごとの損失・正解率・経過秒数を返します。

    既定値は本書の速いレシピ (Adam + one-cycle + データ拡張) です。
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    steps = epochs * -(-len(train[0]) // batch_size)  # 切り上げの割り算
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
                 if one_cycle else None)
    history, elapsed = [], 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        batches = tensor_batches(*train, batch_size, shuffle=True, generator=generator)
        tr = train_one_epoch(model, batches, opt, device, scheduler, augment, generator)
        elapsed += time.perf_counter() - start  # 学習時間 (評価の時間は含めない)
        te = evaluate(model, tensor_batches(*test, 1000), device)
        history.append({"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                        "test_loss": te["loss"], "test_accuracy": te["accuracy"],
                        "seconds": elapsed})
    return history


# ---------------------------------------------------------------- 保存と読み込み
def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """モデルの重み (state_dict) を保存します。DDP で包んだモデルは中身を保存します。"""
    model = model.module if hasattr(model, "module") else model
    torch.save(model.state_dict(), path)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """保存した state_dict を読み込みます。別のモデルのものなら分かりやすく断ります。"""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # 重みだけを読む
    except FileNotFoundError:
        raise
    except Exception as e:  # 壊れたファイルや、テンソル以外を含むファイル
        raise CheckpointError(f"{path} は state_dict のチェックポイントとして読めません ({e})。") \
            from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} は state_dict (名前 → テンソルの辞書) ではありません。")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    target = model.module if hasattr(model, "module") else model
    if not _matches(target.state_dict(), state):
        others = [name for name, cls in MODELS.items() if _matches(cls().state_dict(), state)]
        hint = "モデルの定義が保存したときと違います。"
        if others:
            hint = f"{others[0]} のものです。--model {others[0]} を指定してください。"
        raise CheckpointError(f"{path} は {type(target).__name__} の重みではありません。{hint}")
    target.load_state_dict(state)
    return model


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
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PyTorch で MNIST を学習・評価します")
    p.add_argument("--verbose", action="store_true", help="詳細なログを表示する")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="訓練時のバッチサイズ (DDP ではプロセスごと。既定: 32)")
    p.add_argument("--test-batch-size", type=int, default=1000, metavar="N",
                   help="テスト時のバッチサイズ (既定: 1000)")
    p.add_argument("--no-shuffle", action="store_true", help="訓練データをシャッフルしない")
    p.add_argument("--epochs", type=int, default=10, metavar="N",
                   help="エポック数 (既定: 10。0 なら --save-model のモデルを評価するだけ)")
    p.add_argument("--lr", type=float, default=0.01, metavar="LR", help="学習率 (既定: 0.01)")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="乱数のシード (既定: 1)")
    p.add_argument("--no-cuda", action="store_true", help="GPU があっても CUDA を使わない")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, mps など (既定: auto = cuda → mps → cpu)")
    p.add_argument("--dry-run", action="store_true", help="確認用に 1 バッチだけ実行する")
    p.add_argument("--log-interval", type=int, default=10, metavar="N",
                   help="損失を表示する間隔 (バッチ数。既定: 10)")
    p.add_argument("--save-model", metavar="PATH",
                   help="モデルを保存するパス (ファイルがあれば読み込んでから続きを学習する)")
    p.add_argument("--model", choices=list(MODELS), default="mnistnet",
                   help="モデル (既定: mnistnet)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adadelta"], default="adam",
                   help="最適化器 (既定: adam)")
    p.add_argument("--one-cycle", action="store_true", help="学習率を one-cycle で変える")
    p.add_argument("--augment", action="store_true", help="少し回し・拡大縮小し・ずらすデータ拡張")
    p.add_argument("--train-size", type=int, default=None, metavar="N",
                   help="訓練データの先頭 N 枚だけを使う (既定: 全部)")
    p.add_argument("--download", action="store_true",
                   help="torchvision でダウンロードする (インターネット接続が必要)")
    p.add_argument("datadir", help="MNIST の IDX ファイルがあるディレクトリ")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """値の範囲を確かめ、おかしければ直し方つきで終了します。"""
    for name in ("batch_size", "test_batch_size", "log_interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} は 1 以上の整数です "
                         f"(渡された値: {getattr(args, name)})")
    if args.epochs < 0:
        parser.error(f"--epochs は 0 以上です (渡された値: {args.epochs})")
    if not args.lr > 0:
        parser.error(f"--lr は正の数です (渡された値: {args.lr})")
    if args.train_size is not None and args.train_size <= 0:
        parser.error(f"--train-size は 1 以上です (渡された値: {args.train_size})")
    if args.epochs == 0 and not (args.save_model and Path(args.save_model).exists()):
        parser.error("--epochs 0 は、既存のモデルを --save-model PATH で指定したときだけ使えます")
    if args.no_cuda and args.device.startswith("cuda"):
        parser.error("--no-cuda と --device cuda は同時に指定できません")
    if not args.download and not Path(args.datadir).is_dir():
        parser.error(f"datadir {args.datadir!r} がありません (MNIST のあるディレクトリを指定)")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        device = pick_device(args.device, args.no_cuda)
        rank, world_size = setup_distributed(device)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # 1 プロセスに 1 GPU
        torch.cuda.set_device(device)
    main_process = rank == 0  # 表示と保存は rank 0 だけがする
    torch.manual_seed(args.seed)  # 全プロセスで同じ初期値にする

    try:
        if args.download:
            train_set = torchvision_mnist(args.datadir, True, download=True)
            test_set = torchvision_mnist(args.datadir, False, download=True)
        else:
            train_set = MNISTDataset.from_dir(args.datadir, train=True)
            test_set = MNISTDataset.from_dir(args.datadir, train=False)
    except DataError as e:
        parser.exit(1, f"エラー: {e}\n")
    if args.train_size is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(args.train_size, len(train_set))))

    sampler = None
    if world_size > 1:  # 各プロセスに訓練データの別々の部分を配る
        sampler = DistributedSampler(train_set, shuffle=not args.no_shuffle, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed + rank)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                              shuffle=sampler is None and not args.no_shuffle,
                              generator=generator)
    test_loader = DataLoader(test_set, batch_size=args.test_batch_size)

    model = create_model(args.model, device)
    if args.save_model and Path(args.save_model).exists():
        try:
            load_checkpoint(model, args.save_model)
        except CheckpointError as e:
            parser.exit(1, f"エラー: {e}\n")
        if main_process:
            print(f"{args.save_model} を読み込みました")
    if world_size > 1:  # 勾配をプロセス間で平均する (all-reduce) ラッパー
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    scheduler = None
    if args.one_cycle and args.epochs > 0:
        steps = 1 if args.dry_run else args.epochs * len(train_loader)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)

    if main_process:
        print(f"モデル {args.model} ({count_parameters(model):,} パラメーター)、"
              f"デバイス {device}、プロセス数 {world_size}、訓練 {len(train_set):,} 枚、"
              f"テスト {len(test_set):,} 枚")
    train_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)  # エポックごとに並びを変える (全プロセスで同じ乱数)
        start = time.perf_counter()
        tr = train_one_epoch(model, train_loader, optimizer, device, scheduler,
                             augment=args.augment, generator=generator,
                             log_interval=args.log_interval, dry_run=args.dry_run,
                             progress=main_process, verbose=args.verbose and main_process)
        train_seconds += time.perf_counter() - start
        if main_process:
            te = evaluate(model, test_loader, device, dry_run=args.dry_run)
            print(f"エポック {epoch:3d}: 訓練の損失 {tr['loss']:.4f}  "
                  f"テストの損失 {te['loss']:.4f}  テスト正解率 {100 * te['accuracy']:.2f} %")
        if args.dry_run:
            break

    result = {"train_seconds": train_seconds, "world_size": world_size}
    if main_process:
        te = evaluate(model, test_loader, device, dry_run=args.dry_run)
        result.update(test_accuracy=te["accuracy"], test_loss=te["loss"])
        images = len(train_set) * (1 if args.dry_run else args.epochs)
        speed = f"、{images / train_seconds:,.0f} 枚/秒" if train_seconds > 0 and not args.dry_run \
            else ""
        print(f"結果: テスト正解率 {100 * te['accuracy']:.2f} % "
              f"({round(te['accuracy'] * te['images'])}/{te['images']} 枚)、"
              f"学習時間 {train_seconds:.1f} 秒{speed}")
        if args.save_model and args.epochs > 0:
            save_checkpoint(model, args.save_model)  # rank 0 だけが保存する
            print(f"{args.save_model} に保存しました")
    if world_size > 1:
        dist.barrier()  # rank 0 の保存を待ってから終わる
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
