"""読者のブラウザーでの不具合を直す Sphinx 拡張 (テーマの組み合わせの問題と、ページの重さ)。

_static/ の reader-nav.js (☰ と目次のボタン)、reader-search.js (検索結果の抜粋)、reader.css は、
Jupyter Book が _static/ のファイルとして全ページに読み込みます。この拡張がするのは次のことです。

- 同じ <script> が 2 回入る問題 (sphinx-thebe の THEBE_JS_URL、コンソールのエラー) を 1 回にする
- 配色の既定 (空だとコンソールにエラーが出る) とファビコン
- ビルドの後で HTML を直す:
  - アイコンを描く fontawesome.js (1.5 MB) を読まない (アイコンは CSS の Web フォントで出る)
  - Web フォントは、サイトで使うアイコンの字形だけに減らす (数 kB)
  - 検索の索引 (searchindex.js など) は検索ページだけで読む (テーマの「入力中に検索」は使わない)
  - 本文の画像は loading="lazy"、MathJax は数式が画面に近づいてから読む (初回表示を軽くする)
  - アクセシビリティ: 検索ボタンと折りたたみの英語のラベル、参考文献の一覧の role

変更のない再ビルドを速くするため、HTML を直すのはそのビルドで書いたページだけです。
アイコンのフォントとテーマの CSS の縮小は、サイトの HTML と JS の中身が前回と同じなら前回の
結果を使います (記録は doctree のフォルダーの reader_fixes.json)。この拡張のコードを変えると
環境の版 (env_version) が変わり、全ページを読み直して書き直します。
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

STATIC = Path(__file__).resolve().parents[1] / "_static"


def _config(app: Sphinx, config: Config) -> None:
    # pydata-sphinx-theme の配色の既定 (空のままだと、ページを開くたびにコンソールにエラーが出る)
    context = dict(config.html_context or {})
    context.setdefault("default_mode", "light")
    config.html_context = context
    if not config.html_favicon and (STATIC / "favicon.svg").exists():
        config.html_favicon = str(STATIC / "favicon.svg")


FONTAWESOME_JS = re.compile(
    r'\s*<script defer src="[^"]*_static/scripts/fontawesome\.js[^"]*"></script>'
)
SEARCH_JS = re.compile(
    r'\s*<script src="[^"]*'
    r'(?:_static/searchtools\.js|_static/language_data\.js|searchindex\.js'
    r'|_static/reader-search\.js(?:\?v=[0-9a-f]+)?)"></script>'
)
INLINE_SCRIPT = re.compile(r"\n\s*<script>[^<]*</script>")
IMG_TAG = re.compile(r'<img (?![^>]*loading=)(?=[^>]*src="[^"]*_images/)')
MATHJAX_TAG = re.compile(
    r'<script defer="defer" src="([^"]*mathjax/startup\.js(?:\?[^"]*)?)"></script>'
)
# 数式が画面に近づいてから MathJax (約 800 kB) を読む。読み終えたら reader-mathjax-ready を送る。
MATHJAX_LAZY = """<script>(() => {
  const load = (window.__readerLoadMath = () => {
    if (window.__readerMathLoading) return;
    window.__readerMathLoading = true;
    const s = document.createElement("script");
    s.src = "%s";
    s.onload = () => MathJax.startup.promise.then(
      () => window.dispatchEvent(new Event("reader-mathjax-ready")));
    document.head.appendChild(s);
  });
  const start = () => {
    const math = document.querySelectorAll(".math, .output_latex");
    if (!("IntersectionObserver" in window) || !math.length) return load();
    const io = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) { io.disconnect(); load(); }
    }, { rootMargin: "1200px 0px" });
    math.forEach((m) => io.observe(m));
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();</script>"""
SEARCH_BUTTON = re.compile(
    r'(<button class="[^"]*search-button__button[^"]*"[^>]*?) aria-label="[^"]*"'
)


def plain_token_classes(pygments_css: str) -> set[str]:
    """色が地の文字と同じ Pygments のトークン (名前 n、区切り p、空白 w) の class を返します。

    明暗どちらのテーマでも ``.highlight`` と同じ色 (または色の指定なし) のものだけです。
    """
    plain = set()
    for cls in ("n", "p", "w"):
        same = True
        for theme in ("light", "dark"):
            scope = f'html[data-theme="{theme}"] .highlight'
            base = re.search(re.escape(scope) + r" \{[^}]*?color: (#[0-9A-Fa-f]+)", pygments_css)
            rule = re.escape(scope) + rf" \.{cls} \{{ color: (#[0-9A-Fa-f]+)"
            tok = re.search(rule, pygments_css)
            if tok and (base is None or tok.group(1).lower() != base.group(1).lower()):
                same = False
        if same:
            plain.add(cls)
    return plain


def unwrap_plain_tokens(text: str, classes: set[str]) -> str:
    """見た目の変わらないトークンの <span> を外して、コードの多いページを軽くします。"""
    if not classes:
        return text
    names = "|".join(sorted(classes))
    pattern = re.compile(rf'<span class="(?:{names})">([^<]*)</span>')
    return pattern.sub(r"\1", text)


def fix_html(text: str, is_search_page: bool, plain_tokens: set[str] = frozenset()) -> str:
    """1 ページの HTML を直します (テストしやすいように純粋な関数)。"""
    text = unwrap_plain_tokens(text, set(plain_tokens))
    text = FONTAWESOME_JS.sub("", text)
    text = MATHJAX_TAG.sub(lambda m: MATHJAX_LAZY % m.group(1), text)
    # 同じインラインの <script> が 2 回あれば、2 回目を除く (const の二重宣言でエラーになる)
    seen: set[str] = set()

    def once(m: re.Match) -> str:
        if m.group(0) in seen:
            return ""
        seen.add(m.group(0))
        return m.group(0)

    head, sep, body = text.partition("</head>")
    text = INLINE_SCRIPT.sub(once, head) + sep + body
    if not is_search_page:
        text = SEARCH_JS.sub("", text)
    # ボタンの名前は見えている文字 (「検索 Ctrl+K」) から付ける (ラベルと表示の食い違いを無くす)
    text = SEARCH_BUTTON.sub(r"\1", text)
    # 参考文献: role="list" の子は listitem (doc-biblioentry は廃止された role)
    text = text.replace('role="doc-biblioentry"', 'role="listitem"')
    # 折りたたみの英語のラベル「Toggle hidden content」は、見えている日本語の文字と食い違う
    text = text.replace('<summary aria-label="Toggle hidden content">', "<summary>")
    # 章の一覧で節を開閉する ▼ には文字が無いので、読み上げ用の名前を付ける
    text = text.replace('<summary><span class="toctree-toggle" role="presentation">',
                        '<summary aria-label="節の一覧を開閉"><span class="toctree-toggle" '
                        'role="presentation">')
    # 本文の画像は、画面に近づいてから読む (初回表示を軽くする)
    text = IMG_TAG.sub(r'<img loading="lazy" ', text)
    return text


def subset_icon_fonts(outdir: Path) -> None:
    """Font Awesome の Web フォントを、サイトで使うアイコンだけの woff にします。"""
    css_path = outdir / "_static" / "styles" / "pydata-sphinx-theme.css"
    fonts = outdir / "_static" / "vendor" / "fontawesome" / "webfonts"
    if not css_path.exists() or not fonts.exists():
        return
    from fontTools import subset
    from fontTools.ttLib import TTFont

    css = css_path.read_text(encoding="utf-8")
    codepoints = {}
    for selectors, code in re.findall(
        r"((?:\.fa-[a-z0-9-]+:before,?)+)\{content:\"\\([0-9a-f]+)\"\}", css
    ):
        for name in re.findall(r"\.(fa-[a-z0-9-]+):before", selectors):
            codepoints[name] = int(code, 16)
    used: set[int] = set()
    used_names: set[str] = set()
    sources = [*outdir.rglob("*.html"), *(outdir / "_static").rglob("*.js")]
    for f in sources:
        if "mathjax" in f.parts:
            continue
        for name in set(
            re.findall(r"fa-[a-z0-9-]+", f.read_text(encoding="utf-8", errors="ignore"))
        ):
            if name in codepoints:
                used.add(codepoints[name])
                used_names.add(name)
    # CSS が直接使うアイコン (サイドバーの矢印など: content:"\f105"、--pst-icon-*)
    rule = re.compile(r"((?:\.fa-[a-z0-9-]+:before,?)+)\{content:\"\\[0-9a-f]+\"\}")
    for f in (outdir / "_static").rglob("*.css"):
        text = rule.sub("", f.read_text(encoding="utf-8", errors="ignore"))
        used |= {int(c, 16) for c in re.findall(r"[\"']\\([ef][0-9a-f]{3})[\"']", text)}
    for stem in ("fa-solid-900", "fa-regular-400", "fa-brands-400"):
        ttf = fonts / f"{stem}.ttf"
        if not ttf.exists():
            continue
        font = TTFont(str(ttf))
        options = subset.Options()
        options.flavor = "woff"
        options.layout_features = ["*"]
        sub = subset.Subsetter(options)
        sub.populate(unicodes=used & set(font.getBestCmap()))
        sub.subset(font)
        font.flavor = "woff"
        font.save(str(fonts / f"{stem}.subset.woff"))
        css = re.sub(
            rf'url\(([^)]*){stem}\.woff2\) format\("woff2"\),'
            rf'url\([^)]*{stem}\.ttf\) format\("truetype"\)',
            rf'url(\g<1>{stem}.subset.woff) format("woff")',
            css,
        )

    # 使わないアイコンの CSS の規則 (約 1,800 個、85 kB) も除く
    def keep_used(m: re.Match) -> str:
        names = re.findall(r"\.(fa-[a-z0-9-]+):before", m.group(1))
        return m.group(0) if used_names & set(names) else ""

    css = re.sub(r"((?:\.fa-[a-z0-9-]+:before,?)+)\{content:\"\\[0-9a-f]+\"\}", keep_used, css)
    css_path.write_text(css, encoding="utf-8")


def fix_pages(outdir: Path, pages: list[Path] | None = None) -> int:
    """pages (省くとサイトのすべての HTML) を fix_html で直し、書き換えた数を返します。"""
    css = outdir / "_static" / "pygments.css"
    plain = plain_token_classes(css.read_text(encoding="utf-8")) if css.exists() else set()
    if pages is None:
        pages = [p for p in outdir.rglob("*.html") if "_static" not in p.relative_to(outdir).parts]
    changed = 0
    for page in pages:
        if not page.is_file():
            continue
        text = page.read_text(encoding="utf-8")
        fixed = fix_html(text, page.relative_to(outdir).as_posix() == "search.html", plain)
        if fixed != text:
            page.write_text(fixed, encoding="utf-8")
            changed += 1
    return changed


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _theme_css_files(outdir: Path) -> list[Path]:
    static = outdir / "_static"
    return sorted([*static.glob("*.css"), *static.glob("styles/*.css")])


def _subset_fonts(outdir: Path) -> list[Path]:
    return sorted((outdir / "_static" / "vendor" / "fontawesome" / "webfonts").glob(
        "*.subset.woff"))


def site_fingerprint(outdir: Path) -> str:
    """アイコンと CSS の縮小の結果を決める入力 (HTML と JS の中身、元のフォント) の指紋。"""
    h = hashlib.sha256()
    files = [p for p in outdir.rglob("*.html") if "_static" not in p.relative_to(outdir).parts]
    files += [p for p in (outdir / "_static").rglob("*.js") if "mathjax" not in p.parts]
    files += (outdir / "_static" / "vendor" / "fontawesome" / "webfonts").glob("*.ttf")
    for f in sorted(files):
        h.update(f.relative_to(outdir).as_posix().encode() + b"\0" + _sha(f.read_bytes()).encode())
    return h.hexdigest()


def shrink_site(outdir: Path, state_path: Path) -> bool:
    """アイコンのフォントを減らし、テーマの CSS から使わない規則を除きます。

    入力 (site_fingerprint と各 CSS の中身) が前回と同じなら、前回の結果を書くだけにします
    (Sphinx は再ビルドのたびに元の CSS を写し直すので、結果を記録しておく)。
    縮小をやり直したら True を返します。
    """
    fingerprint = site_fingerprint(outdir)
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    css_now = {p.relative_to(outdir).as_posix(): p.read_text(encoding="utf-8")
               for p in _theme_css_files(outdir)}
    fonts_now = {p.name: _sha(p.read_bytes()) for p in _subset_fonts(outdir)}
    saved = state.get("css", {})
    reusable = (
        state.get("fingerprint") == fingerprint
        and state.get("fonts") == fonts_now
        and set(saved) == set(css_now)
        and all(_sha(text.encode()) in (saved[rel]["in"], _sha(saved[rel]["out"].encode()))
                for rel, text in css_now.items())
    )
    if reusable:
        for rel, text in css_now.items():
            if text != saved[rel]["out"]:
                (outdir / rel).write_text(saved[rel]["out"], encoding="utf-8")
        return False
    subset_icon_fonts(outdir)
    purge_theme_css(outdir)
    state = {
        "fingerprint": fingerprint,
        "fonts": {p.name: _sha(p.read_bytes()) for p in _subset_fonts(outdir)},
        "css": {rel: {"in": _sha(text.encode()),
                      "out": (outdir / rel).read_text(encoding="utf-8")}
                for rel, text in css_now.items()},
    }
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_name(state_path.name + ".tmp")
    tmp.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, state_path)
    return True


def _page_written(app: Sphinx, pagename: str, templatename: str, context: dict,
                  doctree: object) -> None:
    written = getattr(app, "_reader_fixes_written", None)
    if written is not None:
        written.add(pagename)


def _builder_inited(app: Sphinx) -> None:
    # 並列に書くときは、書いたページがこのプロセスで分からないので、すべてのページを直す
    app._reader_fixes_written = set() if app.parallel <= 1 else None


def _finished(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    outdir = Path(app.outdir)
    written = getattr(app, "_reader_fixes_written", None)
    pages = None
    if written is not None:
        pages = [Path(app.builder.get_outfilename(name)) for name in sorted(written)]
    fix_pages(outdir, pages)
    shrink_site(outdir, Path(app.doctreedir) / "reader_fixes.json")


# この拡張のコードが変われば環境の版も変わり、全ページを書き直す (前の版で直したページを残さない)
ENV_VERSION = int(_sha(Path(__file__).read_bytes())[:8], 16)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _config)
    app.connect("builder-inited", _builder_inited)
    app.connect("html-page-context", _page_written, priority=900)
    app.connect("build-finished", _finished, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": ENV_VERSION}


FUNCTIONAL_PSEUDO = re.compile(r":(?:not|is|where|has)\([^()]*\)")
CLASS_IN_SELECTOR = re.compile(r"\.(-?[_a-zA-Z][\w-]*)")


def _split_selectors(prelude: str) -> list[str]:
    """セレクターの並び (a, b:is(c, d)) を、括弧の中のカンマでは分けずに分けます。"""
    parts, depth, cur = [], 0, ""
    for ch in prelude:
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def purge_css(css: str, known: set[str], prefixes: tuple[str, ...] = ()) -> str:
    """サイトのどこにも出てこない class だけを使う CSS の規則を除きます。

    known は HTML の class と JavaScript の中の語 (JS が後から付ける class も含む)。
    :not() などの中の class は条件にしません (除くと意味が変わるため)。
    """

    def used(cls: str) -> bool:
        return cls in known or cls.startswith(prefixes)

    out, i, n = [], 0, len(css)
    while i < n:
        j = css.find("{", i)
        if j < 0:
            out.append(css[i:])
            break
        depth, k = 1, j + 1
        while depth and k < n:
            depth += {"{": 1, "}": -1}.get(css[k], 0)
            k += 1
        prelude, body = css[i:j], css[j + 1 : k - 1]
        head = prelude.strip()
        if head.startswith(("@media", "@supports", "@layer", "@container")):
            inner = purge_css(body, known, prefixes)
            if inner.strip():
                out.append(f"{prelude}{{{inner}}}")
        elif head.startswith("@"):
            out.append(css[i:k])
        else:
            keep = [
                s
                for s in _split_selectors(prelude)
                if all(used(c) for c in CLASS_IN_SELECTOR.findall(FUNCTIONAL_PSEUDO.sub("", s)))
            ]
            if keep:
                out.append(",".join(keep) + "{" + body + "}")
        i = k
    return "".join(out)


def purge_theme_css(outdir: Path) -> None:
    """テーマの大きな CSS (pydata-sphinx-theme.css 約 300 kB など) から使わない規則を除きます。"""
    static = outdir / "_static"
    known: set[str] = set()
    for page in outdir.rglob("*.html"):
        text = page.read_text(encoding="utf-8", errors="ignore")
        for attr in re.findall(r'class="([^"]*)"', text):
            known.update(attr.split())
        inline = " ".join(re.findall(r"<script[^>]*>(.*?)</script>", text, re.S))
        known.update(re.findall(r"[\w-]+", inline))
    for js in static.rglob("*.js"):
        if "mathjax" not in js.parts:
            known.update(re.findall(r"[\w-]+", js.read_text(encoding="utf-8", errors="ignore")))
    prefixes = tuple(w for w in known if w.endswith("-") and len(w) > 3)
    for path in [*static.glob("*.css"), *static.glob("styles/*.css")]:
        css = path.read_text(encoding="utf-8")
        path.write_text(purge_css(css, known, prefixes), encoding="utf-8")
