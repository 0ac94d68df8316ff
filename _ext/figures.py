"""本の図のための Sphinx 拡張。

- 図を原寸で開く小さな JS と CSS (_static/figure-zoom.js, figure-zoom.css) を全ページに加える
- 実行結果に「Glyph ... missing from font」(豆腐になった文字) があれば、ビルドの警告にする
  (CI は警告をエラーとして扱うので、豆腐の図は公開されません)
"""

from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parents[1] / "_static"
MISSING_GLYPH = re.compile(r"Glyph \d+ \(.*?\) missing from font\(s\) [^\n.]*")


def _config(app: Sphinx, config: Config) -> None:
    resolved = [str(Path(app.confdir, p).resolve()) for p in config.html_static_path]
    if str(STATIC) not in resolved:
        config.html_static_path = [*config.html_static_path, str(STATIC)]


def _assets(app: Sphinx) -> None:
    # Jupyter Book は本の _static/ にある .js と .css を自分で全ページに加えます。
    # 加えられていないとき (ほかの設定で使うとき) だけ、ここで加えます (2 回読むと図が 2 重に開く)。
    def listed(files: list, name: str) -> bool:
        return any(str(f[0] if isinstance(f, (tuple, list)) else f).endswith(name) for f in files)

    if not listed(app.config.html_js_files, "figure-zoom.js"):
        app.add_js_file("figure-zoom.js", loading_method="defer")
    if not listed(app.config.html_css_files, "figure-zoom.css"):
        app.add_css_file("figure-zoom.css")


def _check_glyphs(app: Sphinx, doctree: nodes.document) -> None:
    """セルの出力 (標準エラーやエラーの表示) に豆腐の警告があれば、警告を出します。"""
    for node in doctree.findall(nodes.literal_block):
        if "output" not in node.get("classes", []):
            continue
        found = MISSING_GLYPH.search(node.astext())
        if found:
            logger.warning(f"図に日本語の字形が無い文字があります (豆腐): {found.group(0)}",
                           location=node, type="figures", subtype="missing_glyph")


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _config)
    app.connect("builder-inited", _assets)
    app.connect("doctree-read", _check_glyphs)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
