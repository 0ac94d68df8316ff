"""計算デバイス (CPU・CUDA・Apple MPS) の選択、正しい時間計測、再現性の設定。

どの環境でも同じコードが動くように、デバイスはこのモジュールの
:func:`get_device` で選び、テンソルとモデルを ``.to(device)`` で移します。
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable

import torch

KNOWN_TYPES = ("cuda", "mps", "cpu")  # get_device が受け付けるデバイスの種類


def cuda_available() -> bool:
    """NVIDIA の GPU (CUDA) が使えるかどうかを返します。"""
    return torch.cuda.is_available()


def mps_available() -> bool:
    """Apple の GPU (MPS) が使えるかどうかを返します。"""
    return torch.backends.mps.is_available()


def get_device(name: str | None = None) -> torch.device:
    """使う計算デバイスを返します。

    ``name`` を省くと cuda → mps → cpu の順に、使える最初のものを選びます。
    ``"cuda"``・``"cuda:1"``・``"mps"``・``"cpu"`` のように名前を指定もできます。
    知らない名前や、この環境で使えないデバイスには直し方つきの例外を出します。
    """
    if name is None:
        if cuda_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(
            f"知らないデバイス名です: {name!r} (使える名前: {', '.join(KNOWN_TYPES)}、"
            "または 'cuda:0' のような番号つきの名前)"
        ) from e
    if device.type not in KNOWN_TYPES:
        raise ValueError(
            f"本書のコードが扱うデバイスは {', '.join(KNOWN_TYPES)} です (渡された名前: {name!r})"
        )
    if device.type == "cuda":
        if not cuda_available():
            raise RuntimeError(
                f"{name!r} を指定しましたが、この環境では CUDA が使えません。"
                "GPU とドライバー、CUDA 版の PyTorch を確認するか、'cpu' を指定してください。"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(
                f"{name!r} を指定しましたが、GPU は {count} 台 (番号 0〜{count - 1}) です。"
            )
    if device.type == "mps" and not mps_available():
        raise RuntimeError(
            f"{name!r} を指定しましたが、この環境では MPS (Apple の GPU) が使えません。"
            "'cpu' を指定してください。"
        )
    return device


def describe_device(device: torch.device) -> str:
    """デバイスを人が読める言葉で説明します (GPU なら製品名つき)。"""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "mps":
        return "mps (Apple の GPU)"
    return f"cpu ({os.cpu_count()} コア、PyTorch のスレッド数 {torch.get_num_threads()})"


def synchronize(device: torch.device) -> None:
    """GPU に積まれた計算がすべて終わるまで待ちます (CPU では何もしません)。

    CUDA と MPS の計算は非同期です。Python の関数が戻った時点では、
    GPU はまだ計算している途中かもしれません。
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_function(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
) -> float:
    """``fn()`` 1 回の実行時間 (秒) の中央値を返します。

    最初の ``warmup`` 回は計測しません (初期化やキャッシュの準備を除くため)。
    計測の前後で :func:`synchronize` を呼び、GPU の計算の終わりまでを測ります。
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats は 1 以上、warmup は 0 以上です ({repeats=}, {warmup=})")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)  # GPU の計算が終わるまで待ってから時計を止める
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int, device: torch.device, repeats: int | None = None) -> float:
    """n×n の float32 行列積の速さを GFLOP/s (1 秒あたり 10 億回の演算) で返します。

    n×n の行列積は掛け算と足し算を合わせて約 2n³ 回の浮動小数点演算です。
    ``repeats`` を省くと、小さな行列ほど多く繰り返します (中央値を安定させるため)。
    """
    if repeats is None:
        repeats = min(50, max(3, 2**28 // n**3))
    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, n, generator=g).to(device)
    b = torch.rand(n, n, generator=g).to(device)
    seconds = time_function(lambda: a @ b, device, warmup=1, repeats=repeats)
    return 2 * n**3 / seconds / 1e9


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """シードをそろえ、できるだけ毎回同じ結果になるように設定します。

    ``deterministic`` が真なら、cuDNN の自動選択 (benchmark) を止め、
    決定的なアルゴリズムだけを使うよう PyTorch に指示します。
    非決定的な演算しかない処理では、PyTorch が例外を出して知らせます。
    cuBLAS の設定は CUDA を使い始める前に決まるので、プログラムの最初に呼んでください。
    """
    random.seed(seed)
    torch.manual_seed(seed)  # CPU と、すべての GPU のシード
    try:
        import numpy as np  # numpy を使うコードのため (無ければ飛ばす)

        np.random.seed(seed)
    except ImportError:
        pass
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS を決定的にするための設定 (CUDA の行列積で必要)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
