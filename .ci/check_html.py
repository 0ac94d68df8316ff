"""ビルドした HTML を、読者の目で確かめます。

- すべてのページが ``lang="ja"`` である
- 図に豆腐がない (matplotlib の "Glyph ... missing" 警告がページに出ていない)
- すべての画像に、ファイル名ではない本当の代替テキストがある
- サイト内検索で「テンソル」が見つかる (検索索引に語がある)
- 各章の実行済みノートブック (.ipynb) がダウンロードできる
- 実行エラーの出力 (Traceback) が、意図したセル以外にない

    python .ci/check_html.py _build/html
"""

from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GENERIC_ALT = {"", "image", "png", "svg", "figure", "図", "画像", "output", "img"}


class ImageCollector(HTMLParser):
    """ページ内の <img> の src と alt、<html> の lang を集めます。"""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, str | None]] = []
        self.lang: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.lang = a.get("lang")
        elif tag == "img":
            self.images.append((a.get("src") or "", a.get("alt")))


def bad_alt(src: str, alt: str | None) -> str | None:
    """代替テキストが不十分なら理由を返します。"""
    if alt is None or alt.strip().lower() in GENERIC_ALT:
        return "代替テキストがありません"
    name = Path(src.split("?")[0]).name
    if alt.strip() == name or re.fullmatch(r"[\w\-./]+\.(png|svg|jpe?g|gif)", alt.strip()):
        return f"代替テキストがファイル名です ({alt})"
    if len(alt.strip()) < 6:
        return f"代替テキストが短すぎます ({alt})"
    return None


def chapters() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    return [toc["root"]] + [c["file"] for p in toc["parts"] for c in p["chapters"]]


def main(html_dir: Path) -> int:
    problems: list[str] = []
    pages = [
        p for p in html_dir.rglob("*.html") if not {"_static", "reports"} & set(p.parts)
    ]
    if not pages:
        print(f"{html_dir} に HTML がありません", file=sys.stderr)
        return 1
    n_images = 0
    for page in pages:
        text = page.read_text(encoding="utf-8")
        rel = page.relative_to(html_dir)
        if 'http-equiv="Refresh"' in text or "http-equiv=\"refresh\"" in text:
            continue  # index.html のリダイレクト
        parser = ImageCollector()
        parser.feed(text)
        if parser.lang != "ja":
            problems.append(f"{rel}: <html lang> が ja ではありません ({parser.lang})")
        if re.search(r"Glyph \d+.*missing", text):
            problems.append(f"{rel}: 図に日本語の字形がありません (Glyph ... missing)")
        if "Traceback (most recent call last)" in text and "raises-exception" not in text:
            problems.append(f"{rel}: 実行エラーの出力 (Traceback) があります")
        for src, alt in parser.images:
            n_images += 1
            why = bad_alt(src, alt)
            if why:
                problems.append(f"{rel}: <img src={src}>: {why}")
    index = (html_dir / "searchindex.js").read_text(encoding="utf-8")
    terms = json.loads(index[index.find("(") + 1 : index.rfind(")")])["terms"]
    if "テンソル" not in terms:
        problems.append("searchindex.js: 検索索引に「テンソル」がありません")
    for chapter in chapters():
        if not (ROOT / f"{chapter}.md").read_text(encoding="utf-8").startswith("---\njupytext"):
            continue  # ノートブックでない付録 (用語集など)
        ipynb = html_dir / "_sources" / f"{chapter}.ipynb"
        if not ipynb.exists():
            problems.append(f"{ipynb.relative_to(html_dir)}: 実行済みノートブックがありません")
    print(f"{len(pages)} ページ、画像 {n_images} 枚を検査しました")
    for p in problems:
        print("問題:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "_build/html")))
