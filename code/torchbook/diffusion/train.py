"""DDPM (ε 予測) とフローマッチング (速度 v 予測) の学習と、その CLI。

例 (CPU で数分の試し。このフォルダーをコピーした先では ``torchbook.`` を除きます)::

    python -m torchbook.diffusion.train --data-root data --download --steps 500 --out runs/ddpm
    python -m torchbook.diffusion.train --objective flow --steps 500 --out runs/flow
    python -m torchbook.diffusion.train --latent ae.pt --steps 500 --out runs/latent

``--latent AUTOENCODER.pt`` は潜在拡散です。``train_autoencoder`` で作った自己符号化器で
学習画像を潜在変数 (例: 4×8×8) に変え、その空間でフローマッチングのモデル
(``latent.LatentFlow``: クラス名へのクロスアテンションつきの小さな UNet) を学習します。

``--save-every`` ごとに、決まったノイズから作った 10 枚 (クラス 0〜9) の見本を
チェックポイントの ``previews`` に残します (学習が進むと画像がどう良くなるかの記録)。

途中から再開するときは同じコマンドに ``--resume`` を付けます。Ctrl-C で止めると
そこまでを ``last.pt`` に保存して終わるので、``--resume`` で続きから学習できます。
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import options
from .algorithms import ddpm_train_step, flow_train_step
from .autoencoder import encode_all
from .checkpoint import (
    LATENT_FLOW_KIND,
    atomic_write_text,
    command_line,
    git_commit,
    load_autoencoder,
    objective_of,
    read_autoencoder,
    read_diffusion,
    restore_training,
    save_checkpoint,
)
from .data import load_tensors
from .device import cpu_model, fast_formats, get_device
from .latent import LatentFlow, LatentUNet
from .sampling import sample
from .schedule import NoiseSchedule
from .unet import UNet

PREVIEW_SEED = 1234  # 見本のノイズのシード (どのステップでも同じノイズから作る)
PREVIEW_STEPS = 20  # 見本を作るサンプラーのステップ数
MAX_GRAD_NORM = 1.0  # 勾配のノルムの上限


def preview(model: nn.Module, sched: NoiseSchedule | None, device: torch.device,
            bf16: bool = False) -> torch.Tensor:
    """決まったノイズからクラス 0〜9 を 1 枚ずつ作り、uint8 (10, 1, H, W) で返します。

    DDPM は η = 0 の DDIM、フローマッチングはオイラー法で、どちらも PREVIEW_STEPS ステップ。
    """
    method = "euler" if model.objective == "flow" else "ddim"
    x = sample(model, sched, 10, y=torch.arange(10), method=method, steps=PREVIEW_STEPS,
               eta=0.0, seed=PREVIEW_SEED, device=device, bf16=bf16)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class EMA:
    """重みの指数移動平均 (EMA)。サンプリングにはこちらの重みを使います。

    学習の初めは減衰率を min(decay, (1 + step) / (10 + step)) に下げます (ウォームアップ)。
    そうしないと、初期値 (ランダムな重み) の影響が長く残ります。
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)  # e ← d·e + (1 - d)·p
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """線形ウォームアップの後、コサインで 0.05 倍まで下げる学習率の倍率。"""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fashion-MNIST で DDPM (ε 予測) かフローマッチングのモデル (v 予測) を"
                    "クラス条件付きで学習します")
    p.add_argument("--data-root", default="data", help="Fashion-MNIST のあるフォルダー")
    p.add_argument("--download", action="store_true",
                   help="Fashion-MNIST が無ければ torchvision でダウンロードする (約 30 MB)")
    p.add_argument("--out", default="runs/ddpm", help="チェックポイント last.pt を書くフォルダー")
    p.add_argument("--steps", type=options.positive_int, default=20000, help="学習ステップ数")
    p.add_argument("--batch-size", type=options.positive_int, default=128)
    p.add_argument("--lr", type=options.positive_float, default=2e-3)
    p.add_argument("--warmup", type=options.positive_int, default=500)
    p.add_argument("--weight-decay", type=options.nonneg_float, default=0.0)
    p.add_argument("--ema-decay", type=options.probability, default=0.999)
    p.add_argument("--p-uncond", type=options.probability, default=0.1,
                   help="ラベルを落とす確率 (CFG 用)")
    p.add_argument("--objective", default=None, choices=["eps", "flow"],
                   help="eps: DDPM (ε 予測。既定)、flow: フローマッチング (速度 v 予測。"
                   "--latent では flow だけ)")
    p.add_argument("--latent", default=None, metavar="AUTOENCODER.pt",
                   help="この自己符号化器の潜在空間でフローマッチングのモデルを学習する (潜在拡散)")
    p.add_argument("--time-sampling", default="uniform", choices=["uniform", "logit-normal"],
                   help="フローマッチングで t をどう選ぶか (--objective eps では使いません)")
    p.add_argument("--schedule", default="cosine", choices=["linear", "cosine"],
                   help="DDPM のノイズスケジュール (--objective flow では使いません)")
    p.add_argument("--T", type=options.positive_int, default=1000, help="拡散のステップ数")
    p.add_argument("--channels", type=options.channel_list, default=None,
                   help="各解像度のチャンネル数 (既定: 画素は 32,64,128、--latent は 32,64)")
    p.add_argument("--patch-size", type=options.patch_size, default=2)
    p.add_argument("--seed", type=int, default=0)
    options.add_device_argument(p)
    p.add_argument("--threads", type=options.positive_int, default=None,
                   help="CPU のスレッド数")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (既定: 装置が bf16 を速く計算できるときだけ使う)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last メモリ形式 (既定: CPU と CUDA で使う)")
    p.add_argument("--save-every", type=options.positive_int, default=500,
                   help="何ステップごとに保存するか")
    p.add_argument("--log-every", type=options.positive_int, default=100,
                   help="何ステップごとに損失を記録するか")
    p.add_argument("--max-minutes", type=options.positive_float, default=None,
                   help="この時間で学習を打ち切る")
    p.add_argument("--resume", action="store_true", help="out/last.pt から再開する")
    p.add_argument("--force", action="store_true",
                   help="out/last.pt や --export のファイルがあっても上書きする")
    p.add_argument("--export", default=None,
                   help="最後に EMA の重みだけをここ (.pt) へ、来歴を隣の .json へ保存する")
    p.add_argument("--limit", type=options.positive_int, default=None,
                   help="学習画像の枚数を制限する (試し用)")
    p.add_argument("--dry-run", action="store_true",
                   help="データを読まず何も保存せず、乱数の画像で 2 ステップだけ動かす")
    args = p.parse_args(argv)
    if args.latent is not None:
        if args.objective == "eps":
            p.error("--latent はフローマッチングだけです: "
                    "--objective eps を外すか flow にしてください")
        args.objective = "flow"
        if not Path(args.latent).is_file():
            p.error(f"--latent {args.latent} がありません (train_autoencoder で作ってください)")
        try:
            read_autoencoder(args.latent)
        except ValueError as e:
            p.error(f"--latent: {e}")
    args.objective = args.objective or "eps"
    if args.channels is None:
        args.channels = (32, 64) if args.latent else (32, 64, 128)
    if args.resume and args.force:
        p.error("--resume と --force は同時に使えません (続きから学習するか、最初からやり直すか)")
    if args.dry_run:
        return args
    out = options.check_folder(p, args.out, "--out")
    last = out / "last.pt"
    if args.resume and not last.is_file():
        p.error(f"--resume: {last} がないので再開できません (--resume を外すと最初から学習します)")
    if last.is_file() and not (args.resume or args.force):
        p.error(f"{last} に前の学習があります。続けるなら --resume、"
                "捨てて最初からやり直すなら --force を付けるか、別の --out を指定してください")
    if args.export:
        export = options.check_output(p, args.export, "--export", (".pt",))
        for f in (export, export.with_suffix(".json")):
            if f.exists() and not args.force:
                p.error(f"--export: {f} がすでにあります。上書きするなら --force を付けてください")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = command_line(__spec__.name if __spec__ else __name__, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or get_device()
    bf16, channels_last = fast_formats(device, args.bf16, args.channels_last)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    if args.dry_run:
        x_all = torch.rand(256, 1, 32, 32) * 2 - 1
        y_all = torch.randint(0, 10, (256,))
        args.steps = min(args.steps, 2)
    else:
        try:
            x_all, y_all = load_tensors(args.data_root, train=True, download=args.download)
        except (OSError, ValueError) as e:  # データが無い・壊れている: 直し方を 1 行で
            raise SystemExit(str(e)) from None
    if args.limit:
        x_all, y_all = x_all[: args.limit], y_all[: args.limit]
    encode_seconds = 0.0
    if args.latent:  # 潜在拡散: 学習画像を一度だけ潜在変数 (μ・latent_scale 倍) に変える
        ae, _ = load_autoencoder(args.latent, device)
        t0, c0 = time.time(), time.process_time()
        x_all = encode_all(ae, x_all, device=device)
        encode_seconds = time.process_time() - c0
        print(f"学習画像 {len(x_all):,} 枚を潜在変数 {tuple(x_all.shape[1:])} に変えました "
              f"({time.time() - t0:.1f} 秒, 標準偏差 {x_all.std().item():.3f})")

    flow = args.objective == "flow"
    sched = None if flow else NoiseSchedule.from_name(args.schedule, args.T)
    schedule_name = "flow" if flow else args.schedule
    if args.latent:
        model = LatentFlow(LatentUNet(ae.latent_channels, args.channels), ae).to(device)
    else:
        model = UNet(channels=args.channels, patch_size=args.patch_size,
                     objective=args.objective).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, args.warmup, args.steps))
    last = Path(args.out) / "last.pt"
    step, history, elapsed_before, cpu_before, previews = 0, [], 0.0, 0.0, {}
    if args.resume:
        ckpt = read_diffusion(last)
        if (ckpt["kind"] == LATENT_FLOW_KIND) != bool(args.latent):
            raise SystemExit(f"{last} は{'潜在' if args.latent is None else '画素'}空間のモデルの"
                             "学習です。同じ --latent の有無で再開してください")
        if objective_of(ckpt) != args.objective:
            raise SystemExit(f"{last} は --objective {objective_of(ckpt)} の学習です。"
                             "同じ --objective で再開してください")
        if ckpt["schedule"] != schedule_name or ckpt["T"] != args.T:
            raise SystemExit(f"{last} は別のスケジュール ({ckpt['schedule']}, T={ckpt['T']}) "
                             "の学習です。同じ --schedule と --T で再開してください")
        try:
            step = restore_training(ckpt, model, ema, opt, lr_sched, gen)
        except ValueError as e:
            raise SystemExit(f"{last}: {e}") from None
        history = ckpt["extra"].get("history", [])
        elapsed_before = ckpt["extra"].get("wall_seconds", 0.0)
        cpu_before = ckpt["extra"].get("cpu_seconds", 0.0) - encode_seconds
        previews = ckpt.get("previews", {})
        print(f"{last} のステップ {step} から再開します")

    n_params = sum(p.numel() for p in model.parameters())
    kind = f"LatentUNet {args.channels}" if args.latent else \
        f"UNet {args.channels} patch {args.patch_size}"
    print(f"{kind}: {n_params:,} パラメーター (学習するもの "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}), "
          f"device={device}, bf16={bf16}, channels_last={channels_last}, "
          f"threads={torch.get_num_threads()}")
    t_start, cpu_start = time.time(), time.process_time()
    running, count = 0.0, 0
    stopped_early = False

    def extra() -> dict:
        return {"history": history, "wall_seconds": elapsed_before + time.time() - t_start,
                # プロセスの CPU 時間 (全スレッドの合計)。計算量の比較にはこちらを使う
                "cpu_seconds": cpu_before + encode_seconds + time.process_time() - cpu_start,
                "args": {k: (list(v) if isinstance(v, tuple) else str(v)
                             if isinstance(v, torch.device) else v)
                         for k, v in vars(args).items()},
                "n_params": n_params}

    def save() -> None:
        if args.dry_run:
            return
        if step not in previews:
            previews[step] = preview(ema.model, sched, device, bf16)
        save_checkpoint(last, model, ema, schedule_name, args.T, extra(), False,
                        opt, lr_sched, step, gen, args.objective, previews)

    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=5,
               disable=not sys.stderr.isatty())
    try:
        while step < args.steps:
            idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
            x0 = x_all[idx].to(device)
            y = y_all[idx].to(device)
            if channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            if flow:
                loss_value = flow_train_step(model, x0, y, opt, args.p_uncond, gen,
                                             MAX_GRAD_NORM, bf16, args.time_sampling)
            else:  # Ho et al. 2020 の Algorithm 1 (algorithms.ddpm_train_step)
                loss_value = ddpm_train_step(model, sched, x0, y, opt, args.p_uncond, gen,
                                             MAX_GRAD_NORM, bf16)
            if not math.isfinite(loss_value):  # NaN の重みで良いチェックポイントを上書きしない
                raise SystemExit(f"ステップ {step + 1} で損失が {loss_value} になりました。"
                                 "--lr を下げてください (保存済みの last.pt はそのままです)")
            lr_sched.step()
            ema.update(model)
            step += 1
            running += loss_value
            count += 1
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                history.append([step, running / count])
                bar.set_postfix(loss=f"{running / count:.4f}")
                running, count = 0.0, 0
            timeout = (args.max_minutes is not None
                       and time.time() - t_start > args.max_minutes * 60)
            if step % args.save_every == 0 or step == args.steps or timeout:
                save()
            if timeout:
                stopped_early = True
                print(f"--max-minutes {args.max_minutes} に達したのでステップ {step} で止めます")
                break
    except KeyboardInterrupt:
        bar.close()
        save()  # 最後に終えたステップまでを保存 (原子的なので途中で止まっても壊れない)
        print(f"\n中断しました。ステップ {step} までを {last} に保存しました "
              "(同じコマンドに --resume を付けると続きから学習します)")
        raise SystemExit(130) from None
    bar.close()
    summary = extra()
    summary.update(step=step, stopped_early=stopped_early,
                   final_loss=history[-1][1] if history else loss_value)
    if args.export and not args.dry_run:
        info = {"command": command, "commit": git_commit(), "device": str(device),
                "bf16": bf16, "channels_last": channels_last,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "python": platform.python_version(), "torch": str(torch.__version__),
                **summary}
        if args.latent:  # 自己符号化器の学習の記録も添える (合計の学習時間を出すため)
            ae_extra = read_autoencoder(args.latent)["extra"]
            info["autoencoder"] = {"path": str(args.latent), **{
                k: ae_extra.get(k) for k in ("command", "cpu_seconds", "wall_seconds", "val_mse",
                                             "latent_shape", "latent_scale", "beta", "step")}}
        save_checkpoint(args.export, model, ema, schedule_name, args.T, info, ema_only=True,
                        step=step, objective=args.objective, previews=previews)
        atomic_write_text(Path(args.export).with_suffix(".json"),
                          json.dumps({"train": info}, ensure_ascii=False, indent=1) + "\n")
        print(f"EMA の重みを {args.export} に書きました")
    print(f"完了: ステップ {step}, 最後の損失 {summary['final_loss']:.4f}")
    return summary


if __name__ == "__main__":
    main()
