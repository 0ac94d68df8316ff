"""FID と NFE の表: evaluate CLI の来歴 JSON から、サンプラーごと・NFE の予算ごとに並べます。

本書 (速いサンプラーの節) と ``benchmarks/diffusion_bench.py`` の両方がこれを使います。
表の値はすべて JSON に記録された測定値で、ここでは何も測りません。

- 行: サンプラー (DDIM η=0、DDIM η=1、DPM-Solver++ 2M、フローの Euler と Heun) と split。
- 列: NFE の予算 5, 10, 20, 50, 100。セルは、その行のサンプラーで測ったタスクのうち
  NFE が予算以下で最も大きいもの (1 つ前の予算より大きいもの)。Heun は 1 ステップ 2 回
  評価するので、たとえば予算 10 のセルは heun:5 (NFE 9) になります。
- 比: FID ÷ 参照水準。参照水準は同じ split・同じ n の本物どうしの FID の平均
  (``reference`` の ``fid_mean``) です。
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from pathlib import Path

from torchbook.diffusion.evaluation import NFE_BUDGETS, parse_task, task_nfe
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


def fid_nfe_table(evals: dict[str, dict], n: int = 1000, guidance: float = 1.0,
                  budgets: tuple[int, ...] = NFE_BUDGETS,
                  splits: tuple[str, ...] = SPLITS) -> list[dict]:
    """FID と NFE の表の行のリストを返します (行は split ごとに SAMPLERS の順)。

    各行は {"sampler", "split", "reference", "reference_range", "cells"} で、cells は
    {予算: {"task", "nfe", "fid", "ratio"} か None}。測った結果が 1 つも無い行は省きます。
    """
    rows = []
    for split in splits:
        ref = evals.get(f"{split}/reference@{n}")
        ref_mean = ref.get("fid_mean", ref["fid"]) if ref else None
        for label, _, _ in SAMPLERS:
            found = [e for e in evals.values()
                     if e.get("split") == split and e.get("n") == n
                     and e.get("guidance_scale") == guidance and sampler_label(e) == label]
            cells, lower = {}, 0
            for budget in budgets:
                within = [e for e in found if lower < entry_nfe(e) <= budget]
                cells[budget] = None
                if within:
                    e = max(within, key=entry_nfe)
                    cells[budget] = {"task": e["task"], "nfe": entry_nfe(e), "fid": e["fid"],
                                     "ratio": e["fid"] / ref_mean if ref_mean else math.nan}
                lower = budget
            if any(cells.values()):
                rows.append({"sampler": label, "split": split, "reference": ref_mean,
                             "reference_range": (ref.get("fid_min"), ref.get("fid_max"))
                             if ref else (None, None), "cells": cells})
    return rows


def best_per_budget(rows: list[dict], budgets: tuple[int, ...] = NFE_BUDGETS,
                    names: tuple[str, ...] | None = None) -> dict[int, tuple[str, dict]]:
    """予算ごとに val の FID が最小のサンプラーを選び、{予算: (表示名, test のセル)} を返します。

    選ぶのは val、報告するのは同じタスクの test です (test の値で選び直さない)。
    names を渡すと、その行 (SAMPLERS の表示名) の中だけから選びます。
    test のセルがまだ無い予算は省きます。
    """
    table = {(r["sampler"], r["split"]): r for r in rows}
    best = {}
    for b in budgets:
        cands = [(row["cells"][b]["fid"], name) for (name, split), row in table.items()
                 if split == "val" and row["cells"].get(b) and (names is None or name in names)]
        if not cands:
            continue
        name = min(cands)[1]
        test = table.get((name, "test"), {"cells": {}})["cells"].get(b)
        if test is not None:
            best[b] = (name, test)
    return best


def best_overall(rows: list[dict]) -> tuple[str, dict] | None:
    """NFE を問わず val の FID が最小のタスクと、同じタスクの test のセルを返します。"""
    table = {(r["sampler"], r["split"]): r for r in rows}
    cands = [(c["fid"], name, c["task"]) for (name, split), row in table.items()
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


def format_table(rows: list[dict], budgets: tuple[int, ...] = NFE_BUDGETS) -> str:
    """表をテキストに (セルは "FID (比×)"、NFE が予算と違うときは "@NFE" を添えます)。"""
    head = _ljust("サンプラー", 18) + _ljust("split", 6) + _rjust("参照", 6)
    lines = [head + "".join(_rjust(f"NFE ≤ {b}", 20) for b in budgets)]
    for row in rows:
        ref = f"{row['reference']:.2f}" if row["reference"] else "-"
        cells = []
        for b in budgets:
            c = row["cells"][b]
            if c is None:
                cells.append(_rjust("-", 20))
                continue
            at = f" @{c['nfe']}" if c["nfe"] != b else ""
            cells.append(_rjust(f"{c['fid']:.2f} ({c['ratio']:.2f}×){at}", 20))
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
    from torchbook.diffusion.checkpoint import load_checkpoint, load_classifier
    from torchbook.diffusion.data import load_tensors
    from torchbook.diffusion.evaluation import run_task

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
