"""学習済みの拡散モデルの評価 (FID・KID・分類器の正解率・生成時間) を計算して JSON に書く CLI。

本物の参照画像は Fashion-MNIST のテスト画像 10,000 枚を、クラスごとに半分ずつ
``val`` と ``test`` に分けたものです (``metrics.split_matrix``、シード固定)。
サンプラー (方法・ステップ数・η・guidance) は ``val`` で測って選びます (``--choose``)。
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

タスク: ``reference`` (同じ枚数の本物どうしの FID とそのばらつき)、``chosen`` (JSON の
``selection`` で選ばれたサンプラー)、``reconstruction`` (潜在拡散のチェックポイントだけ:
本物の組 1 を自己符号化器に通して戻した画像と参照集合の FID。潜在のモデルが越えられない下限)。
ε を予測する DDPM のチェックポイントには
``ddim:<steps>[:<eta>[:<s>]]``、``dpm:<steps>[:<s>]`` (DPM-Solver++ 2M)、``ddpm[:<s>]``
(1000 ステップ)、フローマッチングのチェックポイントには ``euler:<steps>[:<s>]`` と
``heun:<steps>[:<s>]`` です。省いた値は sample() と同じ既定値です。
どの結果にも ``method`` と ``nfe`` (``sampling.nfe``) を記録します。
生成にはクラス 0〜9 を均等に割り当てます。どのタスクもクラスの正解率を一緒に測ります。
結果は ``--out`` の JSON の ``"eval"`` に 1 項目ずつ追記します (途中で止まっても
済んだ分は残ります)。キーは ``<split>/<タスク>@<n>`` (例: ``val/ddim:50:1:1@1000``) です。
``--seeds 1234 777 2024`` のように複数のシードで測ると、既定 (1234) 以外のシードの結果は
``<split>/<タスク>@<n>/seed<シード>`` に書きます (FID がシードだけでどれだけ動くかを見るため。
選ぶのはいつも既定のシードの val の結果です)。
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
    LATENT_FLOW_KIND,
    atomic_write_text,
    command_line,
    load_checkpoint,
    load_classifier,
    objective_of,
    read_diffusion,
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
from .sampling import (
    DEFAULT_ETA,
    DEFAULT_GUIDANCE,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    FLOW_METHODS,
    nfe,
    sample_many,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

DEFAULT_OUT = Path("runs") / "ddpm_eval.json"
TASK_HELP = ("reference, chosen, reconstruction, ddpm[:<s>], ddim:<steps>[:<eta>[:<s>]], "
             "dpm:<steps>[:<s>], euler:<steps>[:<s>], heun:<steps>[:<s>]")
NFE_BUDGETS = (5, 10, 20, 50, 100)  # best_per_nfe を記録する NFE の予算
T_DDPM = 1000  # ddpm タスクの NFE (チェックポイントの T。同梱のモデルは 1000)
DEFAULT_SEED = 1234  # サンプラーの乱数のシードの既定。選ぶ (--choose) のはこのシードの結果


def balanced_labels(n: int) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ... と並べた n 個のクラス。"""
    return torch.arange(n) % 10


def parse_task(task: str) -> dict:
    """タスク名を ``sample`` の引数に直します ("reference" と "chosen" は名前だけの辞書)。"""
    if task in ("reference", "chosen", "reconstruction"):
        return {"task": task}
    name, *args = task.split(":")
    try:
        if any(a.strip().lower() in ("nan", "inf", "-inf", "+inf") for a in args):
            raise ValueError
        if name == "ddim" and 1 <= len(args) <= 3:
            steps = int(args[0])
            eta = float(args[1]) if len(args) > 1 else DEFAULT_ETA
            s = float(args[2]) if len(args) > 2 else DEFAULT_GUIDANCE
            if steps < 1 or eta < 0:
                raise ValueError
            kwargs = {"method": "ddim", "steps": steps, "eta": eta, "spacing": DEFAULT_SPACING,
                      "guidance_scale": s}
            kwargs["task"] = f"ddim:{steps}:{eta:g}:{s:g}"
        elif name in ("dpm", *FLOW_METHODS) and 1 <= len(args) <= 2:
            steps = int(args[0])
            s = float(args[1]) if len(args) > 1 else DEFAULT_GUIDANCE
            if steps < 1:
                raise ValueError
            method = "dpm++2m" if name == "dpm" else name
            kwargs = {"method": method, "steps": steps, "guidance_scale": s,
                      "task": f"{name}:{steps}:{s:g}"}
            if name == "dpm":
                kwargs["spacing"] = DEFAULT_SPACING
        elif name == "ddpm" and len(args) <= 1:
            s = float(args[0]) if args else DEFAULT_GUIDANCE
            kwargs = {"method": "ddpm", "guidance_scale": s, "task": f"ddpm:{s:g}"}
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"未知のタスク {task!r}: {TASK_HELP} のどれかにしてください") from None
    return kwargs


def task_nfe(kwargs: dict, T: int = T_DDPM) -> int:
    """タスクのネットワーク評価回数 (reference と reconstruction は 0)。"""
    if kwargs["task"] in ("reference", "reconstruction"):
        return 0
    return nfe(kwargs["method"], kwargs.get("steps", 0), T)


def task_objective(kwargs: dict) -> str | None:
    """タスクが要るモデルの種類: "flow"、"eps"、サンプラーを使わないタスクなら None。"""
    if kwargs["task"] in ("reference", "reconstruction"):
        return None
    return "flow" if kwargs["method"] in FLOW_METHODS else "eps"


def entry_key(split: str, task: str, n: int, seed: int = DEFAULT_SEED) -> str:
    """JSON の "eval" のキー (例: "val/ddim:50:1:1@1000"、seed 777 なら "...@1000/seed777")。

    既定のシード (DEFAULT_SEED) の結果はシードを付けない名前のままです (選ぶのはこの結果)。
    """
    key = f"{split}/{task}@{n}"
    return key if seed == DEFAULT_SEED else f"{key}/seed{seed}"


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


def best_per_nfe(cands: dict[str, float], nfes: dict[str, int],
                 budgets: tuple[int, ...] = NFE_BUDGETS) -> dict[str, dict]:
    """NFE の予算ごとに、nfe ≤ 予算の候補で FID が最小のもの ({"5": {task, fid, nfe}, ...})。"""
    best = {}
    for budget in budgets:
        within = [t for t in cands if nfes[t] <= budget]
        if within:
            task = min(within, key=cands.get)
            best[str(budget)] = {"task": task, "fid": cands[task], "nfe": nfes[task]}
    return best


def choose(path: Path, n: int, command: str) -> dict:
    """JSON の val の結果 (枚数 n) から FID が最小のサンプラーを選び、"selection" に書きます。

    NFE の予算ごとの最良 (``best_per_nfe``) も一緒に記録します。
    """
    ev = read_json(path).get("eval", {})
    vals = [v for v in ev.values()
            if v.get("split") == "val" and v.get("n") == n
            and v.get("task") not in ("reference", "reconstruction")
            and v.get("sampler_seed", DEFAULT_SEED) == DEFAULT_SEED]
    cands = {v["task"]: v["fid"] for v in vals}
    if not cands:
        raise ValueError(f"{path} に val・n = {n} のサンプラーの結果がありません。"
                         "先に --split val --tasks ddim:... で測ってください")
    nfes = {v["task"]: v.get("nfe", task_nfe(parse_task(v["task"]))) for v in vals}
    chosen = min(cands, key=cands.get)
    ref = ev.get(entry_key("val", "reference", n), {})
    selection = {
        "split": "val", "n": n, "rule": "val の FID が最小のサンプラー",
        "candidates": dict(sorted(cands.items(), key=lambda kv: kv[1])),
        "chosen": chosen, "chosen_fid": cands[chosen], "chosen_nfe": nfes[chosen],
        "best_per_nfe": best_per_nfe(cands, nfes),
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
        return {**res, "seconds": time.time() - t0, "method": "reference", "nfe": 0}
    if kwargs["task"] == "reconstruction":  # 本物の組 1 → 自己符号化器 → 参照集合 (組 0) と比べる
        blocks = balanced_blocks(labels, split, n)
        ae = model.autoencoder
        x = torch.cat([ae.decode(ae.encode(images[b].to(device))).cpu()
                       for b in blocks[1].split(batch_size)])
        res = score_samples(clf, x, images[blocks[0]])
        res.update(seconds=time.time() - t0, method="reconstruction", nfe=0,
                   accuracy=classifier_accuracy(clf, x, labels[blocks[1]]),
                   mse=torch.mean((x - images[blocks[1]]) ** 2).item())
        return res
    y = balanced_labels(n)
    sample_kwargs = {k: v for k, v in kwargs.items() if k != "task"}
    x = sample_many(model, sched, n, batch_size=batch_size, seed=seed, y=y, device=device,
                    bf16=bf16, **sample_kwargs)
    seconds = time.time() - t0
    ref = images[balanced_blocks(labels, split, n)[0]]
    res = score_samples(clf, x, ref)
    res.update(kwargs, seconds=seconds, seconds_per_image=seconds / n,
               accuracy=classifier_accuracy(clf, x, y),
               nfe=task_nfe(kwargs, sched.T if sched is not None else T_DDPM))
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="拡散モデル (DDPM かフローマッチング) の FID/KID/正解率/時間を測り、"
        "JSON に書きます")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"結果を書き足す JSON (既定: {DEFAULT_OUT})")
    p.add_argument("--data-root", default="data", help="Fashion-MNIST のあるフォルダー")
    p.add_argument("--download", action="store_true",
                   help="Fashion-MNIST が無ければ torchvision でダウンロードする")
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
    p.add_argument("--batch-size", type=options.positive_int, default=500)
    p.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+",
                   default=[DEFAULT_SEED],
                   help="サンプラーの乱数のシード (複数なら各シードで測る。FID のばらつきを見る"
                   f"ため。選ぶのは {DEFAULT_SEED} の結果)")
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
        except ValueError as e:
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
        add_entry(args.out, key, res)
        results[key] = res
        print(key, {k: round(res[k], 4) for k in ("fid", "fid_mean", "accuracy", "seconds", "nfe")
                    if k in res}, flush=True)
    return results


if __name__ == "__main__":
    main()
