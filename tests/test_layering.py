"""パッケージの層: 章のコード (torchbook) は本のための補助 (booktools) を使いません。"""

import ast
from pathlib import Path

import pytest

CODE = Path(__file__).resolve().parents[1] / "code"
CHAPTER_FILES = sorted((CODE / "torchbook").rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """ファイルが import するモジュール名 (先頭の部分) の集合を返します。"""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_chapter_files_found():
    assert any(p.name == "mnist.py" for p in CHAPTER_FILES)


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: str(p.relative_to(CODE)))
def test_chapter_code_never_imports_book_helpers(path):
    bad = imported_modules(path) & {"booktools", "matplotlib", "graphviz", "IPython", "myst_nb"}
    assert not bad, f"{path.name} が本の補助に依存しています: {sorted(bad)}"
