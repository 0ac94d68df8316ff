"""CI の補助 (.ci/): 所要時間の予算、図の PNG の読み取り、デモの速さの行の判定。

ブラウザーを動かす検査そのもの (.ci/browser_check.py、.ci/demo_check.py) は CI がビルドした本に
対して実行します。ここではブラウザーなしで決まる部分だけを確かめます。
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".ci"))
import budgets  # noqa: E402


def test_budget_verdicts_fail_only_past_the_hard_limit():
    assert budgets.verdict(100, budget=600, hard=2400) == "OK"
    assert budgets.verdict(618, budget=600, hard=2400) == "超過"  # 負荷で遅くなっただけ
    assert budgets.verdict(2401, budget=600, hard=2400) == "上限超過"


def test_every_hard_limit_is_at_least_four_times_its_budget():
    # 負荷だけで 3.2 倍遅くなった (191 秒 → 618 秒) ので、上限はそれより広くとる
    for label, budget, hard in budgets.BUDGETS.values():
        assert hard >= 4 * budget or label == "CI 全体", label
    # 全体の上限も、CI の制限 (90 分) の内側で、予算より広い
    _, budget, hard = budgets.BUDGETS["total"]
    assert budget < hard < 5400


def test_report_prints_every_recorded_stage_and_counts_failures():
    out = io.StringIO()
    failed = budgets.report({"build": 618, "browser": 1000, "tests": 50}, out=out)
    text = out.getvalue()
    assert failed == 1  # ブラウザーの検査だけが上限 (900 秒) を超えた
    assert "本のビルド" in text and "618 秒" in text and "超過" in text
    assert "上限超過" in text and "表示だけ" in text


def test_record_and_report_on_the_command_line(tmp_path):
    env = {"CI_TIMES": str(tmp_path / "t.json"), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, str(REPO / ".ci" / "budgets.py")]
    rec = subprocess.run([*run, "record", "build", "618"], env=env, capture_output=True,
                         text=True)
    assert rec.returncode == 0 and "超過" in rec.stdout
    ok = subprocess.run([*run, "report"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "618 秒" in ok.stdout
    subprocess.run([*run, "record", "build", "3000"], env=env, check=True, capture_output=True)
    bad = subprocess.run([*run, "report"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "上限" in bad.stderr


def test_png_info_reads_dpi_and_the_smallest_font(tmp_path):
    pytest.importorskip("playwright")
    pytest.importorskip("PIL")
    import browser_check
    from PIL import Image, PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("min_font_pt", "7.5")
    path = tmp_path / "fig.png"
    Image.new("RGB", (4, 4)).save(path, dpi=(150, 150), pnginfo=meta)
    assert browser_check.png_info(path) == (150, 7.5)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("min_font_pt", "8", zip=True)  # zTXt でも読む
    Image.new("RGB", (4, 4)).save(path, dpi=(200, 200), pnginfo=meta)
    assert browser_check.png_info(path) == (200, 8.0)
    Image.new("RGB", (4, 4)).save(path)  # 記録が無いとき: 100 dpi、最小の文字は不明
    assert browser_check.png_info(path) == (100, None)


def test_page_weight_budget_is_one_and_a_half_megabytes():
    pytest.importorskip("playwright")
    import browser_check

    assert browser_check.WEIGHT_BUDGET == 1_500_000


def test_demo_timing_rows_fail_only_far_past_their_budget():
    pytest.importorskip("playwright")
    import demo_check

    within = demo_check.timing_row("棒の更新", 15.0, 20.0)
    loaded = demo_check.timing_row("棒の更新", 60.0, 20.0)  # 負荷で 3 倍
    broken = demo_check.timing_row("棒の更新", 20.0 * demo_check.TIMING_HARD_FACTOR + 1, 20.0)
    assert (within.ok, within.fails) == (True, False)
    assert (loaded.ok, loaded.fails) == (False, False) and loaded.mark.startswith("超過")
    assert broken.fails and broken.mark == "NG"
    # 一致の行 (速さでない行) は、予算を外れたらいつも失敗
    wrong = demo_check.Row("", "確率の最大差", "1e-2", "≤ 1e-4", False)
    assert wrong.fails and wrong.mark == "NG"
