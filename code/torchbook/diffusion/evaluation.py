"""評価の部品: タスク名の解釈、1 つのタスクの実行、結果の JSON (来歴) への追記と選択。

``evaluate`` CLI と、本の表を作る補助が使います。

タスク: ``reference`` (同じ枚数の本物どうしの FID とそのばらつき)、``chosen`` (JSON の
``selection`` で選ばれたサンプラー)、``reconstruction`` (潜在拡散のチェックポイントだけ:
本物の組 1 を自己符号化器に通して戻した画像と参照集合の FID。潜在のモデルが越えられない下限)。
ε を予測する DDPM のチェックポイントには
``ddim:<steps>[:<eta>[:<s>]]``、``dpm:<steps>[:<s>]`` (DPM-Solver++ 2M)、``ddpm[:<s>]``
(1000 ステップ)、フローマッチングのチェックポイントには ``euler:<steps>[:<s>]`` と
``heun:<steps>[:<s>]`` です。省いた値は sample() と同じ既定値です。

結果は JSON の ``"eval"`` に 1 項目ずつ追記します。キーは ``<split>/<タスク>@<n>``
(例: ``val/ddim:50:1:1@1000``)、既定 (DEFAULT_SEED) 以外のサンプラーのシードでは
``<split>/<タスク>@<n>/seed<シード>`` です。選ぶ (``choose``) のは既定のシードの val の
結果だけで、test の結果はどの選択も読みません。
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint import atomic_write_text
from .metrics import balanced_blocks, classifier_accuracy, real_reference, score_samples
from .sampling import (
    DEFAULT_ETA,
    DEFAULT_GUIDANCE,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    FLOW_METHODS,
    nfe,
    sample_many,
)

TASK_HELP = ("reference, chosen, reconstruction, ddpm[:<s>], ddim:<steps>[:<eta>[:<s>]], "
             "dpm:<steps>[:<s>], "
             "euler:<steps>[:<s>], heun:<steps>[:<s>]")
NFE_BUDGETS = (5, 10, 20, 50, 100)  # best_per_nfe を記録する NFE の予算
T_DDPM = 1000  # ddpm タスクの NFE (チェックポイントの T。同梱のモデルは 1000)
DEFAULT_SEED = 1234  # サンプラーのシードの既定。選ぶ (--choose) のはこのシードの結果


def balanced_labels(n: int) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ... と並べた n 個のクラス。"""
    return torch.arange(n) % 10


def parse_task(task: str) -> dict:
    """タスク名を ``sample`` の引数に直します ("reference" と "chosen" は名前だけの辞書)。

    来歴 JSON の ``eval_legacy`` に記録したコマンドがそのまま動くよう、古い名前も受け付けて
    今の名前に直します: ``floor`` は ``reference``、``guidance:<s>[:<eta>]`` は
    ``ddim:<DEFAULT_STEPS>:<eta>:<s>`` です (参照画像の選び方は今のもの。JSON の注記を参照)。
    """
    if task == "floor":
        task = "reference"
    if task in ("reference", "chosen", "reconstruction"):
        return {"task": task}
    name, *args = task.split(":")
    if name == "guidance" and 1 <= len(args) <= 2:
        name, args = "ddim", [str(DEFAULT_STEPS), args[1] if len(args) > 1 else str(DEFAULT_ETA),
                              args[0]]
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
    """タスクが要るモデルの種類: "flow"、"eps"、どちらでもよい reference なら None。"""
    if kwargs["task"] in ("reference", "reconstruction"):
        return None
    return "flow" if kwargs["method"] in FLOW_METHODS else "eps"


def entry_key(split: str, task: str, n: int, seed: int = DEFAULT_SEED) -> str:
    """JSON の "eval" のキー (例: "val/ddim:50:1:1@1000"、seed 777 なら "...@1000/seed777")。

    既定のシード (DEFAULT_SEED) の結果はシードを付けない名前のままです (選ぶのはこの結果)。
    """
    key = f"{split}/{task}@{n}"
    return key if seed == DEFAULT_SEED else f"{key}/seed{seed}"


LOCK_WAIT_SECONDS = 60.0  # ロックを待つ上限
LOCK_STALE_SECONDS = 300.0  # これより古いロックファイルは、止まったプロセスの残り物とみなす


@contextmanager
def json_lock(path: Path):
    """JSON の隣のロックファイル (``.<名前>.lock``) で、読み書きを 1 つずつにします。

    ファイルを排他的に作れた (O_EXCL) ものだけが進み、終わるとファイルを消します
    (一時フォルダーに何も残しません。fcntl を使わないので Windows でも同じに動きます)。
    """
    lock = path.with_name(f".{path.name}.lock")
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > LOCK_STALE_SECONDS:
                    lock.unlink(missing_ok=True)  # 落ちたプロセスが残したロック
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock} が {LOCK_WAIT_SECONDS:.0f} 秒外れません。ほかの評価が"
                                   "動いていなければ、このファイルを消してください") from None
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def update_json(path: Path, update) -> dict:
    """JSON を読み、update(data) で書き換えて原子的に書き戻します。

    並行して動く評価どうしが互いの結果を消さないよう、``json_lock`` の中で読み書きします。
    """
    with json_lock(path):
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
                         "先に val でサンプラーを測ってください (CLI なら --split val --tasks ...)")
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


