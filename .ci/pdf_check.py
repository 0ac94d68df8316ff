"""PDF 版 (jupyter-book build . --builder pdflatex) を、読者の目で確かめます。

- LaTeX のログに「Missing character」(字形の無い文字、PDF では欠ける) が 1 つも無い
- pdffonts で、埋め込まれていないフォントが 1 つも無い
- ページ数、大きさ、ビルドの時間を予算と並べて表示する (大きさだけは超えたら失敗。時間は
  計算機の混み具合で変わるので表示だけ)
- 章の始まり、数式、図、コード、表のページを PNG にする (--png フォルダー)。人が見て確かめます
- --html: サイトのすべてのページが PDF にリンクし、リンク先のファイルがある

    python .ci/pdf_check.py _build/latex/torchbook.pdf --seconds 300 --png _build/pdf-pages
    python .ci/pdf_check.py --html _build/html
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

SIZE_BUDGET_MB = 40.0  # 超えたら失敗 (図の PNG が大きくなりすぎていないか)
PAGES_BUDGET = 400  # 表示だけ
SECONDS_BUDGET = 900  # 表示だけ (2 コアの CI で、HTML のビルドの後に)
SITE_PDF = "_downloads/torchbook.pdf"  # _ext/pdf.py の SITE_PDF
MISSING = re.compile(r"^Missing character: There is no (.+?) in font (.+?)!?$", re.M)
TOOLS = ("pdffonts", "pdfinfo", "pdftotext", "pdftoppm", "pdfimages")


def missing_characters(log_text: str) -> list[str]:
    """LaTeX のログの「Missing character」を、重複なしで出てきた順に返します。"""
    found: list[str] = []
    for char, font in MISSING.findall(log_text):
        item = f"{char} ({font.split(':')[0].strip('[]')})"
        if item not in found:
            found.append(item)
    return found


def unembedded_fonts(pdffonts_output: str) -> list[str]:
    """pdffonts の表から、埋め込まれていない (emb が no) フォントの名前を返します。"""
    lines = pdffonts_output.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("name ")), None)
    if header is None or header + 1 >= len(lines):
        return []
    # 列の位置は区切りの行 (---- ----) で決まる (名前や種類に空白が入ることがある)
    spans = [m.span() for m in re.finditer(r"-+", lines[header + 1])]
    titles = lines[header].split()
    emb = titles.index("emb")
    bad = []
    for line in lines[header + 2:]:
        if not line.strip():
            continue
        cells = [line[a:b if i < len(spans) - 1 else None].strip()
                 for i, (a, b) in enumerate(spans)]
        if cells[emb] != "yes":
            bad.append(cells[0])
    return bad


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def page_texts(pdf: Path, pages: int) -> list[str]:
    """各ページの文字 (1 ページ目が [0])。"""
    text = run("pdftotext", "-layout", "-f", "1", "-l", str(pages), str(pdf), "-")
    return text.split("\f")[:pages]


def pages_with_images(pdf: Path) -> list[int]:
    out = run("pdfimages", "-list", str(pdf))
    pages = []
    for line in out.splitlines()[2:]:
        parts = line.split()
        if parts and parts[0].isdigit() and int(parts[0]) not in pages:
            pages.append(int(parts[0]))
    return pages


def sample_pages(pdf: Path, texts: list[str], log_text: str) -> dict[str, int]:
    """目で確かめるページ (章の始まり、数式、図、コード、表) を選びます。"""
    def first(pattern: str, start: int = 0) -> int | None:
        for i, text in enumerate(texts[start:], start=start):
            if re.search(pattern, text, re.M):
                return i + 1
        return None

    picked: dict[str, int] = {}
    body = first(r"^\s*第\s*1\s*章") or 1  # 目次の後の最初の章
    chapter = first(r"^\s*第\s*2\s*章", body) or body
    picked["chapter"] = chapter
    images = [p for p in pages_with_images(pdf) if p >= body]
    if images:
        picked["figure"] = images[len(images) // 2]
    # 数式: 変数名のイタリック (CMMI) を使うページのうち、数式の多いもの
    best, best_count = None, 0
    for page in range(body, len(texts) + 1, 2):
        fonts = run("pdffonts", "-f", str(page), "-l", str(page), str(pdf))
        count = texts[page - 1].count("(") if "CMMI" in fonts and "CMEX" in fonts else 0
        if count > best_count:
            best, best_count = page, count
    if best:
        picked["equations"] = best
    # コード: 日本語のコメント (行末の # コメント) が 3 行以上あるページ
    comment = re.compile(r"^\s*\S.*\s#\s*[\u3040-\u30ff\u4e00-\u9fff]", re.M)
    code = next((i + 1 for i, t in enumerate(texts) if i + 1 >= body
                 and len(comment.findall(t)) >= 3), None)
    if code:
        picked["code"] = code
    # 表: プリアンブル (_config.yml) が、表を出したページの番号をログに書いている
    tables = [p for p in table_pages(log_text) if p >= body]
    if tables:
        picked["table"] = tables[0]
    return picked


def table_pages(log_text: str) -> list[int]:
    """LaTeX のログの「pdfcheck:table:ページ」から、表のあるページ (重複なし、順に)。"""
    return sorted({int(p) for p in re.findall(r"pdfcheck:table:(\d+)", log_text)})


def check_pdf(pdf: Path, log: Path, seconds: int | None, png: Path | None) -> int:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"{', '.join(missing)} がありません。poppler-utils を入れてください "
              "(bash scripts/setup.sh が Debian/Ubuntu で入れます)", file=sys.stderr)
        return 2
    if not pdf.is_file():
        print(f"{pdf} がありません。先に jupyter-book build . --builder pdflatex を"
              "実行してください", file=sys.stderr)
        return 2
    errors = []
    log_text = log.read_text(encoding="utf-8", errors="replace")
    chars = missing_characters(log_text)
    if chars:
        errors.append(f"字形の無い文字が {len(chars)} 種類あります ({log}): "
                      + "、".join(chars[:20]))
    fonts = run("pdffonts", str(pdf))
    bad = unembedded_fonts(fonts)
    if bad:
        errors.append("埋め込まれていないフォントがあります: " + ", ".join(bad))
    info = run("pdfinfo", str(pdf))
    pages = int(re.search(r"^Pages:\s+(\d+)", info, re.M).group(1))
    size_mb = pdf.stat().st_size / 1e6
    n_fonts = len(fonts.splitlines()) - 2
    embedded = "すべて埋め込み済み" if not bad else f"うち {len(bad)} 個が埋め込まれていない"
    print(f"PDF: {pdf} ({pages} ページ、{size_mb:.1f} MB、フォント {n_fonts} 個は{embedded})")
    print(f"  ページ数 {pages} (予算 {PAGES_BUDGET}、表示だけ)")
    print(f"  大きさ {size_mb:.1f} MB (予算 {SIZE_BUDGET_MB:.0f} MB)")
    if seconds is not None:
        print(f"  ビルドの時間 {seconds} 秒 (予算 {SECONDS_BUDGET} 秒、"
              "計算機の混み具合で変わるので表示だけ)")
    if size_mb > SIZE_BUDGET_MB:
        errors.append(f"PDF が {size_mb:.1f} MB で、予算 {SIZE_BUDGET_MB:.0f} MB を超えました")
    if png is not None:
        png.mkdir(parents=True, exist_ok=True)
        texts = page_texts(pdf, pages)
        for name, page in sample_pages(pdf, texts, log_text).items():
            prefix = png / f"{name}-p{page}"
            run("pdftoppm", "-png", "-r", "80", "-singlefile", "-f", str(page), "-l", str(page),
                str(pdf), str(prefix))
            print(f"  {name}: {page} ページ目 → {prefix}.png")
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


def check_html(html: Path) -> int:
    """サイトのすべてのページに、本全体の PDF へのリンクがあり、リンク先があることを確かめます。"""
    target = html / SITE_PDF
    if not target.is_file():
        print(f"{target} がありません (PDF を作ってから HTML をビルドし直してください)",
              file=sys.stderr)
        return 1
    pages = [p for p in html.rglob("*.html") if "_static" not in p.parts]
    without: list[str] = []
    linked = 0
    for page in pages:
        text = page.read_text(encoding="utf-8", errors="replace")
        if "download-book-pdf-button" not in text:
            # ダウンロードのメニューがあるページ (本文のページ。検索と索引のページには無い)
            if "download-source-button" in text:
                without.append(page.relative_to(html).as_posix())
            continue
        linked += 1
        hrefs = re.findall(r'href="([^"]*torchbook\.pdf)"', text)
        if not hrefs or any((page.parent / h).resolve() != target.resolve() for h in hrefs):
            without.append(f"{page.relative_to(html).as_posix()} (リンク先 {hrefs})")
    if without:
        print("PDF へのリンクが無いか、リンク先が違うページ: " + ", ".join(without),
              file=sys.stderr)
        return 1
    size_mb = target.stat().st_size / 1e6
    if linked == 0:
        print("PDF にリンクしているページがありません", file=sys.stderr)
        return 1
    print(f"本文の {linked} ページすべてが PDF ({size_mb:.1f} MB) にリンクしています "
          f"(ダウンロードのメニューの無い {len(pages) - linked} ページ: 検索、索引)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pdf", nargs="?", type=Path, help="PDF (例: _build/latex/torchbook.pdf)")
    parser.add_argument("--log", type=Path, help="LaTeX のログ (既定: PDF と同じ名前の .log)")
    parser.add_argument("--seconds", type=int, help="PDF のビルドにかかった秒数 (表示用)")
    parser.add_argument("--png", type=Path, help="見本のページの PNG を置くフォルダー")
    parser.add_argument("--html", type=Path, help="サイトのフォルダー (PDF へのリンクを確かめる)")
    args = parser.parse_args(argv)
    if args.pdf is None and args.html is None:
        parser.error("PDF (_build/latex/torchbook.pdf) か --html _build/html を指定してください")
    status = 0
    if args.pdf is not None:
        status |= check_pdf(args.pdf, args.log or args.pdf.with_suffix(".log"), args.seconds,
                            args.png)
    if args.html is not None:
        status |= check_html(args.html)
    return status


if __name__ == "__main__":
    sys.exit(main())
