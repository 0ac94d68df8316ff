"""リポジトリ全体のきまり: もとにした資料は題名と著者で示し、内部の番号 (seed 0NN) で呼ばない。"""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTERNAL_LABEL = re.compile(r"seed[ _-]?00", re.IGNORECASE)  # 資料の内部番号 (000〜004)


def tracked_text_files() -> list[Path]:
    """git が管理するテキストファイル (git が無ければ主なフォルダーの全ファイル)。"""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
        files = [REPO / f for f in out]
    except (OSError, subprocess.CalledProcessError):
        files = [p for d in ("book", "code", "tests", "benchmarks") for p in (REPO / d).rglob("*")]
    return [p for p in files if p.is_file() and p.suffix not in {".pt", ".png", ".svg"}]


def test_no_internal_source_labels():
    hits = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="ignore")
        hits += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in INTERNAL_LABEL.finditer(text)]
    assert not hits, "資料は題名と著者で示してください: " + ", ".join(hits[:10])


def test_the_rule_catches_the_label():
    assert INTERNAL_LABEL.search("see SEED " + "003 for details")  # このファイル自身に書かない
    assert not INTERNAL_LABEL.search("seed = 1234")
