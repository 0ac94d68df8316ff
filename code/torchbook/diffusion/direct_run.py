"""CLI のファイルを直接実行したとき (``python sample.py`` など) に、-m で実行するよう案内します。

CLI はこのフォルダーの中の相対 import (``from . import ...``) を使うので、パッケージとして
``python -m <パッケージ>.sample`` のように実行する必要があります。直接実行するとこのフォルダーが
``sys.path`` の先頭に入るので、CLI は ``import direct_run`` でこのモジュールを読めます。
読むと、正しいコマンドを 1 行で示して終了コード 2 (使い方の誤り) で止まります。
"""

import sys
from pathlib import Path

_file = Path(sys.argv[0]).resolve()
_top = _file.parents[1] if (_file.parents[1] / "__init__.py").is_file() else _file.parent
print(f"python -m {'.'.join(_file.relative_to(_top.parent).with_suffix('').parts)} のように"
      f" -m で実行してください (フォルダー {_top.parent} で)", file=sys.stderr)
raise SystemExit(2)
