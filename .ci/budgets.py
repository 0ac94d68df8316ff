"""CI の各段階の所要時間を記録し、予算と並べて表示します (標準ライブラリだけ)。

CI を失敗にするのは正しさの検査だけです。時間の予算 (BUDGETS) は毎回表に出して追いますが、
超えても「超過」と表示するだけです。失敗にするのは、予算の何倍もの上限 (hard) を超えたときだけ
です。上限をそこまで広くとる理由は BUDGETS の注を見てください。

    python3 .ci/budgets.py record build 212    # 段階 build に 212 秒かかった
    python3 .ci/budgets.py report              # 表を表示し、上限を超えた段階があれば終了コード 1

記録は環境変数 CI_TIMES のファイル (JSON) に貯めます (既定 _build/ci-times.json)。
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from pathlib import Path

# 段階 → (表示名, 予算 (秒), 失敗にする上限 (秒))
# 2 コアを 6 つの作業が分け合う計算機では、同じビルドが負荷だけで 3.2 倍遅くなりました
# (負荷のない計算機 191 秒、負荷のある新しいクローン 618 秒)。予算は負荷のない計算機の
# 目安で、上限はその 4 倍以上にとります (負荷で遅くなる幅 3.2 倍より広く、CI 全体の制限
# 90 分 = 5,400 秒には収まる)。上限を超えるのは、章が無限に回るような壊れ方のときです。
BUDGETS: dict[str, tuple[str, int, int]] = {
    "setup": ("準備", 300, 1800),
    "tests": ("テスト", 420, 2400),  # 負荷の重い計算機 (load 18) で 1,184 秒かかった
    "lint": ("静的検査と文章校正", 120, 900),
    "build": ("本のビルド", 600, 2400),
    "html": ("HTML の検査", 30, 300),
    "browser": ("ブラウザーの検査", 180, 900),
    "demo": ("デモの照合", 180, 900),
    "pdf": ("PDF 版", 600, 2400),
    "total": ("CI 全体", 2400, 5000),
}


# ブラウザーのデモの 1 枚の時間 (ミリ秒): 行 → (表示名, 予算, 失敗にする上限)。
# .ci/demo_check.py が表に出します。上の段階と同じ規則で、予算を超えても表示だけ、失敗は上限
# (予算の 10 倍: 負荷で遅くなる幅 3.2 倍の 3 倍) を超えたときだけです。
DEMO_BUDGETS_MS: dict[str, tuple[str, float, float]] = {
    # 潜在拡散のライブ: スライダーを動かすたびに描き直すので、手の動きに付いてくる速さ
    "latent-live": ("潜在のライブ (少ないステップ) で 1 枚", 50, 500),
}


def times_path() -> Path:
    return Path(os.environ.get("CI_TIMES") or "_build/ci-times.json")


def load(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def record(path: Path, stage: str, seconds: float) -> None:
    times = load(path)
    times[stage] = seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(times, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def verdict(seconds: float, budget: float, hard: float) -> str:
    """予算内 / 超過 (CI は通す) / 上限超過 (CI を失敗にする)。"""
    if seconds > hard:
        return "上限超過"
    return "超過" if seconds > budget else "OK"


def width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, n: int, right: bool = False) -> str:
    space = " " * max(0, n - width(text))
    return space + text if right else text + space


def report(times: dict[str, float], out=sys.stdout) -> int:
    """表を表示し、上限を超えた段階の数を返します。"""
    rows = [("段階", "所要時間", "予算", "上限", "判定")]
    failed = 0
    for key, (label, budget, hard) in BUDGETS.items():
        if key not in times:
            continue
        v = verdict(times[key], budget, hard)
        failed += v == "上限超過"
        rows.append((label, f"{times[key]:.0f} 秒", f"{budget} 秒", f"{hard} 秒", v))
    cols = [max(width(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join([pad(r[0], cols[0]), *(pad(c, cols[i + 1], True) for i, c in
                                                enumerate(r[1:4])), r[4]]), file=out)
    if any(r[4] == "超過" for r in rows[1:]):
        print("予算の超過は表示だけです (計算機の負荷でも起きるため)。失敗にするのは上限の超過"
              "だけです。", file=out)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="段階の所要時間を記録します")
    r.add_argument("stage", choices=sorted(BUDGETS))
    r.add_argument("seconds", type=float)
    sub.add_parser("report", help="予算の表を表示します (上限を超えた段階があれば終了コード 1)")
    args = ap.parse_args(argv)
    path = times_path()
    if args.cmd == "record":
        record(path, args.stage, args.seconds)
        label, budget, hard = BUDGETS[args.stage]
        print(f"{label}の所要時間: {args.seconds:.0f} 秒 (予算 {budget} 秒、上限 {hard} 秒: "
              f"{verdict(args.seconds, budget, hard)})")
        return 0
    failed = report(load(path))
    if failed:
        print(f"所要時間の上限を超えた段階が {failed} つあります", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
