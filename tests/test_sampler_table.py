"""booktools.sampler_table: 来歴 JSON から FID と NFE の表を作る (ベンチマークと本が共有)。"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from booktools.sampler_table import fid_nfe_table, format_table, read_evals

ROOT = Path(__file__).resolve().parents[1]


def _e(split, task, method, fid, nfe=None, eta=None, s=1.0, n=100):
    e = {"split": split, "task": task, "method": method, "fid": fid, "n": n,
         "guidance_scale": s}
    if eta is not None:
        e["eta"] = eta
    if nfe is not None:
        e["nfe"] = nfe
    return e


def test_cells_take_the_best_val_setting_within_each_budget(tmp_path):
    eps = {"eval": {
        "val/reference@100": {"split": "val", "n": 100, "fid": 2.1, "fid_mean": 2.0,
                              "fid_min": 1.8, "fid_max": 2.2},
        "val/ddim:10:0:1@100": _e("val", "ddim:10:0:1", "ddim", 8.0, eta=0.0),  # nfe なし (古い)
        "val/ddim:10:1:1@100": _e("val", "ddim:10:1:1", "ddim", 6.0, 10, eta=1.0),
        "val/ddim:10:1:2@100": _e("val", "ddim:10:1:2", "ddim", 1.0, 10, eta=1.0, s=2.0),
        "val/dpm:8:1@100": _e("val", "dpm:8:1", "dpm++2m", 5.0, 8),
        "val/dpm:10:1@100": _e("val", "dpm:10:1", "dpm++2m", 4.0, 10),
        "val/ddim:10:1:1@200": _e("val", "ddim:10:1:1", "ddim", 0.5, 10, eta=1.0, n=200),
        "test/dpm:10:1@100": _e("test", "dpm:10:1", "dpm++2m", 4.4, 10),
    }}
    flow = {"eval": {
        "val/reference@100": {"split": "val", "n": 100, "fid": 9.9, "fid_mean": 9.9},
        "val/heun:5:1@100": _e("val", "heun:5:1", "heun", 3.0),  # NFE 9 (タスク名から)
        "val/euler:20:1@100": _e("val", "euler:20:1", "euler", 3.5, 20),
    }}
    paths = [tmp_path / "ddpm.json", tmp_path / "flow.json", tmp_path / "missing.json"]
    paths[0].write_text(json.dumps(eps))
    paths[1].write_text(json.dumps(flow))
    evals = read_evals(paths)
    assert evals["val/reference@100"]["fid_mean"] == 2.0  # 先に読んだ JSON の参照水準
    rows = {(r["sampler"], r["split"]): r for r in fid_nfe_table(evals, n=100)}
    assert set(rows) == {("DDIM η=0", "val"), ("DDIM η=1", "val"), ("DPM-Solver++ 2M", "val"),
                         ("フロー Euler", "val"), ("フロー Heun", "val"),
                         ("DPM-Solver++ 2M", "test")}
    assert rows["DDIM η=0", "val"]["cells"][10]["fid"] == 8.0
    dpm = rows["DPM-Solver++ 2M", "val"]["cells"]
    assert dpm[5] is None and dpm[10]["task"] == "dpm:10:1" and dpm[10]["ratio"] == 2.0
    assert rows["DDIM η=1", "val"]["cells"][10]["fid"] == 6.0  # s = 2 と n = 200 は別
    heun = rows["フロー Heun", "val"]["cells"]
    assert heun[10]["nfe"] == 9 and heun[20]["task"] == "heun:5:1"  # NFE 9 ≤ 20 も候補
    assert rows["フロー Euler", "val"]["cells"][20]["fid"] == 3.5
    assert rows["DPM-Solver++ 2M", "test"]["reference"] is None
    assert math.isnan(rows["DPM-Solver++ 2M", "test"]["cells"][10]["ratio"])
    text = format_table(list(rows.values()))
    assert "3.00 (1.50×) @9" in text and "4.00 (2.00×)" in text
    guided = fid_nfe_table(evals, n=100, guidance=2.0)
    assert [r["cells"][10]["fid"] for r in guided] == [1.0]


@pytest.mark.slow
def test_benchmark_prints_the_table_from_the_shipped_json():
    r = subprocess.run([sys.executable, "benchmarks/diffusion_bench.py", "--fid-nfe"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "NFE ≤ 10" in r.stdout and "DDIM η=1" in r.stdout
    bad = subprocess.run([sys.executable, "benchmarks/diffusion_bench.py", "--fid-nfe",
                          "--live-n", "15"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--live-n" in bad.stderr.splitlines()[-1]


def test_best_is_chosen_on_val_and_reported_on_test():
    from booktools.sampler_table import best_overall, best_per_budget

    ev = {
        "val/reference@100": {"split": "val", "n": 100, "fid": 1.0, "fid_mean": 1.0},
        "test/reference@100": {"split": "test", "n": 100, "fid": 1.0, "fid_mean": 1.0},
        # val では DPM が良く、test では DDIM が良い: 選ぶのは val で、報告は DPM の test
        "val/ddim:10:1:1@100": _e("val", "ddim:10:1:1", "ddim", 5.0, 10, eta=1.0),
        "test/ddim:10:1:1@100": _e("test", "ddim:10:1:1", "ddim", 2.0, 10, eta=1.0),
        "val/dpm:10:1@100": _e("val", "dpm:10:1", "dpm++2m", 4.0, 10),
        "test/dpm:10:1@100": _e("test", "dpm:10:1", "dpm++2m", 6.0, 10),
        "val/dpm:50:1@100": _e("val", "dpm:50:1", "dpm++2m", 4.5, 50),
        "test/dpm:50:1@100": _e("test", "dpm:50:1", "dpm++2m", 1.5, 50),
    }
    rows = fid_nfe_table(ev, n=100)
    best = best_per_budget(rows)
    assert best[10][0] == "DPM-Solver++ 2M" and best[10][1]["fid"] == 6.0
    assert best_per_budget(rows, names=("DDIM η=1",))[10][1]["fid"] == 2.0
    assert 5 not in best  # 測っていない予算は省く
    name, cell = best_overall(rows)  # val の最小は dpm:10 (4.0)。test で良い dpm:50 ではない
    assert (name, cell["task"], cell["fid"]) == ("DPM-Solver++ 2M", "dpm:10:1", 6.0)


def test_budget_column_takes_the_minimum_over_all_settings_within_it():
    """「NFE ≤ 100」は NFE 51〜100 の区間ではなく、100 以下のすべての設定から val で選ぶ。

    本のモデルで起きた例: DDIM 100 (NFE 100、val 1.884) より Heun 25 (NFE 49、val 1.857)
    のほうが良いのに、区間の最大の NFE だけを見ると DDIM 100 が選ばれていた。
    """
    from booktools.sampler_table import best_per_budget

    ev = {
        "val/reference@1000": {"split": "val", "n": 1000, "fid": 1.0, "fid_mean": 1.0},
        "test/reference@1000": {"split": "test", "n": 1000, "fid": 1.0, "fid_mean": 1.0},
    }
    for split, shift in [("val", 0.0), ("test", 0.2)]:
        for task, method, fid, nfe, eta in [("ddim:100:1:1.5", "ddim", 1.884, 100, 1.0),
                                            ("heun:25:1.5", "heun", 1.857, 49, None),
                                            ("heun:50:1.5", "heun", 1.900, 99, None)]:
            ev[f"{split}/{task}@1000"] = _e(split, task, method, fid + shift, nfe, eta=eta,
                                            s=1.5, n=1000)
    rows = fid_nfe_table(ev, n=1000, guidance=1.5)
    heun = next(r for r in rows if r["sampler"] == "フロー Heun" and r["split"] == "val")
    assert heun["cells"][100]["task"] == "heun:25:1.5" and heun["cells"][50]["nfe"] == 49
    name, cell = best_per_budget(rows)[100]
    assert (name, cell["task"]) == ("フロー Heun", "heun:25:1.5")
    assert cell["fid"] == pytest.approx(2.057)  # 報告は同じ設定の test


def test_cells_report_the_mean_and_range_over_sampler_seeds():
    ev = {"val/reference@100": {"split": "val", "n": 100, "fid": 2.0, "fid_mean": 2.0},
          "test/reference@100": {"split": "test", "n": 100, "fid": 2.0, "fid_mean": 2.0}}
    for split in ("val", "test"):
        for seed, fid in [(1234, 4.0), (777, 3.0), (2024, 5.0)]:
            e = _e(split, "heun:5:1", "heun", fid + (split == "test"), 9)
            e["sampler_seed"] = seed
            suffix = "" if seed == 1234 else f"/seed{seed}"
            ev[f"{split}/heun:5:1@100{suffix}"] = e
    ev["val/heun:3:1@100/seed777"] = {**_e("val", "heun:3:1", "heun", 1.0, 5),
                                      "sampler_seed": 777}  # 既定のシードが無い設定は選ばない
    rows = {(r["sampler"], r["split"]): r for r in fid_nfe_table(ev, n=100)}
    val = rows["フロー Heun", "val"]["cells"][10]
    assert val["task"] == "heun:5:1" and val["seeds"] == [777, 1234, 2024]
    assert (val["fid"], val["fid_min"], val["fid_max"]) == (4.0, 3.0, 5.0)
    assert (val["ratio_min"], val["ratio_max"], val["select_fid"]) == (1.5, 2.5, 4.0)
    test = rows["フロー Heun", "test"]["cells"][10]
    assert (test["fid"], test["fid_min"], test["fid_max"]) == (5.0, 4.0, 6.0)
    assert "4.00 (2.00× [1.50–2.50]) @9" in format_table(list(rows.values()))


def test_best_over_guidance_chooses_the_scale_on_val_too():
    from booktools.sampler_table import best_over_guidance

    ev = {"val/reference@100": {"split": "val", "n": 100, "fid": 1.0, "fid_mean": 1.0},
          "test/reference@100": {"split": "test", "n": 100, "fid": 1.0, "fid_mean": 1.0}}
    # NFE 2: val では s = 1.5 が良く、test では s = 1 が良い → 選ぶのは s = 1.5 (val)
    for split, fids in [("val", {1.0: 3.0, 1.5: 2.5}), ("test", {1.0: 1.0, 1.5: 4.0})]:
        for s, fid in fids.items():
            task = f"euler:2:{s:g}"
            ev[f"{split}/{task}@100"] = _e(split, task, "euler", fid, 2, s=s)
    ev["val/euler:1:1@100"] = _e("val", "euler:1:1", "euler", 9.0, 1, s=1.0)
    ev["test/euler:1:1@100"] = _e("test", "euler:1:1", "euler", 8.0, 1, s=1.0)
    best = best_over_guidance(ev, (1, 2), n=100)
    assert best[1][1] == 1.0 and best[1][2]["fid"] == 8.0
    name, s, cell = best[2]
    assert (name, s, cell["task"], cell["fid"]) == ("フロー Euler", 1.5, "euler:2:1.5", 4.0)
