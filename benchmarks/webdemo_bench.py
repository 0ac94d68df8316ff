"""ブラウザーで動くデモの速さと大きさを測ります (headless Chromium、WebAssembly)。

CI の照合 (.ci/demo_check.py) と同じ手順で各デモの自己テストを --repeats 回動かし、
時間と大きさの行だけを並べます。予算を満たさなくても失敗にはしません (CI が判定します)。

    python benchmarks/webdemo_bench.py _build/html --repeats 3
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
from demo_check import print_table, run_demos  # noqa: E402

TIMING_UNITS = (" ms", " s", " MB")  # 時間と大きさの行 (照合の行は CI の表で見る)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html_dir", nargs="?", default="_build/html", type=Path)
    ap.add_argument("--demo-dir", type=Path, default=Path(
        os.environ.get("TORCHBOOK_WEBDEMO_DIR") or ROOT / "_build" / "webdemo"))
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    ap.add_argument("--demos", nargs="*", help="測るデモの名前 (既定: すべて)")
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
        rows, _ = run_demos(args.html_dir, args.demo_dir, exe, args.demos)
        print(f"---- {k + 1} 回目")
        print_table([r for r in rows if r.value.endswith(TIMING_UNITS)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
