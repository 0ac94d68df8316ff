"""何も変えずにもう一度ビルドしたとき (キャッシュの効いた再ビルド) の所要時間を測ります。

本を書きながら何度もビルドするので、変更のない再ビルドは速くなければなりません。予算は 3 秒
です。先に一度 ``jupyter-book build .`` を済ませてから実行します。予算を超えても失敗には
しません (計算機の負荷でも遅くなるため。表示だけ)。

    python benchmarks/rebuild_bench.py --repeats 3

各回の時間、中央値、予算を表示し (負荷の影響を受けにくい CPU 時間も並べます)、
``--profile`` を付けると 1 回分を cProfile で測って、累積時間の上位の関数を表示します。
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 3.0


def build_command(config: str | None = None) -> list[str]:
    exe = shutil.which("jupyter-book")
    if exe is None:
        raise SystemExit("jupyter-book がありません (bash scripts/setup.sh で入れてください)")
    return [exe, "build", str(ROOT), *(["--config", config] if config else [])]


def rebuild(cmd: list[str]) -> tuple[float, float]:
    """1 回ビルドして (経過時間, CPU 時間) を返します。CPU 時間は計算機の負荷の影響を受けにくい。"""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit(f"ビルドが失敗しました (終了コード {res.returncode})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def profile(cmd: list[str], top: int) -> None:
    """同じビルドを、このプロセスの中で cProfile を付けて 1 回実行します。"""
    from jupyter_book.cli.main import main as jb_main

    prof = cProfile.Profile()
    argv = sys.argv
    sys.argv = ["jupyter-book", *cmd[1:]]
    prof.enable()
    try:
        jb_main(standalone_mode=False)
    finally:
        prof.disable()
        sys.argv = argv
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats(top)
    print(out.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="測る回数 (既定 3)")
    ap.add_argument("--profile", action="store_true", help="1 回分を cProfile で表示する")
    ap.add_argument("--top", type=int, default=40, help="--profile で表示する関数の数")
    ap.add_argument("--config", help="前回のビルドで使った設定ファイル (jupyter-book の --config)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats は 1 以上にしてください")
    if not (ROOT / "_build" / "html" / "search.html").exists():
        ap.error("先に一度 jupyter-book build . を実行してください (変更のない再ビルドを測ります)")
    os.environ.setdefault("PYTHONPATH", str(ROOT / "code"))
    cmd = build_command(args.config)
    rebuild(cmd)  # 直前の変更を取り込む 1 回 (測らない)
    runs = [rebuild(cmd) for _ in range(args.repeats)]
    times = [t for t, _ in runs]
    median = statistics.median(times)
    print("変更のない再ビルド (jupyter-book build .): "
          + "、".join(f"{t:.1f} 秒" for t in times)
          + f" (CPU 時間の中央値 {statistics.median(c for _, c in runs):.1f} 秒)")
    verdict = "OK" if median <= BUDGET_SECONDS else "超過 (負荷でも起きるので表示だけ)"
    print(f"中央値 {median:.1f} 秒 / 予算 {BUDGET_SECONDS:g} 秒: {verdict}")
    if args.profile:
        profile(cmd, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
