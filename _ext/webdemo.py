"""ブラウザーで動くデモ (onnxruntime-web) のための Sphinx 拡張。

- ONNX Runtime Web の WebAssembly 版 (npm パッケージ onnxruntime-web、package-lock.json で
  版を固定) のうち、動かすのに要る 3 ファイルだけを、ビルドした HTML の
  ``_static/webdemo/ort/`` へ写します。サイトの外へのリクエストは出ません。
- 章のセルが ``booktools.webdemo.demo_dir()`` (既定 ``_build/webdemo/``) に書き出したモデル
  (.onnx) とメタデータ・テストの入力 (.json) を ``_static/webdemo/`` へ写します。
  デモ ``名前`` のメタデータは ``名前.json`` です (無ければビルドの警告)。
- デモの JS と CSS (``_static/webdemo-loader.js``、``demo-<名前>.js``、``webdemo.css``) は、
  デモのあるページ (``data-demo="名前"`` を含むページ) だけに読み込みます。
  ``data-script="別名"`` のあるデモは ``demo-<別名>.js`` で動きます (潜在のデモは
  ``demo-diffusion.js`` のサンプラーを使う)。
  ランタイムとモデルは、読者がデモを始めたときに webdemo-loader.js が読みます。
- 指令 ``torchbook-demo`` は、ページのセルを使わずにデモを置きます (どの章にも置けるように)。
  別のプロセスで ``python -m <DEMO_BUILDERS[名前]> --html`` を動かし、書き出し (前と同じ入力
  なら省かれる) の後に標準出力の HTML をページに入れます::

      ```{torchbook-demo} latent
      :checkpoint: code/torchbook/diffusion/weights/latent_fashion.pt
      ```

  パスはリポジトリの根からです。重みのファイルが変われば、そのページを読み直します。

onnxruntime-web が無ければ、ビルドの初めに 1 行で止まります (``npm ci`` で入ります)。
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

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
# デモの要素の開きタグ: data-demo="名前" と (あれば) data-script="JS の名前"
DEMO_TAG = re.compile(r'<[^>]*\bdata-demo="([a-z0-9-]+)"[^>]*>')
SCRIPT_ATTR = re.compile(r'\bdata-script="([a-z0-9-]+)"')
# 指令 torchbook-demo で置けるデモ → HTML を書くモジュール (python -m で動かす)
DEMO_BUILDERS = {"latent": "booktools.diffusion_demo"}
BUILD_TIMEOUT = 1800  # 秒。書き出しは負荷のない計算機で 30 秒ほど


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


def scripts_in(doctree: nodes.document | None) -> list[str]:
    """ページのデモを動かす JS の名前 (data-script、無ければ data-demo の名前)。"""
    if doctree is None:
        return []
    found: list[str] = []
    for node in doctree.findall(nodes.raw):
        for tag in DEMO_TAG.finditer(node.astext()):
            script = SCRIPT_ATTR.search(tag.group(0))
            name = script.group(1) if script else tag.group(1)
            if name not in found:
                found.append(name)
    return found


class DemoDirective(SphinxDirective):
    """```{torchbook-demo} 名前``` : デモのファイルを書き出し、その HTML をページに置きます。"""

    required_arguments = 1
    option_spec = {
        "checkpoint": directives.unchanged_required,
        "live-checkpoint": directives.unchanged_required,
        "live-method": directives.unchanged_required,
        "live-steps": directives.positive_int,
        "label": directives.nonnegative_int,
        "seed": directives.nonnegative_int,
    }

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        if name not in DEMO_BUILDERS:
            raise self.error(f"デモ {name} はありません ({'・'.join(DEMO_BUILDERS)} のどれかです)")
        if "checkpoint" not in self.options:
            raise self.error(":checkpoint: (リポジトリの根からの重みのパス) を書いてください")
        args = [sys.executable, "-m", DEMO_BUILDERS[name], "--html", "--out-dir",
                str(demo_source())]
        for key, value in self.options.items():
            if key.endswith("checkpoint"):
                path = ROOT / value
                if not path.is_file():
                    raise self.error(f":{key}: の {value} がありません (リポジトリの根からのパス)")
                self.env.note_dependency(str(path))  # 重みが替われば読み直す
                value = path
            args += [f"--{key}", str(value)]
        module = ROOT / "code" / (DEMO_BUILDERS[name].replace(".", "/") + ".py")
        self.env.note_dependency(str(module))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(
                   p for p in (str(ROOT / "code"), os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise self.error(f"デモ {name} の書き出しが {BUILD_TIMEOUT} 秒で終わりません") from None
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["(出力なし)"])[-1]
            raise self.error(f"デモ {name} を書き出せません: {last}")
        return [nodes.raw("", proc.stdout, format="html")]


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
    for script in scripts_in(doctree):
        app.add_js_file(f"demo-{script}.js", loading_method="defer")


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        copy_assets(RUNTIME_DIST, demo_source(), Path(app.outdir) / "_static")


def setup(app: Sphinx) -> dict:
    app.add_directive("torchbook-demo", DemoDirective)
    app.connect("config-inited", _config)
    app.connect("builder-inited", _check_runtime)
    app.connect("html-page-context", _page_assets)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
