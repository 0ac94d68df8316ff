"""学習済み DDPM の評価 (FID・KID・分類器の正解率・生成時間) を計算して JSON に書く CLI。

本物の参照画像は Fashion-MNIST のテスト画像 10,000 枚を、クラスごとに半分ずつ
``val`` と ``test`` に分けたものです (``metrics.split_matrix``、シード固定)。
サンプラー (η・ステップ数・guidance) は ``val`` で選び (``--choose``)、選んだもの
だけを ``test`` で 1 回測ります。``test`` で測れるのは ``reference`` と ``chosen`` だけです。

例::

    python -m torchbook.diffusion.evaluate --data-root data --split val --n 1000 \\
        --tasks reference ddim:50:1 ddim:50:0 --out runs/eval.json
    python -m torchbook.diffusion.evaluate --out runs/eval.json --n 1000 --choose
    python -m torchbook.diffusion.evaluate --data-root data --split test --n 1000 \\
        --tasks reference chosen --out runs/eval.json

タスク: ``reference`` (同じ枚数の本物どうしの FID とそのばらつき)、
``ddim:<steps>[:<eta>[:<s>]]``、``ddpm[:<s>]`` (1000 ステップ)、``chosen`` (JSON の
``selection`` で選ばれたサンプラー)。省いた値は sample() と同じ既定値です。
生成にはクラス 0〜9 を均等に割り当てます。どのタスクもクラスの正解率を一緒に測ります。
結果は ``--out`` の JSON の ``"eval"`` に 1 項目ずつ追記します (途中で止まっても
済んだ分は残ります)。キーは ``<split>/<タスク>@<n>`` (例: ``val/ddim:50:1:1@1000``) です。
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import options
from .checkpoint import (
    DEFAULT_CHECKPOINT,
    atomic_write_text,
    command_line,
    load_checkpoint,
    load_classifier,
)
from .data import load_tensors
from .device import fast_formats, get_device
from .metrics import (
    SPLIT_SEED,
    SPLITS,
    balanced_blocks,
    classifier_accuracy,
    real_reference,
    score_samples,
)
from .sampling import DEFAULT_ETA, DEFAULT_GUIDANCE, DEFAULT_SPACING, DEFAULT_STEPS, sample_many

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

DEFAULT_OUT = Path("runs") / "ddpm_eval.json"
TASK_HELP = "reference, chosen, ddpm[:<s>], ddim:<steps>[:<eta>[:<s>]]"


def balanced_labels(n: int) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ... と並べた n 個のクラス。"""
    return torch.arange(n) % 10


def parse_task(task: str) -> dict:
    """タスク名を ``sample`` の引数に直します ("reference" と "chosen" は名前だけの辞書)。"""
    if task in ("reference", "chosen"):
        return {"task": task}
    name, *args = task.split(":")
    try:
        if name == "ddim" and 1 <= len(args) <= 3:
            steps = int(args[0])
            eta = float(args[1]) if len(args) > 1 else DEFAULT_ETA
            s = float(args[2]) if len(args) > 2 else DEFAULT_GUIDANCE
            if steps < 1 or eta < 0:
                raise ValueError
            kwargs = {"method": "ddim", "steps": steps, "eta": eta, "spacing": DEFAULT_SPACING,
                      "guidance_scale": s}
            kwargs["task"] = f"ddim:{steps}:{eta:g}:{s:g}"
        elif name == "ddpm" and len(args) <= 1:
            s = float(args[0]) if args else DEFAULT_GUIDANCE
            kwargs = {"method": "ddpm", "guidance_scale": s, "task": f"ddpm:{s:g}"}
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"未知のタスク {task!r}: {TASK_HELP} のどれかにしてください") from None
    return kwargs


def entry_key(split: str, task: str, n: int) -> str:
    """JSON の "eval" のキー (例: "val/ddim:50:1:1@1000")。"""
    return f"{split}/{task}@{n}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def update_json(path: Path, update) -> dict:
    """JSON を読み、update(data) で書き換えて原子的に書き戻します。

    並行して動く評価どうしが互いの結果を消さないよう、一時フォルダーのロックファイル
    (JSON のパスごとに 1 つ) で順番に読み・書きします (fcntl のない Windows ではロックなし)。
    """
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    user = os.getuid() if hasattr(os, "getuid") else 0
    lock_path = Path(tempfile.gettempdir()) / f"torchbook-eval-{user}-{digest}.lock"
    with open(lock_path, "a") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)  # ファイルを閉じるとロックも外れる
        data = read_json(path)
        update(data)
        atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    return data


def add_entry(path: Path, key: str, value: dict) -> None:
    update_json(path, lambda data: data.setdefault("eval", {}).__setitem__(key, value))


def choose(path: Path, n: int, command: str) -> dict:
    """JSON の val の結果 (枚数 n) から FID が最小のサンプラーを選び、"selection" に書きます。"""
    ev = read_json(path).get("eval", {})
    cands = {v["task"]: v["fid"] for v in ev.values()
             if v.get("split") == "val" and v.get("n") == n and v.get("task") != "reference"}
    if not cands:
        raise ValueError(f"{path} に val・n = {n} のサンプラーの結果がありません。"
                         "先に --split val --tasks ddim:... で測ってください")
    chosen = min(cands, key=cands.get)
    ref = ev.get(entry_key("val", "reference", n), {})
    selection = {
        "split": "val", "n": n, "rule": "val の FID が最小のサンプラー",
        "candidates": dict(sorted(cands.items(), key=lambda kv: kv[1])),
        "chosen": chosen, "chosen_fid": cands[chosen],
        "reference_fid_range": [ref.get("fid_min"), ref.get("fid_max")],
        "command": command,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    update_json(path, lambda data: data.__setitem__("selection", selection))
    return selection


def run_task(kwargs: dict, model, sched, clf, images: torch.Tensor, labels: torch.Tensor,
             split: str, n: int, batch_size: int, seed: int, device: torch.device,
             bf16: bool) -> dict:
    """1 つのタスクを実行し、結果の辞書を返します。"""
    t0 = time.time()
    if kwargs["task"] == "reference":
        res = real_reference(clf, images, labels, split, n)
        return {**res, "seconds": time.time() - t0}
    y = balanced_labels(n)
    sample_kwargs = {k: v for k, v in kwargs.items() if k != "task"}
    x = sample_many(model, sched, n, batch_size=batch_size, seed=seed, y=y, device=device,
                    bf16=bf16, **sample_kwargs)
    seconds = time.time() - t0
    ref = images[balanced_blocks(labels, split, n)[0]]
    res = score_samples(clf, x, ref)
    res.update(kwargs, seconds=seconds, seconds_per_image=seconds / n,
               accuracy=classifier_accuracy(clf, x, y))
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DDPM の FID/KID/正解率/時間を測って JSON に書きます")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"結果を書き足す JSON (既定: {DEFAULT_OUT})")
    p.add_argument("--data-root", default="data", help="Fashion-MNIST のあるフォルダー")
    p.add_argument("--download", action="store_true",
                   help="Fashion-MNIST が無ければ torchvision でダウンロードする")
    p.add_argument("--classifier", default=None, help="分類器の重み (既定: 同梱の重み)")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="参照画像: val (選ぶため) か test (選んだものを報告するため)")
    p.add_argument("--n", type=options.reference_count, default=1000,
                   help="生成枚数 (= 比べる本物の枚数、10 の倍数で 2500 まで)")
    p.add_argument("--tasks", nargs="+", default=["reference", f"ddim:{DEFAULT_STEPS}"],
                   help=f"{TASK_HELP} (既定は参照レベルと、sample の既定のサンプラー)")
    p.add_argument("--choose", action="store_true",
                   help="測らずに、--out にある val の結果からサンプラーを選んで記録する")
    p.add_argument("--batch-size", type=options.positive_int, default=500)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=options.positive_int, default=None)
    options.add_device_argument(p)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (既定: 装置が bf16 を速く計算できるときだけ)")
    args = p.parse_args(argv)
    args.out = options.check_output(p, args.out, "--out", (".json",))
    if args.choose:
        return args
    try:
        args.parsed = [parse_task(t) for t in args.tasks]
    except ValueError as e:
        p.error(str(e))
    if args.split == "test" and any(k["task"] not in ("reference", "chosen")
                                    for k in args.parsed):
        p.error("--split test で測れるのは reference と chosen だけです "
                "(サンプラーは val で選び、test では選んだものを 1 回だけ測ります)")
    if any(k["task"] == "chosen" for k in args.parsed):
        sel = read_json(args.out).get("selection")
        if not sel:
            p.error(f"{args.out} に selection がありません。先に --choose で選んでください")
        args.parsed = [parse_task(sel["chosen"]) if k["task"] == "chosen" else k
                       for k in args.parsed]
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint} がありません")
    if args.classifier is not None and not Path(args.classifier).is_file():
        p.error(f"--classifier {args.classifier} がありません")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = command_line(__spec__.name if __spec__ else __name__, argv)
    if args.choose:
        sel = choose(args.out, args.n, command)
        print(f"選んだサンプラー: {sel['chosen']} (val FID {sel['chosen_fid']:.3f})")
        return sel
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or get_device()
    bf16, channels_last = fast_formats(device, args.bf16)
    model, sched, _ = load_checkpoint(args.checkpoint, device, channels_last)
    clf = load_classifier(args.classifier, device)
    try:
        images, labels = load_tensors(args.data_root, train=False, download=args.download)
    except (OSError, ValueError) as e:  # データが無い・壊れている: 直し方を 1 行で
        raise SystemExit(str(e)) from None
    results = {}
    for kwargs in args.parsed:
        try:
            res = run_task(kwargs, model, sched, clf, images, labels, args.split, args.n,
                           args.batch_size, args.seed, device, bf16)
        except KeyboardInterrupt:  # 済んだタスクは JSON に書いてある
            print(f"\n中断しました。終わったタスク ({len(results)} 個) は {args.out} に"
                  "書いてあります", file=sys.stderr)
            raise SystemExit(130) from None
        res.update(task=kwargs["task"], split=args.split, split_seed=SPLIT_SEED, n=args.n,
                   sampler_seed=args.seed, checkpoint=os.path.basename(args.checkpoint),
                   command=command, device=str(device), bf16=bf16,
                   channels_last=channels_last, threads=torch.get_num_threads(),
                   finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        key = entry_key(args.split, kwargs["task"], args.n)
        add_entry(args.out, key, res)
        results[key] = res
        print(key, {k: round(res[k], 4) for k in ("fid", "fid_mean", "accuracy", "seconds")
                    if k in res}, flush=True)
    return results


if __name__ == "__main__":
    main()
