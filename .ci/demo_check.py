"""ブラウザーで動くデモを headless Chromium で動かし、PyTorch との一致と予算を調べます。

ビルドした HTML のうち、デモ (``data-demo="名前"``) のあるページを 127.0.0.1 で開き、次を調べます。

- ページを開いただけでは、ランタイムもモデルも読まない (遅延読み込み)
- 各デモの自己テスト ``window.torchbookDemoTests[名前]()`` を呼び、結果を ``CHECKS[名前]`` が
  PyTorch の答えや予算と比べる (デモを足すときは、照合の関数を書いて CHECKS に 1 行足す)
- 速さの予算は表に出して追いますが、超えても CI は失敗にしません (計算機の負荷で遅くなるため)。
  失敗にするのは予算の TIMING_HARD_FACTOR 倍を超えたときだけです。一致 (PyTorch との差、
  予測のクラス) と大きさは、いつも失敗にします
- デモを始めたときに加わる転送バイト数 (CI 用のテストの入力 ``*-tests.json`` は数えない)
- file:// で開くと、見方の案内が 1 行出る
- デモを使った後の画面の axe-core の critical / serious の違反
- コンソールのエラー、127.0.0.1 以外への通信

ブラウザーは Debian の chromium を Playwright で操作します (ブラウザーのダウンロードはしません)。
表を表示し、問題があれば終了コード 1 を返します。章が書き出した重み (.pt) は
``--demo-dir`` (既定 ``_build/webdemo/``) から読みます。

    python .ci/demo_check.py _build/html
    python .ci/demo_check.py _build/pages/10_latent/_build/html --pages book/10_latent

デモのあるページは、ビルドした HTML の中からデモの印 (``data-demo="名前"``) で探します
(どの章に置いても見つかる)。``--pages`` は調べるページを絞ります (手元の確認用)。
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_check import Checker, find_chromium, launch, pages_of, serve  # noqa: E402
from budgets import DEMO_BUDGETS_MS  # noqa: E402
from playwright.sync_api import Error as PlaywrightError  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_ATTR = re.compile(r'data-demo="([a-z0-9-]+)"')
MB = 1_000_000
# 速さの予算を失敗にする倍率。2 コアを複数の作業で分け合う計算機では、ブラウザーの中の計算も
# 負荷だけで数倍遅くなります (CI のビルドは負荷で 3.2 倍遅くなった)。10 倍はその幅の 3 倍で、
# 負荷では届かず、毎回の再読み込みやバックエンドの取り違えのような 1 桁の後退だけが届きます。
TIMING_HARD_FACTOR = 10.0


@dataclass
class Row:
    """表の 1 行: 何を測ったか、値、予算 (無ければ空)、予算を満たしたか。"""

    demo: str
    item: str
    value: str
    budget: str = ""
    ok: bool = True
    timing: bool = False  # 速さの予算 (超えても、上限の内側なら表示だけ)
    within_hard: bool = True  # 速さの予算の上限 (予算の TIMING_HARD_FACTOR 倍) の内側か
    key: str = ""  # 1 枚の時間の行の印 (benchmarks/webdemo_bench.py が比を計算する)
    ms: float | None = None  # その時間 (ミリ秒)
    nfe: int | None = None  # その 1 枚のネットワークの評価回数

    @property
    def fails(self) -> bool:
        """CI を失敗にするか: 一致と大きさは予算を外れたら、速さは上限を超えたら。"""
        return not self.ok and (not self.timing or not self.within_hard)

    @property
    def mark(self) -> str:
        if not self.budget:
            return ""
        if self.ok:
            return "OK"
        return "NG" if self.fails else "超過 (負荷でも起きるので表示だけ)"


def timing_row(item: str, ms: float, budget_ms: float, hard_ms: float | None = None,
               key: str = "", nfe: int | None = None) -> Row:
    """速さの行: 予算を超えたら「超過」、上限 (既定は予算の TIMING_HARD_FACTOR 倍) を超えたら失敗。

    key と nfe は、生成 1 枚の時間の行の印です (ベンチマークが比を計算する)。
    """
    hard_ms = budget_ms * TIMING_HARD_FACTOR if hard_ms is None else hard_ms
    return Row("", item, f"{ms:.1f} ms", f"≤ {budget_ms:g} ms", ms <= budget_ms, timing=True,
               within_hard=ms <= hard_ms, key=key, ms=ms if key else None, nfe=nfe)


@dataclass
class Context:
    """照合の関数に渡すもの: ビルドした HTML、章の書き出し、ブラウザー (追加の操作用)。"""

    html_dir: Path
    demo_dir: Path
    checker: Checker
    page: str
    extra: dict = field(default_factory=dict)

    def model_size(self, name: str, budget: int) -> Row:
        size = (self.html_dir / "_static" / "webdemo" / name).stat().st_size
        return Row("", f"モデル {name}", f"{size / MB:.2f} MB", f"≤ {budget / MB:g} MB",
                   size <= budget)


# ------------------------------------------------ 05 章: 数字を書いてみる
MNIST_PROB_TOL = 1e-4  # ブラウザーと PyTorch の確率の最大差
MNIST_INPUT_TOL = 1e-5  # ブラウザーの前処理と booktools.webdemo.mnist_preprocess の最大差
MNIST_LATENCY_MS = 20.0  # 線を引き終えてから棒が変わるまで
MNIST_MODEL_BYTES = 1 * MB
MNIST_MIN_ACCURACY = 0.8  # 見本 (本物のテスト画像) を欄に書き直しても、ほぼ読めること


def check_mnist(result: dict, ctx: Context) -> list[Row]:
    import torch

    from booktools.webdemo import mnist_preprocess
    from torchbook import mnist

    meta = json.loads((ctx.demo_dir / "mnist.json").read_text(encoding="utf-8"))
    model = mnist.create_model(meta["arch"])
    model.load_state_dict(torch.load(ctx.demo_dir / "mnist.pt", weights_only=True))
    model.eval()
    digits = result["digits"]
    n, size = meta["size"], result["canvas"]
    inputs = torch.tensor([d["input"] for d in digits], dtype=torch.float32).view(-1, 1, n, n)
    with torch.no_grad():
        logits = model(inputs)
    expected = torch.softmax(logits, dim=1)
    got = torch.tensor([d["probs"] for d in digits], dtype=torch.float32)
    prob_diff = (got - expected).abs().max().item()
    # 自信の強い数字では確率がほぼ 0 と 1 になり差が見えにくいので、ロジットも比べる
    logit_diff = (torch.tensor([d["logits"] for d in digits]) - logits).abs().max().item()
    same_class = int((got.argmax(1) == expected.argmax(1)).sum())
    # 前処理: ブラウザーが欄から読んだ濃さを、Python の同じ手順に通して比べる
    input_diff = 0.0
    for d, x in zip(digits, inputs, strict=True):
        ink = torch.frombuffer(bytearray(base64.b64decode(d["ink"])), dtype=torch.uint8)
        ref = mnist_preprocess(ink.float().view(size, size) / 255)
        ref = (ref - meta["mean"]) / meta["std"]
        input_diff = max(input_diff, (ref - x[0]).abs().max().item())
    correct = sum(int(p == d["label"]) for p, d in zip(got.argmax(1).tolist(), digits,
                                                        strict=True))
    ms = [d["ms"] for d in digits]
    stroke_ms = ctx.extra.get("stroke_ms")
    rows = [
        Row("", "予測したクラスが PyTorch と同じ", f"{same_class} / {len(digits)}",
            f"{len(digits)} / {len(digits)}", same_class == len(digits)),
        Row("", "確率の最大差 (PyTorch との)", f"{prob_diff:.2e}", f"≤ {MNIST_PROB_TOL:g}",
            prob_diff <= MNIST_PROB_TOL),
        Row("", "ロジットの最大差 (PyTorch との)", f"{logit_diff:.2e}",
            f"≤ {MNIST_PROB_TOL:g}", logit_diff <= MNIST_PROB_TOL),
        Row("", "前処理の最大差 (Python の同じ手順との)", f"{input_diff:.2e}",
            f"≤ {MNIST_INPUT_TOL:g}", input_diff <= MNIST_INPUT_TOL),
        Row("", "見本を欄に書き直したときの正解", f"{correct} / {len(digits)}",
            f"≥ {MNIST_MIN_ACCURACY:.0%}", correct >= MNIST_MIN_ACCURACY * len(digits)),
        timing_row("書き終えてから棒の更新まで (中央値)", statistics.median(ms), MNIST_LATENCY_MS),
        Row("", "同 (最大)", f"{max(ms):.1f} ms"),
    ]
    if stroke_ms is not None:
        rows.append(timing_row("マウスで 1 本引いたとき", stroke_ms, MNIST_LATENCY_MS))
    if "touch_ok" in ctx.extra:
        touch_ok = ctx.extra["touch_ok"]
        rows.append(Row("", "指 (タッチ) で書いて予測が出る", "はい" if touch_ok else "いいえ",
                        "はい", touch_ok))
    rows.append(ctx.model_size(meta["model"], MNIST_MODEL_BYTES))
    return rows


def stroke_mnist(ctx: Context) -> None:
    """本物のマウスの操作で「1」を 1 本引き、棒が変わるまでの時間をデモから読みます。

    続けて同じ線を指 (タッチのイベント) で引き、予測が出ることを確かめます。Playwright には
    タッチで線を引く操作が無い (tap だけ) ので、タッチは Playwright の CDP セッションで送ります。
    """
    c = ctx.checker
    box = c.eval(
        "(() => { const c = document.querySelector('[data-demo=mnist] canvas');"
        " c.scrollIntoView({block: 'center'}); const r = c.getBoundingClientRect();"
        " return {x: r.left, y: r.top, w: r.width, h: r.height}; })()"
    )
    x = box["x"] + box["w"] * 0.5
    points = [(x, box["y"] + box["h"] * t) for t in (0.2, 0.35, 0.5, 0.65, 0.8)]
    c.eval("delete document.querySelector('[data-demo=mnist]').dataset.latencyMs, true")
    mouse = c.page.mouse
    mouse.move(*points[0])
    mouse.down()
    for px, py in points[1:]:
        mouse.move(px, py)
    mouse.up()
    latency = "document.querySelector('[data-demo=mnist]').dataset.latencyMs"
    c.wait_for(f"{latency} !== undefined", 30)
    ms = c.eval(latency)
    ctx.extra["stroke_ms"] = float(ms) if ms is not None else float("inf")
    # 指 (タッチ) でも書けること: 同じ線を touch のイベントで引く
    c.eval("document.querySelector('[data-demo=mnist] button').click(), true")  # 消す
    cdp = c.context.new_cdp_session(c.page)
    cdp.send("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 1})
    try:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [
            {"x": points[0][0], "y": points[0][1]}]})
        for px, py in points[1:]:
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove",
                                                  "touchPoints": [{"x": px, "y": py}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        ctx.extra["touch_ok"] = c.wait_for(
            "document.querySelector('[data-demo=mnist] .mnist-status').textContent"
            ".startsWith('予測')", 30)
    finally:
        cdp.send("Emulation.setTouchEmulationEnabled", {"enabled": False})
        cdp.detach()


# ------------------------------------------------ 08 章: ブラウザーで生成する
DIFFUSION_TOL = 1e-3  # [-1, 1] の画素での、ブラウザーと PyTorch の画像の最大差
DIFFUSION_MS = 2000.0  # DDIM 20 ステップで 1 枚 (初回の後の 4 回の最短。計算機は共有なので)
DIFFUSION_MODEL_BYTES = 6 * MB


def check_diffusion(result: dict, ctx: Context) -> list[Row]:
    """自己テストの画像を、章が sample() で作った画像 (diffusion-tests.json) と比べます。"""
    vec = json.loads((ctx.demo_dir / "diffusion-tests.json").read_text(encoding="utf-8"))
    rows = []
    for case, got in zip(vec["cases"], result["cases"], strict=True):
        diff = max(abs(a - b) for a, b in zip(case["image"], got["image"], strict=True))
        s = f"s = {case['guidance']:g}"
        rows += [
            Row("", f"DDIM {vec['steps']} ステップ ({s}) の画像の最大差", f"{diff:.2e}",
                f"≤ {DIFFUSION_TOL:g}", diff <= DIFFUSION_TOL),
            timing_row(f"DDIM {vec['steps']} ステップで 1 枚 (最短、{s})", got["ms"],
                       DIFFUSION_MS, key=f"pixel s={case['guidance']:g}",
                       nfe=vec["steps"]),
            Row("", f"同 (中央値、{s})", f"{got['median_ms']:.0f} ms"),
            Row("", f"同 (初回、{s})", f"{got['first_ms']:.0f} ms"),
        ]
    rows.append(ctx.model_size("diffusion-unet.onnx", DIFFUSION_MODEL_BYTES))
    return rows


# ------------------------------------------------ 10 章: 潜在拡散 (「生成」とライブ)
LATENT_MS = DIFFUSION_MS  # 「生成」で 1 枚 (画素のデモと同じ、押してから 2 秒以内)
LATENT_MODEL_BYTES = 6 * MB
LATENT_DECODER_BYTES = 1 * MB
SOLVERS = {"heun": "ホイン法", "euler": "オイラー法"}


def check_latent(result: dict, ctx: Context) -> list[Row]:
    """「生成」とライブの画像を、章のビルドが sample() で作った画像 (latent-tests.json) と比べます。

    ライブの 1 枚の時間は .ci/budgets.py の DEMO_BUDGETS_MS["latent-live"] と比べます。
    """
    from torchbook.diffusion.sampling import nfe

    vec = json.loads((ctx.demo_dir / "latent-tests.json").read_text(encoding="utf-8"))
    meta = json.loads((ctx.demo_dir / "latent.json").read_text(encoding="utf-8"))
    rows = []
    solver = f"{SOLVERS[vec['method']]} {vec['steps']} ステップ"
    if len(result["cases"]) != len(vec["cases"]) or len(result["live_cases"]) != len(
            vec["live_cases"]):
        return [Row("", "自己テストの画像の数", f"{len(result['cases'])} と "
                    f"{len(result['live_cases'])}", f"{len(vec['cases'])} と "
                    f"{len(vec['live_cases'])}", False)]
    for case, got in zip(vec["cases"], result["cases"], strict=True):
        diff = max(abs(a - b) for a, b in zip(case["image"], got["image"], strict=True))
        s = f"s = {case['guidance']:g}"
        rows += [
            Row("", f"「生成」{solver} ({s}) の画像の最大差", f"{diff:.2e}",
                f"≤ {DIFFUSION_TOL:g}", diff <= DIFFUSION_TOL),
            timing_row(f"「生成」{solver}で 1 枚 (最短、{s})", got["ms"], LATENT_MS,
                       key=f"latent s={case['guidance']:g}",
                       nfe=nfe(vec["method"], vec["steps"])),
            Row("", f"同 (中央値、{s})", f"{got['median_ms']:.0f} ms"),
            Row("", f"同 (初回、{s})", f"{got['first_ms']:.0f} ms"),
        ]
    live = meta["live"]
    live_solver = f"{SOLVERS[live['method']]} {live['steps']} ステップ、NFE {live['nfe']}"
    for case, got in zip(vec["live_cases"], result["live_cases"], strict=True):
        diff = max(abs(a - b) for a, b in zip(case["image"], got["image"], strict=True))
        rows.append(Row("", f"ライブ ({live_solver}、w = {case['w']:g}、s = {case['guidance']:g})"
                        " の画像の最大差", f"{diff:.2e}", f"≤ {DIFFUSION_TOL:g}",
                        diff <= DIFFUSION_TOL))
    label, budget, hard = DEMO_BUDGETS_MS["latent-live"]
    slowest = max(c["ms"] for c in result["live_cases"])  # 各位置の最短のうち、最も遅い位置
    median = statistics.median(c["median_ms"] for c in result["live_cases"])
    rows += [
        timing_row(f"{label} (最短、{len(vec['live_cases'])} 位置で最も遅い位置)", slowest,
                   budget, hard, key="live", nfe=live["nfe"]),
        Row("", "同 (中央値)", f"{median:.1f} ms"),
    ]
    if "live_ok" in ctx.extra:
        rows.append(Row("", "w のスライダーを動かすとライブの画像が変わる",
                        "はい" if ctx.extra["live_ok"] else "いいえ", "はい", ctx.extra["live_ok"]))
        rows.append(Row("", "キーを押してから描き直しが終わるまで (Playwright の往復を含む)",
                        f"{ctx.extra['slide_ms']:.0f} ms"))
    if "full_ok" in ctx.extra:
        rows.append(Row("", "「生成」を押すと右の画像ができる",
                        "はい" if ctx.extra["full_ok"] else "いいえ", "はい", ctx.extra["full_ok"]))
    rows.append(ctx.model_size(meta["model"], LATENT_MODEL_BYTES))
    rows.append(ctx.model_size(meta["decoder"], LATENT_DECODER_BYTES))
    if live["model"] != meta["model"]:
        rows.append(ctx.model_size(live["model"], LATENT_MODEL_BYTES))
    return rows


def slide_latent(ctx: Context) -> None:
    """本物のキー操作で w のスライダーを 2 回動かし、ライブの画像が描き直されることを確かめます。

    2 回目は、キーを押してから状態の行が新しい w を示すまでの時間を測ります。
    """
    c = ctx.checker
    root = "document.querySelector('[data-demo=latent]')"
    status = f"{root}.querySelector('[role=status]').textContent"
    # ライブの画像の画素の和 (描き直しで変わったかを見る)
    ink = (f"{root}.querySelector('canvas').getContext('2d').getImageData(0, 0, 32, 32)"
           ".data.reduce((a, b) => a + b, 0)")
    slider = c.page.locator("[data-demo=latent] input[name=w]")
    slider.focus()
    values = []
    ok = True
    slide_ms = float("inf")
    for _ in range(2):
        before = c.eval(ink)
        target = c.eval(f"(Number({root}.querySelector('input[name=w]').value) + "
                        f"Number({root}.querySelector('input[name=w]').step)).toFixed(2)")
        start = time.perf_counter()
        c.page.keyboard.press("ArrowRight")
        shown = c.wait_for(f"{status}.startsWith('ライブ') && "
                           f"{status}.includes('w = ' + Number({target!r}))", 30)
        slide_ms = (time.perf_counter() - start) * 1000
        values.append(c.eval(ink))
        ok = ok and shown and values[-1] != before
    ctx.extra["live_ok"] = ok
    ctx.extra["slide_ms"] = slide_ms
    # 「生成」を押すと、右の画像が meta の解き方で描かれる
    c.page.locator("[data-demo=latent] button[type=submit]").click()
    ctx.extra["full_ok"] = c.wait_for(
        f"{root}.querySelectorAll('canvas')[1].getAttribute('aria-label')"
        ".startsWith('「生成」の画像: ')", 60)


# デモの名前 → (自己テストの結果を照合する関数, 自己テストの後にする操作 (無ければ None))
CHECKS: dict[str, tuple[Callable[[dict, Context], list[Row]], Callable | None]] = {
    "mnist": (check_mnist, stroke_mnist),
    "diffusion": (check_diffusion, None),
    "latent": (check_latent, slide_latent),
}


# ------------------------------------------------ 共通の手順
def demo_pages(html_dir: Path) -> dict[str, list[str]]:
    """デモのあるページ → そのページのデモの名前。"""
    found = {}
    for page in pages_of(html_dir):
        names = list(dict.fromkeys(DEMO_ATTR.findall((html_dir / page).read_text("utf-8"))))
        if names:
            found[page] = names
    return found


def is_demo_asset(url: str) -> bool:
    return "/_static/webdemo/" in url


def run_demos(html_dir: Path, demo_dir: Path, chromium: str,
              only: list[str] | None = None,
              only_pages: list[str] | None = None) -> tuple[list[Row], list[str]]:
    """デモのあるページをすべて (only_pages があればその中だけ) 調べ、表の行と問題の一覧を返します。

    only_pages は "book/10_latent" のようなページの名前 (.html は付けても付けなくても同じ)。
    """
    rows: list[Row] = []
    problems: list[str] = []
    pages = demo_pages(html_dir)
    if only_pages:
        wanted = {p.removesuffix(".html").removesuffix(".md") for p in only_pages}
        pages = {p: n for p, n in pages.items() if p.removesuffix(".html") in wanted}
    server, port = serve(html_dir)
    pw = sync_playwright().start()
    browser = launch(pw, chromium)
    try:
        c = Checker(browser, f"http://127.0.0.1:{port}", html_dir)
        c.viewport(1280, 900, mobile=False)
        for page, names in pages.items():
            names = [n for n in names if not only or n in only]
            if not names:
                continue
            c.open(page, fresh=True)  # キャッシュの空のコンテキストで
            transfers = c.transfers()
            early = [r["url"] for r in transfers if is_demo_asset(r["url"])]
            page_bytes = sum(r["bytes"] for r in transfers)
            rows.append(Row(page, "ページを開いただけで読んだデモのファイル",
                            f"{len(early)} 個", "0 個", not early))
            rows.append(Row(page, "ページの初回表示 (デモの JS と CSS を含む)",
                            f"{page_bytes / MB:.2f} MB"))
            for name in names:
                if name not in CHECKS:
                    problems.append(f"{page}: デモ {name} の照合が CHECKS にありません")
                    continue
                check, interact = CHECKS[name]
                ctx = Context(html_dir, demo_dir, c, page)
                c.requests.clear()
                start = time.time()
                result = c.eval(f"window.torchbookDemoTests[{name!r}]()")
                if interact is not None:  # 読み込みが済んだ後の、本物の入力での操作
                    interact(ctx)
                c.wait(0.3)
                added = sum(r["bytes"] for r in c.transfers()
                            if is_demo_asset(r["url"]) and not r["url"].endswith("-tests.json"))
                rows.append(Row(name, "デモを始めると加わる転送", f"{added / MB:.2f} MB"))
                for row in check(result, ctx):
                    row.demo = row.demo or name
                    rows.append(row)
                rows.append(Row(name, "自己テストの所要時間", f"{time.time() - start:.1f} s"))
            # デモを使った後の画面 (棒や案内の文) も axe で調べる
            violations = c.axe()
            rows.append(Row(page, "axe の重大な違反 (デモを使った後)",
                            f"{sum(v['n'] for v in violations)} 個", "0 個", not violations))
            problems += [f"{page}: axe {v['impact']} {v['id']} ({v['target']})" for v in violations]
            problems += [f"{page}: {e}" for e in c.errors]
            problems += [f"{page}: 外部への通信 {u}" for u in c.foreign]
            c.foreign.clear()
            # file:// では、見方の案内が出ること
            c.page.goto((html_dir / page).resolve().as_uri(), wait_until="load")
            notice_js = ("(document.querySelector('.torchbook-demo-file-notice') || {})"
                         ".textContent || ''")
            c.wait_for(f"({notice_js}).includes('http.server')", 15)
            notice = c.eval(notice_js) or ""
            rows.append(Row(page, "file:// で開いたときの案内", "あり" if notice else "なし",
                            "あり", "http.server" in notice))
        problems += c.problems
    finally:
        browser.close()
        pw.stop()
        server.shutdown()
    problems += [f"{r.demo}: {r.item} が {r.value} です (予算 {r.budget}"
                 + (f"、上限はその {TIMING_HARD_FACTOR:g} 倍" if r.timing else "") + ")"
                 for r in rows if r.fails]
    return rows, problems


def text_width(text: str) -> int:
    """端末での表示幅 (全角の文字は 2)。"""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, width: int, right: bool = False) -> str:
    space = " " * max(0, width - text_width(text))
    return space + text if right else text + space


def print_table(rows: list[Row]) -> None:
    cols = [max((text_width(getattr(r, k)) for r in rows), default=4)
            for k in ("demo", "item", "value", "budget")]
    for r in rows:
        mark = r.mark
        print(f"{pad(r.demo, cols[0])}  {pad(r.item, cols[1])}  {pad(r.value, cols[2], True)}  "
              f"{pad(r.budget, cols[3])}  {mark}".rstrip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html_dir", nargs="?", default="_build/html", type=Path)
    ap.add_argument("--demo-dir", type=Path, default=Path(
        os.environ.get("TORCHBOOK_WEBDEMO_DIR") or ROOT / "_build" / "webdemo"),
        help="章が書き出した重み (.pt) とメタデータの置き場所")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    ap.add_argument("--demos", nargs="*", help="調べるデモの名前 (既定: すべて)")
    ap.add_argument("--pages", nargs="*",
                    help="調べるページ (例: book/10_latent。既定: デモの印のあるすべてのページ)")
    args = ap.parse_args()
    if not (args.html_dir / "_static" / "webdemo").is_dir():
        ap.error(f"{args.html_dir}/_static/webdemo がありません (先に本をビルドしてください)")
    exe = find_chromium(args.chromium)
    if exe is None:
        ap.error(f"{args.chromium} がありません (Debian/Ubuntu: apt-get install chromium)")
    sys.path.insert(0, str(ROOT / "code"))
    rows, problems = run_demos(args.html_dir, args.demo_dir, exe, args.demos, args.pages)
    if not rows:
        problems.append("デモのあるページが見つかりません")
    found = {name for names in demo_pages(args.html_dir).values() for name in names}
    problems += [f"デモ {name} のあるページが見つかりません" for name in args.demos or []
                 if name not in found]
    print_table(rows)
    for p in problems:
        print("問題:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PlaywrightError as e:
        print(f"ブラウザーの操作に失敗しました: {e}", file=sys.stderr)
        sys.exit(1)
