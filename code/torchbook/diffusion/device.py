"""計算デバイスの選択と、デバイスごとの速い計算形式 (channels_last・bf16) の決定。

``get_device`` (と ``KNOWN_TYPES``・``cuda_available``・``mps_available``) は
``torchbook/device.py`` の同名の定義の写しです。このフォルダーだけをコピーしても動くように
写してあり、"# Copied from" の印のある定義は元と同じ文面であることをテストが確かめます
(tests/test_device.py)。直すときは元 (torchbook/device.py) を直し、写しも同じにしてください。
"""

from __future__ import annotations

import torch

# Copied from torchbook.device.KNOWN_TYPES
KNOWN_TYPES = ("cuda", "mps", "cpu")  # get_device が受け付けるデバイスの種類


# Copied from torchbook.device.cuda_available
def cuda_available() -> bool:
    """NVIDIA の GPU (CUDA) が使えるかどうかを返します。"""
    return torch.cuda.is_available()


# Copied from torchbook.device.mps_available
def mps_available() -> bool:
    """Apple の GPU (MPS) が使えるかどうかを返します。"""
    return torch.backends.mps.is_available()


# Copied from torchbook.device.get_device
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


# ---------------------------------------------------------------- 速い計算形式 (この章だけ)


def bf16_supported(device: torch.device) -> bool:
    """この装置で bf16 の計算が速いか (CPU は oneDNN が bf16 命令を使えるときだけ)。

    AVX2 までの CPU では bf16 の畳み込みが遅い参照実装になり、fp32 より何十倍も遅くなります。
    """
    if device.type == "cuda":
        try:  # Ampere より前の GPU (T4・V100) は bf16 をエミュレーションで計算するので数えない
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # including_emulation の無い古い PyTorch は、エミュレーションを数えない
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def fast_formats(device: torch.device, bf16: bool | None = None,
                 channels_last: bool | None = None) -> tuple[bool, bool]:
    """(bf16, channels_last) を決めます。None の項目は装置に合わせた既定値にします。

    章のコードで bf16 と channels_last を決めるのはこの関数だけです。
    - bf16: 装置が bf16 を速く計算できるときだけ (``bf16_supported``)。
    - channels_last: CPU (oneDNN) と CUDA (cuDNN) で使います。MPS では使いません。
    """
    if bf16 is None:
        bf16 = bf16_supported(device)
    if channels_last is None:
        channels_last = device.type in ("cpu", "cuda")
    return bf16, channels_last


def cpu_model() -> str:
    """CPU の製品名 (Linux は /proc/cpuinfo、ほかは platform から)。来歴に書きます。"""
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
