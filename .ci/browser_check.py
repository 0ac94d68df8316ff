"""ビルドした本を、読者と同じように headless Chromium で開いて確かめます。

_build/html を 127.0.0.1 の空いたポートで配信し、Debian の chromium を Playwright で操作します
(``executable_path`` で渡すので Playwright はブラウザーをダウンロードせず、オフラインで動きます)。
axe-core は axe-playwright-python で動かします (axe-core 本体は node_modules の固定した版)。
次のどれかがあれば失敗 (終了コード 1) にします。

- 図の日本語に字形が無い (SVG の文字をブラウザーのフォントで描いて豆腐と比べる。ラスター画像は
  ビルド時に booktools.plotting がエラーにし、ここではページに残った警告を探す)
- 390 px で ☰ (章の一覧) と目次の引き出しが開かない (900 / 1280 px も調べる)
- 検索語が、その語を本文に含むページを見つけない。検索結果の抜粋に TeX や画面の部品の文字がある
- コンソールのエラー、127.0.0.1 以外への通信
- axe-core の critical / serious の違反
- ダウンロードできる .ipynb に実行結果が無い
- ページの重さが上限 (1.5 MB) を超える (キャッシュなしの初回表示で転送したバイト数)
- 図の最も小さい文字が 1280 px の表示で 9 CSS px 未満

ページごとの表 (バイト数、リクエスト数、初回描画までの時間、違反の数) を表示し、
人が見るためのスクリーンショットを _build/screenshots/ に保存します。

    python .ci/browser_check.py _build/html
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlparse

from axe_playwright_python.sync_playwright import Axe
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout

ROOT = Path(__file__).resolve().parents[1]
SEARCH_TERMS = [
    "テンソル",
    "拡散モデル",
    "自動微分",
    "勾配降下",
    "学習率",
    "計算グラフ",
    "分類器なしガイダンス",
]
# 初回表示で転送してよいバイト数 (数式の MathJax は画面に近づいてから読むので含まない)
WEIGHT_BUDGET = 1_500_000
MIN_TEXT_PX = 9.0  # 1280 px の表示で、図の最も小さい文字の大きさ (CSS px)
DEFAULT_MIN_FONT_PT = 10.0  # 図のコードが記録していないときの、matplotlib の最小の文字 (pt)
NAV_WIDTHS = (390, 900, 1280)
# 検索結果の抜粋に出てはいけないもの (TeX の命令、ボタンなどの画面の文字)
SNIPPET_NOISE = re.compile(
    r"\\(frac|mathbf|mathrm|sum|alpha|beta|epsilon|sqrt|left|right|begin|end)\b|\\\(|\\\[|"
    r"Toggle|Show code|Hide code|Copy to clipboard|Click to show|Skip to main|"
    r"コードを表示|出力を表示|クリップボード"
)
SCREENSHOT_PAGES = ("book/03_gpu.html", "book/08_sampling.html")
SOLUTION_PAGE = "book/04_nn_from_scratch.html"
# Playwright がブラウザーを起動するときの引数 (Debian の chromium をそのまま使う)
CHROMIUM_ARGS = ["--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
                 "--mute-audio", "--disable-extensions", "--disable-component-update"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # アクセスログは出さない
        pass


def serve(html_dir: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(QuietHandler, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def find_chromium(name: str) -> str | None:
    """Debian の chromium の実行ファイル (Playwright にブラウザーをダウンロードさせない)。"""
    return shutil.which(name)


def launch(playwright, executable: str) -> Browser:
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


def png_info(path: Path) -> tuple[float, float | None]:
    """PNG の解像度 (dpi, pHYs) と、図のコードが書いた最小の文字 (tEXt min_font_pt) を返します。"""
    with Image.open(path) as im:
        dpi = im.info.get("dpi", (100.0, 100.0))[0]
        text = getattr(im, "text", {}) or {}
    min_pt = text.get("min_font_pt")
    return round(dpi), float(min_pt) if min_pt is not None else None


class Checker:
    """1 つのブラウザーで、ページを開き、通信・エラーを記録し、ページの中の関数を呼びます。

    表示の幅ごとに Playwright のコンテキストを作ります。fresh=True で開くと新しいコンテキスト
    (キャッシュが空) で開くので、初回表示の重さを測れます。
    """

    def __init__(self, browser: Browser, origin: str, html_dir: Path) -> None:
        self.browser = browser
        self.origin = origin
        self.html_dir = html_dir
        self.host = urlparse(origin).netloc
        self.problems: list[str] = []
        self.requests: list = []  # playwright の Request (開いたページで出たもの)
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page_js = (ROOT / ".ci" / "browser_page.js").read_text(encoding="utf-8")
        # axe-core は package-lock.json で固定した node_modules のものを使う (無ければ同梱版)
        axe = ROOT / "node_modules" / "axe-core" / "axe.min.js"
        self.axe_runner = Axe.from_file(axe) if axe.exists() else None
        self.context = None
        self.page: Page | None = None
        self.size = (1280, 900, False)
        self.viewport(1280, 900, mobile=False)

    # ---- コンテキストと通信の記録
    def _new_context(self) -> None:
        if self.context is not None:
            self.context.close()
        width, height, mobile = self.size
        self.context = self.browser.new_context(
            viewport={"width": width, "height": height}, device_scale_factor=1,
            is_mobile=mobile)
        self.context.add_init_script(self.page_js)
        page = self.context.new_page()
        page.on("request", self._on_request)
        page.on("response", self._on_response)
        page.on("requestfailed", self._on_failed)
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.errors.append(f"例外: {str(e)[:200]}"))
        self.page = page

    def _on_request(self, request) -> None:
        url = request.url
        if url.startswith(("http:", "https:", "ws:", "wss:")) and urlparse(url).netloc != self.host:
            self.foreign.append(url)
        self.requests.append(request)

    def _on_response(self, response) -> None:
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status}: {response.url}")

    def _on_failed(self, request) -> None:
        failure = request.failure or ""
        if "ERR_ABORTED" not in failure:  # 取り消し (ページの移動など) は失敗ではない
            self.errors.append(f"読み込みの失敗 {failure}: {request.url}")

    def _on_console(self, msg) -> None:
        if msg.type in ("error", "assert"):
            where = msg.location.get("url", "") if msg.location else ""
            self.errors.append(f"console.{msg.type}: {msg.text[:200]} {where}".rstrip())

    def transfers(self) -> list[dict]:
        """開いてから転送した各リクエストの URL とバイト数 (ヘッダーを含む、圧縮したまま)。"""
        out = []
        for r in self.requests:
            n = 0
            if r.url.startswith(("http:", "https:")):
                try:
                    s = r.sizes()
                    n = max(0, s["responseBodySize"]) + max(0, s["responseHeadersSize"])
                except PlaywrightError:  # 終わらなかった・失敗したリクエスト
                    n = 0
            out.append({"url": r.url, "bytes": n})
        return out

    # ---- 操作
    def viewport(self, width: int, height: int, mobile: bool) -> None:
        old = self.size
        self.size = (width, height, mobile)
        if self.page is None or old[2] != mobile:
            self._new_context()  # モバイルの表示はコンテキストの設定
        else:
            self.page.set_viewport_size({"width": width, "height": height})

    def eval(self, expression: str):
        """ページで JavaScript の式を評価し、値 (JSON にできるもの) を返します。"""
        return self.page.evaluate(expression)

    def wait(self, seconds: float) -> None:
        self.page.wait_for_timeout(seconds * 1000)

    def wait_for(self, expression: str, timeout: float) -> bool:
        try:
            self.page.wait_for_function(expression, timeout=timeout * 1000, polling=50)
            return True
        except PlaywrightTimeout:
            return False

    def open(self, path: str, fresh: bool = False) -> None:
        if fresh:
            self._new_context()
        self.requests.clear()
        self.errors.clear()
        try:
            self.page.goto(f"{self.origin}/{path}", wait_until="load", timeout=30_000)
        except PlaywrightTimeout:
            self.problems.append(f"{path}: 30 秒で読み込みが終わりません")
        # 遅れて読む部品 (MathJax のフォントなど) が落ち着くまで待つ (通信が 0.5 秒止まるまで)
        try:
            self.page.wait_for_load_state("networkidle", timeout=15_000)
        except PlaywrightTimeout:
            pass
        self.eval(
            "window.MathJax && MathJax.startup && MathJax.startup.promise ? "
            "MathJax.startup.promise.then(() => true) : true"
        )

    def click(self, x: float, y: float) -> None:
        self.page.mouse.click(x, y)

    def screenshot(self, name: str, out_dir: Path) -> None:
        self.page.screenshot(path=str(out_dir / name))

    # ---- 検査
    def axe(self) -> list[dict]:
        if self.axe_runner is None:
            self.problems.append("node_modules/axe-core がありません (npm ci を実行してください)")
            return []
        res = self.axe_runner.run(self.page, options={"resultTypes": ["violations"]})
        return [
            {"id": v["id"], "impact": v["impact"], "n": len(v["nodes"]),
             "target": " | ".join(" ".join(map(str, n["target"])) for n in v["nodes"][:2])}
            for v in res.response["violations"]
            if v["impact"] in ("critical", "serious")
        ]

    def figures(self, page: str) -> None:
        for fig in self.eval("__bookCheck.figures()"):
            where = f"{page}: 図 {fig['src']}"
            if fig.get("missing_glyphs"):
                self.problems.append(
                    f"{where}: 日本語の字形がありません (豆腐): {fig['missing_glyphs']}"
                )
            if fig["kind"] == "raster":
                src = (self.html_dir / page).parent / fig["src"].split("?")[0]
                if src.suffix.lower() != ".png" or not src.exists() or not fig["natural"]:
                    continue
                dpi, min_pt = png_info(src)
                natural_px = (min_pt or DEFAULT_MIN_FONT_PT) * dpi / 72
                fig["min_text_px"] = round(natural_px * fig["displayed"] / fig["natural"], 2)
            if fig.get("min_text_px") is not None and fig["min_text_px"] < MIN_TEXT_PX:
                self.problems.append(
                    f"{where}: 最も小さい文字が {fig['min_text_px']} px です "
                    f"({MIN_TEXT_PX} px 以上にしてください。表示幅 {fig['displayed']} px)"
                )

    def notebooks(self, page: str) -> None:
        for nb in self.eval("__bookCheck.notebooks()"):
            if "error" in nb:
                self.problems.append(f"{page}: {nb['href']} を読めません ({nb['error']})")
            elif (
                nb["code"]
                and nb["with_outputs"] < min(nb["shown"], 1)
                or (nb["shown"] and nb["with_outputs"] == 0)
            ):
                self.problems.append(
                    f"{page}: ダウンロードの .ipynb に実行結果がありません "
                    f"(コードセル {nb['code']}、結果のあるセル {nb['with_outputs']}、"
                    f"ページの出力 {nb['shown']})"
                )

    def nav(self, page: str, width: int) -> None:
        self.viewport(width, 844 if width < 600 else 900, mobile=width < 600)
        self.open(page)
        for kind, label in (("primary", "☰ (章の一覧)"), ("secondary", "目次")):
            center = self.eval(f"__bookCheck.toggleCenter('{kind}')")
            before = self.eval(f"__bookCheck.drawerState('{kind}')")
            if center is None:
                has_toc = self.eval("!!document.querySelector('#pst-page-toc-nav a')")
                if kind == "primary" or (width < 1200 and has_toc):
                    self.problems.append(f"{page} ({width} px): {label} のボタンが見えません")
                continue
            self.click(center["x"], center["y"])
            self.wait(0.4)
            after = self.eval(f"__bookCheck.drawerState('{kind}')")
            if width < 992 or kind == "secondary":
                ok = after["dialogOpen"] and after["visibleLinks"] > 0
            else:  # 広い画面の ☰ はサイドバーを畳む / 戻すボタン
                ok = after["visibleLinks"] != before["visibleLinks"]
            if not ok:
                self.problems.append(
                    f"{page} ({width} px): {label} のボタンを押しても引き出しが開きません"
                )
            self.eval("__bookCheck.closeDrawers(), true")
            if width >= 992 and kind == "primary" and ok:
                self.click(center["x"], center["y"])  # 畳んだサイドバーを戻す
                self.wait(0.4)

    def search(self, texts: dict[str, str]) -> list[str]:
        lines = []
        for term in SEARCH_TERMS:
            self.open(f"search.html?q={quote(term)}")
            if not self.wait_for("__bookCheck.searchDone()", 20):
                self.problems.append(f"検索「{term}」: 20 秒で検索が終わりません")
            results = self.eval("__bookCheck.searchResults()")
            found = {r["href"] for r in results}
            expected = {p for p, t in texts.items() if term in t and p.startswith("book/")}
            missed = sorted(expected - found)
            if missed:
                self.problems.append(
                    f"検索「{term}」: 語を含むページが結果にありません: {', '.join(missed)}"
                )
            for r in results:
                m = SNIPPET_NOISE.search(r["snippet"])
                if m:
                    self.problems.append(
                        f"検索「{term}」: {r['href']} の抜粋に「{m.group(0)}」があります"
                    )
            for e in self.errors:
                self.problems.append(f"search.html?q={term}: {e}")
            lines.append(
                f"  {term}: 含むページ {len(expected)}、見つかったページ {len(found)}、"
                f"見落とし {len(missed)}"
            )
        return lines


def pages_of(html_dir: Path) -> list[str]:
    pages = []
    for p in sorted(html_dir.rglob("*.html")):
        rel = p.relative_to(html_dir).as_posix()
        if rel.startswith(("_static/", "reports/", "_sources/")):
            continue
        if 'http-equiv="Refresh"' in p.read_text(encoding="utf-8", errors="replace")[:2000]:
            continue  # index.html はリダイレクト
        pages.append(rel)
    return pages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html_dir", nargs="?", default="_build/html", type=Path)
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    ap.add_argument("--screenshots", type=Path, default=Path("_build/screenshots"))
    ap.add_argument("--pages", nargs="*", help="調べるページ (既定: すべて)")
    args = ap.parse_args()
    if not (args.html_dir / "search.html").exists():
        ap.error(
            f"{args.html_dir} にビルドした HTML がありません "
            "(先に jupyter-book build . を実行してください)"
        )
    exe = find_chromium(args.chromium)
    if exe is None:
        ap.error(
            f"{args.chromium} がありません (Debian/Ubuntu: apt-get install chromium。"
            "scripts/setup.sh が root のときに入れます)"
        )
    start = time.time()
    server, port = serve(args.html_dir)
    pw = sync_playwright().start()
    browser = launch(pw, exe)
    try:
        c = Checker(browser, f"http://127.0.0.1:{port}", args.html_dir)
        pages = args.pages or pages_of(args.html_dir)
        rows, texts = [], {}
        c.viewport(1280, 900, mobile=False)
        for page in pages:
            c.open(page, fresh=True)  # 初回表示の重さを測るため、キャッシュの空のコンテキストで
            transfers = c.transfers()
            n_bytes = sum(r["bytes"] for r in transfers)
            n_req = len(transfers)
            fp = c.eval("__bookCheck.firstPaint()")
            for e in c.errors:
                c.problems.append(f"{page}: {e}")
            for url in c.foreign:
                c.problems.append(f"{page}: 外部への通信 {url}")
            c.foreign.clear()
            if n_bytes > WEIGHT_BUDGET:
                biggest = sorted(transfers, key=lambda r: -r["bytes"])[:3]
                names = ", ".join(
                    f"{urlparse(r['url']).path.rsplit('/', 1)[-1]} {r['bytes'] // 1000} kB"
                    for r in biggest
                )
                c.problems.append(
                    f"{page}: 初回表示 {n_bytes / 1e6:.2f} MB が "
                    f"上限 {WEIGHT_BUDGET / 1e6:.1f} MB を超えます "
                    f"(大きいもの: {names})"
                )
            text = c.eval("__bookCheck.mainText()")
            texts[page] = text
            if re.search(r"Glyph \d+.*missing", text):
                c.problems.append(
                    f"{page}: 図に日本語の字形がありません (Glyph ... missing の警告)"
                )
            # 遅れて読む数式も描いてから、図と axe を調べる
            c.eval(
                "window.__readerLoadMath ? (__readerLoadMath(), new Promise((ok) => {"
                " const wait = () => window.MathJax && MathJax.startup && MathJax.startup.promise"
                " ? MathJax.startup.promise.then(() => ok(true)) : setTimeout(wait, 50);"
                " wait(); })) : true"
            )
            c.figures(page)
            c.notebooks(page)
            violations = c.axe()
            for v in violations:
                c.problems.append(f"{page}: axe {v['impact']} {v['id']} ×{v['n']} ({v['target']})")
            rows.append((page, n_bytes, n_req, fp, sum(v["n"] for v in violations)))
        phases = [("1280 px の読み込み・図・axe", time.time() - start)]
        for page in pages:
            if page.startswith("book/"):
                c.nav(page, 390)
        for width in NAV_WIDTHS[1:]:
            c.nav("book/03_gpu.html", width)
        phases.append(("ナビゲーション", time.time() - start))
        search_lines = c.search(texts)
        phases.append(("検索", time.time() - start))
        # 人が見るためのスクリーンショット
        args.screenshots.mkdir(parents=True, exist_ok=True)
        shots = []
        for width in (1280, 390):
            c.viewport(width, 900 if width > 600 else 844, mobile=width < 600)
            for page in SCREENSHOT_PAGES:
                if page in pages:
                    c.open(page)
                    name = f"{Path(page).stem}-{width}.png"
                    c.screenshot(name, args.screenshots)
                    shots.append(name)
                    # 最初の図 (SVG の図解など) を画面の中央にしてもう 1 枚
                    has_figure = c.eval(
                        "(() => { const i = document.querySelector('.bd-article img');"
                        " if (!i) return false; i.loading = 'eager';"
                        " i.scrollIntoView({block: 'center'}); return true; })()"
                    )
                    if has_figure:
                        c.wait(0.8)
                        name = f"{Path(page).stem}-figure-{width}.png"
                        c.screenshot(name, args.screenshots)
                        shots.append(name)
            if SOLUTION_PAGE in pages:
                c.open(SOLUTION_PAGE)
                opened = c.eval(
                    "(() => { const d = document.querySelector("
                    "'details.dropdown, .admonition.dropdown');"
                    " if (!d) return false; if (d.tagName === 'DETAILS') d.open = true;"
                    " else d.querySelector('button, .toggle-button')?.click();"
                    " d.scrollIntoView(); return true; })()"
                )
                c.wait(0.5)
                if opened:
                    name = f"{Path(SOLUTION_PAGE).stem}-solution-{width}.png"
                    c.screenshot(name, args.screenshots)
                    shots.append(name)
    finally:
        browser.close()
        pw.stop()
        server.shutdown()

    print(f"{'ページ':<28} {'バイト':>10} {'リクエスト':>8} {'初回描画ms':>9} {'違反':>4}")
    for page, n_bytes, n_req, fp, nv in rows:
        print(f"{page:<30} {n_bytes:>10,} {n_req:>10} {fp if fp is not None else '-':>11} {nv:>5}")
    print("検索:")
    print("\n".join(search_lines))
    print(f"スクリーンショット: {args.screenshots}/ ({', '.join(shots)})")
    print(
        "ブラウザーの検査の所要時間: "
        + ", ".join(f"{name} まで {t:.0f} 秒" for name, t in phases)
        + f", 合計 {time.time() - start:.0f} 秒"
    )
    for p in c.problems:
        print("問題:", p, file=sys.stderr)
    return 1 if c.problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PlaywrightError as e:
        print(f"ブラウザーの操作に失敗しました: {e}", file=sys.stderr)
        sys.exit(1)
