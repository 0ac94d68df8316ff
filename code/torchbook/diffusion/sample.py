"""学習済みの拡散モデル (DDPM かフローマッチング) から画像を生成し、格子状に並べた PNG を書く CLI。

例 (このフォルダーをコピーした先では ``torchbook.`` を除きます)::

    python -m torchbook.diffusion.sample --out samples.png
    python -m torchbook.diffusion.sample --eta 0 --steps 20 --out ddim20.png
    python -m torchbook.diffusion.sample --class-grid --guidance 3 --out classes.png
    python -m torchbook.diffusion.sample --method dpm++2m --steps 10 --out dpm10.png
    python -m torchbook.diffusion.sample --checkpoint flow.pt --method heun --steps 10 \
        --out flow.png

``--method`` は ε を予測する DDPM のチェックポイントには ddim・ddpm・dpm++2m、
フローマッチングのチェックポイントには euler・heun です (違う組み合わせは作業の前に止めます)。
"""

from __future__ import annotations

if not __package__:  # ファイルを直接実行した: 下の相対 import の代わりに -m を 1 行で案内する
    import direct_run  # noqa: F401

import argparse
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from . import options
from .checkpoint import (
    DEFAULT_CHECKPOINT,
    atomic_write,
    load_checkpoint,
    objective_of,
    read_diffusion,
)
from .sampling import (
    DEFAULT_ETA,
    DEFAULT_FLOW_METHOD,
    DEFAULT_GUIDANCE,
    DEFAULT_METHOD,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    EPS_METHODS,
    FLOW_METHODS,
    default_method,
    sample,
)
from .schedule import NoiseSchedule
from .unet import UNet


def build_parser() -> argparse.ArgumentParser:
    """この CLI の引数 (値の確認は ``parse_args`` が作業の前に行います)。"""
    p = argparse.ArgumentParser(description="学習済みの拡散モデルで画像を生成して PNG に並べます",
                                formatter_class=options.HelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="拡散モデルのチェックポイント (.pt)")
    p.add_argument("--out", default="samples.png", help="書き出す画像 (.png / .jpg)")
    p.add_argument("-n", type=options.positive_int, default=64, help="生成する枚数")
    p.add_argument("--method", default=None, choices=[*EPS_METHODS, *FLOW_METHODS],
                   help="DDPM には ddim・ddpm・dpm++2m (DPM-Solver++ 2M)、フローマッチングには "
                   f"euler・heun (省くとチェックポイントの種類で {DEFAULT_METHOD} か "
                   f"{DEFAULT_FLOW_METHOD})")
    p.add_argument("--steps", type=options.positive_int, default=DEFAULT_STEPS,
                   help="ステップ数 (ddpm では使いません)")
    p.add_argument("--eta", type=options.nonneg_float, default=DEFAULT_ETA,
                   help="DDIM の各ステップで足すノイズの量 η (0 = 決定的、1 = DDPM と同じ分散)")
    p.add_argument("--spacing", default=DEFAULT_SPACING, choices=["trailing", "leading"],
                   help="DDIM と DPM-Solver++ の時刻の選び方")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="このクラス (0〜9) だけを生成 (既定: クラスなしで生成)")
    p.add_argument("--class-grid", action="store_true", help="各行が 1 クラスの 10 行の格子")
    p.add_argument("--guidance", type=options.nonneg_float, default=DEFAULT_GUIDANCE,
                   help="CFG の強さ s (0 = クラスなし)")
    p.add_argument("--seed", type=int, default=0, help="シード (同じなら同じ画像)")
    options.add_device_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="乱数の重みの小さなモデルで 2 ステップだけ")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    options.check_output(p, args.out, "--out", (".png", ".jpg", ".jpeg"))
    if args.label is not None and not 0 <= args.label <= 9:
        p.error(f"--class は 0〜9 にしてください (受け取ったのは {args.label})")
    if args.dry_run:
        objective = "flow" if args.method in FLOW_METHODS else "eps"
        args.method = args.method or default_method(objective)
        return args
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint} がありません")
    try:
        objective = objective_of(read_diffusion(args.checkpoint))
    except ValueError as e:
        p.error(str(e))
    args.method = args.method or default_method(objective)
    T = read_diffusion(args.checkpoint)["T"]
    if objective == "eps" and args.method != "ddpm" and args.steps > T:
        p.error(f"--steps {args.steps}: このモデルの拡散のステップ数 T = {T} 以下にしてください")
    if objective == "flow" and args.method not in FLOW_METHODS:
        p.error(f"--checkpoint {args.checkpoint} はフローマッチングのモデルです。"
                f"--method {' か '.join(FLOW_METHODS)} を指定してください")
    if objective == "eps" and args.method not in EPS_METHODS:
        p.error(f"--method {args.method} はフローマッチングのモデル用です。"
                f"--checkpoint {args.checkpoint} (ε を予測する DDPM) には "
                f"{'・'.join(EPS_METHODS)} のどれかを指定してください")
    return args


def main(argv: list[str] | None = None) -> torch.Tensor:
    args = parse_args(argv)
    device, bf16, channels_last = options.setup_device(args)
    if args.dry_run:  # 学習済みの重みなしで、CLI の流れだけを選んだ装置で確かめる
        objective = "flow" if args.method in FLOW_METHODS else "eps"
        model = UNet(channels=(16, 32), objective=objective).to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        sched = None if objective == "flow" else NoiseSchedule.from_name("cosine")
        if args.method == "ddpm":
            args.method = "ddim"
        args.n, args.steps = min(args.n, 4), 2
    else:
        try:
            model, sched, _ = load_checkpoint(args.checkpoint, device, channels_last)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    y, nrow = None, 8
    if args.class_grid:
        per = max(1, args.n // 10)
        y = torch.arange(10).repeat_interleave(per)
        args.n, nrow = len(y), per
    elif args.label is not None:
        y = torch.full((args.n,), args.label)
    t0 = time.time()
    x = sample(model, sched, args.n, y=y, guidance_scale=args.guidance, method=args.method,
               steps=args.steps, eta=args.eta, spacing=args.spacing, seed=args.seed,
               device=device, bf16=bf16, progress=sys.stderr.isatty())
    fmt = "png" if Path(args.out).suffix.lower() == ".png" else "jpeg"
    try:
        atomic_write(args.out, lambda tmp: save_image((x + 1) / 2, tmp, nrow=nrow, padding=2,
                                                      format=fmt))
    except OSError as e:  # ディスクが一杯など: 1 行で (前のファイルは残っている)
        raise SystemExit(str(e)) from None
    print(f"{args.n} 枚を {time.time() - t0:.1f} 秒で生成し、{args.out} に書きました")
    return x


if __name__ == "__main__":
    main()
