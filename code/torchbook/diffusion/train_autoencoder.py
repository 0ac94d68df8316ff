"""潜在拡散の自己符号化器 (``autoencoder.Autoencoder``) を Fashion-MNIST で学習する CLI。

例 (このフォルダーをコピーした先では ``torchbook.`` を除きます)::

    python -m torchbook.diffusion.train_autoencoder --latent-channels 4 --steps 3000 \\
        --out runs/ae4 --export ae4.pt

学習画像 60,000 枚のうち、決まった 5,000 枚 (``--val-size``) を学習に使わず、
再構成誤差を測る検証用に取っておきます (潜在変数の形はこの値で選びます)。
終わると潜在変数の標準偏差が 1 になる ``latent_scale`` を決め、``--export`` に
配布用の重みを、隣の ``.json`` に来歴 (コマンド、計算機、時間、検証の再構成誤差) を書きます。
途中から再開するときは同じコマンドに ``--resume`` を付けます。
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
from tqdm import tqdm

from . import options
from .autoencoder import (
    Autoencoder,
    fit_latent_scale,
    kl_divergence,
    reconstruction_error,
    vae_loss,
)
from .checkpoint import (
    command_line,
    provenance,
    read_autoencoder,
    save_autoencoder,
    write_provenance,
)
from .training import lr_lambda

SPLIT_SEED = 0  # 学習用と検証用に分ける並べ替えのシード
# 学習の形を決める設定 (last.pt の config に保存し、--resume のときに比べる。train と同じ約束)
RUN_SETTINGS = ("latent_channels", "width", "beta", "steps", "batch_size", "lr", "val_size",
                "seed", "limit")


def split_train_val(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0..n-1 を決まった順に並べ替え、(学習用, 検証用) の番号に分けます。"""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[val_size:], perm[:val_size]


def build_parser() -> argparse.ArgumentParser:
    """この CLI の引数 (値の確認は ``parse_args`` が作業の前に行います)。"""
    p = argparse.ArgumentParser(
        description="潜在拡散のための KL 正則化つき自己符号化器 (VAE) を "
                    "Fashion-MNIST で学習します",
        formatter_class=options.HelpFormatter)
    options.add_data_arguments(p)
    p.add_argument("--out", default="runs/autoencoder", help="last.pt を書くフォルダー")
    p.add_argument("--latent-channels", type=options.positive_int, default=4,
                   help="潜在変数 (8×8) のチャンネル数")
    p.add_argument("--width", type=options.channel_count, default=32,
                   help="畳み込みのチャンネル数の基準 (8 の倍数)")
    p.add_argument("--beta", type=options.nonneg_float, default=1e-3,
                   help="KL の重み β (損失 = ‖x - x̂‖² + β·KL)")
    p.add_argument("--steps", type=options.positive_int, default=3000, help="学習ステップ数")
    p.add_argument("--batch-size", type=options.positive_int, default=128, help="バッチサイズ")
    p.add_argument("--lr", type=options.positive_float, default=2e-3,
                   help="学習率の最大値 (5%% のウォームアップの後、コサインで 0.05 倍まで)")
    p.add_argument("--val-size", type=options.positive_int, default=5000,
                   help="学習に使わず再構成誤差を測る画像の枚数")
    p.add_argument("--seed", type=int, default=0, help="シード")
    options.add_device_arguments(p)
    options.add_run_arguments(
        p, export_help="最後に配布用の重みをここ (.pt) へ、来歴を隣の .json へ保存する")
    return p


def run_config(args: argparse.Namespace) -> dict:
    """学習の形を決める設定の辞書 (last.pt の config。--resume のときに比べる)。"""
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    last = options.check_run_folder(p, args)
    # 再開の約束は train と同じ: 設定が違えば作業の前に 1 行で止める
    args.resume_from = (options.check_resume(p, last, read_autoencoder, run_config(args))
                        if args.resume and last else None)
    options.check_export(p, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = command_line(__spec__.name if __spec__ else __name__, argv)
    device, bf16, _ = options.setup_device(args)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_all, _ = options.train_images(args, fake=64)
    if args.dry_run:
        args.steps, args.val_size = min(args.steps, 2), 16
    if args.val_size >= len(x_all):
        raise SystemExit(f"--val-size {args.val_size} は画像の枚数 {len(x_all)} より小さくして"
                         "ください")
    train_idx, val_idx = split_train_val(len(x_all), args.val_size)
    x_train, x_val = x_all[train_idx], x_all[val_idx]
    if args.limit:
        x_train = x_train[: args.limit]

    model = Autoencoder(args.latent_channels, args.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    last = Path(args.out) / "last.pt"
    step, history, wall_before, cpu_before = 0, [], 0.0, 0.0
    if args.resume_from is not None:
        ckpt = args.resume_from
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        gen.set_state(ckpt["generator"])
        step = ckpt["step"]
        history = ckpt["extra"]["history"]
        wall_before = ckpt["extra"]["wall_seconds"]
        cpu_before = ckpt["extra"]["cpu_seconds"]
        print(f"{last} のステップ {step} から再開します")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Autoencoder latent {model.latent_shape}: {n_params:,} パラメーター, device={device}, "
          f"bf16={bf16}, threads={torch.get_num_threads()}")
    t_start, cpu_start = time.time(), time.process_time()

    def extra() -> dict:
        return {"history": history, "wall_seconds": wall_before + time.time() - t_start,
                "cpu_seconds": cpu_before + time.process_time() - cpu_start,
                "args": {k: str(v) if isinstance(v, torch.device) else v
                         for k, v in vars(args).items() if k != "resume_from"},
                "n_params": n_params}

    def save() -> None:
        if not args.dry_run:
            save_autoencoder(last, model, step, extra(), opt, gen, config=run_config(args))

    warmup = max(1, args.steps // 20)  # 5% の線形ウォームアップの後、コサインで 0.05 倍まで
    model.train()
    sums = torch.zeros(3)
    count = 0
    bar = tqdm(total=args.steps, initial=step, desc="autoencoder", mininterval=5,
               disable=not sys.stderr.isatty())
    try:  # 1 回目の Ctrl-C は、今のステップを終えてから保存して止める合図
        with options.deferred_ctrl_c() as ctrl_c:
            while step < args.steps:
                for g in opt.param_groups:
                    g["lr"] = args.lr * lr_lambda(step, warmup, args.steps)
                x = x_train[torch.randint(0, len(x_train), (args.batch_size,), generator=gen)]
                x = x.to(device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    x_hat, mean, logvar = model(x, gen)
                loss, rec, kl = vae_loss(x, x_hat, mean, logvar, args.beta)
                if not math.isfinite(loss.item()):
                    raise SystemExit(f"ステップ {step + 1} で損失が {loss.item()} になりました。"
                                     "--lr を下げてください (保存済みの last.pt はそのままです)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                sums += torch.tensor([loss.item(), rec.item(), kl.item()])
                count += 1
                bar.update(1)
                if step % args.log_every == 0 or step == args.steps:
                    history.append([step, *(sums / count).tolist()])  # [ステップ, 損失, 再構成, KL]
                    bar.set_postfix(loss=f"{history[-1][1]:.3f}", kl=f"{history[-1][3]:.1f}")
                    sums.zero_()
                    count = 0
                if options.end_of_step(step, args, t_start, ctrl_c, save, last):
                    break  # --max-minutes の時間切れ
    except KeyboardInterrupt:  # 2 回目の Ctrl-C: ステップの途中なので保存しない
        bar.close()
        print(f"\n中断しました。{last} は前に保存したときのままです (--resume で再開できます)")
        raise SystemExit(130) from None
    bar.close()
    model.eval()
    scale = fit_latent_scale(model, x_train[:10000])
    val_mse = reconstruction_error(model, x_val)
    with torch.no_grad():
        mean, logvar = model.encoder(x_val[:1000].to(device))
        val_kl = kl_divergence(mean, logvar).item()
    summary = extra()
    summary.update(step=step, latent_shape=list(model.latent_shape), latent_scale=scale,
                   val_mse=val_mse, val_kl=val_kl, val_size=args.val_size, beta=args.beta)
    print(f"完了: ステップ {step}, 検証の再構成誤差 (1 画素の二乗誤差) {val_mse:.5f}, "
          f"KL {val_kl:.1f}, latent_scale {scale:.4f}")
    if args.export and not args.dry_run:
        info = {**provenance(command, device, bf16), **summary}
        save_autoencoder(args.export, model, step, info, export=True)
        write_provenance(args.export, info)
        print(f"重みを {args.export} に書きました")
    return summary


if __name__ == "__main__":
    main()
