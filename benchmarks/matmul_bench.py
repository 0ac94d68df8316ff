"""行列積の速さ (GFLOP/s) を、CPU 1 スレッドを基準にした比で表示します。

    python benchmarks/matmul_bench.py [--sizes 256 512 1024] [--repeats 5]

比べるのは、CPU 1 スレッド (基準)・CPU の全スレッド・使える GPU (cuda か mps) です。
GPU の計測は torchbook.device.time_function で同期とウォームアップを入れて行います。
あわせて、同期しない素朴な計測が GPU で何秒と出るかも表示します。
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from torchbook import device as dev


def measure(n: int, device: torch.device, repeats: int) -> float:
    return dev.matmul_gflops(n, device, repeats=repeats)


def naive_seconds(n: int, device: torch.device) -> float:
    """同期しない素朴な計測 (GPU では計算の依頼にかかった時間しか測れない)。"""
    a = torch.rand(n, n, device=device)
    t0 = time.perf_counter()
    a @ a
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5, help="計測の回数 (中央値をとる)")
    args = parser.parse_args()
    if min(args.sizes) < 1 or args.repeats < 1:
        parser.error("--sizes と --repeats は 1 以上にしてください")

    cpu = torch.device("cpu")
    all_threads = os.cpu_count() or 1
    gpu = dev.get_device()
    print(f"PyTorch {torch.__version__}、CPU {all_threads} コア、既定のデバイス: "
          f"{dev.describe_device(gpu)}")
    header = f"{'n':>6} {'CPU 1 スレッド':>14} {'CPU 全スレッド':>14} {'比':>6}"
    if gpu.type != "cpu":
        header += f" {gpu.type:>10} {'比':>6} {'素朴な計測 (秒)':>16}"
    print(header)
    for n in args.sizes:
        torch.set_num_threads(1)
        base = measure(n, cpu, args.repeats)
        torch.set_num_threads(all_threads)
        multi = measure(n, cpu, args.repeats)
        row = f"{n:>6} {base:>12.1f} GF {multi:>12.1f} GF {multi / base:>5.2f}x"
        if gpu.type != "cpu":
            g = measure(n, gpu, args.repeats)
            row += f" {g:>8.1f} GF {g / base:>5.1f}x {naive_seconds(n, gpu):>16.6f}"
        print(row)


if __name__ == "__main__":
    main()
