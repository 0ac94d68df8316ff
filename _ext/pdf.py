"""PDF 版 (``jupyter-book build . --builder pdflatex``) のための Sphinx 拡張。

1. LaTeX の設定: sphinx-jupyterbook-latex は部・章の組み立てに使いますが、その拡張が
   書き換える組版エンジン (xelatex 固定) と XeTeX 専用のプリアンブル (ucharclasses) を、
   _config.yml の ``latex.latex_engine`` (lualatex、LuaTeX-ja) と本書のプリアンブルに戻します。
2. PDF で動かないもの: ブラウザーで動くデモ (``<div class="torchbook-demo">``、生の HTML と
   セルの HTML 出力) は、Web 版のページの URL を示す短い注記に置き換えます。それ以外の生の HTML や、
   PDF に載せられる形の無いセルの出力は、黙って消えないようにビルドの警告にします
   (CI は警告をエラーにします)。
3. 折りたたみの解答: ``hide-cell`` のセル (解答のコード) は、sphinx-jupyterbook-latex が PDF から
   消してしまいます。PDF では「解答のコード」という見出しを付けて、そのまま載せます。
   ``:class: dropdown`` の解答 (admonition) は、LaTeX では普通の囲みとして中身ごと出ます。
   ``hide-input`` のセル (図を描くだけのコード) は、Web 版で閉じているとおり、PDF でも出力だけです。
4. Web 版の各ページから PDF へのリンク: PDF (``_build/latex/torchbook.pdf``) があるときだけ、
   HTML のビルドがそれをサイトの ``_downloads/torchbook.pdf`` に写し、テーマのダウンロードの
   メニューに「PDF 版 (本全体)」を加えます。PDF が無ければリンクは出さないので、リンク切れは
   起きません (CI は PDF を作った後で HTML をもう一度書き出します: .ci/run)。
"""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging

logger = logging.getLogger(__name__)

PDF_NAME = "torchbook.pdf"  # _config.yml の latex.latex_documents.targetname と同じ名前
SITE_PDF = f"_downloads/{PDF_NAME}"  # サイトの中の置き場所 (どのページからも同じ)
DEMO = re.compile(r'class="torchbook-demo"[^>]*data-demo="([a-z0-9-]+)"')
COMMENT = re.compile(r"<!--.*?-->", re.S)
# text/plain しか残らないとき、その中身がオブジェクトの表示だけなら、PDF では中身が失われる
# これより行の多い表は PDF でページをまたげるようにする (1 ページの 3 分の 1 ほど)
LONG_TABLE_ROWS = 8
OBJECT_REPR = re.compile(r"^<[\w.]+ (object|at 0x[0-9a-f]+)[^>]*>$")
# myst-nb が LaTeX で選べる出力の形 (text/plain 以外)。SVG は _config.yml で加えたもの
PDF_MIMES = ("application/pdf", "image/png", "image/jpeg", "image/svg+xml", "text/latex",
             "text/markdown")
JBLATEX_PREAMBLE = re.compile(
    r"\s*% Start of preamble defined in sphinx-jupyterbook-latex %.*?"
    r"% End of preamble defined in sphinx-jupyterbook-latex %\s*", re.S)


def built_pdf(outdir: str | Path) -> Path:
    """HTML の出力フォルダー (_build/html) から見た、PDF のビルドの成果物の場所。"""
    return Path(outdir).parent / "latex" / PDF_NAME


def site_url(config: Config) -> str | None:
    """Web 版の URL (末尾は /)。html.baseurl、なければ BOOK_REPOSITORY の GitHub Pages。"""
    base = (getattr(config, "html_baseurl", "") or "").strip()
    if base:
        return base.rstrip("/") + "/"
    repo = os.environ.get("BOOK_REPOSITORY", "").strip().strip("/")
    parts = repo.split("/")
    if len(parts) == 2 and all(parts):
        return f"https://{parts[0].lower()}.github.io/{parts[1]}/"
    return None


def page_address(config: Config, docname: str) -> str:
    """ページの Web 版の URL。URL が分からなければ、サイトの中のページの名前。"""
    base = site_url(config)
    return f"{base}{docname}.html" if base else f"{docname}.html"


def demo_note(config: Config, docname: str, names: list[str],
              title: str = "") -> nodes.admonition:
    """デモの代わりに PDF に載せる注記。"""
    address = page_address(config, docname)
    note = nodes.admonition(classes=["note", "pdf-demo-note"])
    note += nodes.title("", "ブラウザーで動くデモ")
    para = nodes.paragraph()
    page = f"Web 版の「{title}」のページ" if title else "Web 版のこのページ"
    para += nodes.Text(f"ここには、ブラウザーの中で動くデモ ({', '.join(names)}) があります。"
                       f"PDF では動かないので、{page}で試してください: ")
    if site_url(config):
        para += nodes.reference(address, address, refuri=address)
    else:
        para += nodes.literal(address, address)
    note += para
    return note


def demo_names(text: str) -> list[str]:
    found: list[str] = []
    for name in DEMO.findall(text):
        if name not in found:
            found.append(name)
    return found


class PdfDemos(SphinxPostTransform):
    """LaTeX だけ: デモを注記に置き換え、PDF で消える HTML を警告にします。

    myst-nb が出力の形 (mime type) を選ぶ前 (優先度 4) に動きます。
    """

    default_priority = 3
    formats = ("latex",)

    def run(self, **kwargs: Any) -> None:
        # LaTeX では全ページが 1 つの文書にまとまっています。ノードがどのページのものかは、
        # それを含むいちばん内側の start_of_file (ページの始まり) で決まります。
        # (Sphinx は children を付け替えるだけで parent を直さないので、上へはたどれない)
        page: dict[int, str] = {}
        for start in self.document.findall(addnodes.start_of_file):
            for node in start.findall(include_self=False):
                page[id(node)] = start["docname"]

        def note(node: nodes.Node, names: list[str]) -> nodes.admonition:
            docname = page.get(id(node), self.env.docname)
            title = self.env.titles[docname].astext() if docname in self.env.titles else ""
            return demo_note(self.config, docname, names, title)

        bundles = list(self.document.findall(_is_mime_bundle))
        in_bundle = {id(n) for bundle in bundles for n in bundle.findall()}
        # セルの出力 (形ごとの候補の束) を先に: 束の中の text/html も生の HTML のノードです
        for bundle in bundles:
            mimes = {child.get("mime_type"): child for child in bundle.children}
            html = mimes.get("text/html")
            if html is None:
                continue
            names = demo_names(html.astext())
            if names:
                bundle.replace_self(note(bundle, names))
                continue
            if any(m in mimes for m in PDF_MIMES):
                continue
            plain = mimes.get("text/plain")
            if plain is None or OBJECT_REPR.match(plain.astext().strip()):
                logger.warning("HTML だけのセルの出力は PDF に載りません。Markdown か画像で"
                               "出力するか、_ext/pdf.py で置き換えを決めてください",
                               location=bundle, type="pdf", subtype="html_output")
        for node in list(self.document.findall(nodes.raw)):
            if "html" not in node.get("format", "").split() or id(node) in in_bundle:
                continue
            names = demo_names(node.astext())
            if names:
                node.replace_self(note(node, names))
            elif COMMENT.sub("", node.astext()).strip():  # コメント (textlint の指示など) は除く
                logger.warning("生の HTML は PDF に載りません。PDF にも要る内容なら Markdown で"
                               "書くか、_ext/pdf.py で置き換えを決めてください",
                               location=node, type="pdf", subtype="raw_html")


def _is_mime_bundle(node: nodes.Node) -> bool:
    return isinstance(node, nodes.container) and node.get("nb_element") == "mime_bundle"


class PdfSolutions(SphinxPostTransform):
    """LaTeX だけ: hide-cell のセル (折りたたんだ解答のコード) を、見出しを付けて PDF に残します。

    sphinx-jupyterbook-latex の MystNbPostTransform (優先度 400) が消す前に動きます。
    """

    default_priority = 390
    formats = ("latex",)

    def run(self, **kwargs: Any) -> None:
        for cell in list(self.document.findall(nodes.container)):
            if "tag_hide-cell" not in cell.get("classes", []):
                continue
            cell["classes"].remove("tag_hide-cell")
            cell["classes"].append("pdf-shown-hidden-cell")
            label = solution_label(cell.get("prompt_show", ""))
            para = nodes.paragraph(classes=["pdf-hidden-cell-label"])
            para += nodes.strong(label, label)
            cell.parent.insert(cell.parent.index(cell), para)


class PdfLongTables(SphinxPostTransform):
    """LaTeX だけ: 行の多い表を longtable にして、ページをまたげるようにします。

    Sphinx は表を既定で分けられない箱 (tabulary) にします。ページの残りに入らない表は
    次のページへ送られ、前のページの下半分が空白になります。
    """

    default_priority = 400
    formats = ("latex",)

    def run(self, **kwargs: Any) -> None:
        for table in self.document.findall(nodes.table):
            if count_body_rows(table) > LONG_TABLE_ROWS and "longtable" not in table["classes"]:
                table["classes"].append("longtable")
                if "colwidths-given" not in table["classes"]:
                    set_column_widths(table)


def set_column_widths(table: nodes.table) -> None:
    """longtable の列幅を、列の中のいちばん長い文字列の幅に比例させます (折り返せる列)。

    幅を与えない longtable の列は折り返さない (l) ので、長い文を含む表がページの右へはみ出します。
    分けない箱 (tabulary) なら LaTeX が幅を決めますが、longtable ではここで決めます。
    """
    for tgroup in table.findall(nodes.tgroup):
        colspecs = [c for c in tgroup.children if isinstance(c, nodes.colspec)]
        widths = [1] * len(colspecs)
        for row in tgroup.findall(nodes.row):
            for i, entry in enumerate(row.children[: len(colspecs)]):
                widths[i] = max(widths[i], text_width(entry.astext()))
        for colspec, width in zip(colspecs, widths, strict=True):
            colspec["colwidth"] = min(max(width, 4), 80)  # 短すぎる列と長すぎる列をならす
    table["classes"].append("colwidths-given")


def text_width(text: str) -> int:
    """表示の幅 (全角の文字は 2)。"""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def count_body_rows(table: nodes.table) -> int:
    """表の本体 (見出しの行を除く) の行数。"""
    return sum(len(body.children) for body in table.findall(nodes.tbody))


def solution_label(prompt: str) -> str:
    """折りたたみのボタンの文言 (「解答のコードを表示」) から、PDF の見出し (「解答のコード」)。"""
    prompt = re.sub(r"\{type\}", "コード", prompt or "").strip()
    prompt = re.sub(r"を表示$", "", prompt)
    return prompt or "コード"


def _keep_engine(app: Sphinx, config: Config) -> None:
    # sphinx-jupyterbook-latex (優先度 500) が書き換える前の値を覚えておく
    app._pdf_engine = config.latex_engine  # type: ignore[attr-defined]
    app._pdf_secnum_depth = config.numfig_secnum_depth  # type: ignore[attr-defined]


def _keep_environment(app: Sphinx) -> None:
    """LaTeX のビルドでも、HTML のビルドと同じ設定の環境 (読んだページ) を保ちます。

    sphinx-jupyterbook-latex は LaTeX のビルドのときだけ numfig_secnum_depth を 2 にします。
    それが保存した環境に残ると、次の HTML のビルドが「設定が変わった」と全ページを読み直します。
    LaTeX の図や式の番号は LaTeX 自身が付けるので、元の値に戻しても PDF は変わりません。
    """
    if app.builder.format == "latex" and hasattr(app, "_pdf_secnum_depth"):
        app.config.numfig_secnum_depth = app._pdf_secnum_depth


def _latex_config(app: Sphinx, config: Config) -> None:
    """sphinx-jupyterbook-latex の後で、組版エンジンとプリアンブルを本書のものにします。"""
    engine = getattr(app, "_pdf_engine", None) or config.latex_engine
    config.latex_engine = engine
    # 日本語のクラス (latex_docclass の ltjsbook) を使う。jupyterBook.cls は欧文の report です
    config.latex_theme = "manual"
    elements = dict(config.latex_elements or {})
    elements["preamble"] = JBLATEX_PREAMBLE.sub("\n", elements.get("preamble", ""))
    config.latex_elements = elements


def _add_pdf_link(app: Sphinx, pagename: str, templatename: str, context: dict,
                  doctree: Any) -> None:
    """テーマのダウンロードのメニューに、本全体の PDF を加えます (サイトに PDF があるときだけ)."""
    if app.builder.format != "html" or not Path(app.outdir, SITE_PDF).is_file():
        return
    for group in context.get("header_buttons", []):
        if group.get("label") == "download-buttons":
            add_pdf_button(group["buttons"], context["pathto"](SITE_PDF, 1))
            return


def add_pdf_button(buttons: list[dict], url: str) -> None:
    """ダウンロードのメニューの先頭に、本全体の PDF へのリンクを加えます (2 度は加えない)。"""
    if any(b.get("label") == "download-book-pdf-button" for b in buttons):
        return
    buttons.insert(0, {
        "type": "link",
        "url": url,
        "text": "PDF 版 (本全体)",
        "tooltip": "本全体の PDF をダウンロード",
        "icon": "fas fa-file-pdf",
        "label": "download-book-pdf-button",
    })


def publish_pdf(html_outdir: str | Path) -> Path | None:
    """_build/latex の PDF を、サイトの _downloads/ に写します (無ければ何もせず None)。

    古い PDF が残らないよう、PDF が無くなったときはサイトの写しも消します。
    """
    src = built_pdf(html_outdir)
    dest = Path(html_outdir, SITE_PDF)
    if not src.is_file():
        dest.unlink(missing_ok=True)
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def _publish(app: Sphinx) -> None:
    # ページを書き出す前に写す (各ページはサイトに PDF があるかでリンクを決める)
    if app.builder.format == "html":
        publish_pdf(app.outdir)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _keep_engine, priority=400)
    app.connect("config-inited", _latex_config, priority=600)
    app.connect("builder-inited", _publish)
    app.connect("builder-inited", _keep_environment, priority=600)
    app.connect("html-page-context", _add_pdf_link, priority=503)
    app.add_post_transform(PdfDemos)
    app.add_post_transform(PdfSolutions)
    app.add_post_transform(PdfLongTables)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
