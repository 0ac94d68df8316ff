"""PDF 版のための Sphinx 拡張 (_ext/pdf.py)。

小さな本 (ノートブック 1 つ) を Sphinx の LaTeX ビルダーで .tex にして、デモの注記、
折りたたんだ解答のコード、PDF で消える HTML の警告を確かめます (TeX は使いません)。
本全体の PDF の組版 (字形の欠け、フォントの埋め込み) は .ci/pdf_check.py が確かめます。
"""

import json
import sys
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "_ext"))
import pdf  # noqa: E402

DEMO = '<div class="torchbook-demo" data-demo="mnist"><p>JavaScript が必要です。</p></div>'


def notebook(extra_html_output: bool) -> dict:
    def code(source, outputs, tags=(), prompt=None):
        meta = {"tags": list(tags)}
        if prompt:
            meta["mystnb"] = {"code_prompt_show": prompt}
        return {"cell_type": "code", "execution_count": 1, "metadata": meta,
                "outputs": outputs, "source": source}

    def display(data):
        return {"output_type": "display_data", "data": data, "metadata": {}}

    cells = [
        {"cell_type": "markdown", "metadata": {},
         "source": "# 章\n\n## 演習\n\n<!-- textlint-disable -->\n本文です。\n"
                   "<!-- textlint-enable -->\n"},
        {"cell_type": "markdown", "metadata": {}, "source": f"```{{raw}} html\n{DEMO}\n```\n"},
        code("show_demo()", [display({
            "text/html": DEMO.replace("mnist", "diffusion"),
            "text/plain": "<IPython.core.display.HTML object>"})]),
        {"cell_type": "markdown", "metadata": {},
         "source": "| 列 | 値 |\n|---|---|\n" + "".join(f"| {i} | {i * i} |\n" for i in range(12))
                   + "\n| 短 | 表 |\n|---|---|\n| 1 | 2 |\n"},
        {"cell_type": "markdown", "metadata": {},
         "source": "```{admonition} 解答\n:class: dropdown\n解答の説明の文です。\n```\n"},
        code("# 解答のコメント\nanswer = 42", [
            {"output_type": "stream", "name": "stdout", "text": "解答の出力 42\n"}],
            tags=["hide-cell"], prompt="解答のコードを表示"),
    ]
    if extra_html_output:
        cells.append(code("table()", [display({
            "text/html": "<table><tr><td>1</td></tr></table>",
            "text/plain": "<pandas.io.formats.style.Styler at 0x7f00>"})]))
        cells.append({"cell_type": "markdown", "metadata": {},
                      "source": "```{raw} html\n<p>大事な文</p>\n```\n"})
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3",
            "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def build_latex(tmp_path, monkeypatch, *, extra_html_output=False, baseurl="",
                repository=None, **overrides):
    """小さな本を LaTeX にして (.tex の中身, 警告) を返します。"""
    from sphinx.application import Sphinx

    if repository is None:
        monkeypatch.delenv("BOOK_REPOSITORY", raising=False)
    else:
        monkeypatch.setenv("BOOK_REPOSITORY", repository)
    src = tmp_path / "src"
    src.mkdir(parents=True)
    # 本の最初のページ (index) と、デモのある章 (chapter): LaTeX では 1 つの文書にまとまる
    (src / "index.md").write_text("# 本\n\n```{toctree}\nchapter\n```\n", encoding="utf-8")
    (src / "chapter.ipynb").write_text(json.dumps(notebook(extra_html_output)),
                                       encoding="utf-8")
    (src / "conf.py").write_text("", encoding="utf-8")
    warnings = StringIO()
    app = Sphinx(str(src), str(src), str(tmp_path / "out"), str(tmp_path / "doctrees"),
                 "latex", status=None, warning=warnings, freshenv=True,
                 confoverrides={
                     "extensions": ["myst_nb", "sphinx_jupyterbook_latex", "pdf"],
                     "language": "ja", "html_baseurl": baseurl,
                     "nb_execution_mode": "off", "jblatex_load_imgconverter": False,
                     "latex_engine": "lualatex",
                     "latex_documents": [("index", "book.tex", "本", "著者", "manual")],
                     **overrides,
                 })
    app.build()
    build_latex.config = app.config
    return (tmp_path / "out" / "book.tex").read_text(encoding="utf-8"), warnings.getvalue()


def test_demos_become_a_note_with_the_page_url(tmp_path, monkeypatch):
    tex, warnings = build_latex(tmp_path, monkeypatch, baseurl="https://example.org/book")
    # 生の HTML のデモも、セルの HTML 出力のデモも、PDF では注記になる
    assert tex.count("ブラウザーで動くデモ") == 2
    assert "(mnist)" in tex and "(diffusion)" in tex
    assert tex.count("Web 版の「章」のページで試してください") == 2  # デモのあるページの題
    assert r"\sphinxurl{https://example.org/book/chapter.html}" in tex
    assert "IPython.core.display.HTML" not in tex  # オブジェクトの表示は載せない
    assert "JavaScript が必要です" not in tex
    assert "生の HTML" not in warnings and "HTML だけ" not in warnings


def test_demo_note_uses_the_github_pages_url_or_the_page_name(tmp_path, monkeypatch):
    tex, _ = build_latex(tmp_path, monkeypatch, repository="Owner/torchbook")
    assert r"\sphinxurl{https://owner.github.io/torchbook/chapter.html}" in tex
    tex, _ = build_latex(tmp_path / "local", monkeypatch)
    assert r"\sphinxcode{\sphinxupquote{chapter.html}}" in tex and "sphinxurl" not in tex


def test_hidden_solution_code_is_printed_with_a_label(tmp_path, monkeypatch):
    tex, _ = build_latex(tmp_path, monkeypatch)
    assert "解答のコメント" in tex and "解答の出力 42" in tex
    # 折りたたみの解答 (dropdown) は、開いた囲みとして中身ごと
    assert r"\begin{sphinxadmonition}{note}{解答}" in tex and "解答の説明の文です。" in tex
    assert r"\sphinxstylestrong{解答のコード}" in tex  # 折りたたみのボタンの文言からの見出し


def test_long_tables_can_break_across_pages(tmp_path, monkeypatch):
    # 12 行の表は longtable (ページをまたげる)、1 行の表は分けない箱のまま
    tex, _ = build_latex(tmp_path, monkeypatch)
    assert tex.count(r"\begin{longtable}") == 1
    assert tex.count(r"\begin{tabulary}") == 1
    # longtable の列は折り返せる幅 (\X) で、はみ出さない (l の列は折り返さない)
    spec = tex.split(r"\begin{longtable}", 1)[1].split("\n", 1)[0]
    assert r"\X{" in spec and "{ll}" not in spec.replace("|", ""), spec


def test_html_that_would_vanish_from_the_pdf_is_a_warning(tmp_path, monkeypatch):
    tex, warnings = build_latex(tmp_path, monkeypatch, extra_html_output=True)
    assert "生の HTML は PDF に載りません" in warnings
    assert "HTML だけのセルの出力は PDF に載りません" in warnings


def test_latex_engine_and_theme_survive_jupyterbook_latex(tmp_path, monkeypatch):
    tex, _ = build_latex(tmp_path, monkeypatch)
    assert "ucharclasses" not in tex  # XeTeX 専用のパッケージを読まない
    assert (tmp_path / "out" / "latexmkrc").read_text().count("lualatex") >= 1


def test_latex_build_keeps_the_html_numbering_setting_of_the_environment(tmp_path, monkeypatch):
    # sphinx-jupyterbook-latex は部を作るとき numfig_secnum_depth を 2 にする。環境に残ると、
    # 次の HTML のビルドが全ページを読み直すので、元の値 (1) に戻っていること
    build_latex(tmp_path, monkeypatch, jblatex_captions_to_parts=True)
    assert build_latex.config.latex_toplevel_sectioning == "part"  # 部は作る
    assert build_latex.config.numfig_secnum_depth == 1


@pytest.mark.parametrize(("prompt", "label"), [
    ("解答のコードを表示", "解答のコード"), ("Show code {type}", "Show code コード"),
    ("", "コード")])
def test_solution_label(prompt, label):
    assert pdf.solution_label(prompt) == label


def test_site_url(monkeypatch):
    monkeypatch.delenv("BOOK_REPOSITORY", raising=False)
    assert pdf.site_url(SimpleNamespace(html_baseurl="")) is None
    assert pdf.page_address(SimpleNamespace(html_baseurl=""), "book/05_mnist") == (
        "book/05_mnist.html")
    monkeypatch.setenv("BOOK_REPOSITORY", "bad")
    assert pdf.site_url(SimpleNamespace(html_baseurl="")) is None
    assert pdf.site_url(SimpleNamespace(html_baseurl="https://a.example/x")) == (
        "https://a.example/x/")


def test_pdf_button_is_added_once_at_the_top():
    buttons = [{"label": "download-source-button"}]
    pdf.add_pdf_button(buttons, "../_downloads/torchbook.pdf")
    pdf.add_pdf_button(buttons, "../_downloads/torchbook.pdf")
    assert [b["label"] for b in buttons] == ["download-book-pdf-button",
                                             "download-source-button"]
    assert buttons[0]["url"] == "../_downloads/torchbook.pdf"


def test_publish_pdf_copies_only_an_existing_pdf_and_drops_a_stale_copy(tmp_path):
    html = tmp_path / "_build" / "html"
    html.mkdir(parents=True)
    assert pdf.publish_pdf(html) is None and not (html / pdf.SITE_PDF).exists()
    latex = tmp_path / "_build" / "latex"
    latex.mkdir()
    (latex / pdf.PDF_NAME).write_bytes(b"%PDF-1.5 new")
    dest = pdf.publish_pdf(html)
    assert dest == html / pdf.SITE_PDF and dest.read_bytes() == b"%PDF-1.5 new"
    assert sorted(p.name for p in dest.parent.iterdir()) == [pdf.PDF_NAME]  # 一時ファイルは残らない
    (latex / pdf.PDF_NAME).unlink()
    assert pdf.publish_pdf(html) is None and not dest.exists()  # 古い PDF へのリンクを残さない
