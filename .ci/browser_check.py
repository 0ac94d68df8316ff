"""ビルドした本を、読者と同じように headless Chromium で開いて確かめます。

_build/html を 127.0.0.1 の空いたポートで配信し、Debian の chromium を CDP で操作します。
次のどれかがあれば失敗 (終了コード 1) にします。

- 図の日本語に字形が無い (SVG の文字をブラウザーのフォントで描いて豆腐と比べる。ラスター画像は
  ビルド時に booktools.plotting がエラーにし、ここではページに残った警告を探す)
- 390 px で ☰ (章の一覧) と目次の引き出しが開かない (900 / 1280 px も調べる)
- 検索語が、その語を本文に含むページを見つけない。検索結果の抜粋に TeX や画面の部品の文字がある
- コンソールのエラー、127.0.0.1 以外への通信
- axe-core の critical / serious の違反
- ダウンロードできる .ipynb に実行結果が無い
- ページの重さが上限を超える (キャッシュなしの初回表示で転送したバイト数)
- 図の最も小さい文字が 1280 px の表示で 9 CSS px 未満

ページごとの表 (バイト数、リクエスト数、初回描画までの時間、違反の数) を表示し、
人が見るためのスクリーンショットを _build/screenshots/ に保存します。

    python .ci/browser_check.py _build/html
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import os
import re
import shutil
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import quote, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdp import Browser, CDPError  # noqa: E402

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
# 初回表示で転送してよいバイト数。06_diffusion (導出・UNet の表・デモの説明) は 1.55 MB で、
# うち MathJax が 0.44 MB。1.5 MB から 1.6 MB に上げた。次は 06 の一部を節のページへ移して戻す
WEIGHT_BUDGET = 1_600_000
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


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # アクセスログは出さない
        pass


def serve(html_dir: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(QuietHandler, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def png_info(path: Path) -> tuple[float, float | None]:
    """PNG の解像度 (dpi, pHYs) と、図のコードが書いた最小の文字 (tEXt min_font_pt) を返します。"""
    data = path.read_bytes()
    dpi, min_pt = 100.0, None
    pos = 8
    while pos + 8 <= len(data):
        n, kind = struct.unpack("!I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"pHYs" and body[8] == 1:  # 1 = メートルあたりの画素数
            dpi = struct.unpack("!I", body[:4])[0] * 0.0254
        elif kind == b"tEXt" and body.startswith(b"min_font_pt\0"):
            min_pt = float(body.split(b"\0", 1)[1])
        elif kind == b"zTXt" and body.startswith(b"min_font_pt\0"):
            min_pt = float(zlib.decompress(body.split(b"\0", 1)[1][1:]))
        elif kind == b"IEND":
            break
        pos += 12 + n
    return round(dpi), min_pt


class Checker:
    def __init__(self, browser: Browser, origin: str, html_dir: Path) -> None:
        self.b = browser
        self.origin = origin
        self.html_dir = html_dir
        self.host = urlparse(origin).netloc
        self.problems: list[str] = []
        self.requests: dict[str, dict] = {}
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.inflight: set[str] = set()
        self.loaded = False
        browser.listeners.append(self.on_event)
        for domain in ("Page", "Network", "Runtime", "Log"):
            browser.call(f"{domain}.enable")
        self.page_js = (ROOT / ".ci" / "browser_page.js").read_text(encoding="utf-8")
        browser.call("Page.addScriptToEvaluateOnNewDocument", {"source": self.page_js})
        axe = ROOT / "node_modules" / "axe-core" / "axe.min.js"
        self.axe_js = axe.read_text(encoding="utf-8") if axe.exists() else None

    # ---- CDP のイベント
    def on_event(self, msg: dict) -> None:
        m, p = msg["method"], msg.get("params", {})
        if m == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if (
                url.startswith(("http:", "https:", "ws:", "wss:"))
                and urlparse(url).netloc != self.host
            ):
                self.foreign.append(url)
            self.requests[p["requestId"]] = {"url": url, "bytes": 0}
            self.inflight.add(p["requestId"])
        elif m == "Network.loadingFinished":
            if p["requestId"] in self.requests:
                self.requests[p["requestId"]]["bytes"] = p["encodedDataLength"]
            self.inflight.discard(p["requestId"])
        elif m == "Network.responseReceived":
            if p["response"]["status"] >= 400:
                self.errors.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        elif m == "Network.loadingFailed":
            self.inflight.discard(p["requestId"])
            if not p.get("canceled"):
                url = self.requests.get(p["requestId"], {}).get("url", "?")
                self.errors.append(f"読み込みの失敗 {p.get('errorText')}: {url}")
        elif m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
            self.errors.append(f"console.{p['type']}: {args[:200]}")
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append(
                f"例外: {(d.get('exception') or {}).get('description', d.get('text'))[:200]}"
            )
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(f"ログ: {p['entry']['text'][:200]} {p['entry'].get('url', '')}")
        elif m == "Page.loadEventFired":
            self.loaded = True

    # ---- 操作
    def viewport(self, width: int, height: int, mobile: bool) -> None:
        self.b.call(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": width,
                "height": height,
                "deviceScaleFactor": 1,
                "mobile": mobile,
            },
        )

    def open(self, path: str, cache: bool = True) -> None:
        self.b.call("Network.setCacheDisabled", {"cacheDisabled": not cache})
        self.requests.clear()
        self.inflight.clear()
        self.errors.clear()
        self.loaded = False
        self.b.call("Page.navigate", {"url": f"{self.origin}/{path}"})
        if not self.b.wait_for(lambda: self.loaded, 30):
            self.problems.append(f"{path}: 30 秒で読み込みが終わりません")
        # 遅れて読む部品 (MathJax のフォントなど) が落ち着くまで待つ
        quiet_since = time.time()
        deadline = time.time() + 15
        while time.time() < deadline:
            self.b.pump(0.1)
            if self.inflight:
                quiet_since = time.time()
            elif time.time() - quiet_since > 0.4:
                break
        self.b.eval(
            "window.MathJax && MathJax.startup && MathJax.startup.promise ? "
            "MathJax.startup.promise.then(() => true) : true"
        )

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.b.call(
                "Input.dispatchMouseEvent",
                {
                    "type": kind,
                    "x": x,
                    "y": y,
                    "button": "left",
                    "clickCount": 1,
                },
            )

    def screenshot(self, name: str, out_dir: Path) -> None:
        data = self.b.call("Page.captureScreenshot", {"format": "png"})["data"]
        (out_dir / name).write_bytes(base64.b64decode(data))

    # ---- 検査
    def axe(self) -> list[dict]:
        if self.axe_js is None:
            self.problems.append("node_modules/axe-core がありません (npm ci を実行してください)")
            return []
        self.b.eval(self.axe_js + ";true")
        res = self.b.eval(
            "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations.map(v => "
            "({id: v.id, impact: v.impact, n: v.nodes.length, "
            "target: v.nodes.slice(0, 2).map(n => n.target.join(' ')).join(' | ')})))",
            timeout=120,
        )
        return [v for v in res if v["impact"] in ("critical", "serious")]

    def figures(self, page: str) -> None:
        for fig in self.b.eval("__bookCheck.figures()"):
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
        for nb in self.b.eval("__bookCheck.notebooks()"):
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
            center = self.b.eval(f"__bookCheck.toggleCenter('{kind}')")
            before = self.b.eval(f"__bookCheck.drawerState('{kind}')")
            if center is None:
                has_toc = self.b.eval("!!document.querySelector('#pst-page-toc-nav a')")
                if kind == "primary" or (width < 1200 and has_toc):
                    self.problems.append(f"{page} ({width} px): {label} のボタンが見えません")
                continue
            self.click(center["x"], center["y"])
            self.b.pump(0.4)
            after = self.b.eval(f"__bookCheck.drawerState('{kind}')")
            if width < 992 or kind == "secondary":
                ok = after["dialogOpen"] and after["visibleLinks"] > 0
            else:  # 広い画面の ☰ はサイドバーを畳む / 戻すボタン
                ok = after["visibleLinks"] != before["visibleLinks"]
            if not ok:
                self.problems.append(
                    f"{page} ({width} px): {label} のボタンを押しても引き出しが開きません"
                )
            self.b.eval("__bookCheck.closeDrawers(), true")
            if width >= 992 and kind == "primary" and ok:
                self.click(center["x"], center["y"])  # 畳んだサイドバーを戻す
                self.b.pump(0.4)

    def search(self, texts: dict[str, str]) -> list[str]:
        lines = []
        for term in SEARCH_TERMS:
            self.open(f"search.html?q={quote(term)}")
            if not self.b.wait_for(lambda: self.b.eval("__bookCheck.searchDone()"), 20):
                self.problems.append(f"検索「{term}」: 20 秒で検索が終わりません")
            results = self.b.eval("__bookCheck.searchResults()")
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
    exe = shutil.which(args.chromium)
    if exe is None:
        ap.error(
            f"{args.chromium} がありません (Debian/Ubuntu: apt-get install chromium。"
            "scripts/setup.sh が root のときに入れます)"
        )
    start = time.time()
    server, port = serve(args.html_dir)
    browser = Browser(exe)
    try:
        c = Checker(browser, f"http://127.0.0.1:{port}", args.html_dir)
        pages = args.pages or pages_of(args.html_dir)
        rows, texts = [], {}
        c.viewport(1280, 900, mobile=False)
        for page in pages:
            c.open(page, cache=False)  # 初回表示の重さを測るためキャッシュを使わない
            n_bytes = sum(r["bytes"] for r in c.requests.values())
            n_req = len(c.requests)
            fp = c.b.eval("__bookCheck.firstPaint()")
            for e in c.errors:
                c.problems.append(f"{page}: {e}")
            for url in c.foreign:
                c.problems.append(f"{page}: 外部への通信 {url}")
            c.foreign.clear()
            if n_bytes > WEIGHT_BUDGET:
                biggest = sorted(c.requests.values(), key=lambda r: -r["bytes"])[:3]
                names = ", ".join(
                    f"{urlparse(r['url']).path.rsplit('/', 1)[-1]} {r['bytes'] // 1000} kB"
                    for r in biggest
                )
                c.problems.append(
                    f"{page}: 初回表示 {n_bytes / 1e6:.2f} MB が "
                    f"上限 {WEIGHT_BUDGET / 1e6:.1f} MB を超えます "
                    f"(大きいもの: {names})"
                )
            text = c.b.eval("__bookCheck.mainText()")
            texts[page] = text
            if re.search(r"Glyph \d+.*missing", text):
                c.problems.append(
                    f"{page}: 図に日本語の字形がありません (Glyph ... missing の警告)"
                )
            # 遅れて読む数式も描いてから、図と axe を調べる
            c.b.eval(
                "window.__readerLoadMath ? (__readerLoadMath(), new Promise((ok) => {"
                " const wait = () => window.MathJax && MathJax.startup && MathJax.startup.promise"
                " ? MathJax.startup.promise.then(() => ok(true)) : setTimeout(wait, 50);"
                " wait(); })) : true",
                timeout=60,
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
                    has_figure = c.b.eval(
                        "(() => { const i = document.querySelector('.bd-article img');"
                        " if (!i) return false; i.loading = 'eager';"
                        " i.scrollIntoView({block: 'center'}); return true; })()"
                    )
                    if has_figure:
                        c.b.pump(0.8)
                        name = f"{Path(page).stem}-figure-{width}.png"
                        c.screenshot(name, args.screenshots)
                        shots.append(name)
            if SOLUTION_PAGE in pages:
                c.open(SOLUTION_PAGE)
                opened = c.b.eval(
                    "(() => { const d = document.querySelector("
                    "'details.dropdown, .admonition.dropdown');"
                    " if (!d) return false; if (d.tagName === 'DETAILS') d.open = true;"
                    " else d.querySelector('button, .toggle-button')?.click();"
                    " d.scrollIntoView(); return true; })()"
                )
                c.b.pump(0.5)
                if opened:
                    name = f"{Path(SOLUTION_PAGE).stem}-solution-{width}.png"
                    c.screenshot(name, args.screenshots)
                    shots.append(name)
    finally:
        browser.close()
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
    except CDPError as e:
        print(f"ブラウザーの操作に失敗しました: {e}", file=sys.stderr)
        sys.exit(1)
