"""MNIST: 本書のレシピと pytorch/examples のレシピを、同じデータ・同じ計算機で比べます。

    nice python benchmarks/mnist_bench.py [--out benchmarks/results/mnist_bench.txt]

それぞれの学習を最後まで走らせ、1/4 エポックごとにテスト正解率を測り (評価の時間は
除く)、98 % と 99 % に初めて届いた学習時間と、学習の速さ (枚/秒) を並べて表示します。

pytorch/examples (mnist/main.py) の既定値: 畳み込み 1→32→64 (3×3)、最大値プーリング、
Dropout 0.25 / 0.5、全結合 9216→128→10、Adadelta (lr 1.0)、StepLR (gamma 0.7)、
バッチ 64、14 エポック、データ拡張なし。
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from booktools import data
from torchbook import mnist


class ExamplesNet(nn.Module):
    """pytorch/examples の mnist/main.py と同じ構造の CNN (120 万パラメーター)。"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc2(x)  # 元は log_softmax + nll_loss。cross_entropy と同じ


def run(name: str, train, test, epochs: int, batch_size: int, seed: int = 1) -> dict:
    """1 つのレシピで学習し、(学習秒数, テスト正解率) の列と速さを返します。"""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    device = torch.device("cpu")
    if name == "ours":
        model = mnist.create_model("ours")
        opt = torch.optim.Adam(model.parameters(), lr=mnist.FAST_RECIPE["lr"])
        steps = epochs * -(-len(train[0]) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, mnist.FAST_RECIPE["lr"], total_steps=steps)
        per_step, per_epoch, augment = sched, None, True
    else:
        model = ExamplesNet()  # 元のとおり NCHW・float32
        opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
        per_step, augment = None, False
        per_epoch = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    n_batches = -(-len(train[0]) // batch_size)
    check_every = max(1, n_batches // 4)
    curve, elapsed, images = [], 0.0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        batches = mnist.tensor_batches(*train, batch_size, shuffle=True, generator=g)
        for i, (x, y) in enumerate(batches):
            start = time.perf_counter()
            if augment:
                x = mnist.random_affine(x, generator=g)
            x = mnist.to_device(x, device) if name == "ours" else x
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if per_step is not None:
                per_step.step()
            elapsed += time.perf_counter() - start
            images += len(y)
            if (i + 1) % check_every == 0 or i + 1 == n_batches:
                acc = mnist.evaluate(model, mnist.tensor_batches(*test, 1000), device)["accuracy"]
                curve.append((elapsed, acc))
                model.train()
        if per_epoch is not None:
            per_epoch.step()
        print(f"  {name} エポック {epoch}: テスト正解率 {100 * curve[-1][1]:.2f} %、"
              f"学習 {elapsed:.1f} 秒", flush=True)
    return {"curve": curve, "seconds": elapsed, "images_per_s": images / elapsed,
            "final": curve[-1][1], "params": mnist.count_parameters(model)}


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def fmt(seconds: float | None) -> str:
    return f"{seconds:.1f} 秒" if seconds is not None else "届かず"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/mnist_bench.txt")
    p.add_argument("--examples-epochs", type=int, default=14)
    p.add_argument("--threads", type=int, default=None,
                   help="torch のスレッド数 (既定: 変えない。CPU を共有中なら 1 が安定)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data.data_root()
    train_set = mnist.MNISTDataset.from_dir(root, train=True)
    test_set = mnist.MNISTDataset.from_dir(root, train=False)
    train = (train_set.inputs, train_set.targets)
    test = (test_set.inputs, test_set.targets)
    manifest = data.read_manifest("mnist")
    lines = [
        f"日時: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"計算機: {platform.processor() or platform.machine()}, {os.cpu_count()} コア, "
        f"torch {torch.__version__}, スレッド {torch.get_num_threads()}, "
        f"開始時の負荷 (loadavg) {os.getloadavg()[0]:.2f}",
        f"データ: 訓練 {len(train_set):,} 枚 / テスト {len(test_set):,} 枚 ({manifest['detail']})",
        "",
    ]
    print("\n".join(lines), flush=True)
    results = {
        "ours": run("ours", train, test, mnist.FAST_RECIPE["epochs"],
                    mnist.FAST_RECIPE["batch_size"]),
        "examples": run("examples", train, test, args.examples_epochs, 64),
    }
    labels = {"ours": "本書 (FastNet, Adam+one-cycle, 拡張)",
              "examples": "pytorch/examples (Adadelta, StepLR)"}
    header = f"{'レシピ':<36}{'パラメーター':>12}{'98 % まで':>10}{'99 % まで':>10}" \
             f"{'最終正解率':>10}{'学習時間':>9}{'枚/秒':>8}"
    rows = [header]
    for key, r in results.items():
        t98, t99 = time_to(r["curve"], 0.98), time_to(r["curve"], 0.99)
        rows.append(
            f"{labels[key]:<36}{r['params']:>12,}"
            f"{fmt(t98):>10}{fmt(t99):>10}"
            f"{100 * r['final']:>9.2f}%{r['seconds']:>7.1f} 秒{r['images_per_s']:>8,.0f}"
        )
    for target in (0.98, 0.99):
        a = time_to(results["ours"]["curve"], target)
        b = time_to(results["examples"]["curve"], target)
        if a and b:
            rows.append(f"{target:.0%} に届くまでの時間の比 (examples / 本書): {b / a:.1f} 倍")
        elif a:  # examples は最後まで届かなかった: 全学習時間との比は下限になる
            total = results["examples"]["seconds"]
            rows.append(f"{target:.0%}: examples は {total:.1f} 秒の学習で届かず。"
                        f"時間の比は {total / a:.1f} 倍より大きい (examples の全学習時間 / 本書)")
        else:
            rows.append(f"{target:.0%}: 本書 {'届いた' if a else '届かず'}, "
                        f"examples {'届いた' if b else '届かず'} (比は出せません)")
    ratio = results["ours"]["images_per_s"] / results["examples"]["images_per_s"]
    rows.append(f"学習の速さの比 (本書 / examples, 枚/秒): {ratio:.1f} 倍")
    print("\n".join(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines + rows) + "\n", encoding="utf-8")
    print(f"\n{out} に保存しました")


if __name__ == "__main__":
    main()
