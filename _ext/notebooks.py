"""ダウンロードと Colab 用のノートブック (.ipynb) を整える Sphinx 拡張。

1. 実行結果を必ず載せる: myst-nb は jupyter-cache の結果を合わせる前のノートブックを
   書き出すことがあります (キャッシュを使った再ビルド)。ページを読んだ直後に、キャッシュの
   実行結果を合わせて書き直します。
2. リポジトリの URL は 1 か所から: 環境変数 BOOK_REPOSITORY (「所有者/名前」、公開用の
   ワークフローが ${{ github.repository }} を渡す) があるときだけ、リポジトリのボタン、
   Colab のボタン、ノートブックの最初のセル (パッケージを入れる %pip install) を加えます。
   無いとき (手元や CI のビルド) は、どれも出しません。
3. Colab のボタンは、ワークフローが notebooks ブランチに置いた実行済みの .ipynb を開きます。
   ダウンロードのボタンも同じノートブックを配ります。
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import nbformat
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

NOTEBOOK_BRANCH = "notebooks"  # .github/workflows/pages.yml が .ipynb を置くブランチ
COLAB = "https://colab.research.google.com/github"


def repository(warn: bool = False) -> str | None:
    """BOOK_REPOSITORY (例: owner/torchbook) を返します。無いか形が違えば None。"""
    value = os.environ.get("BOOK_REPOSITORY", "").strip().strip("/")
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        if value and warn:
            logger.warning(f"BOOK_REPOSITORY は「所有者/名前」の形で渡してください: {value!r}")
        return None
    return value


def install_command(repo: str) -> str:
    """Colab などで章を動かすのに必要なパッケージを入れるコマンド。"""
    return f'%pip install -q "torchbook[book] @ git+https://github.com/{repo}"'


def _configure(app: Sphinx, config: Any) -> None:
    repo = repository(warn=True)
    opts = dict(config.html_theme_options or {})
    opts["launch_buttons"] = {}  # Colab のボタンはこの拡張が作る (テーマのものは .md を開く)
    if repo:
        opts["repository_url"] = f"https://github.com/{repo}"
        opts["repository_branch"] = os.environ.get("BOOK_BRANCH", "main")
        opts["path_to_docs"] = ""
        opts["use_repository_button"] = True
    else:
        opts["repository_url"] = ""
        opts["use_repository_button"] = False
    config.html_theme_options = opts
    # はじめにの章が使う置き換え (ノートブックの最初のセルの説明)
    subs = dict(getattr(config, "myst_substitutions", None) or {})
    if repo:
        subs["notebook_install"] = (
            f"最初のセル `{install_command(repo).removeprefix('%')}` が、"
            "本書のパッケージ `torchbook` を入れます。"
            "各ページ上部のロケットのボタンの「Colab」からは、同じノートブックを直接開けます。"
        )
    else:
        subs["notebook_install"] = (
            "手元の Jupyter で開くときは、本書のリポジトリのフォルダーで "
            "`pip install -e \".[book]\"` を実行してから開きます。"
        )
    config.myst_substitutions = subs


def _notebook_path(app: Sphinx, docname: str) -> Path:
    folder = getattr(app.env, "mystnb_config", None)
    base = Path(folder.output_folder) if folder and folder.output_folder else (
        Path(app.outdir).parent / "jupyter_execute")
    return base.joinpath(*docname.split("/")).with_suffix(".ipynb")


def _write_atomic(path: Path, nb: nbformat.NotebookNode) -> None:
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp))
    os.replace(tmp, path)


def _finish_notebook(app: Sphinx, doctree: Any) -> None:
    """読んだばかりのページのノートブックに、キャッシュの実行結果と最初のセルを加えます。"""
    path = _notebook_path(app, app.env.docname)
    cfg = getattr(app.env, "mystnb_config", None)
    if cfg is None or not path.exists():
        return
    nb = nbformat.read(str(path), as_version=4)
    # 前のビルドで足したセルは除く (何度読んでも 1 つだけにする)
    nb.cells = [c for c in nb.cells if "book-install" not in c.metadata.get("tags", [])]
    if not any(c.cell_type == "code" for c in nb.cells):
        return
    if cfg.execution_mode == "cache" and cfg.execution_cache_path:
        from jupyter_cache import get_cache

        try:
            _, nb = get_cache(cfg.execution_cache_path).merge_match_into_notebook(nb)
        except KeyError:
            pass  # 実行しなかったページ (実行の対象外)
    repo = repository()
    if repo:
        cell = nbformat.v4.new_code_cell(
            "# 本書のパッケージ (章のコードと図の補助) を入れます。本のビルドでは実行しません。\n"
            + install_command(repo),
            metadata={"tags": ["book-install"]},
        )
        cell.pop("id", None)
        nb.cells.insert(0, cell)
        nbformat.validator.normalize(nb)
    _write_atomic(path, nb)


def _is_notebook(app: Sphinx, pagename: str) -> bool:
    return ("kernelspec" in app.env.metadata.get(pagename, {})
            and _notebook_path(app, pagename).exists())


def _download(app: Sphinx, pagename: str, templatename: str, context: dict,
              doctree: Any) -> None:
    """実行済みの .ipynb を _sources に置き、テーマのダウンロードボタンに渡します。"""
    if app.builder.format != "html" or doctree is None or not _is_notebook(app, pagename):
        return
    dest = Path(app.outdir, "_sources", *pagename.split("/")).with_suffix(".ipynb")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_notebook_path(app, pagename), dest)
    context["ipynb_source"] = pagename + ".ipynb"


def _colab_button(app: Sphinx, pagename: str, templatename: str, context: dict,
                  doctree: Any) -> None:
    """リポジトリが分かるときだけ、notebooks ブランチの .ipynb を Colab で開くボタンを足します。"""
    repo = repository()
    if app.builder.format != "html" or doctree is None or not _is_notebook(app, pagename):
        return
    if repo:
        url = f"{COLAB}/{repo}/blob/{NOTEBOOK_BRANCH}/{pagename}.ipynb"
        context.setdefault("header_buttons", []).append({
            "type": "group",
            "tooltip": "このページをノートブックで開く",
            "icon": "fas fa-rocket",
            "label": "launch-buttons",
            "buttons": [{
                "type": "link",
                "text": "Colab",
                "tooltip": "Colab で開く",
                "icon": "_static/images/logo_colab.png",
                "url": url,
                "label": "colab-button",
            }],
        })


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _configure, priority=100)
    app.connect("doctree-read", _finish_notebook)
    # テーマのボタン (優先度 501) より前にダウンロードの場所を決め、後に Colab を足す
    app.connect("html-page-context", _download, priority=500)
    app.connect("html-page-context", _colab_button, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
