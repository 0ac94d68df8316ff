"""読者のブラウザー向けの修正 (_ext/ja_search.py、_ext/reader_fixes.py) の純粋な関数の検査。

ブラウザーでの確かめ (引き出しが開く、検索で見つかる、axe) は .ci/browser_check.py が行います。
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "_ext"))

from ja_search import bigrams  # noqa: E402
from reader_fixes import fix_html, purge_css  # noqa: E402


def test_every_query_bigram_is_indexed_for_a_page_containing_the_term():
    # 文の中でどう単語に分かれても、語を含む文の 2 文字組は、語の 2 文字組をすべて含む
    text = "本章では勾配降下法と分類器なしガイダンスを使う拡散モデルを学びます。"
    for term in ["勾配降下", "分類器なしガイダンス", "拡散モデル", "学びます"]:
        assert set(bigrams(term)) <= set(bigrams(text))
    assert "降下" in bigrams(text) and "PyTorch" not in "".join(bigrams("PyTorch のテンソル"))


def test_fix_html_removes_heavy_and_duplicate_scripts_and_fixes_labels():
    page = (
        '<html><head>\n    <script>const A = 1;</script>\n    <script>const A = 1;</script>\n'
        '<script defer src="../_static/scripts/fontawesome.js?digest=1"></script>\n'
        '<script src="../_static/searchtools.js"></script>\n'
        '<script src="../_static/reader-search.js?v=f2116ca4"></script>\n'
        '<script defer="defer" src="../_static/mathjax/startup.js?v=4ba68244"></script>'
        "</head><body>"
        '<button class="btn search-button__button" title="検索" aria-label="検索">'
        "検索 Ctrl+K</button>"
        '<summary aria-label="Toggle hidden content">コードを表示</summary>'
        '<details open="open"><summary><span class="toctree-toggle" role="presentation">'
        '<i class="fa-solid fa-chevron-down"></i></span></summary></details>'
        '<div role="doc-biblioentry"></div><img alt="図" src="../_images/a.png" /></body></html>'
    )
    out = fix_html(page, is_search_page=False)
    assert out.count("const A = 1;") == 1
    assert "fontawesome.js" not in out and "searchtools.js" not in out
    assert "reader-search.js" not in out  # 検索ページ専用の修正は、ほかのページでは読まない
    assert '<script defer="defer" src="../_static/mathjax' not in out
    assert 's.src = "../_static/mathjax/startup.js?v=4ba68244"' in out
    assert 'aria-label="検索"' not in out and "<summary>" in out
    assert 'role="listitem"' in out and '<img loading="lazy" alt="図"' in out
    assert '<summary aria-label="節の一覧を開閉"><span class="toctree-toggle"' in out  # axe
    assert "searchtools.js" in fix_html(page, is_search_page=True)


def test_purge_css_keeps_used_and_negated_rules():
    css = (
        ".used{a:1}.unused{b:2}.unused,.used2{c:3}@media (min-width:1px){.unused{d:4}.used{e:5}}"
        ".x:not(.unused){f:6}@font-face{font-family:F}p{g:7}.bs-tooltip-top{h:8}"
    )
    out = purge_css(css, {"used", "used2", "x"}, prefixes=("bs-tooltip-",))
    assert ".unused{b:2}" not in out and "d:4" not in out
    kept_rules = (".used{a:1}", ".used2{c:3}", ".used{e:5}", ".x:not(.unused){f:6}")
    for kept in (*kept_rules, "@font-face", "p{g:7}", ".bs-tooltip-top{h:8}"):
        assert kept in out


def test_plain_pygments_tokens_are_unwrapped_only_when_they_look_the_same():
    from reader_fixes import plain_token_classes, unwrap_plain_tokens

    css = (
        'html[data-theme="light"] .highlight { background: #fff; color: #080808 }\n'
        'html[data-theme="dark"] .highlight { background: #222; color: #F8F8F2 }\n'
        'html[data-theme="light"] .highlight .n { color: #080808 }\n'
        'html[data-theme="dark"] .highlight .n { color: #F8F8F2 }\n'
        'html[data-theme="light"] .highlight .p { color: #080808 }\n'
        'html[data-theme="dark"] .highlight .p { color: #AAAAAA }\n'
    )
    plain = plain_token_classes(css)
    assert plain == {"n", "w"}  # p は暗いテーマで色が違うので残す
    code = '<span class="n">x</span><span class="p">(</span><span class="w"> </span>'
    assert unwrap_plain_tokens(code, plain) == 'x<span class="p">(</span> '
