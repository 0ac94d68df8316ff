"""潜在拡散の章 (book/10_latent.md) の表と測定の補助 (本だけが使います)。

- 自己符号化器の小さな掃引 (``book/assets/ae_sweep/``): ``train_autoencoder`` CLI が書いた
  重みと来歴 JSON を読み、潜在変数の形を選ぶ規則 (画像を 4 倍以上に縮め、その中で検証の
  再構成誤差が最小) を当てはめます。
- 画素と潜在のモデルの比べ方: 来歴 JSON の評価から、NFE の予算ごとに val で選んだ
  サンプラーの test の FID と、参照水準に対する比 (``booktools.sampler_table`` と同じ定義) を
  読みます。生成の時間とメモリは、この補助がページのビルドで測ります。
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from booktools.data import REPO_ROOT
from booktools.sampler_table import best_per_budget, fid_nfe_table, read_evals
from torchbook.diffusion.autoencoder import IMAGE_SIZE
from torchbook.diffusion.evaluation import parse_task
from torchbook.diffusion.sampling import sample

SWEEP_DIR = REPO_ROOT / "book" / "assets" / "ae_sweep"
TRADE_BUDGETS = (5, 10, 20, 50)  # 画素と潜在を比べる NFE の予算
MIN_COMPRESSION = 4.0  # 潜在変数は画像 (32×32 = 1,024 個の数) を少なくともこの倍率で縮める


def sweep_runs(folder: str | os.PathLike = SWEEP_DIR) -> list[dict]:
    """掃引の来歴 JSON を読み、1 回の学習ごとの要約を (チャンネル数, β) の順に返します。

    各要約は {"name", "path" (重み), "latent_shape", "numbers" (潜在変数の数の個数),
    "compression" (画像の画素数 ÷ numbers), "beta", "val_mse", "val_kl", "step",
    "cpu_seconds", "command"} です。重みの無い JSON は、直し方を添えて ValueError にします。
    """
    folder = Path(folder)
    runs = []
    for path in sorted(folder.glob("*.json")):
        info = json.loads(path.read_text(encoding="utf-8"))["train"]
        weights = path.with_suffix(".pt")
        if not weights.is_file():
            raise ValueError(f"{path} の重み {weights.name} がありません。JSON の command で"
                             "学習し直すか、JSON を消してください")
        shape = [int(v) for v in info["latent_shape"]]
        numbers = shape[0] * shape[1] * shape[2]
        runs.append({"name": path.stem, "path": weights, "latent_shape": tuple(shape),
                     "numbers": numbers, "compression": IMAGE_SIZE * IMAGE_SIZE / numbers,
                     "beta": float(info["beta"]), "val_mse": float(info["val_mse"]),
                     "val_kl": float(info["val_kl"]), "step": int(info["step"]),
                     "cpu_seconds": float(info["cpu_seconds"]), "command": info["command"]})
    if not runs:
        raise ValueError(f"{folder} に掃引の来歴 JSON がありません")
    return sorted(runs, key=lambda r: (r["latent_shape"][0], r["beta"]))


def choose_shape(runs: list[dict], beta: float,
                 min_compression: float = MIN_COMPRESSION) -> tuple[dict, list[dict]]:
    """同じ β の学習の中から、潜在変数の形を選びます。

    規則: 画像を min_compression 倍以上に縮める形 (そうでないと潜在のモデルは計算を節約
    しない) だけを候補にし、その中で検証の再構成誤差 (val_mse) が最小のもの。
    (選んだ学習, 比べた学習それぞれに "eligible" を足したもの) を返します。
    """
    same = [dict(r, eligible=r["compression"] >= min_compression) for r in runs
            if r["beta"] == beta]
    eligible = [r for r in same if r["eligible"]]
    if not eligible:
        raise ValueError(f"β = {beta:g} で {min_compression:g} 倍以上に縮める学習がありません")
    return min(eligible, key=lambda r: r["val_mse"]), same


def chosen_guidance(json_path: str | os.PathLike) -> float:
    """来歴 JSON の selection (val で選んだサンプラー) のガイダンスのスケール。"""
    sel = json.loads(Path(json_path).read_text(encoding="utf-8"))["selection"]
    return parse_task(sel["chosen"])["guidance_scale"]


LIVE_GUIDANCE = 2.0  # ページのデモのライブの既定のガイダンス
LIVE_MAX_NFE = 4  # ライブ (スライダーに合わせて描き直す) の NFE の上限


def live_choice(json_path: str | os.PathLike, scale: float = LIVE_GUIDANCE,
                max_nfe: int = LIVE_MAX_NFE) -> tuple[str, float]:
    """ライブの設定: NFE が max_nfe 以下でガイダンスのスケールが scale の候補から、
    val (既定のシード) の FID が最小のタスクと、その FID を返します。無ければ ValueError。"""
    # 選び方は表と同じ (fid_nfe_table): サンプラーごとに NFE ≤ max_nfe の val の最小、その中の最小
    rows = fid_nfe_table(read_evals([json_path]), guidance=scale, budgets=(max_nfe,),
                         splits=("val",))
    cells = [r["cells"][max_nfe] for r in rows if r["cells"][max_nfe]]
    if not cells:
        raise ValueError(f"{json_path} に NFE {max_nfe} 以下・s = {scale:g} の val の結果が"
                         "ありません (evaluate --split val で測ってください)")
    best = min(cells, key=lambda c: c["select_fid"])
    return best["task"], best["select_fid"]


def model_trade(json_path: str | os.PathLike, budgets: tuple[int, ...] = TRADE_BUDGETS,
                n: int = 1000) -> dict:
    """1 つのモデルの来歴 JSON から、予算ごとに val で選んだサンプラーの test の値を返します。

    ガイダンスのスケールは selection で選ばれた値にそろえ (速いサンプラーの章と同じ)、
    表の作り方は ``sampler_table.fid_nfe_table`` と ``best_per_budget`` そのものです。
    戻り値は辞書で、reference が test の参照水準、cells が {予算: セル}、scale が
    ガイダンスのスケールです。
    セルは {"task", "nfe", "fid", "ratio", ...} で、test の値が無い予算は入りません。
    """
    guidance = chosen_guidance(json_path)
    rows = fid_nfe_table(read_evals([json_path]), n, guidance, budgets)
    best = best_per_budget(rows, budgets)
    test = [r for r in rows if r["split"] == "test"]
    return {"reference": test[0]["reference"] if test else None, "scale": guidance,
            "cells": {b: cell for b, (_, cell) in best.items()}}


def reconstruction_floor(json_path: str | os.PathLike, split: str = "test",
                         n: int = 1000) -> dict | None:
    """自己符号化器の再構成 FID (タスク reconstruction) と参照水準に対する比。無ければ None。"""
    evals = read_evals([json_path])
    rec, ref = evals.get(f"{split}/reconstruction@{n}"), evals.get(f"{split}/reference@{n}")
    if rec is None or ref is None:
        return None
    level = ref.get("fid_mean", ref["fid"])
    return {"fid": rec["fid"], "ratio": rec["fid"] / level, "reference": level,
            "mse": rec.get("mse")}


def seconds_per_image(model: nn.Module, sched, task: str, n: int = 8, repeats: int = 3,
                      seed: int = 0) -> float:
    """タスクのサンプラーで n 枚を作る時間の中央値を、1 枚あたりの秒で返します。

    潜在のモデルでは ``sample`` が最後にデコーダーを通すので、その時間も入ります。
    数える前に 1 枚だけ作って準備を済ませます (最初の呼び出しの遅さを数えないため)。
    """
    kwargs = {k: v for k, v in parse_task(task).items() if k != "task"}
    y = torch.arange(n) % 10
    sample(model, sched, 1, y=y[:1], seed=seed, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(model, sched, n, y=y, seed=seed, **kwargs)
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times)


@torch.no_grad()
def activation_numbers(model: nn.Module, *inputs) -> int:
    """model(*inputs) の 1 回の順伝播で、葉のモジュール (子の無い層) が出力する数の合計。

    逆伝播をしない生成で、途中の特徴マップがどれだけの大きさになるかの目安です。
    """
    total = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal total
        outs = output if isinstance(output, tuple) else (output,)
        total += sum(o.numel() for o in outs if isinstance(o, torch.Tensor))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if not list(m.children())]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
