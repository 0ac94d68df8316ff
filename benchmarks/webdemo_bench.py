"""ブラウザーで動くデモの速さと大きさを測ります (headless Chromium、WebAssembly)。

CI の照合 (.ci/demo_check.py) と同じ手順で各デモの自己テストを --repeats 回動かし、
時間と大きさの行だけを並べます。予算を満たさなくても失敗にはしません (CI が判定します)。
生成のデモ (画素の DDIM、潜在の「生成」、潜在のライブ) があれば、1 枚の時間を並べ、画素の
時間との比 (画素 ÷ 潜在) を 1 枚あたりと、ネットワークの評価 1 回 (NFE) あたりで表示します。

    python benchmarks/webdemo_bench.py _build/html --repeats 3
    python benchmarks/webdemo_bench.py _build/html --pages book/08_sampling book/10_latent
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
sys.path.insert(0, str(ROOT / "code"))
from demo_check import Row, print_table, run_demos  # noqa: E402

TIMING_UNITS = (" ms", " s", " MB")  # 時間と大きさの行 (照合の行は CI の表で見る)
NAMES = {"pixel": "画素の DDIM", "latent": "潜在の「生成」", "live": "潜在のライブ"}


def speed_table(rows: list[Row]) -> list[str]:
    """1 枚の時間の行 (key のある行) から、画素との比の表を作ります (画素が無ければ比は空)。

    ガイダンスの強さごとの行は、ガイダンスあり (2 枚のバッチ) の行で比べます
    (どれも 1 と違う s の行が 1 つずつあります)。
    """
    picked: dict[str, Row] = {}
    for r in rows:
        if r.ms is None:
            continue
        kind, _, guidance = r.key.partition(" s=")
        if kind in NAMES and (kind not in picked or guidance not in ("", "1")):
            picked[kind] = r
    base = picked.get("pixel")
    lines = []
    for kind in [k for k in NAMES if k in picked]:
        r = picked[kind]
        line = f"{NAMES[kind]}: 1 枚 {r.ms:.1f} ms (NFE {r.nfe}、{r.item})"
        if base is not None and kind != "pixel":
            per_nfe = (base.ms / base.nfe) / (r.ms / r.nfe)
            line += f" — 画素 ÷ これ: 1 枚 {base.ms / r.ms:.1f} 倍、NFE 1 回あたり {per_nfe:.2f} 倍"
        lines.append(line)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html_dir", nargs="?", default="_build/html", type=Path)
    ap.add_argument("--demo-dir", type=Path, default=Path(
        os.environ.get("TORCHBOOK_WEBDEMO_DIR") or ROOT / "_build" / "webdemo"))
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    ap.add_argument("--demos", nargs="*", help="測るデモの名前 (既定: すべて)")
    ap.add_argument("--pages", nargs="*", help="測るページ (既定: デモの印のあるすべてのページ)")
    ap.add_argument("--repeats", type=int, default=3, help="ブラウザーを起動し直して測る回数")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats は 1 以上にしてください")
    if not (args.html_dir / "_static" / "webdemo").is_dir():
        ap.error(f"{args.html_dir}/_static/webdemo がありません (先に本をビルドしてください)")
    exe = shutil.which(args.chromium)
    if exe is None:
        ap.error(f"{args.chromium} がありません (Debian/Ubuntu: apt-get install chromium)")
    for k in range(args.repeats):
        rows, _ = run_demos(args.html_dir, args.demo_dir, exe, args.demos, args.pages)
        print(f"---- {k + 1} 回目")
        print_table([r for r in rows if r.value.endswith(TIMING_UNITS)])
        print("\n".join(speed_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
