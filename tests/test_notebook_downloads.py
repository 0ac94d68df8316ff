"""ダウンロードできる .ipynb の検査 (_ext/notebooks.py)。

小さな 2 ページの本を jupyter-book で実際にビルドします (1 回 10 秒ほど)。
- キャッシュを使った再ビルドでも、.ipynb に実行結果が載っていること
- リポジトリが分からないビルドでは、Colab・リポジトリのボタンもインストールのセルも無いこと
- BOOK_REPOSITORY があれば、Colab のボタンが notebooks ブランチの .ipynb を開き、
  最初のセルがパッケージを入れること
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("jupyter-book") is None,
                                reason="jupyter-book が入っていません")

CONFIG = f"""\
title: テスト
only_build_toc_files: true
execute:
  execute_notebooks: cache
  timeout: 60
  allow_errors: false
html:
  use_download_button: true
sphinx:
  local_extensions:
    notebooks: {ROOT / "_ext"}
  config:
    language: ja
    nb_execution_raise_on_error: true
"""

PAGE = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# 計算

{line}

```{{code-cell}} ipython3
print(6 * 7)
```
"""


def build(book: Path, repo: str | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BOOK_REPOSITORY"}
    if repo:
        env["BOOK_REPOSITORY"] = repo
    proc = subprocess.run([shutil.which("jupyter-book"), "build", str(book)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def outputs(nb: nbformat.NotebookNode) -> list[str]:
    return [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.fixture
def book(tmp_path: Path) -> Path:
    (tmp_path / "_config.yml").write_text(CONFIG, encoding="utf-8")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: calc\nchapters:\n  - file: plain\n",
                                       encoding="utf-8")
    (tmp_path / "calc.md").write_text(PAGE.format(line="最初の文です。"), encoding="utf-8")
    (tmp_path / "plain.md").write_text("# ただの文章\n\nコードはありません。\n", encoding="utf-8")
    return tmp_path


@pytest.mark.slow
def test_download_keeps_outputs_after_cached_rebuild(book: Path) -> None:
    build(book)
    ipynb = book / "_build" / "html" / "_sources" / "calc.ipynb"
    assert outputs(nbformat.read(ipynb, as_version=4)) == ["42\n"]
    # 文章だけを変えて再ビルド: コードは同じなのでキャッシュの結果が使われる
    (book / "calc.md").write_text(PAGE.format(line="書き直した文です。"), encoding="utf-8")
    build(book)
    nb = nbformat.read(ipynb, as_version=4)
    assert "書き直した文です。" in nb.cells[0].source
    assert outputs(nb) == ["42\n"]
    # リポジトリが分からないビルド: ボタンもインストールのセルも無い
    assert "print(6 * 7)" in nb.cells[1].source and len(nb.cells) == 2
    html = (book / "_build" / "html" / "calc.html").read_text(encoding="utf-8")
    assert "_sources/calc.ipynb" in html  # ダウンロードのボタンはある
    assert "colab.research.google.com" not in html
    assert "github.com" not in html
    assert not (book / "_build" / "html" / "_sources" / "plain.ipynb").exists()


@pytest.mark.slow
def test_repository_from_environment(book: Path) -> None:
    build(book, repo="someone/torchbook")
    html = (book / "_build" / "html" / "calc.html").read_text(encoding="utf-8")
    colab = "https://colab.research.google.com/github/someone/torchbook/blob/notebooks/calc.ipynb"
    assert colab in html
    assert 'href="https://github.com/someone/torchbook"' in html
    nb = nbformat.read(book / "_build" / "html" / "_sources" / "calc.ipynb", as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code"
    assert '%pip install -q "torchbook[book] @ git+https://github.com/someone/torchbook"' in (
        first.source)
    assert outputs(nb) == ["42\n"]
    nbformat.validate(nb)
