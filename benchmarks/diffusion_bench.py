"""拡散モデルの速さのベンチマーク (同じ実行の中で並べて比べます)。

1. 1 枚あたりの計算量 (FLOP、``torch.utils.flop_counter``) と学習ステップの速さ (img/s):
   本書の UNet と、入門記事「ちょい調べた!拡散モデルとは?【実装編】」(note) の
   UNetWithTime (BatchNorm、Python ループの時刻埋め込み) を同じパラメーター数に縮めたもの。
   どちらも同じ形式 (fp32 / channels_last / bf16) をすべて試し、それぞれの最速どうしを比べます。
2. 時刻埋め込みが学習ステップに占める割合。
3. 生成の速さ: DDIM 50 ステップと DDPM 1000 ステップの 1 枚あたりの時間。
4. 来歴 JSON の評価 (evaluate CLI): val で選んだサンプラーと、その test の値。選ぶのは
   val だけです。test は val で測った候補のすべてについて記録してありますが、どの選択も
   test の値を読みません。
5. FID と NFE の表 (来歴 JSON から): DDIM η=0・η=1、DPM-Solver++ 2M (ddpm_fashion.json)、
   フローマッチングの Euler・Heun (flow_fashion.json があれば)。val と test の各 FID の隣に、
   同じ n の本物どうしの参照水準との比を並べます (``booktools.sampler_table``)。
   ``--live-n 100`` を付けると、NFE 10 の数セルを今のコードで小さな n で測り直します。
6. ``--latent``: 画素のフローマッチング (flow_fashion) と潜在拡散 (latent_fashion) の表。
   NFE の予算 5, 10, 20, 50 ごとに各モデルのサンプラーを val の FID で選び、同じタスクの
   test の FID (参照水準との比) と、1 枚あたりの生成時間 (潜在はデコーダー込み) をこの実行で
   並べて測った速さの比を出します。自己符号化器の再構成 FID (潜在のモデルの下限) も並べます。

    OMP_NUM_THREADS=1 python benchmarks/diffusion_bench.py --threads 1
    python benchmarks/diffusion_bench.py --fid-nfe               # 5. の表だけ (すぐ終わります)
    OMP_NUM_THREADS=1 python benchmarks/diffusion_bench.py --fid-nfe --live-n 100 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/diffusion_bench.py --latent --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from booktools.sampler_table import (
    best_overall,
    best_per_budget,
    fid_nfe_table,
    format_table,
    measure_live,
    ratio_text,
    read_evals,
)
from torchbook.diffusion.checkpoint import DEFAULT_CHECKPOINT, WEIGHTS_DIR, load_checkpoint
from torchbook.diffusion.device import bf16_supported
from torchbook.diffusion.evaluation import parse_task
from torchbook.diffusion.losses import training_loss
from torchbook.diffusion.sampling import sample
from torchbook.diffusion.schedule import NoiseSchedule
from torchbook.diffusion.unet import UNet, timestep_embedding

ARTICLE = "入門記事のモデル"
FLOW_CHECKPOINT = WEIGHTS_DIR / "flow_fashion.pt"
LATENT_CHECKPOINT = WEIGHTS_DIR / "latent_fashion.pt"
LATENT_BUDGETS = (5, 10, 20, 50)
LIVE_TASKS = {DEFAULT_CHECKPOINT: ["ddim:10:0", "ddim:10:1", "dpm:10"],
              FLOW_CHECKPOINT: ["euler:10", "heun:5"]}  # NFE 10 (Heun は 9) のセル

# ------------------------------------------------ 引用: 入門記事のモデル
# ここから「引用ここまで」までは、入門記事「ちょい調べた!拡散モデルとは?【実装編】」(note の
# 記事、book/references.bib の src_ddpm_article) のコードをほぼそのまま引用したものです
# (言い換えではありません。名前の頭に Article / article_ を付けただけです)。同じ条件で速さを
# 比べるためだけに引用しており、このリポジトリの MIT ライセンスの対象ではありません。


def article_time_embedding(time_steps, time_dim, device="cpu"):
    max_time = len(time_steps)
    embeddings = torch.zeros(max_time, time_dim, device=device)
    idx = torch.arange(0, time_dim, device=device)
    div_term = torch.exp(idx / (2 * time_dim) * torch.log(torch.tensor(10000.0)))
    for t in range(max_time):
        embeddings[t, 0::2] = torch.sin(time_steps[t] / div_term[::2])
        embeddings[t, 1::2] = torch.cos(time_steps[t] / div_term[1::2])
    return embeddings


class ArticleConvBlock(nn.Module):
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


class ArticleUNetWithTime(nn.Module):
    """記事の UNetWithTime。幅 c (原文は 64) と time_dim (原文は 512) だけを変えられます。"""

    def __init__(self, c=64, time_dim=512):
        super().__init__()
        self.time_dim = time_dim
        self.down_conv1 = ArticleConvBlock(1, c, time_dim)
        self.down_conv2 = ArticleConvBlock(c, 2 * c, time_dim)
        self.bottleneck = ArticleConvBlock(2 * c, 4 * c, time_dim)
        self.up_conv2 = ArticleConvBlock(6 * c, 2 * c, time_dim)
        self.up_conv1 = ArticleConvBlock(3 * c, c, time_dim)
        self.out = nn.Conv2d(c, 1, 1)
        self.max_pool = nn.MaxPool2d(2, 2)
        self.up_sample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x, time_steps):
        t = article_time_embedding(time_steps, self.time_dim, device=x.device)
        x1 = self.down_conv1(x, t)
        x2 = self.down_conv2(self.max_pool(x1), t)
        x = self.bottleneck(self.max_pool(x2), t)
        x = self.up_conv2(torch.cat([self.up_sample(x), x2], 1), t)
        x = self.up_conv1(torch.cat([self.up_sample(x), x1], 1), t)
        return self.out(x)


# ------------------------------------------------ 引用ここまで


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def article_model_like(target: int) -> ArticleUNetWithTime:
    """パラメーター数が target に最も近い幅 c の記事のモデル (time_dim = 8c は原文と同じ比)。"""
    def gap(c: int) -> int:
        return abs(n_params(ArticleUNetWithTime(c, 8 * c)) - target)

    best = min(range(8, 129, 2), key=gap)
    return ArticleUNetWithTime(best, 8 * best)


# ---------------------------------------------------------------- 計測


def seconds_per_call(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def forward_flops(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """順伝播 1 回の浮動小数点演算の回数 (掛け算と足し算を別に数える)。"""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


def ours_step(model, sched, x, y, bf16):
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = training_loss(model, sched, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def article_step(model, x, bf16):
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    betas = torch.linspace(0.001, 0.01, 1000)
    ac = (1 - betas).cumprod(0)

    def step():  # 記事の学習ループの 1 ステップ (t は 1..1000)
        t = torch.randint(1, 1001, (len(x),))
        noise = torch.randn_like(x)
        a = ac[t - 1].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.mse_loss(model(x_t, t).float(), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


GOALS = {10: 2.0, 20: 1.6}  # イシューで決めた目標 (test の比): NFE ≤ 10 で 2.0×、≤ 20 で 1.6×
GOAL_OVERALL = 1.4  # 全体で最良のサンプラーの目標
# 少ないステップの目標 (test の比、3 つのシードの平均): NFE ≤ 4 で 2.5×、≤ 10 で 2.0×、≤ 20 で 1.6×
FEW_GOALS = {1: None, 2: None, 4: 2.5, 10: 2.0, 20: 1.6}
FEW_MODELS = {"フロー (同梱)": "flow_fashion.json", "リフロー後": "reflow_fashion.json",
              "潜在のフロー": "latent_fashion.json"}


def fid_nfe_report(n: int, guidance: float | None, live_n: int | None) -> None:
    """5. FID と NFE の表 (来歴 JSON)、val で選んだものの test の比と目標、必要なら測り直し。"""
    paths = [DEFAULT_CHECKPOINT.with_suffix(".json"), FLOW_CHECKPOINT.with_suffix(".json")]
    found = [path.name for path in paths if path.is_file()]
    if guidance is None:  # val で選んだサンプラー (selection の chosen) の s を使う
        sel = json.loads(paths[0].read_text(encoding="utf-8")).get("selection", {})
        guidance = parse_task(sel["chosen"])["guidance_scale"] if sel else 1.0
    rows = fid_nfe_table(read_evals(paths), n, guidance)
    print(f"\nFID と NFE (来歴 JSON {', '.join(found)}、n = {n}、guidance s = {guidance:g}。"
          "比 = FID ÷ 同じ split・n の本物どうしの FID の平均)")
    print(format_table(rows) if rows else "  (この n と s で測った結果がありません)")
    print("  (シードを変えて測ったセルは、比の平均と [最小–最大]。選ぶのは既定のシードの val)")
    best = best_per_budget(rows)
    for b, (name, cell) in best.items():
        goal = f" (目標 {GOALS[b]:.1f}×: {'達成' if cell['ratio'] <= GOALS[b] else '未達'})" \
            if b in GOALS else ""
        print(f"  NFE ≤ {b:>3}: val で選んだ {name} {cell['task']} の test の比 "
              f"{ratio_text(cell)}{goal}")
    overall = best_overall(rows)
    if overall:
        name, cell = overall
        ok = "達成" if cell["ratio"] <= GOAL_OVERALL else "未達"
        print(f"  全体: val で選んだ {name} {cell['task']} の test の比 {ratio_text(cell)} "
              f"(目標 {GOAL_OVERALL:.1f}×: {ok})")
    if not live_n:
        return
    print(f"\n今のコードで測り直し (val、n = {live_n}、CPU・fp32、threads="
          f"{torch.get_num_threads()}。n が小さいので FID は大きく出ます。比を見てください)")
    for ckpt, tasks in LIVE_TASKS.items():
        if not ckpt.is_file():
            print(f"  {ckpt.name} がないので飛ばします")
            continue
        res = measure_live(ckpt, tasks, live_n)
        ref = res["reference"]["fid_mean"]
        print(f"  {ckpt.name}: 参照水準 {ref:.2f}")
        for task, r in res.items():
            if task != "reference":
                print(f"    {task:<14} NFE {r['nfe']:>3}  FID {r['fid']:6.2f} "
                      f"({r['fid'] / ref:.2f}×)  {r['seconds']:.1f} 秒")


def few_step_report(n: int) -> None:
    """6. 少ないステップ: モデルごとに、予算ごとの val で選んだ設定 (ガイダンスも) の test の比。"""
    from booktools.sampler_table import best_over_guidance

    budgets = tuple(FEW_GOALS)
    print(f"\n少ない NFE (n = {n}。予算ごとにサンプラー・ステップ・ガイダンスを val で選び、"
          "test の比。シードを変えて測ったものは平均 [最小–最大])")
    for name, file in FEW_MODELS.items():
        path = DEFAULT_CHECKPOINT.parent / file
        if not path.is_file():
            print(f"  {name}: {file} がありません")
            continue
        best = best_over_guidance(read_evals([path]), budgets, n)
        for b in budgets:
            if b not in best:
                print(f"  {name:<12} NFE ≤ {b:>2}: (測っていません)")
                continue
            _, scale, cell = best[b]
            goal = FEW_GOALS[b]
            mark = "" if goal is None else \
                f" (目標 {goal:.1f}×: {'達成' if cell['ratio'] <= goal else '未達'})"
            seeds = len(cell["seeds"])
            print(f"  {name:<12} NFE ≤ {b:>2}: {cell['task']:<14} (NFE {cell['nfe']}) "
                  f"{ratio_text(cell)} [シード {seeds} 個]{mark}")


def chosen_per_budget(evals: dict, n: int, budgets: tuple[int, ...] = LATENT_BUDGETS
                      ) -> dict[int, dict]:
    """予算ごとに val の FID が最小のタスクを選び、{予算: {task, nfe, val, test}} を返します。

    test の結果 (同じタスク・同じ n) が無い予算は "test" が None です。選ぶのはいつも val です。
    """
    vals = [e for k, e in evals.items() if e.get("split") == "val" and e.get("n") == n
            and "/seed" not in k and e.get("nfe", 0) > 0]
    out = {}
    for b in budgets:
        within = [e for e in vals if e["nfe"] <= b]
        if within:
            e = min(within, key=lambda v: v["fid"])
            out[b] = {"task": e["task"], "nfe": e["nfe"], "val": e,
                      "test": evals.get(f"test/{e['task']}@{n}")}
    return out


def time_per_image(ckpt, task: str, n: int, repeats: int = 3) -> float:
    """1 枚あたりの生成時間 (秒、最小値)。潜在拡散ではデコーダーも含みます。"""
    model, sched, _ = load_checkpoint(ckpt)
    kwargs = {k: v for k, v in parse_task(task).items() if k != "task"}
    y = torch.arange(n) % 10
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample(model, sched, n, y=y, seed=0, **kwargs)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def latent_report(n: int, sample_n: int, pixel_json=None, latent_json=None) -> None:
    """6. 画素と潜在のフローマッチングの比較 (FID は来歴 JSON、速さはこの実行で測る)。"""
    pixel_json = pixel_json or FLOW_CHECKPOINT.with_suffix(".json")
    latent_json = latent_json or LATENT_CHECKPOINT.with_suffix(".json")
    for path in (pixel_json, latent_json):
        if not os.path.isfile(path):
            print(f"\n{path} がないので、画素と潜在の表は出せません")
            return
    ev_pix = json.loads(open(pixel_json, encoding="utf-8").read()).get("eval", {})
    ev_lat = json.loads(open(latent_json, encoding="utf-8").read()).get("eval", {})
    pix, lat = chosen_per_budget(ev_pix, n), chosen_per_budget(ev_lat, n)
    ref = ev_lat.get(f"test/reference@{n}") or ev_pix.get(f"test/reference@{n}")
    ref_mean = ref.get("fid_mean", ref["fid"]) if ref else float("nan")
    rec = ev_lat.get(f"test/reconstruction@{n}")
    print(f"\n画素と潜在のフローマッチング (n = {n}。FID は test、括弧は同じ n の本物どうしの "
          f"FID の平均 {ref_mean:.2f} との比。サンプラーは予算ごとに val で選択)")
    if rec:
        print(f"  自己符号化器の再構成 FID (潜在のモデルの下限): {rec['fid']:.2f} "
              f"({rec['fid'] / ref_mean:.2f}×)")
    pixel, _, _ = load_checkpoint(FLOW_CHECKPOINT)
    latent, _, _ = load_checkpoint(LATENT_CHECKPOINT)
    t1 = torch.tensor([500.0])
    f_pix = forward_flops(pixel, torch.randn(1, *pixel.sample_shape), t1)
    f_lat = forward_flops(latent, torch.randn(1, *latent.sample_shape), t1)
    with FlopCounterMode(display=False) as counter:
        latent.decode_latents(torch.randn(1, *latent.sample_shape))
    f_dec = counter.get_total_flops()
    print(f"  順伝播の計算量 (1 枚): 画素の UNet {f_pix / 1e6:.1f} MFLOP、潜在の UNet "
          f"{f_lat / 1e6:.1f} MFLOP (比 {f_pix / f_lat:.2f})、デコーダー {f_dec / 1e6:.1f} MFLOP "
          "(生成の最後に 1 回)")
    print(f"  生成時間: この実行で {sample_n} 枚ずつ測った 1 枚あたり (最小値)、threads="
          f"{torch.get_num_threads()}、fp32、潜在はデコーダー込み")
    print(f"  {'NFE ≤':>6} {'画素 (タスク)':<22}{'FID':>12} {'ms/枚':>8}   "
          f"{'潜在 (タスク)':<22}{'FID':>12} {'ms/枚':>8}  {'FID 比':>7} {'速さの比':>8}")
    for b in LATENT_BUDGETS:
        p, q = pix.get(b), lat.get(b)
        if not p or not q or not p["test"] or not q["test"]:
            print(f"  {b:>6}  (val と test の両方の結果がまだありません)")
            continue
        tp = time_per_image(FLOW_CHECKPOINT, p["task"], sample_n)
        tq = time_per_image(LATENT_CHECKPOINT, q["task"], sample_n)
        fp, fq = p["test"]["fid"], q["test"]["fid"]
        print(f"  {b:>6} {p['task']:<22}{fp:6.2f} ({fp / ref_mean:4.2f}×) {tp * 1e3:8.1f}   "
              f"{q['task']:<22}{fq:6.2f} ({fq / ref_mean:4.2f}×) {tq * 1e3:8.1f}  "
              f"{fq / fp:7.2f} {tp / tq:8.2f}")
    print("  FID 比 = 潜在 ÷ 画素 (1 以下なら潜在が同等以上)、速さの比 = 画素の時間 ÷ 潜在の時間")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--sample-n", type=int, default=8, help="生成の速さを測る枚数")
    p.add_argument("--fid-nfe", action="store_true",
                   help="FID と NFE の表 (来歴 JSON) だけを表示する (速さは測らない)")
    p.add_argument("--n", type=int, default=1000, help="表に使う評価の枚数 (来歴 JSON の n)")
    p.add_argument("--guidance", type=float, default=None,
                   help="表に使う guidance s (既定: val で選んだサンプラーの s)")
    p.add_argument("--live-n", type=int, default=None,
                   help="この枚数で NFE 10 の数セルを今のコードで測り直す (例: 100)")
    p.add_argument("--latent", action="store_true",
                   help="画素と潜在のフローマッチングの表 (FID は来歴 JSON、速さは測る) だけを表示")
    p.add_argument("--pixel-json", default=None,
                   help="--latent で使う画素のモデルの評価 JSON (既定: flow_fashion.json)")
    p.add_argument("--latent-json", default=None,
                   help="--latent で使う潜在のモデルの評価 JSON (既定: latent_fashion.json)")
    args = p.parse_args()
    if args.live_n is not None and (args.live_n % 10 or not 20 <= args.live_n <= 2500):
        p.error(f"--live-n は 10 の倍数で 20〜2500 にしてください (受け取ったのは {args.live_n})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fid_nfe:
        fid_nfe_report(args.n, args.guidance, args.live_n)
        few_step_report(args.n)
        return
    if args.latent:
        latent_report(args.n, args.sample_n, args.pixel_json, args.latent_json)
        return
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (args.batch_size,))
    t = torch.randint(0, 1000, (args.batch_size,))
    sched = NoiseSchedule.from_name("cosine")
    cpu = torch.device("cpu")
    print(f"日時: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 開始時の負荷 (loadavg) "
          f"{os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"threads={torch.get_num_threads()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, bf16 が速い: {bf16_supported(cpu)}")

    ours = UNet()
    article = article_model_like(n_params(ours))
    width = article.down_conv1.conv[0].out_channels
    print(f"本書の UNet: {n_params(ours):,} パラメーター / {ARTICLE} (幅 {width}): "
          f"{n_params(article):,} パラメーター")
    f_ours = forward_flops(ours, x[:8], t[:8]) / 8
    f_art = forward_flops(article, x[:8], t[:8] + 1) / 8
    print(f"順伝播の計算量: 本書 {f_ours / 1e6:.0f} MFLOP/枚、{ARTICLE} {f_art / 1e6:.0f} MFLOP/枚 "
          f"(比 {f_art / f_ours:.2f})")

    configs = [("fp32", False, False), ("fp32 + channels_last", False, True)]
    if bf16_supported(cpu):
        configs.append(("bf16 + channels_last", True, True))
    speed = {}
    for design in ("本書", ARTICLE):
        for name, bf16, cl in configs:
            torch.manual_seed(0)
            model = UNet() if design == "本書" else article_model_like(n_params(ours))
            xb = x
            if cl:
                model = model.to(memory_format=torch.channels_last)
                xb = x.contiguous(memory_format=torch.channels_last)
            step = (ours_step(model, sched, xb, y, bf16) if design == "本書"
                    else article_step(model, xb, bf16))
            speed[design, name] = len(x) / seconds_per_call(step, 1, args.iters)
    print(f"\n学習ステップの速さ (バッチ {args.batch_size}、img/s)")
    print(f"  {'形式':<22}{'本書':>10}{ARTICLE:>14}{'比':>8}")
    for name, _, _ in configs:
        a, b = speed["本書", name], speed[ARTICLE, name]
        print(f"  {name:<22}{a:10.1f}{b:14.1f}{a / b:8.2f}")
    best_ours = max(configs, key=lambda c: speed["本書", c[0]])[0]
    best_art = max(configs, key=lambda c: speed[ARTICLE, c[0]])[0]
    ratio = speed["本書", best_ours] / speed[ARTICLE, best_art]
    print(f"→ 最速どうし: 本書 ({best_ours}) は {ARTICLE} ({best_art}) の {ratio:.2f} 倍")

    # 時刻埋め込み (正弦波 + MLP) の時間と、fp32 の学習ステップ 1 回の時間
    def ours_emb():
        ours.time_mlp(timestep_embedding(t, ours.time_dim)).sum().backward()

    def article_emb():
        article_time_embedding(t + 1, article.time_dim)

    step_ours = args.batch_size / speed["本書", "fp32"]
    step_art = args.batch_size / speed[ARTICLE, "fp32"]
    e_ours = seconds_per_call(ours_emb, 1, 5)
    e_art = seconds_per_call(article_emb, 1, 3)
    print(f"\n時刻埋め込みの時間 (バッチ {args.batch_size}、fp32 の学習ステップに占める割合)")
    print(f"  本書 (ループなし、順伝播 + 逆伝播) {e_ours * 1e3:8.2f} ms "
          f"({100 * e_ours / step_ours:.2f} %)")
    print(f"  {ARTICLE} (Python ループ) {e_art * 1e3:8.2f} ms ({100 * e_art / step_art:.2f} %)")

    model, sched, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    n = args.sample_n
    yb = torch.arange(n) % 10
    t0 = time.perf_counter()
    sample(model, sched, n, y=yb, method="ddim", steps=50, eta=1.0)
    t_ddim = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    sample(model, sched, n, y=yb, method="ddpm")
    t_ddpm = (time.perf_counter() - t0) / n
    print(f"\n生成 ({n} 枚、fp32): DDIM 50 ステップ {t_ddim * 1000:.1f} ms/枚、"
          f"DDPM 1000 ステップ {t_ddpm * 1000:.1f} ms/枚 (DDIM は {t_ddpm / t_ddim:.1f} 倍速い)")

    info = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    sel, ev = info.get("selection"), info.get("eval", {})
    if sel:
        n = sel["n"]
        ref = ev.get(f"val/reference@{n}", {})
        print(f"\n来歴 JSON: val ({n} 枚) でのサンプラーの選択 "
              f"(本物どうしの FID {ref.get('fid_min', float('nan')):.2f}〜"
              f"{ref.get('fid_max', float('nan')):.2f})")
        for task, fid in sel["candidates"].items():
            mark = " ← 選択" if task == sel["chosen"] else ""
            print(f"  {task:<16} val FID {fid:5.2f}{mark}")
        test, test_ref = ev.get(f"test/{sel['chosen']}@{n}"), ev.get(f"test/reference@{n}")
        if test and test_ref:
            print(f"→ 選んだ {sel['chosen']} の test ({n} 枚) の FID {test['fid']:.2f}、"
                  f"本物どうし {test_ref['fid_min']:.2f}〜{test_ref['fid_max']:.2f}")
    fid_nfe_report(args.n, args.guidance, args.live_n)


if __name__ == "__main__":
    main()
