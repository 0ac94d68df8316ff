"""本をビルドした環境と各章の実行時間を集める関数 (本書専用)。"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
from pathlib import Path

import torch
import torchvision
import yaml

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


def toc_pages(toc_path: str | os.PathLike = data.REPO_ROOT / "_toc.yml") -> list[tuple[str, int]]:
    """目次 (_toc.yml) のページを、読む順に (ファイル, 深さ) で返します。

    深さは、最初のページと章が 0、章の中の節が 1、節の中の節が 2 … です。
    節 (``sections``) は何段でも再帰的にたどるので、節のページも漏れません。
    """
    toc = yaml.safe_load(Path(toc_path).read_text(encoding="utf-8"))
    pages = [(toc["root"], 0)]

    def walk(entries: list[dict], depth: int) -> None:
        for entry in entries:
            if "file" in entry:
                pages.append((entry["file"], depth))
            walk(entry.get("sections", []), depth + 1)

    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        walk(part.get("chapters", []), 0)
    return pages


def execution_table(
    records: dict[str, float],
    toc_path: str | os.PathLike = data.REPO_ROOT / "_toc.yml",
    skip: tuple[str, ...] = (),
) -> tuple[list[list[str]], float]:
    """目次のすべてのページ (節を含む) の実行時間の表の行と、その合計 (秒) を返します。

    ``records`` は :func:`execution_records` の結果、``skip`` は表から除くページの名前です。
    節のページの見出しは、どの章の節かが分かるように字下げします。
    """
    root = Path(toc_path).parent
    rows, total = [], 0.0
    for path, depth in toc_pages(toc_path):
        stem = Path(path).name
        if stem in skip:
            continue
        title = chapter_title(root / f"{path}.md")
        seconds = records.get(stem)
        total += seconds or 0.0
        indent = "\u3000" * depth + ("└ " if depth else "")
        shown = f"{seconds:.1f}" if seconds is not None else "実行するセルなし"
        rows.append([indent + title, shown])
    return rows, total


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
