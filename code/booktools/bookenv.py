"""本をビルドした環境と各章の実行時間を集める関数 (本書専用)。"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
from pathlib import Path

import torch
import torchvision

from booktools import data
from torchbook.device import describe_device, get_device

CACHE_DIR = data.REPO_ROOT / "_build" / ".jupyter_cache"


def environment_info() -> dict[str, str]:
    """Python・PyTorch のバージョン、デバイス、データの出どころをまとめます。"""
    info = {
        "Python": platform.python_version(),
        "PyTorch": torch.__version__,
        "torchvision": torchvision.__version__,
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "デバイス": describe_device(get_device()),  # 章のコードと同じ選び方
        "CPU スレッド数 (torch)": str(torch.get_num_threads()),
    }
    for name in data.DATASETS:
        try:
            m = data.read_manifest(name)
            source = m["detail"].split(" ← ")[0]
            counts = f"訓練 {m['train']:,} 枚 / テスト {m['test']:,} 枚"
            info[f"データ: {m['dataset']}"] = f"{counts} ({source})"
        except data.DataError:
            info[f"データ: {data.DATASETS[name]}"] = "未準備"
    return info


def execution_records(cache_dir: str | os.PathLike = CACHE_DIR) -> dict[str, float]:
    """jupyter-cache のデータベースから、章のファイル名 → 実行秒数を読みます。

    myst-nb は ``execute_notebooks: cache`` のとき、各章を実行するたびに
    その所要時間をこのデータベースに記録します。
    """
    db = Path(cache_dir) / "global.db"
    if not db.exists():
        return {}
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT uri, data FROM nbcache ORDER BY created").fetchall()
    times = {}
    for uri, payload in rows:
        seconds = json.loads(payload or "{}").get("execution_seconds")
        if seconds is not None:
            times[Path(uri).stem] = float(seconds)  # 同じ章は新しい記録で上書き
    return times


def chapter_title(path: str | os.PathLike) -> str:
    """MyST Markdown の章ファイルから最初の見出し (# ...) を返します。"""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return Path(path).stem


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """見出しと行から Markdown の表を作ります (セルの出力として表示するため)。"""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
