"""学習済み DDPM の評価 (FID・KID・分類器の正解率・生成時間) を計算して JSON に書く CLI。

結果はチェックポイントの隣の来歴 JSON (``ddpm_fashion.json``) の ``"eval"`` に、
実行したコマンドと一緒に 1 項目ずつ追記します (途中で止まっても済んだ分は残ります)。

例::

    python -m torchbook.diffusion.evaluate --data-root data --n 1000 --tasks floor ddim:50 ddim:10
    python -m torchbook.diffusion.evaluate --data-root data --n 250 --tasks ddpm ddim:50
    python -m torchbook.diffusion.evaluate --data-root data --n 500 --tasks guidance:2:1

タスク: ``floor`` (本物どうしの下限)、``ddim:<steps>[:<eta>]``、``ddpm`` (1000 ステップ)、
``guidance:<s>[:<eta>]`` (DDIM 50 ステップ、スケール s)。η を省くと 0 (決定的な DDIM)。
生成にはクラス 0〜9 を均等に割り当て、``ddim``/``ddpm`` は s = 1 (条件付きモデルそのもの)
で生成します。どのタスクもクラスの正解率を一緒に測ります。
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from .classifier import load_classifier
from .data import load_tensors
from .metrics import classifier_accuracy, real_floor, real_split, score_samples
from .sample import DEFAULT_CHECKPOINT
from .sampling import sample_many
from .train import load_checkpoint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def balanced_labels(n: int) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ... と並べた n 個のクラス。"""
    return torch.arange(n) % 10


def parse_task(task: str) -> dict:
    """タスク名を ``sample`` の引数に直します ("floor" は空の辞書)。"""
    if task == "floor":
        return {}
    name, *args = task.split(":")
    kwargs = {"method": "ddim", "steps": 50, "eta": 0.0, "spacing": "trailing",
              "guidance_scale": 1.0}
    try:
        if name == "ddim" and 1 <= len(args) <= 2:
            kwargs["steps"] = int(args[0])
        elif name == "guidance" and 1 <= len(args) <= 2:
            kwargs["guidance_scale"] = float(args[0])
        elif name == "ddpm" and not args:
            kwargs = {"method": "ddpm", "guidance_scale": 1.0}
        else:
            raise ValueError
        if len(args) == 2:
            kwargs["eta"] = float(args[1])
    except ValueError:
        raise ValueError(f"未知のタスク {task!r}: floor, ddpm, ddim:<steps>[:<eta>], "
                         "guidance:<s>[:<eta>] のどれかにしてください") from None
    return kwargs


def run_task(task: str, model, sched, clf, test: torch.Tensor, n: int, batch_size: int,
             seed: int, bf16: bool) -> dict:
    """1 つのタスクを実行し、結果の辞書を返します。"""
    kwargs = parse_task(task)
    if not kwargs:
        t0 = time.time()
        res = real_floor(clf, test, n)
        return {**res, "seconds": time.time() - t0}
    y = balanced_labels(n)
    t0 = time.time()
    x = sample_many(model, sched, n, batch_size=batch_size, seed=seed, y=y, bf16=bf16, **kwargs)
    seconds = time.time() - t0
    ref, _ = real_split(test, n)
    res = score_samples(clf, x, ref)
    res.update(kwargs, seconds=seconds, seconds_per_image=seconds / n,
               accuracy=classifier_accuracy(clf, x, y))
    return res


def update_json(path: Path, key: str, value: dict) -> None:
    """JSON の "eval" に key: value を書き足します。

    並行して動く評価どうしが互いの結果を消さないよう、JSON そのものをロックして
    読み・書きします (fcntl のない Windows ではロックなし)。
    """
    with open(path, "a+", encoding="utf-8") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)  # ファイルを閉じるとロックも外れる
        f.seek(0)
        text = f.read()
        data = json.loads(text) if text.strip() else {}
        data.setdefault("eval", {})[key] = value
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, ensure_ascii=False, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DDPM の FID/KID/正解率/時間を測って JSON に書きます")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--json", default=None, help="書き込む JSON (既定: チェックポイントの .json)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--classifier", default=None, help="分類器の重み (既定: 同梱の重み)")
    p.add_argument("--n", type=int, default=1000, help="生成枚数 (= 比べる本物の枚数)")
    p.add_argument("--tasks", nargs="+", default=["floor", "ddim:50:1"],
                   help="floor, ddpm, ddim:<steps>[:<eta>], guidance:<s>[:<eta>] "
                        "(既定は下限と、sample CLI の既定と同じ DDIM 50・η = 1)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args(argv)
    for task in args.tasks:
        try:
            parse_task(task)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m torchbook.diffusion.evaluate " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    model, sched, _ = load_checkpoint(args.checkpoint)
    clf = load_classifier(args.classifier)
    test, _ = load_tensors(args.data_root, train=False)
    out = Path(args.json) if args.json else Path(args.checkpoint).with_suffix(".json")
    results = {}
    for task in args.tasks:
        res = run_task(task, model, sched, clf, test, args.n, args.batch_size, args.seed,
                       args.bf16)
        res.update(n=args.n, command=command, threads=torch.get_num_threads(),
                   finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        key = f"{task}@{args.n}"
        update_json(out, key, res)
        results[key] = res
        print(key, {k: res[k] for k in ("fid", "kid_mean", "seconds") if k in res}, flush=True)
    return results


if __name__ == "__main__":
    main()
