"""日本語の複合語を検索で見つけるための Sphinx 拡張。

Sphinx の日本語検索は、索引を作るときに文を単語に分けます (拡散モデル → 拡散 + モデル)。
ところが検索語は分けないので、「拡散モデル」や「勾配降下」で探すと見つかりません。

この拡張は、索引に単語のほかに日本語の 2 文字組 (bigram) も入れ、検索語も同じ 2 文字組に
分けます。ある語を本文に含むページには、その語のすべての 2 文字組があるので、必ず見つかります。
"""

from __future__ import annotations

import re

from sphinx.application import Sphinx
from sphinx.search.ja import SearchJapanese

JA_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uff66-\uff9f]{2,}")


def bigrams(text: str) -> list[str]:
    """日本語の文字が 2 つ以上続く部分の、すべての 2 文字組を返します。"""
    return [run[i : i + 2] for run in JA_RUN.findall(text) for i in range(len(run) - 1)]


# 検索語の分け方 (ブラウザー側)。索引と同じ 2 文字組にします。
JS_SPLITTER = r"""
var splitQuery = (query) => {
  const ja = /[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uff66-\uff9f]+/g;
  const terms = [];
  for (const word of query.split(/[^\p{Letter}\p{Number}_\p{Emoji_Presentation}]+/gu)) {
    if (!word) continue;
    const rest = word.replace(ja, " ").split(" ").filter((w) => w);
    terms.push(...rest);
    for (const run of word.match(ja) || []) {
      if (run.length === 1) terms.push(run);
      for (let i = 0; i + 1 < run.length; i++) terms.push(run.slice(i, i + 2));
    }
  }
  return terms;
};
"""


class SearchJapaneseBigram(SearchJapanese):
    js_splitter_code = JS_SPLITTER

    def split(self, input: str) -> list[str]:
        return super().split(input) + bigrams(input)


def setup(app: Sphinx) -> dict:
    app.add_search_language(SearchJapaneseBigram)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
