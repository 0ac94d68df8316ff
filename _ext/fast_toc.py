"""目次にないファイルを探す sphinx-external-toc の走査を、除外したフォルダーに入らせない拡張。

only_build_toc_files: true のとき、sphinx-external-toc はビルドのたびにソースのフォルダー全体を
``glob("**/*.md")`` のように (拡張子ごとに) 走査し、目次にないファイルを exclude_patterns に
加えます。この走査は除外したフォルダー (node_modules の数万個のファイル、data、_build) にも
入るので、変更のない再ビルドでも時間の多くを占めていました。除外したフォルダーの中のファイルは、どのみち
結果に加わらない (すでに除外されている) ので、そこへ入らずに同じ結果を返します。

置き換えるのは sphinx-external-toc がその走査をする間 (config-inited) だけです。
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Callable, Iterator

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util.matching import Matcher


class PrunedGlob:
    """glob モジュールの代わり (iglob だけ)。srcdir の下の除外したフォルダーには入りません。

    ``<srcdir>/**/*<拡張子>`` の形 (sphinx-external-toc の使う形) だけを扱い、ほかは glob に
    任せます。
    glob と同じく、名前が . で始まるファイルとフォルダーは返さず、シンボリックリンクはたどります。
    """

    def __init__(self, srcdir: str, excluded: Callable[[str], bool]) -> None:
        self.srcdir = os.fspath(srcdir)
        self.excluded = excluded

    def iglob(self, pattern: str, recursive: bool = False, **kwargs) -> Iterator[str]:
        prefix = os.path.join(self.srcdir, "**", "*")
        rest = pattern[len(prefix):]
        if kwargs or not recursive or not pattern.startswith(prefix) or os.sep in rest:
            yield from glob.iglob(pattern, recursive=recursive, **kwargs)
            return
        name_pattern = "*" + rest
        for root, dirs, files in os.walk(self.srcdir, followlinks=True):
            rel = os.path.relpath(root, self.srcdir).replace(os.sep, "/")
            dirs[:] = sorted(
                d for d in dirs
                if not d.startswith(".")
                and not self.excluded(d if rel == "." else f"{rel}/{d}")
            )
            for f in sorted(files):
                if not f.startswith(".") and fnmatch.fnmatchcase(f, name_pattern):
                    yield os.path.join(root, f)


def _install(app: Sphinx, config: Config) -> None:
    from sphinx_external_toc import events

    events.glob = PrunedGlob(app.srcdir, Matcher(config.exclude_patterns))


def _restore(app: Sphinx, config: Config) -> None:
    try:
        from sphinx_external_toc import events
    except ImportError:
        return
    events.glob = glob


def setup(app: Sphinx) -> dict:
    try:
        import sphinx_external_toc  # noqa: F401
    except ImportError:
        return {"parallel_read_safe": True, "parallel_write_safe": True}
    # sphinx-external-toc の走査 (config-inited、優先度 900) の前に入れ、後で元に戻す
    app.connect("config-inited", _install, priority=800)
    app.connect("config-inited", _restore, priority=950)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
