"""本の読む順の検査: 目次の順 = 前へ/次へ = 演習の番号、「前の章」「次の章」は本当の隣。

- 目次 (_toc.yml) を節まで含めて順にたどり、ページの並びを作ります (前へ/次への順)。
- 番号付きの章 (ファイル名が「06_...」のように数字で始まる) の演習は「演習 6-1」から
  1 ずつ増え、章の番号はファイル名の番号と同じです。演習の見出しは目次の順に並びます。
- 本文の「演習 6-2」のような参照は、実在する演習を指します。
- 「前の章「{doc}`x`」」「次の章「{doc}`x`」」の x は、目次の順で本当に隣のページです。
- 実行の順 (ファイル名の順) が目次の順と同じです (CONTRIBUTING の約束)。
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXERCISE = re.compile(r"^#+ 演習 (\d+)-(\d+)", re.M)
EXERCISE_REF = re.compile(r"演習 (\d+)-(\d+)")
NEIGHBOUR = re.compile(r"(?<!その)(前|次)の(?:章|節)「\{doc\}`([^`]+)`」")


def toc_pages(toc: dict) -> list[str]:
    """目次のページを、前へ/次へと同じ順 (親のあとに節) で返します。"""
    pages = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for e in entries:
            pages.append(e["file"])
            walk(e.get("sections", []))

    for part in toc.get("parts", []):
        walk(part["chapters"])
    walk(toc.get("chapters", []))
    return pages


def chapter_number(page: str) -> int | None:
    m = re.match(r"(\d+)_", Path(page).name)
    return int(m.group(1)) if m else None


def check(pages: list[str], texts: dict[str, str]) -> list[str]:
    """問題のリストを返します (空なら読む順がそろっています)。"""
    problems = []
    numbered = [p for p in pages if chapter_number(p) is not None]
    if [Path(p).name for p in numbered] != sorted(Path(p).name for p in numbered):
        problems.append(f"実行の順 (ファイル名の順) が目次の順と違います: {numbered}")
    defined = set()
    for page in pages:
        found = [(int(a), int(b)) for a, b in EXERCISE.findall(texts[page])]
        defined |= set(found)
        chapter = chapter_number(page)
        if found and chapter is None:
            problems.append(f"{page}: 番号の無いページに演習 {found} があります")
        elif found and found != [(chapter, i + 1) for i in range(len(found))]:
            problems.append(f"{page}: 演習の番号 {found} が {chapter}-1 から順に並んでいません")
    for page in pages:
        for a, b in EXERCISE_REF.findall(texts[page]):
            if (int(a), int(b)) not in defined:
                problems.append(f"{page}: 演習 {a}-{b} はどのページにもありません")
        i = pages.index(page)
        for which, target in NEIGHBOUR.findall(texts[page]):
            want = pages[i - 1] if which == "前" else pages[i + 1] if i + 1 < len(pages) else None
            if want is None or Path(want).name != Path(target).name:
                problems.append(f"{page}: 「{which}の章」が {target} を指しています (隣は {want})")
    return problems


def test_book_reading_order():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    pages = toc_pages(toc)
    texts = {p: (ROOT / f"{p}.md").read_text(encoding="utf-8") for p in pages}
    assert check(pages, texts) == []


def test_check_finds_a_wrong_order():
    """検査そのものが、番号の飛び・存在しない参照・隣でない「前の章」を見つけること。"""
    pages = ["book/00_intro", "book/06_a", "book/07_b"]
    texts = {
        "book/00_intro": "",
        "book/06_a": "### 演習 6-1 x\n### 演習 6-3 y\n演習 6-4 で調べます。",
        "book/07_b": "前の章「{doc}`00_intro`」では\n### 演習 7-1 z\n",
    }
    problems = check(pages, texts)
    assert any("6-1 から順に" in p for p in problems)
    assert any("演習 6-4 はどのページにもありません" in p for p in problems)
    assert any("前の章" in p for p in problems)
    assert check(pages, {**texts, "book/06_a": "### 演習 6-1 x\n",
                         "book/07_b": "前の章「{doc}`06_a`」\n### 演習 7-1 z\n"}) == []
