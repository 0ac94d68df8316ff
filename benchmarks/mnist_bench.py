"""MNIST: レシピを検証データで選び (ablation)、選んだレシピだけをテストデータで測ります。

    nice python benchmarks/mnist_bench.py ablation --threads 1
        → code/torchbook/weights/mnist_recipe.json (第 5 章が読む記録)
    nice python benchmarks/mnist_bench.py compare --threads 1
        → benchmarks/results/mnist_bench.txt (pytorch/examples のレシピとの速さの比較)

ablation: 基準のレシピ (FastNet, Adam + one-cycle + データ拡張, 8 エポック) から材料を
1 つずつ外したり変えたりして、検証データの正解率と学習時間を比べます (シードごと)。
検証の正解率の平均が最も高いレシピを選び、そのレシピだけをテストデータで評価します
(シードを増やして平均とばらつきを出します)。テストデータは選ぶのに使いません。

compare: ablation で選んだ本書のレシピ (記録が無ければ基準のレシピ) と、
pytorch/examples (mnist/main.py) の既定値 (畳み込み 1→32→64、Dropout、
全結合 9216→128→10、Adadelta lr 1.0、StepLR gamma 0.7、バッチ 64、14 エポック、拡張なし)
を同じデータ・同じ計算機で走らせ、検証の正解率が 98 % と 99 % に
初めて届いた学習時間と、学習の速さ (枚/秒) を比べます。
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from booktools import data
from torchbook import mnist

REPO = Path(__file__).resolve().parents[1]
RECIPE_JSON = REPO / "code" / "torchbook" / "weights" / "mnist_recipe.json"

# 本書のレシピの候補 (ablation の基準)
BASE = {"model": "ours", "optimizer": "adam", "lr": 5e-3, "one_cycle": True, "augment": True,
        "epochs": 8, "batch_size": 128}
# 基準から 1 つだけ変えたもの: (名前, 変更)
VARIANTS = [
    ("基準 (Adam + one-cycle + 拡張、8 エポック)", {}),
    ("Adam → SGD (モーメンタム 0.9、学習率 0.05)", {"optimizer": "sgd", "lr": 0.05}),
    ("one-cycle なし (学習率一定)", {"one_cycle": False}),
    ("データ拡張なし", {"augment": False}),
    ("4 エポック", {"epochs": 4}),
    ("12 エポック", {"epochs": 12}),
]


def load_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """訓練データを層化して訓練用と検証用に分け、テストデータと合わせて返します。"""
    root = data.data_root()
    full = mnist.MNISTDataset.from_dir(root, train=True)
    test = mnist.MNISTDataset.from_dir(root, train=False)
    train_idx, val_idx = mnist.split_train_val(full.targets, len(full) // 8)
    return {"train": (full.inputs[train_idx], full.targets[train_idx]),
            "val": (full.inputs[val_idx], full.targets[val_idx]),
            "test": (test.inputs, test.targets)}


def train_recipe(recipe: dict, splits: dict, seed: int) -> tuple[nn.Module, list[dict]]:
    """1 つのレシピを 1 つのシードで学習します (第 5 章と同じ mnist.fit を使う)。"""
    torch.manual_seed(seed)
    model = mnist.create_model(recipe["model"])
    optimizer = mnist.make_optimizer(recipe["optimizer"], model.parameters(), recipe["lr"])
    train = mnist.TensorLoader(*splits["train"], recipe["batch_size"], shuffle=True)
    val = mnist.TensorLoader(*splits["val"], 1000)
    scheduler = None
    if recipe["one_cycle"]:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, recipe["lr"], total_steps=recipe["epochs"] * len(train))
    history = list(mnist.fit(model, optimizer, train, val, recipe["epochs"], scheduler=scheduler,
                             augment=recipe["augment"]))
    return model, history


def machine() -> dict:
    manifest = data.read_manifest("mnist")
    return {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "cpu": f"{platform.machine()}, {os.cpu_count()} コア",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "data": manifest["detail"].split(" ← ")[0],  # 出どころ (ビルドした計算機のパスは除く)
    }


def ablation(args: argparse.Namespace) -> None:
    splits = load_splits()
    seeds = list(range(1, args.seeds + 1))
    rows, models = [], {}
    for name, change in VARIANTS:
        recipe = {**BASE, **change}
        accs, secs = [], []
        for seed in seeds:
            model, history = train_recipe(recipe, splits, seed)
            accs.append(history[-1]["val_accuracy"])
            secs.append(history[-1]["seconds"])
            models[name, seed] = model
            print(f"{name} シード {seed}: 検証 {100 * accs[-1]:.2f} %、{secs[-1]:.1f} 秒",
                  flush=True)
        rows.append({"name": name, "change": change, "recipe": recipe, "val_accuracy": accs,
                     "val_mean": statistics.mean(accs), "seconds_mean": statistics.mean(secs)})
    best = max(rows, key=lambda r: r["val_mean"])  # 検証の正解率の平均で選ぶ
    print(f"選んだレシピ: {best['name']}", flush=True)

    # 選んだレシピだけをテストデータで評価する (シードを足して、平均とばらつきを出す)
    test_seeds = list(range(1, args.test_seeds + 1))
    test_loader = mnist.TensorLoader(*splits["test"], 1000)
    test_accs = []
    for seed in test_seeds:
        model = models.get((best["name"], seed))
        if model is None:
            model, _ = train_recipe(best["recipe"], splits, seed)
        test_accs.append(mnist.evaluate(model, test_loader, torch.device("cpu"))["accuracy"])
        print(f"テスト シード {seed}: {100 * test_accs[-1]:.2f} %", flush=True)
    record = {
        "command": "python benchmarks/mnist_bench.py " + " ".join(sys.argv[1:]),
        **machine(),
        "split": {"train": len(splits["train"][1]), "val": len(splits["val"][1]),
                  "test": len(splits["test"][1]), "split_seed": mnist.SPLIT_SEED,
                  "val_from": "訓練データ (層化)", "chosen_by": "val"},
        "seeds": seeds,
        "ablation": rows,
        "chosen": {"name": best["name"], "recipe": best["recipe"]},
        "test": {"split": "test", "seeds": test_seeds, "accuracy": test_accs,
                 "mean": statistics.mean(test_accs), "stdev": statistics.stdev(test_accs),
                 "min": min(test_accs), "max": max(test_accs)},
    }
    out = Path(args.out or RECIPE_JSON)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, ensure_ascii=False, indent=1) + "\n"
    data.atomic_write(out, text.encode("utf-8"))
    print(f"{out} に保存しました")


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


def chosen_recipe() -> dict:
    """ablation で選んだレシピ (記録がまだなければ基準のレシピ)。"""
    if RECIPE_JSON.exists():
        return json.loads(RECIPE_JSON.read_text(encoding="utf-8"))["chosen"]["recipe"]
    return BASE


def run_curve(name: str, splits: dict, epochs: int, batch_size: int, seed: int = 1) -> dict:
    """1 つのレシピで学習し、1/4 エポックごとの (学習秒数, 検証の正解率) と速さを返します。"""
    torch.manual_seed(seed)
    train, val = splits["train"], splits["val"]
    device = torch.device("cpu")
    if name == "ours":
        recipe = chosen_recipe()
        model = mnist.create_model(recipe["model"])
        opt = mnist.make_optimizer(recipe["optimizer"], model.parameters(), recipe["lr"])
        steps = epochs * -(-len(train[0]) // batch_size)
        per_step = None
        if recipe["one_cycle"]:
            per_step = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=steps)
        per_epoch, augment = None, recipe["augment"]
    else:
        model = ExamplesNet()  # 元のとおり NCHW・float32
        opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
        per_step, augment = None, False
        per_epoch = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    loader = mnist.TensorLoader(*train, batch_size, shuffle=True)
    check_every = max(1, len(loader) // 4)
    curve, elapsed, images = [], 0.0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        for i, (x, y) in enumerate(loader):
            start = time.perf_counter()
            if augment:
                x = mnist.random_affine(x)
            x = mnist.to_device(x, device) if name == "ours" else x
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if per_step is not None:
                per_step.step()
            elapsed += time.perf_counter() - start
            images += len(y)
            if (i + 1) % check_every == 0 or i + 1 == len(loader):
                acc = mnist.evaluate(model, mnist.TensorLoader(*val, 1000), device)["accuracy"]
                curve.append((elapsed, acc))
                model.train()
        if per_epoch is not None:
            per_epoch.step()
        print(f"  {name} エポック {epoch}: 検証の正解率 {100 * curve[-1][1]:.2f} %、"
              f"学習 {elapsed:.1f} 秒", flush=True)
    return {"curve": curve, "seconds": elapsed, "images_per_s": images / elapsed,
            "final": curve[-1][1], "params": mnist.count_parameters(model)}


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def fmt(seconds: float | None) -> str:
    return f"{seconds:.1f} 秒" if seconds is not None else "届かず"


def compare(args: argparse.Namespace) -> None:
    splits = load_splits()
    m = machine()
    lines = [
        f"日時: {m['date']}",
        f"計算機: {m['cpu']}, torch {m['torch']}, スレッド {m['threads']}, "
        f"開始時の負荷 (loadavg) {os.getloadavg()[0]:.2f}",
        f"データ: 訓練 {len(splits['train'][1]):,} 枚 / 検証 {len(splits['val'][1]):,} 枚 "
        f"(訓練データから層化して分割、{m['data']})。正解率はすべて検証データ",
        "",
    ]
    print("\n".join(lines), flush=True)
    recipe = chosen_recipe()
    results = {"ours": run_curve("ours", splits, recipe["epochs"], recipe["batch_size"]),
               "examples": run_curve("examples", splits, args.examples_epochs, 64)}
    labels = {"ours": f"本書 (FastNet, {recipe['optimizer']}, {recipe['epochs']} エポック)",
              "examples": "pytorch/examples (Adadelta, StepLR)"}
    rows = [f"{'レシピ':<36}{'パラメーター':>12}{'98 % まで':>10}{'99 % まで':>10}"
            f"{'最終正解率':>10}{'学習時間':>9}{'枚/秒':>8}"]
    for key, r in results.items():
        rows.append(f"{labels[key]:<36}{r['params']:>12,}"
                    f"{fmt(time_to(r['curve'], 0.98)):>10}{fmt(time_to(r['curve'], 0.99)):>10}"
                    f"{100 * r['final']:>9.2f}%{r['seconds']:>7.1f} 秒{r['images_per_s']:>8,.0f}")
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
    out = Path(args.out or REPO / "benchmarks" / "results" / "mnist_bench.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    data.atomic_write(out, ("\n".join(lines + rows) + "\n").encode("utf-8"))
    print(f"\n{out} に保存しました")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["ablation", "compare"])
    p.add_argument("--out", default=None, help="出力先 (既定: タスクごとの決まった場所)")
    p.add_argument("--seeds", type=int, default=3, help="ablation の各レシピのシード数")
    p.add_argument("--test-seeds", type=int, default=5, help="選んだレシピをテストするシード数")
    p.add_argument("--examples-epochs", type=int, default=14)
    p.add_argument("--threads", type=int, default=None,
                   help="torch のスレッド数 (既定: 変えない。CPU を共有中なら 1 が安定)")
    args = p.parse_args()
    if args.seeds < 1 or args.test_seeds < 2 or args.examples_epochs < 1:
        p.error("--seeds は 1 以上、--test-seeds は 2 以上、--examples-epochs は 1 以上です")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads は 1 以上です")
        torch.set_num_threads(args.threads)
    if args.task == "ablation":
        ablation(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
