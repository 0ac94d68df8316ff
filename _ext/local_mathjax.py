"""MathJax をサイトに同梱する Sphinx 拡張。

npm の mathjax (package.json) が node_modules にあれば、その es5 版を _static/mathjax/ に
コピーし、ページはそれを読みます。こうするとインターネットのない環境や file:// で開いた
ときも数式が表示されます。無ければ CDN の MathJax を使います (_config.yml の mathjax_path)。
"""

from pathlib import Path

from sphinx.application import Sphinx

ES5 = Path(__file__).resolve().parents[1] / "node_modules" / "mathjax" / "es5"
# tex-svg.js と、それが必要に応じて読み込む部品 (TeX の拡張、SVG 出力、メニュー) だけを同梱する
KEEP = ("tex-svg.js", "input", "output/svg", "ui", "a11y")


def _use_local(app: Sphinx) -> None:
    if not (ES5 / "tex-svg.js").exists():
        return
    app.config.mathjax_path = "mathjax/tex-svg.js"


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html" or not (ES5 / "tex-svg.js").exists():
        return
    from sphinx.util.fileutil import copy_asset

    dest = Path(app.outdir) / "_static" / "mathjax"
    copy_asset(str(ES5), str(dest), excluded=lambda p: not Path(p).as_posix().startswith(KEEP))


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", _use_local)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
