"""生成画像の品質を測るための Fashion-MNIST 分類器。

FID や KID は「画像をある特徴空間に写し、本物と生成物の分布を比べる」指標です。
原論文は ImageNet で学習した Inception-v3 の特徴を使いますが、32×32 の白黒の服の画像には
大きすぎて合いません。そこでこの章では、Fashion-MNIST で学習した小さな CNN の
最後から 2 番目の層 (128 次元) を特徴空間として使います。

この分類器は拡散モデルではないので BatchNorm を使っても問題ありません
(評価時は ``eval()`` で学習時の統計量に固定されます)。

学習::

    python -m torchbook.diffusion.classifier --data-root data --epochs 10 --threads 1 \\
        --save code/torchbook/diffusion/weights/fashion_classifier.pt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import load_tensors
from .train import git_commit  # 来歴 JSON に書くコミット (学習 CLI と同じ関数)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "fashion_classifier.pt"
FEATURE_DIM = 128
TRAIN_COMMAND = (
    "python -m torchbook.diffusion.classifier --data-root DATA_DIR "
    f"--save {DEFAULT_WEIGHTS}"
)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 畳み込み → BatchNorm → ReLU → 2×2 最大プーリング (縦横が半分になります)。"""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionClassifier(nn.Module):
    """(N, 1, 32, 32)・[-1, 1] の画像を 10 クラスに分ける小さな CNN (約 25 万パラメータ)。

    最初の畳み込みはストライド 2 で 32×32 → 16×16 に縮めます (CPU では大きな特徴マップの
    読み書きが一番遅いため)。続けて 8×8 → 4×4 と縮め、全結合層で 128 次元の特徴にしてから
    10 クラスのロジットを出します。``features`` がその 128 次元を返します。
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, dropout: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 24, 4, stride=2, padding=1, bias=False),  # (N, 24, 16, 16)
            nn.BatchNorm2d(24),
            nn.ReLU(inplace=True),
            conv_block(24, 48),  # (N, 48, 8, 8)
            conv_block(48, 96),  # (N, 96, 4, 4)
            nn.Flatten(),  # (N, 1536)
            nn.Linear(96 * 4 * 4, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),  # ここまでが特徴 (N, feature_dim)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """最後から 2 番目の層の特徴 (N, feature_dim) を返します。FID/KID はこれを使います。"""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ロジット (N, 10) を返します。"""
        return self.head(self.dropout(self.features(x)))


def load_classifier(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> FashionClassifier:
    """学習済みの分類器を読み込み、評価モード (eval) で返します。

    ``path`` を省くと、このファイルの隣の ``weights/fashion_classifier.pt`` を読みます。
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"分類器の重み {path} がありません。次のコマンドで学習して保存してください:\n"
            f"  {TRAIN_COMMAND}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FashionClassifier()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path} は FashionClassifier の重みではありません (構造が違います)。"
            f"このモジュールの学習コマンドで作り直してください:\n  {TRAIN_COMMAND}"
        ) from e
    return model.to(device).eval()


# ---------------------------------------------------------------- 学習


def augment(x: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """軽いデータ拡張: 左右反転 (半分の確率) と上下左右 ±max_shift 画素の平行移動。

    服は左右反転しても同じクラスなので反転を使えます。空いた縁は背景の -1 で埋めます。
    """
    n, _, h, w = x.shape
    flip = torch.rand(n, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=-1.0)
    dy = torch.randint(0, 2 * s + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * s + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded[idx, 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int = 1000, device: str = "cpu"
) -> torch.Tensor:
    """画像全体のクラス予測 (N,) をバッチに分けて計算します。"""
    model.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size].to(device)
        preds.append(model(xb).argmax(1).cpu())
    return torch.cat(preds)


def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu"
) -> float:
    """正解率 (0〜1) を返します。"""
    return (predict(model, images, device=device) == labels).float().mean().item()


def train_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    args: argparse.Namespace,
    epoch: int,
) -> float:
    """1 エポック分学習し、平均損失を返します。データはテンソルのまま切り出します。"""
    model.train()
    perm = torch.randperm(len(x))
    total, count = 0.0, 0
    batches = range(0, len(x), args.batch_size)
    for i in tqdm(batches, desc=f"epoch {epoch}", leave=False):
        idx = perm[i : i + args.batch_size]
        xb = augment(x[idx], args.max_shift).to(args.device)
        yb = y[idx].to(args.device)
        if args.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16,
                            enabled=args.bf16):
            loss = F.cross_entropy(model(xb), yb, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
        count += len(idx)
        if args.dry_run:
            break
    return total / count


def pick_device(name: str) -> str:
    """--device の指定を確かめて返します。使えない装置ならわかるように止めます。"""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda が指定されましたが CUDA が使えません。")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("--device mps が指定されましたが MPS が使えません。")
    return name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FID/KID 用の Fashion-MNIST 分類器を学習します")
    p.add_argument("--data-root", default="data", help="Fashion-MNIST のあるフォルダ")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="OneCycle の最大学習率")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--max-shift", type=int, default=2, help="平行移動の最大画素数")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU のスレッド数")
    p.add_argument("--bf16", action="store_true", help="bfloat16 の autocast を使う")
    p.add_argument("--channels-last", action="store_true", help="channels_last 形式で計算する")
    p.add_argument("--save", default=str(DEFAULT_WEIGHTS), help="state_dict の保存先 (.pt)")
    p.add_argument("--floor", type=int, nargs="*", default=[1000, 5000],
                   help="実画像どうしの FID/KID (下限) を測る枚数 (テスト画像から)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="学習せず、--save の重みの正解率と下限を測り直して JSON を更新する")
    p.add_argument("--dry-run", action="store_true", help="1 バッチだけ学習して保存する")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs と --batch-size は 1 以上にしてください")
    if any(n < 2 or 2 * n > 10_000 for n in args.floor):
        p.error("--floor の枚数は 2〜5000 にしてください (テスト画像 10,000 枚を 2 つに分けます)")
    args.device = pick_device(args.device)
    return args


def train(args: argparse.Namespace, x_train: torch.Tensor, y_train: torch.Tensor):
    """分類器を学習し、(モデル, エポックごとの学習損失) を返します。"""
    epochs = 1 if args.dry_run else args.epochs
    model = FashionClassifier().to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = -(-len(x_train) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=epochs, steps_per_epoch=steps
    )
    history = []
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, x_train, y_train, optimizer, scheduler, args, epoch)
        history.append(round(loss, 4))
        tqdm.write(f"epoch {epoch}: 学習損失 {loss:.4f}")
    return model.to(memory_format=torch.contiguous_format).eval(), history


def evaluate(
    model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, floor_sizes: list[int],
    device: str,
) -> dict:
    """テスト正解率と、実画像どうしの FID/KID (下限) を測ります。"""
    from .metrics import real_floor  # 学習には要らないので、ここで import します

    test_acc = accuracy(model, x_test, y_test, device=device)
    tqdm.write(f"テスト正解率: {test_acc:.4f} ({len(x_test)} 枚)")
    floors = {}
    for n in floor_sizes:
        floors[str(n)] = real_floor(model, x_test, n, device=device)
        tqdm.write(f"実画像どうしの下限 (N={n}): {floors[str(n)]}")
    return {
        "test_images": len(x_test),
        "test_accuracy": round(test_acc, 4),
        "real_floor": floors,
        "real_floor_note": (
            "N 枚の実画像どうしの FID/KID。参照集合 = テスト画像の先頭 N 枚 (test[:N])、"
            "比べる集合 = 重ならない次の N 枚 (test[N:2N])。KID は部分集合の大きさ "
            "min(1000, N/2)、100 回の平均と標準偏差。"
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    command = " ".join(["python -m torchbook.diffusion.classifier"]
                       + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    commit = git_commit()  # 学習を始めた時点のコード
    save = Path(args.save)
    x_test, y_test = load_tensors(args.data_root, train=False)

    if args.evaluate_only:  # 保存済みの重みを測り直し、JSON の測定値だけを更新します
        model = load_classifier(save, args.device)
        info = json.loads(save.with_suffix(".json").read_text("utf-8"))
        info.update(evaluate(model, x_test, y_test, args.floor, args.device))
        info["evaluation"] = {"command": command, "git_commit": commit,
                              "torch_version": torch.__version__}
    else:
        x_train, y_train = load_tensors(args.data_root, train=True)
        model, history = train(args, x_train, y_train)
        train_seconds = time.perf_counter() - start
        save.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, save)
        if args.dry_run:
            x_test, y_test, args.floor = x_test[:1000], y_test[:1000], []
        info = {
            "command": command,
            "git_commit": commit,
            "epochs": len(history),
            "dry_run": args.dry_run,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "max_shift": args.max_shift,
            "seed": args.seed,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "bf16": args.bf16,
            "channels_last": args.channels_last,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "train_seconds": round(train_seconds, 1),
            "train_loss": history,
            "feature_dim": FEATURE_DIM,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        info.update(evaluate(model, x_test, y_test, args.floor, args.device))
    save.with_suffix(".json").write_text(
        json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return info


if __name__ == "__main__":
    main()
