"""MathJax をサイトに同梱する Sphinx 拡張。

npm の mathjax (package.json) が node_modules にあれば、その es5 版の部品を _static/mathjax/ に
コピーし、ページはそれを読みます。こうするとインターネットのない環境や file:// で開いた
ときも数式が表示されます。無ければ CDN の MathJax を使います (_config.yml の mathjax_path)。

軽くするため、全部入りの tex-svg.js (2.1 MB) ではなく、startup.js から必要な部品だけを読みます
(TeX 入力、CommonHTML 出力と woff フォント、読み上げ用の MathML)。右クリックメニュー (430 kB) は
読みません。数式の無いページには、Sphinx が MathJax を入れません。
"""

from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

ES5 = Path(__file__).resolve().parents[1] / "node_modules" / "mathjax" / "es5"
# startup.js と、それが読み込む部品だけを同梱する
KEEP = (
    "startup.js",
    "core.js",
    "input/tex.js",
    "input/tex/",
    "output/chtml.js",
    "output/chtml/",
    "a11y/assistive-mml.js",
)
LOAD = ["input/tex", "output/chtml", "a11y/assistive-mml"]


def _use_local(app: Sphinx, config: Config) -> None:
    if not (ES5 / "startup.js").exists():
        return
    config.mathjax_path = "mathjax/startup.js"
    mj = dict(config.mathjax3_config or {})
    mj["loader"] = {"load": LOAD}
    # myst-nb の既定 (数式を探す要素の class) を保つ
    mj.setdefault("options", {}).setdefault(
        "processHtmlClass", "tex2jax_process|mathjax_process|math|output_area"
    )
    # 読み上げ用の MathML は残し、メニューは読まない
    mj["options"]["enableMenu"] = False
    config.mathjax3_config = mj


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html" or not (ES5 / "startup.js").exists():
        return
    from sphinx.util.fileutil import copy_asset

    dest = Path(app.outdir) / "_static" / "mathjax"
    copy_asset(str(ES5), str(dest), excluded=_excluded)


def _excluded(path: str) -> bool:
    """KEEP の部品と、そこへ至るフォルダー以外は同梱しない。"""
    return not any(path.startswith(k) or k.startswith(path + "/") for k in KEEP)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _use_local, priority=900)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
