"""拡散モデルの速さのベンチマーク (同じ実行の中で並べて比べます)。

1. 学習ステップの速さ (img/s): 本書の UNet と、seed 003 の UNetWithTime (BatchNorm、
   Python ループの時刻埋め込み) を同じパラメータ数に縮めたもの。
2. 生成の速さ: DDIM 50 ステップ (η = 1) と DDPM 1000 ステップの 1 枚あたりの時間。
3. 来歴 JSON にある FID (evaluate CLI の結果) を、本物どうしの下限と並べて表示。

    python benchmarks/diffusion_bench.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

from torchbook.diffusion.sample import DEFAULT_CHECKPOINT
from torchbook.diffusion.sampling import sample
from torchbook.diffusion.schedule import NoiseSchedule
from torchbook.diffusion.train import bf16_supported, training_loss
from torchbook.diffusion.unet import UNet

# ---------------------------------------------------------------- seed 003 の設計 (書かれたとおり)


def seed_time_embedding(time_steps, time_dim, device="cpu"):
    max_time = len(time_steps)
    embeddings = torch.zeros(max_time, time_dim, device=device)
    idx = torch.arange(0, time_dim, device=device)
    div_term = torch.exp(idx / (2 * time_dim) * torch.log(torch.tensor(10000.0)))
    for t in range(max_time):
        embeddings[t, 0::2] = torch.sin(time_steps[t] / div_term[::2])
        embeddings[t, 1::2] = torch.cos(time_steps[t] / div_term[1::2])
    return embeddings


class SeedConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_dim):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
            nn.ReLU())
        self.linear = nn.Sequential(nn.Linear(time_dim, in_channels * 2), nn.ReLU(),
                                    nn.Linear(in_channels * 2, in_channels))

    def forward(self, x, t=None):
        if t is not None:
            x = x + self.linear(t).view(x.size(0), -1, 1, 1)
        return self.conv(x)


class SeedUNetWithTime(nn.Module):
    """seed 003 の UNetWithTime。幅 c (原文は 64) と time_dim (原文は 512) だけを変えられます。"""

    def __init__(self, c=64, time_dim=512):
        super().__init__()
        self.time_dim = time_dim
        self.down_conv1 = SeedConvBlock(1, c, time_dim)
        self.down_conv2 = SeedConvBlock(c, 2 * c, time_dim)
        self.bottleneck = SeedConvBlock(2 * c, 4 * c, time_dim)
        self.up_conv2 = SeedConvBlock(6 * c, 2 * c, time_dim)
        self.up_conv1 = SeedConvBlock(3 * c, c, time_dim)
        self.out = nn.Conv2d(c, 1, 1)
        self.max_pool = nn.MaxPool2d(2, 2)
        self.up_sample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x, time_steps):
        t = seed_time_embedding(time_steps, self.time_dim, device=x.device)
        x1 = self.down_conv1(x, t)
        x2 = self.down_conv2(self.max_pool(x1), t)
        x = self.bottleneck(self.max_pool(x2), t)
        x = self.up_conv2(torch.cat([self.up_sample(x), x2], 1), t)
        x = self.up_conv1(torch.cat([self.up_sample(x), x1], 1), t)
        return self.out(x)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def seed_model_like(target: int) -> SeedUNetWithTime:
    """パラメータ数が target に最も近い幅 c の seed モデル (time_dim = 8c は原文と同じ比)。"""
    def gap(c: int) -> int:
        return abs(n_params(SeedUNetWithTime(c, 8 * c)) - target)

    best = min(range(8, 129, 2), key=gap)
    return SeedUNetWithTime(best, 8 * best)


# ---------------------------------------------------------------- 計測


def train_throughput(step, batch: int, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - t0)


def ours_step(model, sched, x, y, opt, bf16):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = training_loss(model, sched, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def seed_step(model, x, opt):
    betas = torch.linspace(0.001, 0.01, 1000)
    ac = (1 - betas).cumprod(0)

    def step():  # seed 003 の学習ループの 1 ステップ (t は 1..1000)
        t = torch.randint(1, 1001, (len(x),))
        noise = torch.randn_like(x)
        a = ac[t - 1].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        loss = nn.functional.mse_loss(model(x_t, t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sample-n", type=int, default=32, help="生成の速さを測る枚数")
    p.add_argument("--skip-ddpm", action="store_true", help="DDPM 1000 ステップの計測を省く")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (args.batch_size,))
    sched = NoiseSchedule.from_name("cosine")
    print(f"日時: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 開始時の負荷 (loadavg) "
          f"{os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"threads={torch.get_num_threads()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, bf16 が速い: {bf16_supported('cpu')}")

    results = {}
    ours = UNet()
    seed = seed_model_like(n_params(ours))
    width = seed.down_conv1.conv[0].out_channels
    print(f"本書の UNet: {n_params(ours):,} パラメータ / seed 003 (幅 {width}): "
          f"{n_params(seed):,} パラメータ")
    opt = torch.optim.AdamW(seed.parameters(), 1e-3)
    results["seed 003 (fp32)"] = train_throughput(seed_step(seed, x, opt), len(x), 1, args.iters)
    configs = [("本書 fp32", False, False), ("本書 fp32 + channels_last", False, True)]
    if bf16_supported("cpu"):
        configs.append(("本書 bf16 + channels_last", True, True))
    for name, bf16, cl in configs:
        torch.manual_seed(0)
        model = UNet()
        xb = x
        if cl:
            model = model.to(memory_format=torch.channels_last)
            xb = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        results[name] = train_throughput(ours_step(model, sched, xb, y, opt, bf16), len(x), 1,
                                         args.iters)
    base = results["seed 003 (fp32)"]
    print("\n学習ステップの速さ (バッチ", args.batch_size, ")")
    for name, v in results.items():
        print(f"  {name:<28} {v:8.1f} img/s   seed 比 {v / base:5.2f} 倍")
    best = max(v for k, v in results.items() if k.startswith("本書"))
    print(f"→ 本書の最速設定は seed 003 の {best / base:.2f} 倍")

    if DEFAULT_CHECKPOINT.is_file():
        from torchbook.diffusion.train import load_checkpoint
        model, sched, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    else:
        model = UNet().eval()
    n = args.sample_n
    yb = torch.arange(n) % 10
    t0 = time.perf_counter()
    sample(model, sched, n, y=yb, method="ddim", steps=50, eta=1.0)
    t_ddim = (time.perf_counter() - t0) / n
    print(f"\n生成 ({n} 枚): DDIM 50 ステップ (η = 1) {t_ddim * 1000:.1f} ms/枚")
    if not args.skip_ddpm:
        t0 = time.perf_counter()
        sample(model, sched, n, y=yb, method="ddpm")
        t_ddpm = (time.perf_counter() - t0) / n
        print(f"             DDPM 1000 ステップ         {t_ddpm * 1000:.1f} ms/枚 → DDIM は "
              f"{t_ddpm / t_ddim:.1f} 倍速い")

    info = DEFAULT_CHECKPOINT.with_suffix(".json")
    if info.is_file():
        ev = json.loads(info.read_text()).get("eval", {})
        print("\n来歴 JSON の FID (evaluate CLI):")
        runs = sorted((k for k in ev if "fid" in ev[k] and not k.startswith("floor")),
                      key=lambda k: (ev[k]["n"], ev[k]["method"], ev[k]["guidance_scale"] != 1,
                                     ev[k]["guidance_scale"], ev[k].get("steps", 0),
                                     ev[k].get("eta", 0)))
        for key in runs:
            r = ev[key]
            floor = ev.get(f"floor@{r['n']}", {}).get("fid", math.nan)
            print(f"  {key:<20} FID {r['fid']:6.2f}  下限 {floor:5.2f}  比 {r['fid'] / floor:5.2f}")
        ddim, ddpm = ev.get("ddim:50:1@1000"), ev.get("ddpm@1000")
        if ddim and ddpm:
            print(f"→ DDIM 50 (η = 1) の FID は DDPM 1000 の {ddim['fid'] / ddpm['fid']:.3f} 倍、"
                  f"1 枚の時間は 1/{ddpm['seconds_per_image'] / ddim['seconds_per_image']:.1f}"
                  " (評価時の計測)")


if __name__ == "__main__":
    main()
