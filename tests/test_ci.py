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


def test_demo_budget_lines_follow_the_four_times_rule():
    for label, budget, hard in budgets.DEMO_BUDGETS_MS.values():
        assert label and hard >= 4 * budget, label
    assert budgets.DEMO_BUDGETS_MS["latent-live"][1] == 50  # issue 22: 1 枚 50 ms 以内


def latent_fixture(tmp_path):
    """潜在のデモの照合に渡す、小さな自己テストの結果とテストの入力 (ブラウザーなし)。"""
    import json
    from types import SimpleNamespace

    import demo_check

    image = [0.5] * 16
    vec = {"method": "heun", "steps": 5,
           "cases": [{"guidance": g, "image": image} for g in (1.0, 2.0)],
           "live_cases": [{"w": w, "guidance": 2.0, "image": image} for w in (0.0, 0.5)]}
    meta = {"model": "u.onnx", "decoder": "d.onnx",
            "live": {"model": "u.onnx", "method": "heun", "steps": 2, "nfe": 3}}
    (tmp_path / "latent-tests.json").write_text(json.dumps(vec))
    (tmp_path / "latent.json").write_text(json.dumps(meta))
    (tmp_path / "_static" / "webdemo").mkdir(parents=True)
    for name in ("u.onnx", "d.onnx"):
        (tmp_path / "_static" / "webdemo" / name).write_bytes(b"0" * 100)
    ctx = demo_check.Context(tmp_path, tmp_path, SimpleNamespace(), "book/10_latent.html")

    def result(live_ms=10.0, live_image=image):
        case = {"image": image, "ms": 30.0, "median_ms": 31.0, "first_ms": 50.0}
        return {"cases": [case, case],
                "live_cases": [case | {"ms": live_ms, "median_ms": live_ms},
                               case | {"image": live_image, "ms": 8.0, "median_ms": 9.0}]}
    return demo_check, ctx, result


def test_latent_check_fails_on_a_wrong_live_image_and_far_past_the_live_budget(tmp_path):
    sys.path.insert(0, str(REPO / "code"))
    pytest.importorskip("playwright")
    demo_check, ctx, result = latent_fixture(tmp_path)
    rows = demo_check.check_latent(result(), ctx)
    assert not any(r.fails for r in rows)
    live = next(r for r in rows if r.key == "live")
    assert live.ms == 10.0 and live.nfe == 3 and live.budget == "≤ 50 ms"
    # ライブの 1 枚の画像が 1 画素でも 1e-3 を超えてずれれば失敗
    wrong = demo_check.check_latent(result(live_image=[0.5] * 15 + [0.502]), ctx)
    assert [r.item for r in wrong if r.fails] == [
        "ライブ (ホイン法 2 ステップ、NFE 3、w = 0.5、s = 2) の画像の最大差"]
    # 速さ: 予算 (50 ms) を超えても表示だけ、上限 (DEMO_BUDGETS_MS) を超えたら失敗
    _, _, hard = budgets.DEMO_BUDGETS_MS["latent-live"]
    slow = next(r for r in demo_check.check_latent(result(live_ms=120.0), ctx) if r.key == "live")
    assert not slow.ok and not slow.fails
    broken = next(r for r in demo_check.check_latent(result(live_ms=hard + 1), ctx)
                  if r.key == "live")
    assert broken.fails
