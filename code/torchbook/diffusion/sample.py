"""学習済みの DDPM から画像を生成し、格子状に並べた PNG を書く CLI。

例::

    python -m torchbook.diffusion.sample --out samples.png
    python -m torchbook.diffusion.sample --eta 0 --steps 20 --out ddim20.png
    python -m torchbook.diffusion.sample --class-grid --guidance 3 --out classes.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from .sampling import sample
from .train import default_device, load_checkpoint

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "ddpm_fashion.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="学習済み DDPM で画像を生成して PNG に並べます")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--out", default="samples.png")
    p.add_argument("-n", type=int, default=64, help="生成する枚数")
    p.add_argument("--method", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, default=50, help="DDIM のステップ数")
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM の各ステップで足すノイズの量 η (0 = 決定的、1 = DDPM と同じ分散)")
    p.add_argument("--spacing", default="trailing", choices=["trailing", "leading"],
                   help="DDIM の時刻の選び方")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="このクラス (0〜9) だけを生成")
    p.add_argument("--class-grid", action="store_true", help="各行が 1 クラスの 10 行の格子")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG の強さ s (0 = クラスなし)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device())
    p.add_argument("--bf16", action="store_true", help="bf16 autocast で推論する")
    p.add_argument("--dry-run", action="store_true",
                   help="乱数の重みの小さなモデルで 2 ステップだけ")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.eta < 0:
        p.error("-n と --steps は 1 以上、--eta は 0 以上にしてください")
    return args


def main(argv: list[str] | None = None) -> torch.Tensor:
    args = parse_args(argv)
    if args.dry_run:
        from .schedule import NoiseSchedule
        from .unet import UNet
        model, sched = UNet(channels=(16, 32)).eval(), NoiseSchedule.from_name("cosine")
        args.n, args.steps, args.method = min(args.n, 4), 2, "ddim"
    else:
        model, sched, _ = load_checkpoint(args.checkpoint, args.device)
    y, nrow = None, 8
    if args.class_grid:
        per = max(1, args.n // 10)
        y = torch.arange(10).repeat_interleave(per)
        args.n, nrow = len(y), per
    elif args.label is not None:
        if not 0 <= args.label < model.num_classes:
            raise SystemExit(f"--class は 0〜{model.num_classes - 1} にしてください "
                             f"(受け取ったのは {args.label})")
        y = torch.full((args.n,), args.label)
    t0 = time.time()
    x = sample(model, sched, args.n, y=y, guidance_scale=args.guidance, method=args.method,
               steps=args.steps, eta=args.eta, spacing=args.spacing, seed=args.seed,
               device=args.device, bf16=args.bf16, progress=True)
    save_image((x + 1) / 2, args.out, nrow=nrow, padding=2)
    print(f"{args.n} 枚を {time.time() - t0:.1f} 秒で生成し、{args.out} に書きました")
    return x


if __name__ == "__main__":
    main()
