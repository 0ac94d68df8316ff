"""ブラウザーで動くデモ (onnxruntime-web) のための Sphinx 拡張。

- ONNX Runtime Web の WebAssembly 版 (npm パッケージ onnxruntime-web、package-lock.json で
  版を固定) のうち、動かすのに要る 3 ファイルだけを、ビルドした HTML の
  ``_static/webdemo/ort/`` へ写します。サイトの外へのリクエストは出ません。
- 章のセルが ``booktools.webdemo.demo_dir()`` (既定 ``_build/webdemo/``) に書き出したモデル
  (.onnx) とメタデータ・テストの入力 (.json) を ``_static/webdemo/`` へ写します。
  デモ ``名前`` のメタデータは ``名前.json`` です (無ければビルドの警告)。
- デモの JS と CSS (``_static/webdemo-loader.js``、``demo-<名前>.js``、``webdemo.css``) は、
  デモのあるページ (``data-demo="名前"`` を含むページ) だけに読み込みます。
  ランタイムとモデルは、読者がデモを始めたときに webdemo-loader.js が読みます。

onnxruntime-web が無ければ、ビルドの初めに 1 行で止まります (``npm ci`` で入ります)。
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIST = ROOT / "node_modules" / "onnxruntime-web" / "dist"
# WebAssembly (SIMD) だけの最小の組: ort.wasm.min.js が読み込み口 (グローバルの ort)、
# .mjs がその WebAssembly を起こす部品です。WebGPU 版 (jsep、28 MB) は写しません。
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PUBLISHED = (".onnx", ".json")  # 写すデモのファイル (重みの .pt は CI の照合用で、公開しない)
LOADER = "webdemo-loader.js"
CSS = "webdemo.css"
DEMO_ATTR = re.compile(r'data-demo="([a-z0-9-]+)"')


def demo_source() -> Path:
    """章が書き出したファイルの置き場所 (booktools.webdemo.demo_dir と同じ規則)。"""
    return Path(os.environ.get("TORCHBOOK_WEBDEMO_DIR") or ROOT / "_build" / "webdemo")


def missing_runtime(dist: Path = RUNTIME_DIST) -> list[str]:
    return [name for name in RUNTIME_FILES if not (dist / name).is_file()]


def copy_assets(dist: Path, source: Path, static_out: Path) -> list[Path]:
    """ランタイムを static_out/webdemo/ort/ へ、デモのファイルを static_out/webdemo/ へ写します。

    写したファイルのパスを返します。一時ファイル (名前が . で始まる) は写しません。
    """
    missing = missing_runtime(dist)
    if missing:
        raise ExtensionError(runtime_message(missing))
    out = static_out / "webdemo"
    (out / "ort").mkdir(parents=True, exist_ok=True)
    copied = []
    for name in RUNTIME_FILES:
        copied.append(copy_if_changed(dist / name, out / "ort" / name))
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file() and f.suffix in PUBLISHED and not f.name.startswith("."):
                copied.append(copy_if_changed(f, out / f.name))
    return copied


def copy_if_changed(src: Path, dest: Path) -> Path:
    """src を dest へ写します。中身が同じなら写しません (変更のない再ビルドを速くする)。

    copyfile なので、写したファイルの権限は umask どおりです (書き出しの一時ファイルの 0600 を
    引き継がない)。
    """
    if dest.is_file() and dest.stat().st_size == src.stat().st_size and filecmp.cmp(
            src, dest, shallow=False):
        return dest
    return Path(shutil.copyfile(src, dest))


def runtime_message(missing: list[str]) -> str:
    return (f"onnxruntime-web がありません ({RUNTIME_DIST.relative_to(ROOT)}/{missing[0]})。"
            "リポジトリのフォルダーで npm ci を実行してから、もう一度ビルドしてください")


def _config(app: Sphinx, config: Config) -> None:
    # Jupyter Book は _static/ の .js と .css をすべて全ページに加えます。デモのものは外し、
    # デモのあるページだけに _page_assets で加えます (ほかのページを重くしない)。
    def is_demo_asset(entry: object) -> bool:
        name = str(entry[0] if isinstance(entry, (tuple, list)) else entry)
        return name in (LOADER, CSS) or re.fullmatch(r"demo-[a-z0-9-]+\.js", name) is not None

    config.html_js_files = [f for f in config.html_js_files if not is_demo_asset(f)]
    config.html_css_files = [f for f in config.html_css_files if not is_demo_asset(f)]


def _check_runtime(app: Sphinx) -> None:
    if app.builder.format == "html":
        missing = missing_runtime()
        if missing:
            raise ExtensionError(runtime_message(missing))


def demos_in(doctree: nodes.document | None) -> list[str]:
    """ページの生の HTML にあるデモの名前 (data-demo="...") を、出てくる順に返します。"""
    if doctree is None:
        return []
    found: list[str] = []
    for node in doctree.findall(nodes.raw):
        for name in DEMO_ATTR.findall(node.astext()):
            if name not in found:
                found.append(name)
    return found


def _page_assets(app: Sphinx, pagename: str, templatename: str, context: dict,
                 doctree: nodes.document | None) -> None:
    names = demos_in(doctree)
    if not names:
        return
    for name in names:
        meta = demo_source() / f"{name}.json"
        if not meta.is_file():
            logger.warning(
                f"デモ {name} のファイル {meta} がありません。ページのセルが書き出すので、"
                "実行結果のキャッシュ (_build/.jupyter_cache) を消してビルドし直してください",
                location=pagename, type="webdemo", subtype="missing")
    app.add_css_file(CSS)
    app.add_js_file(LOADER, loading_method="defer")
    for name in names:
        app.add_js_file(f"demo-{name}.js", loading_method="defer")


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        copy_assets(RUNTIME_DIST, demo_source(), Path(app.outdir) / "_static")


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _config)
    app.connect("builder-inited", _check_runtime)
    app.connect("html-page-context", _page_assets)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
