"""本書の用語: 用語集 (book/glossary/*.md) の並び順と、表記の辞書 (prh.yml) のコードへの適用。"""

import io
import re
import tokenize
import unicodedata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GLOSSARIES = sorted((REPO / "book" / "glossary").glob("*.md"))
READING = re.compile(r"^\.\. よみ: (\S+)$")  # 用語の前の注釈 (Sphinx の glossary が読み飛ばす行)
KANA = re.compile(r"^[\u3041-\u3096\u30a1-\u30fa\u30fc]+$")
SMALL = str.maketrans("ぁぃぅぇぉっゃゅょゎゕゖ", "あいうえおつやゆよわかけ")


def kana_key(reading: str) -> str:
    """五十音順の鍵: カタカナはひらがなに、濁音・半濁音・小書きは清音にし、長音記号は除きます。"""
    hira = "".join(chr(ord(c) - 0x60) if "\u30a1" <= c <= "\u30f6" else c for c in reading)
    plain = "".join(c for c in unicodedata.normalize("NFD", hira) if c not in "\u3099\u309a")
    return unicodedata.normalize("NFC", plain).translate(SMALL).replace("ー", "")


def sort_key(head: str, reading: str | None) -> tuple:
    """英字で始まる用語を先に A〜Z の順で、その後に読みの五十音順で並べます。"""
    if reading is None and re.match(r"[A-Za-z0-9]", head):
        return (0, head.lower())
    reading = reading or head.replace("・", "").replace(" ", "")
    if not KANA.match(reading):
        raise ValueError(f"用語「{head}」の読みがありません (前の行に「.. よみ: ひらがな」)")
    return (1, kana_key(reading), reading)


def glossary_terms(path: Path) -> list[tuple[str, str | None]]:
    """用語集のファイルから、(用語の見出し, 読み) を書いてある順に返します。"""
    terms, reading = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := READING.match(line):
            reading = m.group(1)
        elif line and not line[0].isspace() and not line.startswith(("```", ":")):
            terms.append((line.split(" (")[0], reading))
            reading = None
    return terms


@pytest.mark.parametrize("path", GLOSSARIES, ids=lambda p: p.name)
def test_glossary_is_in_gojuon_order_by_reading(path):
    text = path.read_text(encoding="utf-8")
    assert ":sorted:" not in text, "Sphinx の :sorted: は文字コード順です。読みの順に手で並べます"
    terms = glossary_terms(path)
    assert terms
    keys = [sort_key(head, reading) for head, reading in terms]
    wrong = [f"{terms[i][0]} → {terms[i + 1][0]}" for i in range(len(keys) - 1)
             if keys[i] > keys[i + 1]]
    assert not wrong, f"{path.name} の並びが五十音順ではありません: {wrong}"


def test_the_order_check_catches_kanji_order_and_missing_readings(tmp_path):
    """漢字の文字コード順は読みの順と違うことがあります (尤度 < 期待値 だが、きたいち < ゆうど)。"""
    assert sort_key("尤度", "ゆうど") > sort_key("期待値", "きたいち")
    assert "尤度" < "期待値"  # 文字コード順では逆になる (だから :sorted: は使えない)
    assert sort_key("GPU", None) < sort_key("アブレーション", None)
    assert kana_key("バッチ") == kana_key("はつち") and kana_key("データ") == "てた"
    with pytest.raises(ValueError, match="読みがありません"):
        sort_key("尤度", None)
    page = tmp_path / "g.md"
    page.write_text("```{glossary}\n.. よみ: ゆうど\n尤度 (likelihood)\n  説明\n\n"
                    ".. よみ: きたいち\n期待値 (expectation)\n  説明\n```\n", encoding="utf-8")
    terms = glossary_terms(page)
    assert terms == [("尤度", "ゆうど"), ("期待値", "きたいち")]
    assert sort_key(*terms[0]) > sort_key(*terms[1])  # この順は誤りとして見つかる


def test_glossary_has_the_terms_the_text_relies_on():
    heads = {head for path in GLOSSARIES for head, _ in glossary_terms(path)}
    needed = {"正規分布", "ベイズの定理", "期待値", "尤度", "マルコフ連鎖", "活性化関数",
              "損失関数", "全結合層", "オイラー法", "常微分方程式", "ONNX"}
    assert needed <= heads, f"用語集にない: {sorted(needed - heads)}"


def prh_patterns() -> list[tuple[str, re.Pattern]]:
    """prh.yml の表記の規則を、(正しい表記, Python の正規表現) の組にします。"""
    rules = yaml.safe_load((REPO / "prh.yml").read_text(encoding="utf-8"))["rules"]
    out = []
    for rule in rules:
        patterns = rule["pattern"] if isinstance(rule["pattern"], list) else [rule["pattern"]]
        for p in patterns:
            regex = re.compile(p[1:-1]) if p.startswith("/") else re.compile(re.escape(p))
            out.append((rule["expected"], regex))
    return out


def comments_and_strings(path: Path) -> list[tuple[int, str]]:
    """日本語を含むコメントと文字列 (docstring、メッセージ)。JavaScript は // のコメント。"""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".js":
        found = [(i, line.split("//", 1)[1]) for i, line in enumerate(text.splitlines(), 1)
                 if "//" in line]
    else:
        tokens = tokenize.generate_tokens(io.StringIO(text).readline)
        found = [(t.start[0], t.string) for t in tokens
                 if t.type in (tokenize.COMMENT, tokenize.STRING)]
    return [(line, s) for line, s in found if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", s)]


def wording_problems(paths: list[Path], root: Path = REPO) -> list[str]:
    patterns = prh_patterns()
    return [f"{path.relative_to(root)}:{line}: {m.group(0)} → {expected}"
            for path in paths for line, text in comments_and_strings(path)
            for expected, regex in patterns for m in regex.finditer(text)]


def test_code_comments_follow_the_dictionary():
    """本に載るコードのコメント・docstring・メッセージも本文と同じ表記 (チャンネル …)。"""
    paths = sorted((REPO / "code").rglob("*.py")) + sorted((REPO / "_static").glob("*.js"))
    problems = wording_problems(paths)
    assert not problems, "\n".join(problems)


def test_the_dictionary_check_sees_comments_and_docstrings(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text('"""入力チャネルの数。"""\nx = 1  # パラメータの数\n', encoding="utf-8")
    assert wording_problems([bad], tmp_path) == ["m.py:1: チャネル → チャンネル",
                                                  "m.py:2: パラメータ → パラメーター"]
