"""学習済みの拡散モデルの評価 (FID・KID・分類器の正解率・生成時間) を計算して JSON に書く CLI。

本物の参照画像は Fashion-MNIST のテスト画像 10,000 枚を、クラスごとに半分ずつ
``val`` と ``test`` に分けたものです (``metrics.split_matrix``、シード固定)。
サンプラー (方法・ステップ数・η・ガイダンス) は ``val`` で測って選びます (``--choose``)。
``test`` で測れるのは ``reference``、``chosen``、それに同じチェックポイント・同じ n で
``val`` で測り済みのタスクだけです (格子を決めるのは val で、test はそれを報告するだけ)。
``--choose`` は FID が最小のもの (``chosen``) と、NFE (ネットワークの評価回数) の予算
5, 10, 20, 50, 100 ごとの最良 (``best_per_nfe``) を記録します。

例::

    python -m torchbook.diffusion.evaluate --data-root data --split val --n 1000 \\
        --tasks reference ddim:50:1 ddim:50:0 --out runs/eval.json
    python -m torchbook.diffusion.evaluate --out runs/eval.json --n 1000 --choose
    python -m torchbook.diffusion.evaluate --data-root data --split test --n 1000 \\
        --tasks reference chosen --out runs/eval.json

タスクの書き方と JSON のキーは ``evaluation`` モジュールの説明のとおりです。どの結果にも
``method`` と ``nfe`` (``sampling.nfe``) を記録します。生成にはクラス 0〜9 を均等に
割り当て、どのタスクもクラスの正解率を一緒に測ります。結果は ``--out`` の JSON に
1 項目ずつ追記します (途中で止まっても済んだ分は残ります)。
``--seeds 1234 777 2024`` のように複数のシードで測ると、FID がサンプラーのシードだけで
どれだけ動くかが分かります (選ぶのはいつも既定のシード 1234 の val の結果です)。
"""

from __future__ import annotations

if not __package__:  # ファイルを直接実行した: 下の相対 import の代わりに -m を 1 行で案内する
    import direct_run  # noqa: F401

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import options
from .checkpoint import (
    DEFAULT_CHECKPOINT,
    LATENT_FLOW_KIND,
    command_line,
    load_checkpoint,
    objective_of,
    read_diffusion,
)
from .data import load_tensors
from .device import fast_formats, get_device
from .evaluation import (
    DEFAULT_SEED,
    TASK_HELP,
    add_entry,
    choose,
    entry_key,
    parse_task,
    read_json,
    run_task,
    task_objective,
)
from .fashion_classifier import load_classifier
from .metrics import SPLIT_SEED, SPLITS
from .sampling import DEFAULT_STEPS

DEFAULT_OUT = Path("runs") / "ddpm_eval.json"


def build_parser() -> argparse.ArgumentParser:
    """この CLI の引数 (値の確認は ``parse_args`` が作業の前に行います)。"""
    p = argparse.ArgumentParser(
        description="拡散モデル (DDPM かフローマッチング) の FID/KID/正解率/時間を測り、"
        "JSON に書きます", formatter_class=options.HelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="拡散モデルのチェックポイント (.pt)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="結果を書き足す JSON")
    options.add_data_arguments(p)
    p.add_argument("--classifier", default=None, help="分類器の重み (既定: 同梱の重み)")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="参照画像: val (測って選ぶため) か test (reference・chosen と、"
                   "val で測り済みのタスクを報告するため)")
    p.add_argument("--n", type=options.reference_count, default=1000,
                   help="生成枚数 (= 比べる本物の枚数、10 の倍数で 2500 まで)")
    p.add_argument("--tasks", nargs="+", default=["reference", f"ddim:{DEFAULT_STEPS}"],
                   help=f"{TASK_HELP} (既定は参照レベルと、sample の既定のサンプラー)")
    p.add_argument("--choose", action="store_true",
                   help="測らずに、--out にある val の結果からサンプラー (最良と、"
                   "NFE の予算ごとの最良) を選んで記録する")
    p.add_argument("--batch-size", type=options.positive_int, default=500,
                   help="一度に生成する枚数")
    p.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+",
                   default=[DEFAULT_SEED],
                   help="サンプラーのシード (複数なら各シードで測る。FID のばらつきを見る"
                   f"ため。選ぶのは {DEFAULT_SEED} の結果)")
    options.add_device_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.out = options.check_output(p, args.out, "--out", (".json",))
    if args.choose:
        return args
    try:
        args.parsed = [parse_task(t) for t in args.tasks]
    except ValueError as e:
        p.error(str(e))
    allowed_on_test = {"reference", "reconstruction"}  # val で選んだもの (chosen) もここに足す
    if any(k["task"] == "chosen" for k in args.parsed):
        sel = read_json(args.out).get("selection")
        if not sel:
            p.error(f"{args.out} に selection がありません。先に --choose で選んでください")
        args.parsed = [parse_task(sel["chosen"]) if k["task"] == "chosen" else k
                       for k in args.parsed]
        allowed_on_test.add(sel["chosen"])
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint} がありません")
    if args.classifier is not None and not Path(args.classifier).is_file():
        p.error(f"--classifier {args.classifier} がありません")
    try:
        ckpt = read_diffusion(args.checkpoint)
    except ValueError as e:
        p.error(str(e))
    objective = objective_of(ckpt)
    if any(k["task"] == "reconstruction" for k in args.parsed) and \
            ckpt["kind"] != LATENT_FLOW_KIND:
        p.error(f"タスク reconstruction は潜在拡散のチェックポイント ({LATENT_FLOW_KIND}) だけです "
                f"(--checkpoint {args.checkpoint} は {ckpt['kind']})")
    for k in args.parsed:
        need = task_objective(k)
        if need is not None and need != objective:
            model_kind = "フローマッチング" if objective == "flow" else "ε を予測する DDPM"
            usable = "euler:<steps>, heun:<steps>" if objective == "flow" else \
                "ddim:<steps>, dpm:<steps>, ddpm"
            p.error(f"タスク {k['task']} は --checkpoint {args.checkpoint} ({model_kind}) "
                    f"には使えません。使えるのは reference と {usable} です")
    if args.split == "test":
        check_test_tasks(p, args, allowed_on_test)
    return args


def check_test_tasks(p: argparse.ArgumentParser, args: argparse.Namespace,
                     allowed: set[str]) -> None:
    """test で測れるのは reference・chosen と、同じチェックポイント・同じ n で val で測ったもの。"""
    ev = read_json(args.out).get("eval", {})
    ckpt = os.path.basename(args.checkpoint)
    for k in args.parsed:
        if k["task"] in allowed:
            continue
        for seed in args.seeds:
            val = ev.get(entry_key("val", k["task"], args.n, seed))
            if val is None or val.get("checkpoint") != ckpt:
                p.error(f"--split test で測れるのは reference、chosen と、{args.out} で同じ "
                        f"--checkpoint・--n {args.n}・シードで val を測り済みのタスクだけです "
                        f"({k['task']} (seed {seed}) は val で先に測ってください。"
                        "選ぶのは val です)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = command_line(__spec__.name if __spec__ else __name__, argv)
    if args.choose:
        try:
            sel = choose(args.out, args.n, command)
        except (ValueError, OSError) as e:  # 測った結果がない・書けない
            raise SystemExit(str(e)) from None
        print(f"選んだサンプラー: {sel['chosen']} (val FID {sel['chosen_fid']:.3f})")
        for budget, best in sel["best_per_nfe"].items():
            print(f"  NFE ≤ {budget:>3}: {best['task']} (NFE {best['nfe']}、val FID "
                  f"{best['fid']:.3f})")
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
    runs = [(k, seed) for k in args.parsed for seed in args.seeds
            if k["task"] != "reference" or seed == args.seeds[0]]  # 本物どうしはシードと無関係
    for kwargs, seed in runs:
        try:
            res = run_task(kwargs, model, sched, clf, images, labels, args.split, args.n,
                           args.batch_size, seed, device, bf16)
        except KeyboardInterrupt:  # 済んだタスクは JSON に書いてある
            print(f"\n中断しました。終わったタスク ({len(results)} 個) は {args.out} に"
                  "書いてあります", file=sys.stderr)
            raise SystemExit(130) from None
        res.update(task=kwargs["task"], split=args.split, split_seed=SPLIT_SEED, n=args.n,
                   sampler_seed=seed, checkpoint=os.path.basename(args.checkpoint),
                   command=command, device=str(device), bf16=bf16,
                   channels_last=channels_last, threads=torch.get_num_threads(),
                   finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        key = entry_key(args.split, kwargs["task"], args.n,
                        DEFAULT_SEED if kwargs["task"] == "reference" else seed)
        try:
            add_entry(args.out, key, res)
        except OSError as e:  # 書けない・ロックが外れない (TimeoutError も OSError)
            raise SystemExit(str(e)) from None
        results[key] = res
        print(key, {k: round(res[k], 4) for k in ("fid", "fid_mean", "accuracy", "seconds", "nfe")
                    if k in res}, flush=True)
    return results


if __name__ == "__main__":
    main()
