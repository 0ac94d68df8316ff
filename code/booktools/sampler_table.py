"""FID と NFE の表: evaluate CLI の来歴 JSON から、サンプラーごと・NFE の予算ごとに並べます。

本書 (速いサンプラーの節) と ``benchmarks/diffusion_bench.py`` の両方がこれを使います。
表の値はすべて JSON に記録された測定値で、ここでは何も測りません。

- 行: サンプラー (DDIM η=0、DDIM η=1、DPM-Solver++ 2M、フローの Euler と Heun) と split。
- 列: NFE の予算 5, 10, 20, 50, 100。セルは、その行のサンプラーで測った設定のうち
  NFE が予算以下のすべての中で val の FID が最小のもの (選ぶのは val、test は同じ設定を
  報告するだけ)。Heun は 1 ステップ 2 回評価するので、heun:5 は NFE 9 です。
- サンプラーのシードを変えて測った結果があれば、FID はシードにわたる平均で、比の範囲
  (最小–最大) も示します (選ぶのはいつも既定のシードの val の値です)。
- 比: FID ÷ 参照水準。参照水準は同じ split・同じ n の本物どうしの FID の平均
  (``reference`` の ``fid_mean``) です。
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from pathlib import Path

from torchbook.diffusion.evaluation import DEFAULT_SEED, NFE_BUDGETS, parse_task, task_nfe
from torchbook.diffusion.metrics import SPLITS

# (表示名, method, eta) (eta が None のサンプラーは η を持たない)
SAMPLERS: tuple[tuple[str, str, float | None], ...] = (
    ("DDIM η=0", "ddim", 0.0),
    ("DDIM η=1", "ddim", 1.0),
    ("DPM-Solver++ 2M", "dpm++2m", None),
    ("フロー Euler", "euler", None),
    ("フロー Heun", "heun", None),
)


def read_evals(paths: list[str | os.PathLike]) -> dict[str, dict]:
    """来歴 JSON (あるものだけ) の "eval" を 1 つの辞書にまとめます。

    タスク名はモデルの種類ごとに違う (ddim/dpm と euler/heun) のでぶつかりません。
    ``reference`` は本物どうしの値で、どの JSON でも同じ split・n なら同じ計算です
    (先に読んだ JSON の値を使います)。
    """
    evals: dict[str, dict] = {}
    for path in paths:
        path = Path(path)
        if path.is_file():
            for key, value in json.loads(path.read_text(encoding="utf-8")).get("eval", {}).items():
                evals.setdefault(key, value)
    return evals


def sampler_label(entry: dict) -> str | None:
    """結果の 1 項目がどの行 (SAMPLERS の表示名) に入るか。入らなければ None。"""
    for label, method, eta in SAMPLERS:
        if entry.get("method") == method and (eta is None or entry.get("eta") == eta):
            return label
    return None


def entry_nfe(entry: dict) -> int:
    """結果の NFE (記録が無い古い結果はタスク名から数えます)。"""
    return entry["nfe"] if "nfe" in entry else task_nfe(parse_task(entry["task"]))


def entry_seed(entry: dict) -> int:
    """結果を作ったサンプラーのシード (記録が無い古い結果は既定のシード)。"""
    return entry.get("sampler_seed", DEFAULT_SEED)


def fid_nfe_table(evals: dict[str, dict], n: int = 1000, guidance: float = 1.0,
                  budgets: tuple[int, ...] = NFE_BUDGETS,
                  splits: tuple[str, ...] = SPLITS) -> list[dict]:
    """FID と NFE の表の行のリストを返します (行は split ごとに SAMPLERS の順)。

    列「NFE ≤ b」のセルは、その行のサンプラーで測った設定のうち NFE が b 以下のすべての
    中から、val の FID (既定のシードの値) が最小のものです。test の行にも、val で選んだ
    同じタスクを入れます (test の値では選びません)。
    各行は {"sampler", "split", "reference", "reference_range", "cells"} で、cells は
    {予算: セルか None}。セルは {"task", "nfe", "fid", "ratio", "fid_min", "fid_max",
    "ratio_min", "ratio_max", "seeds", "select_fid"}: fid と ratio はサンプラーのシードに
    わたる平均、_min と _max はその範囲、seeds は測ったシード、select_fid は選ぶのに使った
    val の値です。測った結果が 1 つも無い行は省きます。
    """
    def measured(split: str, label: str) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for e in evals.values():
            if (e.get("split") == split and e.get("n") == n and sampler_label(e) == label
                    and e.get("guidance_scale") == guidance):
                found.setdefault(e["task"], []).append(e)
        return found

    rows = []
    for label, _, _ in SAMPLERS:
        val = measured("val", label)
        select = {task: next((e["fid"] for e in es if entry_seed(e) == DEFAULT_SEED), None)
                  for task, es in val.items()}
        choice = {}
        for budget in budgets:
            within = [t for t, fid in select.items()
                      if fid is not None and entry_nfe(val[t][0]) <= budget]
            choice[budget] = min(within, key=select.get) if within else None
        for split in splits:
            ref = evals.get(f"{split}/reference@{n}")
            ref_mean = ref.get("fid_mean", ref["fid"]) if ref else None
            found = val if split == "val" else measured(split, label)
            cells = {b: _cell(found.get(choice[b], []), ref_mean, select.get(choice[b]))
                     for b in budgets}
            if any(cells.values()):
                rows.append({"sampler": label, "split": split, "reference": ref_mean,
                             "reference_range": (ref.get("fid_min"), ref.get("fid_max"))
                             if ref else (None, None), "cells": cells})
    order = {split: i for i, split in enumerate(splits)}
    return sorted(rows, key=lambda r: order[r["split"]])  # split ごとに SAMPLERS の順


def _cell(entries: list[dict], ref_mean: float | None, select_fid: float | None) -> dict | None:
    """同じタスクのシードごとの結果から、表のセル (平均と範囲) を作ります。"""
    if not entries:
        return None
    fids = [e["fid"] for e in sorted(entries, key=entry_seed)]
    mean = sum(fids) / len(fids)

    def ratio(x: float) -> float:
        return x / ref_mean if ref_mean else math.nan

    return {"task": entries[0]["task"], "nfe": entry_nfe(entries[0]), "fid": mean,
            "ratio": ratio(mean), "fid_min": min(fids), "fid_max": max(fids),
            "ratio_min": ratio(min(fids)), "ratio_max": ratio(max(fids)),
            "seeds": sorted(entry_seed(e) for e in entries), "select_fid": select_fid}


def best_per_budget(rows: list[dict], budgets: tuple[int, ...] = NFE_BUDGETS,
                    names: tuple[str, ...] | None = None) -> dict[int, tuple[str, dict]]:
    """予算ごとに val の FID が最小のサンプラーを選び、{予算: (表示名, test のセル)} を返します。

    選ぶのは val (既定のシードの値)、報告するのは同じタスクの test です (test の値で選び
    直さない)。names を渡すと、その行 (SAMPLERS の表示名) の中だけから選びます。
    test のセルがまだ無い予算は省きます。
    """
    table = {(r["sampler"], r["split"]): r for r in rows}
    best = {}
    for b in budgets:
        cands = [(row["cells"][b]["select_fid"], name) for (name, split), row in table.items()
                 if split == "val" and row["cells"].get(b) and (names is None or name in names)]
        if not cands:
            continue
        name = min(cands)[1]
        test = table.get((name, "test"), {"cells": {}})["cells"].get(b)
        if test is not None:
            best[b] = (name, test)
    return best


def best_over_guidance(evals: dict[str, dict], budgets: tuple[int, ...], n: int = 1000,
                       ) -> dict[int, tuple[str, float, dict]]:
    """ガイダンスのスケールも候補に入れて、予算ごとに val の FID が最小の設定を選びます。

    測ってあるスケールごとに ``fid_nfe_table`` と ``best_per_budget`` で選び、その中から
    val の値 (select_fid) が最小のものを取ります。{予算: (表示名, スケール, test のセル)}。
    """
    scales = sorted({e["guidance_scale"] for e in evals.values()
                     if e.get("n") == n and e.get("guidance_scale") is not None})
    best: dict[int, tuple[str, float, dict]] = {}
    for s in scales:
        rows = fid_nfe_table(evals, n=n, guidance=s, budgets=budgets)
        for b, (name, cell) in best_per_budget(rows, budgets).items():
            if b not in best or cell["select_fid"] < best[b][2]["select_fid"]:
                best[b] = (name, s, cell)
    return best


def best_overall(rows: list[dict]) -> tuple[str, dict] | None:
    """NFE を問わず val の FID が最小のタスクと、同じタスクの test のセルを返します。"""
    table = {(r["sampler"], r["split"]): r for r in rows}
    cands = [(c["select_fid"], name, c["task"]) for (name, split), row in table.items()
             if split == "val" for c in row["cells"].values() if c]
    if not cands:
        return None
    _, name, task = min(cands)
    test = table.get((name, "test"), {"cells": {}})["cells"]
    cell = next((c for c in test.values() if c and c["task"] == task), None)
    return (name, cell) if cell else None


def _width(text: str) -> int:
    """端末での表示幅 (全角の文字は 2)。"""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _ljust(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def _rjust(text: str, width: int) -> str:
    return " " * max(0, width - _width(text)) + text


def ratio_text(cell: dict) -> str:
    """セルの比を "2.00×"、シードが複数なら "2.00× [1.50–2.50]" (平均 [最小–最大]) にします。"""
    spread = (f" [{cell['ratio_min']:.2f}–{cell['ratio_max']:.2f}]"
              if len(cell["seeds"]) > 1 else "")
    return f"{cell['ratio']:.2f}×{spread}"


def format_table(rows: list[dict], budgets: tuple[int, ...] = NFE_BUDGETS) -> str:
    """表をテキストに。セルは "FID (比×)"、シードが複数なら平均と "[最小–最大]" の比。

    NFE が予算と違うときは "@NFE" を添えます。
    """
    width = 30
    head = _ljust("サンプラー", 18) + _ljust("split", 6) + _rjust("参照", 6)
    lines = [head + "".join(_rjust(f"NFE ≤ {b}", width) for b in budgets)]
    for row in rows:
        ref = f"{row['reference']:.2f}" if row["reference"] else "-"
        cells = []
        for b in budgets:
            c = row["cells"][b]
            if c is None:
                cells.append(_rjust("-", width))
                continue
            at = f" @{c['nfe']}" if c["nfe"] != b else ""
            cells.append(_rjust(f"{c['fid']:.2f} ({ratio_text(c)}){at}", width))
        lines.append(_ljust(row["sampler"], 18) + _ljust(row["split"], 6) + _rjust(ref, 6)
                     + "".join(cells))
    return "\n".join(lines)


def measure_live(checkpoint: str | os.PathLike, tasks: list[str], n: int, split: str = "val",
                 data_root: str | os.PathLike | None = None, seed: int = 1234) -> dict[str, dict]:
    """今のコードで、いくつかのタスクを小さな n で測り直します (来歴 JSON には書きません)。

    evaluate CLI と同じ ``run_task`` を CPU・fp32 で呼び、``reference`` も同じ n で測ります。
    返り値は {タスク名: 結果の辞書}。n が小さいと FID は大きく出るので、比べるのは
    同じ n の参照水準との比です。
    """
    import torch

    from booktools.data import data_root as default_root
    from torchbook.diffusion.checkpoint import load_checkpoint
    from torchbook.diffusion.data import load_tensors
    from torchbook.diffusion.evaluation import run_task
    from torchbook.diffusion.fashion_classifier import load_classifier

    model, sched, _ = load_checkpoint(checkpoint)
    clf = load_classifier()
    images, labels = load_tensors(data_root or default_root(), train=False)
    out = {}
    for task in ["reference", *tasks]:
        kwargs = parse_task(task)
        res = run_task(kwargs, model, sched, clf, images, labels, split, n, 500, seed,
                       torch.device("cpu"), False)
        out[kwargs["task"]] = {**res, "task": kwargs["task"], "n": n, "split": split}
    return out
