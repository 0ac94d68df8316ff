"""requirements ファイルのうち、この Python にまだ入っていないものを表示します。

    python scripts/requirements_status.py requirements-dev.txt
    python scripts/requirements_status.py --scripts requirements-dev.txt

足りない要件を 1 行に 1 つ表示し、足りないものがあれば終了コード 1 を返します。
``--scripts`` は、venv の外 (--system-site-packages で見える計算機の Python) に入っている要件の
コマンド (``jupyter-book`` など) を venv の bin にも作ります。作らないと、PATH で見つかるのが
外の Python のコマンドになり、本のビルドが venv ではない Python で動いてしまうからです。
``scripts/setup.sh`` はこれを使い、すべて入っていれば pip を呼びません
(2 回目以降の準備はネットワークなしで済みます)。本書のコード (torchbook) が
このチェックアウトから編集可能モードで入っているかも確かめます (足りなければ ``-e <repo>``)。
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # 新しい venv には packaging がないので、pip に同梱のものを使う
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement

REPO = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path) -> list[str]:
    """requirements ファイルの要件を、``-r`` で読む別のファイルも含めて返します。"""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            lines += requirement_lines(path.parent / line.split(maxsplit=1)[1])
        elif line.startswith("-"):
            raise ValueError(f"{path}: このスクリプトが読まない行です: {raw!r}")
        else:
            lines.append(line)
    return lines


def unmet(lines: list[str]) -> list[str]:
    """入っていない、または版が合わない要件を返します。"""
    missing = []
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise ValueError(f"要件を読めません: {line!r} ({e})") from e
        if req.marker is not None and not req.marker.evaluate():
            continue  # この環境には要らない要件
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(line)
    return missing


def editable_from(dist_name: str, repo: Path) -> bool:
    """``dist_name`` が ``repo`` から編集可能モードで入っていれば真を返します。"""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return False
    info = json.loads(dist.read_text("direct_url.json") or "{}")
    url = urlparse(info.get("url", ""))
    if not info.get("dir_info", {}).get("editable") or url.scheme != "file":
        return False
    return Path(unquote(url.path)).resolve() == repo.resolve()


SCRIPT = """#!{python}
import re
import sys
from {module} import {attr}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({call}())
"""


def link_scripts(lines: list[str], bin_dir: Path) -> list[str]:
    """要件のコマンドのうち ``bin_dir`` にないものを、pip と同じ形で作り、その名前を返します。"""
    made = []
    for line in lines:
        try:
            dist = metadata.distribution(Requirement(line).name)
        except metadata.PackageNotFoundError:
            continue
        for ep in dist.entry_points:
            target = bin_dir / ep.name
            if ep.group != "console_scripts" or target.exists():
                continue
            attr = ep.attr.split(".")[0]
            target.write_text(SCRIPT.format(
                python=sys.executable, module=ep.module, attr=attr, call=ep.attr
            ))
            target.chmod(0o755)
            made.append(ep.name)
    return made


def main(argv: list[str]) -> int:
    if argv[:1] == ["--scripts"] and len(argv) == 2:
        if sys.prefix == sys.base_prefix:
            return 0  # venv でなければ、コマンドは pip が作った場所にある
        made = link_scripts(requirement_lines(Path(argv[1])), Path(sys.executable).parent)
        print(" ".join(made))
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    missing = unmet(requirement_lines(Path(argv[0])))
    if not editable_from("torchbook", REPO):
        missing.append(f"-e {REPO}")
    print("\n".join(missing))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
