"""生成画像の品質を測るための Fashion-MNIST 分類器。

FID や KID は「画像をある特徴空間に写し、本物と生成物の分布を比べる」指標です。
原論文は ImageNet で学習した Inception-v3 の特徴を使いますが、32×32 の白黒の服の画像には
大きすぎて合いません。そこでこの章では、Fashion-MNIST で学習した小さな CNN の
最後から 2 番目の層 (128 次元) を特徴空間として使います。

この分類器は拡散モデルではないので BatchNorm を使っても問題ありません
(評価時は ``eval()`` で学習時の統計量に固定されます)。

学習 (同梱の重みを作り直すときは --save に weights/fashion_classifier.pt を明示します)::

    python -m torchbook.diffusion.classifier --data-root data --epochs 10 --threads 1 \\
        --save runs/fashion_classifier.pt

モデル (``FashionClassifier``) と読み込み (``load_classifier``) は ``fashion_classifier``
にあり、ここには学習の CLI だけがあります。
"""

from __future__ import annotations

if not __package__:  # ファイルを直接実行した: 下の相対 import の代わりに -m を 1 行で案内する
    import direct_run  # noqa: F401

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import options
from .checkpoint import (
    atomic_save,
    atomic_write_text,
    command_line,
    git_commit,
)
from .data import load_tensors
from .device import get_device
from .fashion_classifier import FEATURE_DIM, FashionClassifier, load_classifier
from .metrics import SPLITS, real_reference

DEFAULT_SAVE = Path("runs") / "fashion_classifier.pt"


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
    model: nn.Module, images: torch.Tensor, batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """画像全体のクラス予測 (N,) をバッチに分けて計算します。"""
    model.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size].to(device)
        preds.append(model(xb).argmax(1).cpu())
    return torch.cat(preds)


def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
    device: str | torch.device = "cpu",
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
    for i in tqdm(batches, desc=f"epoch {epoch}", leave=False,
                  disable=not sys.stderr.isatty()):
        idx = perm[i : i + args.batch_size]
        xb = augment(x[idx], args.max_shift).to(args.device)
        yb = y[idx].to(args.device)
        if args.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=args.device.type, dtype=torch.bfloat16,
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


def build_parser() -> argparse.ArgumentParser:
    """この CLI の引数 (値の確認は ``parse_args`` が作業の前に行います)。"""
    p = argparse.ArgumentParser(description="FID/KID 用の Fashion-MNIST 分類器を学習します",
                                formatter_class=options.HelpFormatter)
    options.add_data_arguments(p)
    p.add_argument("--epochs", type=options.positive_int, default=10, help="エポック数")
    p.add_argument("--batch-size", type=options.positive_int, default=256, help="バッチサイズ")
    p.add_argument("--lr", type=options.positive_float, default=3e-3, help="OneCycle の最大学習率")
    p.add_argument("--weight-decay", type=options.nonneg_float, default=5e-4,
                   help="AdamW の重み減衰")
    p.add_argument("--max-shift", type=int, choices=range(0, 9), default=2,
                   help="平行移動の最大画素数 (0〜8)")
    p.add_argument("--label-smoothing", type=options.probability, default=0.0,
                   help="交差エントロピーのラベル平滑化")
    p.add_argument("--seed", type=int, default=1, help="シード")
    options.add_device_arguments(p, channels_last=True, auto_formats=False)
    p.add_argument("--save", default=str(DEFAULT_SAVE),
                   help="state_dict の保存先 (.pt、来歴は隣の .json)")
    p.add_argument("--reference", type=options.reference_count, nargs="*", default=[1000],
                   help="本物どうしの FID/KID (参照レベル) を val と test で測る枚数")
    p.add_argument("--evaluate-only", action="store_true",
                   help="学習せず、--save の重みの正解率と参照レベルを測り直して JSON を更新する")
    p.add_argument("--dry-run", action="store_true",
                   help="1 バッチだけ学習し、何も保存しない (動作の確認用)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.evaluate_only:
        if not Path(args.save).is_file():
            p.error(f"--evaluate-only: {args.save} がありません (--save で重みを指定してください)")
        if not Path(args.save).with_suffix(".json").is_file():
            p.error(f"--evaluate-only: 来歴 {Path(args.save).with_suffix('.json')} がありません")
    if not args.dry_run:
        options.check_output(p, args.save, "--save", (".pt",))
    args.device = args.device or get_device()
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
    model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, reference_sizes: list[int],
    device: torch.device,
) -> dict:
    """テスト正解率と、本物どうしの FID/KID (参照レベル) を val と test の両方で測ります。"""
    test_acc = accuracy(model, x_test, y_test, device=device)
    tqdm.write(f"テスト正解率: {test_acc:.4f} ({len(x_test)} 枚)")
    refs = {}
    for n in reference_sizes:
        for split in SPLITS:
            refs[f"{split}@{n}"] = real_reference(model, x_test, y_test, split, n, device=device)
            tqdm.write(f"本物どうしの FID ({split}, N={n}): {refs[f'{split}@{n}']['fid']:.3f}")
    return {
        "test_images": len(x_test),
        "test_accuracy": round(test_acc, 4),
        "real_reference": refs,
        "real_reference_note": (
            "N 枚の本物どうしの FID/KID (参照レベル、下限ではない)。"
            "テスト画像をクラスごとに半分ずつ val と test に分け (metrics.split_matrix)、"
            "それぞれを重ならない N 枚の組に分けて、"
            "組 0 (生成画像と比べる参照集合) と組 1 の値が fid・kid、組 0 とほかの各組の FID が "
            "fid_blocks。KID は部分集合の大きさ min(1000, N/2)、100 回の平均と標準偏差。"
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    command = command_line(__spec__.name if __spec__ else __name__, argv)
    commit = git_commit()  # 学習を始めた時点のコード
    save = Path(args.save)
    try:  # 学習の前に両方を読む (無い・壊れているなら、作業の前に直し方を 1 行で)
        x_test, y_test = load_tensors(args.data_root, train=False, download=args.download)
        if not args.evaluate_only:
            x_train, y_train = load_tensors(args.data_root, train=True, download=args.download)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None

    if args.evaluate_only:  # 保存済みの重みを測り直し、JSON の測定値だけを更新します
        model = load_classifier(save, args.device)
        info = json.loads(save.with_suffix(".json").read_text("utf-8"))
        info.update(evaluate(model, x_test, y_test, args.reference, args.device))
        info["evaluation"] = {"command": command, "git_commit": commit,
                              "torch_version": torch.__version__}
    else:
        model, history = train(args, x_train, y_train)
        train_seconds = time.perf_counter() - start
        if args.dry_run:
            acc = accuracy(model, x_test[:1000], y_test[:1000], device=args.device)
            print(f"dry run: 1 バッチだけ学習しました (テスト 1,000 枚の正解率 {acc:.3f})。"
                  "何も保存していません")
            return {"dry_run": True, "train_loss": history, "accuracy_1000": acc}
        try:
            atomic_save({k: v.cpu() for k, v in model.state_dict().items()}, save)
        except OSError as e:
            raise SystemExit(str(e)) from None
        info = {
            "command": command,
            "git_commit": commit,
            "epochs": len(history),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "max_shift": args.max_shift,
            "seed": args.seed,
            "device": str(args.device),
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
        info.update(evaluate(model, x_test, y_test, args.reference, args.device))
    try:
        atomic_write_text(save.with_suffix(".json"),
                          json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    except OSError as e:
        raise SystemExit(str(e)) from None
    return info


if __name__ == "__main__":
    main()
