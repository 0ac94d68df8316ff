"""変更のない再ビルドを速く保つ仕組み (_ext/reader_fixes.py、_ext/webdemo.py) の検査。

時間そのものは benchmarks/rebuild_bench.py が測ります。ここでは「同じ入力なら重い処理をしない、
入力が変われば必ずやり直す」ことを確かめます。
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "_ext"))
import fast_toc  # noqa: E402, F401
import reader_fixes  # noqa: E402
import webdemo  # noqa: E402

THEME_CSS = ".fa-bars:before{content:\"\\f0c9\"}.fa-unused:before{content:\"\\f000\"}" \
            ".used{color:red}.never-used{color:blue}"


def test_identical_files_are_not_copied_again(tmp_path):
    src, dest = tmp_path / "a.wasm", tmp_path / "out.wasm"
    src.write_bytes(b"x" * 1000)
    webdemo.copy_if_changed(src, dest)
    os.utime(dest, ns=(1, 1))  # 写し直したら時刻が変わる
    webdemo.copy_if_changed(src, dest)
    assert dest.stat().st_mtime_ns == 1
    src.write_bytes(b"y" * 1000)  # 大きさが同じでも、中身が違えば写す
    webdemo.copy_if_changed(src, dest)
    assert dest.read_bytes() == src.read_bytes()


@pytest.fixture
def site(tmp_path):
    out = tmp_path / "html"
    (out / "_static" / "styles").mkdir(parents=True)
    (out / "book").mkdir()
    (out / "book" / "a.html").write_text('<i class="fa-bars used"></i>', encoding="utf-8")
    (out / "_static" / "styles" / "pydata-sphinx-theme.css").write_text(THEME_CSS,
                                                                        encoding="utf-8")
    return out


def test_site_shrinking_is_reused_until_an_input_changes(site, tmp_path, monkeypatch):
    calls = []
    real_purge = reader_fixes.purge_theme_css
    monkeypatch.setattr(reader_fixes, "purge_theme_css",
                        lambda outdir: (calls.append(1), real_purge(outdir)))
    state = tmp_path / "doctrees" / "reader_fixes.json"
    css = site / "_static" / "styles" / "pydata-sphinx-theme.css"
    assert reader_fixes.shrink_site(site, state) is True
    purged = css.read_text(encoding="utf-8")
    assert ".never-used" not in purged and ".used" in purged
    # 変更のない再ビルド: Sphinx が元の CSS を写し直しても、前回の結果を書くだけ
    css.write_text(THEME_CSS, encoding="utf-8")
    assert reader_fixes.shrink_site(site, state) is False
    assert css.read_text(encoding="utf-8") == purged and len(calls) == 1
    assert reader_fixes.shrink_site(site, state) is False  # 写し直さなかったときも同じ
    # ページが変わったら (新しい class を使う)、やり直す
    (site / "book" / "a.html").write_text('<i class="fa-bars used never-used"></i>',
                                          encoding="utf-8")
    css.write_text(THEME_CSS, encoding="utf-8")
    assert reader_fixes.shrink_site(site, state) is True
    assert ".never-used" in css.read_text(encoding="utf-8") and len(calls) == 2
    # テーマの CSS が変わったときも、やり直す
    css.write_text(THEME_CSS + ".used{margin:0}", encoding="utf-8")
    assert reader_fixes.shrink_site(site, state) is True and len(calls) == 3


def test_only_the_pages_written_in_this_build_are_fixed(site):
    page = site / "book" / "a.html"
    other = site / "book" / "b.html"
    raw = '<script defer src="../_static/scripts/fontawesome.js?v=1"></script>'
    page.write_text(raw, encoding="utf-8")
    other.write_text(raw, encoding="utf-8")
    assert reader_fixes.fix_pages(site, [page]) == 1
    assert "fontawesome.js" not in page.read_text(encoding="utf-8")
    assert other.read_text(encoding="utf-8") == raw  # 書かなかったページには触れない
    assert reader_fixes.fix_pages(site) == 1  # 省けば、すべてのページ
    assert reader_fixes.fix_pages(site) == 0  # 直したページは、もう変わらない


def test_changing_the_extension_forces_a_full_rewrite():
    """env_version は reader_fixes.py の中身から決まる (変えれば Sphinx が全ページを書き直す)。"""

    class App:
        def __init__(self):
            self.events = []

        def connect(self, event, fn, priority=500):
            self.events.append(event)

    app = App()
    meta = reader_fixes.setup(app)
    text = Path(reader_fixes.__file__).read_bytes()
    assert meta["env_version"] == int(reader_fixes._sha(text)[:8], 16)
    assert "html-page-context" in app.events  # 書いたページを覚える


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("jupyter-book") is None, reason="jupyter-book が入っていません")
def test_real_rebuild_reuses_the_shrinking_and_keeps_pages_fixed(tmp_path):
    """本物の jupyter-book で 2 回ビルドする: 2 回目も CSS は縮んだまま、ページは直ったまま。"""
    (tmp_path / "_config.yml").write_text(
        "title: t\nexecute:\n  execute_notebooks: 'off'\nsphinx:\n  local_extensions:\n"
        f"    reader_fixes: {ROOT / '_ext'}\n", encoding="utf-8")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: a\nchapters:\n- file: b\n",
                                       encoding="utf-8")
    (tmp_path / "a.md").write_text("# A\n\n本文\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# B\n\n本文\n", encoding="utf-8")
    out = tmp_path / "_build" / "html"
    css = out / "_static" / "styles" / "pydata-sphinx-theme.css"
    state = tmp_path / "_build" / ".doctrees" / "reader_fixes.json"

    def build() -> None:
        proc = subprocess.run([shutil.which("jupyter-book"), "build", str(tmp_path)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    build()
    first_css = css.read_text(encoding="utf-8")
    first_state = state.stat().st_mtime_ns
    page_b = (out / "b.html").read_text(encoding="utf-8")
    assert "fontawesome.js" not in page_b and "searchindex.js" not in page_b
    build()  # 変更なし
    assert css.read_text(encoding="utf-8") == first_css  # 写し直された CSS も縮んだまま
    assert state.stat().st_mtime_ns == first_state  # 縮小はやり直していない
    assert (out / "b.html").read_text(encoding="utf-8") == page_b
    (tmp_path / "b.md").write_text("# B\n\n本文を変えた\n", encoding="utf-8")
    build()  # ページが変われば、直してから縮小もやり直す
    page_b = (out / "b.html").read_text(encoding="utf-8")
    assert "本文を変えた" in page_b and "fontawesome.js" not in page_b


def test_toc_scan_skips_excluded_folders_with_the_same_result(tmp_path):
    """除外したフォルダーに入らない走査も、除外されていないファイルは glob と同じだけ返す。"""
    import glob

    from sphinx.util.matching import Matcher

    for rel in ("a.md", "book/b.md", "book/c.ipynb", "node_modules/x/readme.md",
                "_build/html/d.md", "book/.hidden/e.md", ".f.md", "book/sub/g.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    excluded = Matcher(["_build", "node_modules", "**/.ipynb_checkpoints"])
    pruned = fast_toc.PrunedGlob(str(tmp_path), excluded)
    pattern = str(tmp_path / "**" / "*.md")
    expected = {p for p in glob.iglob(pattern, recursive=True)
                if not any(excluded("/".join(Path(p).relative_to(tmp_path).parts[:i + 1]))
                           for i in range(len(Path(p).relative_to(tmp_path).parts)))}
    assert set(pruned.iglob(pattern, recursive=True)) == expected
    assert {Path(p).name for p in expected} == {"a.md", "b.md", "g.md"}
    # ほかの形のパターンは glob に任せる
    other = str(tmp_path / "book" / "*.ipynb")
    assert list(pruned.iglob(other)) == glob.glob(other)
