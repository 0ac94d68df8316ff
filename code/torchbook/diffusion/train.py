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

再開の約束 (MNIST の章の CLI と同じ): 学習の形を決める設定 (``RUN_SETTINGS``: 学習率、
バッチサイズ、ステップ数、ウォームアップ、シード、スケジュール、目的、p_uncond、EMA の
減衰率、モデルの大きさ、t の選び方など) はチェックポイントの ``config`` に保存し、
``--resume`` のときに比べます。1 つでも違えば、違う設定 (保存した値と指定した値) を 1 行で
示して止めます。終わった (または途中の) 学習をもっと長くするときだけは ``--extend`` を付け、
大きい ``--steps`` を指定します (ほかの設定は同じにします)。このとき学習率のコサインは
新しい ``--steps`` に合わせて描き直されるので、最初から長く学習したのとは同じになりません。

リフロー (``reflow``): ``--init FLOW.pt`` でフローマッチングのモデルの重みから始め、
``--pairs PAIRS.pt`` (``python -m torchbook.diffusion.make_pairs`` で作った組) のノイズと画像の
組で学び直します。どちらも ``config`` に保存し、``--resume`` のときに比べます。
"""

from __future__ import annotations

if not __package__:  # ファイルを直接実行した: 下の相対 import の代わりに -m を 1 行で案内する
    import direct_run  # noqa: F401

import argparse
import math
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
    KINDS,
    command_line,
    load_autoencoder,
    load_checkpoint,
    provenance,
    read_autoencoder,
    read_diffusion,
    restore_training,
    save_checkpoint,
    write_provenance,
)
from .latent import LatentFlow, LatentUNet
from .reflow import read_pairs
from .sampling import sample
from .schedule import NoiseSchedule
from .training import EMA, lr_scheduler
from .unet import UNet

PREVIEW_SEED = 1234  # 見本のノイズのシード (どのステップでも同じノイズから作る)
PREVIEW_STEPS = 20  # 見本を作るサンプラーのステップ数
MAX_GRAD_NORM = 1.0  # 勾配のノルムの上限
# 学習の形を決める設定 (チェックポイントの config に保存し、--resume のときに比べる)
RUN_SETTINGS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "ema_decay", "p_uncond",
                "objective", "time_sampling", "schedule", "T", "channels", "patch_size", "seed",
                "limit", "latent", "init", "pairs")


def run_config(args: argparse.Namespace) -> dict:
    """学習の形を決める設定の辞書 (チェックポイントの config)。"""
    config = {name: getattr(args, name) for name in RUN_SETTINGS}
    config["channels"] = list(config["channels"])
    config["max_grad_norm"] = MAX_GRAD_NORM
    return config


def preview(model: nn.Module, sched: NoiseSchedule | None, device: torch.device,
            bf16: bool = False) -> torch.Tensor:
    """決まったノイズからクラス 0〜9 を 1 枚ずつ作り、uint8 (10, 1, H, W) で返します。

    DDPM は η = 0 の DDIM、フローマッチングはオイラー法で、どちらも PREVIEW_STEPS ステップ。
    """
    method = "euler" if model.objective == "flow" else "ddim"
    x = sample(model, sched, 10, y=torch.arange(10), method=method, steps=PREVIEW_STEPS,
               eta=0.0, seed=PREVIEW_SEED, device=device, bf16=bf16)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_resume(p: argparse.ArgumentParser, args: argparse.Namespace, last: Path) -> dict:
    """--resume の前に last.pt を読み、学習の形を決める設定が同じか確かめます。"""
    return options.check_resume(p, last, read_diffusion, run_config(args), args.extend)


def check_reflow(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--init と --pairs (リフロー) を作業の前に確かめます。どちらも画素のフローだけです。"""
    if args.objective == "eps" or args.latent:
        p.error("--init と --pairs は画素のフローマッチングだけです: --objective eps と "
                "--latent を外してください")
    args.objective = "flow"
    if args.init:
        try:
            ckpt = read_diffusion(args.init)
        except (OSError, ValueError) as e:
            p.error(f"--init: {e}")
        if ckpt["kind"] != KINDS["flow"]:
            p.error(f"--init {args.init} は {ckpt['kind']} です。フローマッチングのモデル "
                    f"({KINDS['flow']}) を指定してください")
        unet = ckpt["unet"]
        if args.channels is None:
            args.channels = tuple(unet["channels"])
        if list(args.channels) != unet["channels"] or args.patch_size != unet["patch_size"]:
            p.error(f"--init {args.init} の UNet は --channels "
                    f"{','.join(map(str, unet['channels']))} --patch-size {unet['patch_size']} "
                    "です。同じ値にしてください")
    if args.pairs:
        try:
            shape = tuple(read_pairs(args.pairs)["data"].shape[1:])
        except (OSError, ValueError) as e:
            p.error(f"--pairs: {e}")
        if shape != (1, 32, 32):
            p.error(f"--pairs {args.pairs} の画像の形 {shape} が Fashion-MNIST の (1, 32, 32) と"
                    "違います")


def build_parser() -> argparse.ArgumentParser:
    """この CLI の引数 (値の確認は ``parse_args`` が作業の前に行います)。"""
    p = argparse.ArgumentParser(
        description="Fashion-MNIST で DDPM (ε 予測) かフローマッチングのモデル (v 予測) を"
                    "クラス条件付きで学習します",
        formatter_class=options.HelpFormatter)
    options.add_data_arguments(p)
    p.add_argument("--out", default="runs/ddpm", help="チェックポイント last.pt を書くフォルダー")
    p.add_argument("--steps", type=options.positive_int, default=20000, help="学習ステップ数")
    p.add_argument("--batch-size", type=options.positive_int, default=128, help="バッチサイズ")
    p.add_argument("--lr", type=options.positive_float, default=2e-3,
                   help="学習率の最大値 (ウォームアップの後、コサインで 0.05 倍まで下げる)")
    p.add_argument("--warmup", type=options.positive_int, default=500,
                   help="学習率を線形に上げるステップ数")
    p.add_argument("--weight-decay", type=options.nonneg_float, default=0.0,
                   help="AdamW の重み減衰")
    p.add_argument("--ema-decay", type=options.probability, default=0.999,
                   help="重みの指数移動平均 (EMA) の減衰率")
    p.add_argument("--p-uncond", type=options.probability, default=0.1,
                   help="ラベルを落とす確率 (CFG 用)")
    p.add_argument("--objective", default=None, choices=["eps", "flow"],
                   help="eps: DDPM (ε 予測。既定)、flow: フローマッチング (速度 v 予測。"
                   "--latent では flow だけ)")
    p.add_argument("--latent", default=None, metavar="AUTOENCODER.pt",
                   help="この自己符号化器の潜在空間でフローマッチングのモデルを学習する "
                   "(潜在拡散。既定: 画素の空間で学習する)")
    p.add_argument("--time-sampling", default="uniform", choices=["uniform", "logit-normal"],
                   help="フローマッチングで t をどう選ぶか (--objective eps では使いません)")
    p.add_argument("--schedule", default="cosine", choices=["linear", "cosine"],
                   help="DDPM のノイズスケジュール (--objective flow では使いません)")
    p.add_argument("--T", type=options.positive_int, default=1000, help="拡散のステップ数")
    p.add_argument("--channels", type=options.channel_list, default=None,
                   help="各解像度のチャンネル数 (既定: 画素は 32,64,128、--latent は 32,64)")
    p.add_argument("--patch-size", type=options.patch_size, default=2,
                   help="UNet が最初に画像を分ける小区画の一辺 (1, 2, 4。--latent では使いません)")
    p.add_argument("--seed", type=int, default=0, help="シード")
    options.add_device_arguments(p, channels_last=True)
    options.add_run_arguments(
        p, export_help="最後に EMA の重みだけをここ (.pt) へ、来歴を隣の .json へ保存する")
    p.add_argument("--extend", action="store_true",
                   help="--resume で、保存した学習より大きい --steps まで延ばす (学習率の"
                   "コサインは新しい --steps に合わせて描き直す)")
    p.add_argument("--init", default=None, metavar="FLOW.pt",
                   help="このフローマッチングのモデルの (EMA の) 重みから学習を始める (リフロー。"
                   "既定: 乱数の重みから)")
    p.add_argument("--pairs", default=None, metavar="PAIRS.pt",
                   help="make_pairs CLI の組 (ノイズ, 画像) で学習する (--objective flow だけ。"
                   "既定: Fashion-MNIST の画像と乱数のノイズ)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
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
    if args.init or args.pairs:
        check_reflow(p, args)
    args.objective = args.objective or "eps"
    if args.channels is None:
        args.channels = (32, 64) if args.latent else (32, 64, 128)
    if args.extend and not args.resume:
        p.error("--extend は --resume と一緒に使います (保存した学習を延ばすためのものです)")
    last = options.check_run_folder(p, args)
    args.resume_from = check_resume(p, args, last) if args.resume and last else None
    options.check_export(p, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = command_line(__spec__.name if __spec__ else __name__, argv)
    device, bf16, channels_last = options.setup_device(args)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    noise_all = None  # リフロー: x_all[i] と組になったノイズ
    if args.pairs:
        pairs = read_pairs(args.pairs)
        x_all, noise_all = pairs["data"], pairs["noise"]
        y_all = pairs["y"] if pairs["y"] is not None else torch.full((len(x_all),), 10)
    else:
        x_all, y_all = options.train_images(args, fake=256)
    if args.dry_run:
        args.steps = min(args.steps, 2)
    if args.limit:
        x_all, y_all = x_all[: args.limit], y_all[: args.limit]
        noise_all = noise_all[: args.limit] if noise_all is not None else None
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
    if args.init:  # リフロー: 今のフローの (EMA の) 重みから始める (EMA もここから)
        model.load_state_dict(load_checkpoint(args.init)[0].state_dict())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = lr_scheduler(opt, args.warmup, args.steps)
    last = Path(args.out) / "last.pt"
    step, history, elapsed_before, cpu_before, previews = 0, [], 0.0, 0.0, {}
    if args.resume:
        ckpt = args.resume_from
        try:
            step = restore_training(ckpt, model, ema, opt, lr_sched, gen)
        except ValueError as e:  # 作業の前 (データを読んだだけ) に 1 行で止める
            raise SystemExit(f"--resume: {last}: {e}") from None
        history = ckpt["extra"]["history"]
        elapsed_before = ckpt["extra"]["wall_seconds"]
        cpu_before = ckpt["extra"]["cpu_seconds"] - encode_seconds
        previews = ckpt["previews"]
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
                         for k, v in vars(args).items() if k != "resume_from"},
                "n_params": n_params}

    def save() -> None:
        if args.dry_run:
            return
        if step not in previews:
            previews[step] = preview(ema.model, sched, device, bf16)
        try:
            save_checkpoint(last, model, ema, schedule_name, args.T, extra(), False,
                            opt, lr_sched, step, gen, args.objective, previews, run_config(args))
        except OSError as e:  # ディスクが一杯など: 前の last.pt は残っている
            raise SystemExit(str(e)) from None

    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=5,
               disable=not sys.stderr.isatty())
    try:  # 1 回目の Ctrl-C は、今のステップを終えてから保存して止める合図
        with options.deferred_ctrl_c() as ctrl_c:
            while step < args.steps:
                idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
                x0 = x_all[idx].to(device)
                y = y_all[idx].to(device)
                noise = noise_all[idx].to(device) if noise_all is not None else None
                if channels_last:
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                if flow:
                    loss_value = flow_train_step(model, x0, y, opt, args.p_uncond, gen,
                                                 MAX_GRAD_NORM, bf16, args.time_sampling, noise)
                else:  # Ho et al. 2020 の Algorithm 1 (algorithms.ddpm_train_step)
                    loss_value = ddpm_train_step(model, sched, x0, y, opt, args.p_uncond, gen,
                                                 MAX_GRAD_NORM, bf16)
                if not math.isfinite(loss_value):  # NaN の重みで良い last.pt を上書きしない
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
                if options.end_of_step(step, args, t_start, ctrl_c, save, last):
                    stopped_early = True  # --max-minutes の時間切れ
                    break
    except KeyboardInterrupt:  # 2 回目の Ctrl-C: ステップの途中なので保存しない
        bar.close()
        print(f"\n中断しました。{last} は前に保存したときのままです (--resume で再開できます)")
        raise SystemExit(130) from None
    bar.close()
    summary = extra()
    summary.update(step=step, stopped_early=stopped_early,
                   final_loss=history[-1][1] if history else loss_value)
    if args.export and not args.dry_run:
        info = {**provenance(command, device, bf16, channels_last=channels_last), **summary}
        if args.latent:  # 自己符号化器の学習の記録も添える (合計の学習時間を出すため)
            ae_extra = read_autoencoder(args.latent)["extra"]
            info["autoencoder"] = {"path": str(args.latent), **{
                k: ae_extra.get(k) for k in ("command", "cpu_seconds", "wall_seconds", "val_mse",
                                             "latent_shape", "latent_scale", "beta", "step")}}
        try:
            save_checkpoint(args.export, model, ema, schedule_name, args.T, info,
                            ema_only=True, step=step, objective=args.objective, previews=previews)
            write_provenance(args.export, info)
        except OSError as e:  # last.pt は保存済みなので、--export だけやり直せばよい
            raise SystemExit(str(e)) from None
        print(f"EMA の重みを {args.export} に書きました")
    print(f"完了: ステップ {step}, 最後の損失 {summary['final_loss']:.4f}")
    return summary


if __name__ == "__main__":
    main()
