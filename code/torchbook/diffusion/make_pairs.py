"""リフロー (``reflow``) の組を作る CLI: 学習したフローの ODE でノイズと画像を組にして保存します。

例 (このフォルダーをコピーした先では ``torchbook.`` を除きます)::

    python -m torchbook.diffusion.make_pairs --checkpoint flow.pt --n 10000 --out pairs.pt
    python -m torchbook.diffusion.train --init flow.pt --pairs pairs.pt --steps 2000 \
        --out runs/reflow

組のファイル (``reflow.PAIRS_KIND``) の隣には来歴 JSON (同じ名前の .json) を書きます。
"""

from __future__ import annotations

if not __package__:  # ファイルを直接実行した: 下の相対 import の代わりに -m を 1 行で案内する
    import direct_run  # noqa: F401

import argparse
import json
import sys
import time
from pathlib import Path

from . import options
from .checkpoint import (
    FLOW_KIND,
    atomic_save,
    atomic_write_text,
    command_line,
    load_checkpoint,
    provenance,
    read_diffusion,
)
from .reflow import PAIRS_KIND, reflow_pairs
from .sampling import DEFAULT_FLOW_METHOD, DEFAULT_GUIDANCE, FLOW_METHODS


def build_parser() -> argparse.ArgumentParser:
    """この CLI の引数 (値の確認は ``parse_args`` が作業の前に行います)。"""
    p = argparse.ArgumentParser(
        description="フローマッチングのモデルの ODE でノイズと画像を組にし、リフロー用に保存します",
        formatter_class=options.HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="フローマッチングのモデルのチェックポイント (.pt)")
    p.add_argument("--out", required=True, help="組を書くファイル (.pt。来歴は隣の .json)")
    p.add_argument("--n", type=options.positive_int, default=10000, help="組の数")
    p.add_argument("--steps", type=options.positive_int, default=10, help="ODE のステップ数")
    p.add_argument("--method", default=DEFAULT_FLOW_METHOD, choices=list(FLOW_METHODS),
                   help="ODE の解き方")
    p.add_argument("--guidance", type=options.nonneg_float, default=DEFAULT_GUIDANCE,
                   help="CFG の強さ s (1 = 条件付きモデルそのもの)")
    p.add_argument("--seed", type=int, default=0, help="ノイズとクラスのシード")
    p.add_argument("--batch-size", type=options.positive_int, default=250,
                   help="一度に解く組の数")
    options.add_device_arguments(p)
    p.add_argument("--force", action="store_true", help="--out のファイルがあっても上書きする")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    out = options.check_output(p, args.out, "--out", (".pt",))
    for f in (out, out.with_suffix(".json")):
        if f.exists() and not args.force:
            p.error(f"--out: {f} がすでにあります。上書きするなら --force を付けてください")
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint} がありません")
    try:
        kind = read_diffusion(args.checkpoint)["kind"]
    except ValueError as e:
        p.error(f"--checkpoint: {e}")
    if kind != FLOW_KIND:
        p.error(f"--checkpoint {args.checkpoint} は {kind} です。リフローには画素の"
                f"フローマッチングのモデル ({FLOW_KIND}。train --objective flow) を"
                "指定してください")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = command_line(__spec__.name if __spec__ else __name__, argv)
    device, bf16, _ = options.setup_device(args)
    try:
        model, _, _ = load_checkpoint(args.checkpoint, device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    t0, c0 = time.time(), time.process_time()
    noise, data, y = reflow_pairs(model, args.n, args.steps, args.method, args.seed,
                                  guidance_scale=args.guidance, batch_size=args.batch_size,
                                  device=device, bf16=bf16, progress=sys.stderr.isatty())
    info = provenance(command, device, bf16, checkpoint=str(args.checkpoint), n=args.n,
                      steps=args.steps, method=args.method, guidance=args.guidance,
                      seed=args.seed, wall_seconds=time.time() - t0,
                      cpu_seconds=time.process_time() - c0)
    try:
        atomic_save({"kind": PAIRS_KIND, "noise": noise, "data": data, "y": y, "info": info},
                    args.out)
        atomic_write_text(Path(args.out).with_suffix(".json"),
                          json.dumps({"reflow_pairs": info}, ensure_ascii=False, indent=1) + "\n")
    except OSError as e:  # ディスクが一杯など: 1 行で
        raise SystemExit(str(e)) from None
    print(f"{args.n} 組を {info['wall_seconds']:.1f} 秒で作り、{args.out} に書きました")
    return info


if __name__ == "__main__":
    main()
