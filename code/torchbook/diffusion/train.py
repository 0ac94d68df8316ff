"""DDPM の学習 (ε 予測) と、その CLI。

例 (CPU で数分の試し)::

    python -m torchbook.diffusion.train --data-root data --steps 500 --out runs/ddpm

途中から再開するときは同じコマンドに ``--resume`` を付けます。
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import load_tensors
from .schedule import NoiseSchedule
from .unet import UNet

CHECKPOINT_KIND = "torchbook-ddpm-v1"


def training_loss(model: nn.Module, sched: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor,
                  p_uncond: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε 予測の損失 ‖ε - ε_θ(x_t, t, y)‖² (Ho et al. 2020 の「単純な損失」)。

    t は 0〜T-1 の整数を一様に選びます。p_uncond の割合でラベルを「クラスなし」に
    置き換え、同じモデルに条件なしの予測も学ばせます (classifier-free guidance 用)。
    """
    n = x0.shape[0]
    t = torch.randint(0, sched.T, (n,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    drop = torch.rand(n, generator=generator).to(x0.device) < p_uncond
    y = torch.where(drop, torch.full_like(y, model.null_class), y)
    x_t = sched.q_sample(x0, t, noise)
    return F.mse_loss(model(x_t, t, y).float(), noise)


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


def save_checkpoint(path: str | os.PathLike, model: nn.Module, ema: EMA, schedule_name: str,
                    T: int, extra: dict | None = None, ema_only: bool = False,
                    optimizer: torch.optim.Optimizer | None = None,
                    lr_scheduler=None, step: int = 0,
                    generator: torch.Generator | None = None) -> None:
    """チェックポイントを保存します。ema_only=True なら EMA の重みだけ (配布用に小さい)。

    再開用には最適化器・学習率・乱数の状態も保存し、続きが中断なしと同じになるようにします。
    """
    ckpt = {"kind": CHECKPOINT_KIND, "unet": model.config, "schedule": schedule_name, "T": T,
            "step": step, "ema": ema.model.state_dict(), "ema_step": ema.step,
            "extra": extra or {}}
    if not ema_only:
        ckpt["model"] = model.state_dict()
        ckpt["optimizer"] = optimizer.state_dict() if optimizer else None
        ckpt["lr_scheduler"] = lr_scheduler.state_dict() if lr_scheduler else None
        ckpt["rng"] = torch.get_rng_state()
        ckpt["generator"] = generator.get_state() if generator else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # 書き込み途中で止まっても前のファイルが壊れない


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[UNet, NoiseSchedule, dict]:
    """チェックポイントから EMA の UNet (評価モード) とスケジュールを作って返します。

    ``uses_channels_last`` の装置では重みを channels_last にします (畳み込みが速くなる)。
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} はこのモジュールの DDPM チェックポイントではありません")
    model = UNet(**ckpt["unet"])
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError as e:
        raise ValueError(f"{path} の重みが UNet({ckpt['unet']}) の構造と合いません: {e}") from e
    model = model.float().to(device).eval()
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model, NoiseSchedule.from_name(ckpt["schedule"], ckpt["T"]), ckpt


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def uses_channels_last(device: str | torch.device) -> bool:
    """channels_last を既定で使う装置か (CPU と CUDA。MPS では使いません)。"""
    return torch.device(device).type in ("cpu", "cuda")


def bf16_supported(device: str) -> bool:
    """この装置で bf16 の計算が速いか (CPU は oneDNN が bf16 命令を使えるときだけ)。

    AVX2 までの CPU では bf16 の畳み込みが遅い参照実装になり、fp32 より何十倍も遅くなります。
    """
    dev_type = device.split(":")[0]
    if dev_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def git_commit() -> str | None:
    """このファイルがある git リポジトリのコミット (なければ None)。"""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fashion-MNIST で DDPM (ε 予測、クラス条件付き) を学習します")
    p.add_argument("--data-root", default="data", help="Fashion-MNIST のあるフォルダー")
    p.add_argument("--out", default="runs/ddpm", help="チェックポイントを書くフォルダー")
    p.add_argument("--steps", type=int, default=20000, help="学習ステップ数")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1, help="ラベルを落とす確率 (CFG 用)")
    p.add_argument("--schedule", default="cosine", choices=["linear", "cosine"])
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--channels", default="32,64,128")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device())
    p.add_argument("--threads", type=int, default=None, help="CPU のスレッド数")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (既定: 装置が bf16 を速く計算できるときだけ使う)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last メモリ形式 (既定: CPU と CUDA で使う)")
    p.add_argument("--save-every", type=int, default=500, help="何ステップごとに保存するか")
    p.add_argument("--log-every", type=int, default=100, help="何ステップごとに損失を記録するか")
    p.add_argument("--max-minutes", type=float, default=None, help="この時間で学習を打ち切る")
    p.add_argument("--resume", action="store_true", help="out/last.pt から再開する")
    p.add_argument("--export", default=None, help="最後に EMA の重みだけをここへ保存する")
    p.add_argument("--limit", type=int, default=None, help="学習画像の枚数を制限する (試し用)")
    p.add_argument("--dry-run", action="store_true",
                   help="データを読まずに乱数の画像で 2 ステップだけ動かす")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_type = args.device.split(":")[0]
    bf16 = args.bf16 if args.bf16 is not None else bf16_supported(args.device)
    channels_last = (args.channels_last if args.channels_last is not None
                     else uses_channels_last(args.device))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    if args.dry_run:
        x_all = torch.rand(256, 1, 32, 32) * 2 - 1
        y_all = torch.randint(0, 10, (256,))
        args.steps = min(args.steps, 2)
    else:
        x_all, y_all = load_tensors(args.data_root, train=True)
    if args.limit:
        x_all, y_all = x_all[: args.limit], y_all[: args.limit]

    sched = NoiseSchedule.from_name(args.schedule, args.T)
    channels = tuple(int(c) for c in args.channels.split(","))
    model = UNet(channels=channels, patch_size=args.patch_size).to(args.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, args.warmup, args.steps))
    out = Path(args.out)
    last = out / "last.pt"
    step, history, elapsed_before = 0, [], 0.0
    if args.resume and last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        if ckpt.get("kind") != CHECKPOINT_KIND or ckpt["unet"] != model.config:
            raise ValueError(f"{last} は別の構造のモデルのチェックポイントです")
        model.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        ema.step = ckpt["ema_step"]
        opt.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("generator") is not None:
            gen.set_state(ckpt["generator"])
        else:  # 古い形式のチェックポイント
            gen.manual_seed(args.seed + ckpt["step"])
        step = ckpt["step"]
        history = ckpt["extra"].get("history", [])
        elapsed_before = ckpt["extra"].get("wall_seconds", 0.0)
        print(f"{last} のステップ {step} から再開します")

    n_params = sum(p.numel() for p in model.parameters())
    print(f"UNet {channels} patch {args.patch_size}: {n_params:,} パラメータ, "
          f"device={args.device}, "
          f"bf16={bf16}, channels_last={channels_last}, threads={torch.get_num_threads()}")
    t_start = time.time()
    running, count = 0.0, 0
    stopped_early = False

    def extra() -> dict:
        return {"history": history, "wall_seconds": elapsed_before + time.time() - t_start,
                "args": vars(args), "n_params": n_params}

    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=5)
    while step < args.steps:
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        x0 = x_all[idx].to(args.device)
        y = y_all[idx].to(args.device)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=bf16):
            loss = training_loss(model, sched, x0, y, args.p_uncond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update(model)
        step += 1
        running += loss.item()
        count += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            history.append([step, running / count])
            bar.set_postfix(loss=f"{running / count:.4f}")
            running, count = 0.0, 0
        timeout = (args.max_minutes is not None
                   and time.time() - t_start > args.max_minutes * 60)
        if step % args.save_every == 0 or step == args.steps or timeout:
            if not args.dry_run:
                save_checkpoint(last, model, ema, args.schedule, args.T, extra(), False,
                                opt, lr_sched, step, gen)
        if timeout:
            stopped_early = True
            print(f"--max-minutes {args.max_minutes} に達したのでステップ {step} で止めます")
            break
    bar.close()
    summary = extra()
    summary.update(step=step, stopped_early=stopped_early,
                   final_loss=history[-1][1] if history else loss.item())
    if args.export and not args.dry_run:
        info = {"command": "python -m torchbook.diffusion.train " + shlex.join(
                    sys.argv[1:] if argv is None else argv),
                "commit": git_commit(), "device": args.device, "bf16": bf16,
                "channels_last": channels_last, "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(), "torch": str(torch.__version__),
                **summary}
        save_checkpoint(args.export, model, ema, args.schedule, args.T, info, ema_only=True,
                        step=step)
        Path(args.export).with_suffix(".json").write_text(
            json.dumps({"train": info}, ensure_ascii=False, indent=1))
        print(f"EMA の重みを {args.export} に書きました")
    print(f"完了: ステップ {step}, 最後の損失 {summary['final_loss']:.4f}")
    return summary


if __name__ == "__main__":
    main()
