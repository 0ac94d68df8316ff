#!/usr/bin/env bash
# GPU (CUDA) のある計算機で、GPU の経路のテスト (tests/test_gpu.py) とテスト全体を実行し、
# 結果をファイルに書きます。数分で終わります。GPU が無ければ 1 行で知らせて終了コード 2。
#
#   bash scripts/gpu_check.sh [結果のファイル]     # 既定: gpu-check-<日時>.txt
#
# 結果のファイルには、GPU と torch の情報、tests/test_gpu.py の結果 (1 件ずつ)、テスト全体の
# 最後の行、それぞれの所要時間を書きます。torch (CUDA 版) と requirements-dev.txt のものが
# 入った環境で実行してください (bash scripts/setup.sh --dev で用意できます)。
#
# 環境変数: GPU_CHECK_SUITE=0 でテスト全体を省き、GPU の経路だけを実行します。
#           GPU_CHECK_TIMEOUT はテスト全体の制限 (秒、既定 900)。
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ).txt}"
export PYTHONPATH="$PWD/code${PYTHONPATH:+:$PYTHONPATH}"
export TORCHBOOK_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  PY=.venv/bin/python
fi

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "$PY に torch がありません。bash scripts/setup.sh --dev で用意するか、PYTHON=... で指定してください。" >&2
  exit 2
fi
if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "CUDA の GPU が見つかりません ($PY の torch から)。GPU のある計算機で実行してください。" >&2
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo "# GPU の経路の検査 (scripts/gpu_check.sh)"
  echo "日時: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "コミット: $(git rev-parse --short HEAD 2>/dev/null || echo 不明)"
  "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}、CUDA {torch.version.cuda}、cuDNN {torch.backends.cudnn.version()}")
print(f"NCCL: {'あり' if torch.distributed.is_nccl_available() else 'なし'}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}、計算能力 {p.major}.{p.minor}、メモリー {p.total_memory / 2**30:.0f} GiB")
EOF
} > "$tmp/head.txt" 2>&1
cat "$tmp/head.txt"

start=$(date +%s)
"$PY" -m pytest tests/test_gpu.py -v -rs -p no:cacheprovider > "$tmp/gpu.txt" 2>&1
gpu_rc=$?
gpu_seconds=$(( $(date +%s) - start ))
cat "$tmp/gpu.txt"

suite_rc=0
suite_seconds=0
if [ "${GPU_CHECK_SUITE:-1}" != 0 ]; then
  start=$(date +%s)
  timeout "${GPU_CHECK_TIMEOUT:-900}" "$PY" -m pytest -q -p no:cacheprovider \
    > "$tmp/suite.txt" 2>&1
  suite_rc=$?
  suite_seconds=$(( $(date +%s) - start ))
  tail -25 "$tmp/suite.txt"
fi

{
  cat "$tmp/head.txt"
  echo
  echo "## tests/test_gpu.py (終了コード $gpu_rc、${gpu_seconds} 秒)"
  grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$tmp/gpu.txt"
  if [ "${GPU_CHECK_SUITE:-1}" != 0 ]; then
    echo
    echo "## テスト全体 (終了コード $suite_rc、${suite_seconds} 秒)"
    grep -E "^(FAILED|ERROR)" "$tmp/suite.txt" || true
    tail -1 "$tmp/suite.txt"
  fi
} > "$out"
echo
echo "結果を $out に書きました"
[ "$gpu_rc" = 0 ] && [ "$suite_rc" = 0 ]
