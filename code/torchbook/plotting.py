"""本の図を描くための補助関数 (本書専用。読者のプロジェクトにコピーする必要はありません)。

import するだけで matplotlib に日本語フォント (IPAexGothic, matplotlib-fontja) を設定し、
図のラベルが豆腐 (□) にならないようにします。
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # 画面のない環境 (CI) でも描けるようにする

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib_fontja  # noqa: E402,F401  (import するとフォントが設定される)
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

matplotlib_fontja.japanize()
plt.rcParams["axes.unicode_minus"] = False  # マイナス記号の豆腐を防ぐ
plt.rcParams["figure.dpi"] = 100
plt.rcParams["savefig.bbox"] = "tight"


def image_grid(
    images: torch.Tensor,
    nrow: int = 8,
    title: str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    scale: float = 1.0,
    ax: plt.Axes | None = None,
) -> plt.Figure:
    """(N, C, H, W) の画像を格子状に並べた図を返します。"""
    if images.dim() != 4:
        raise ValueError(
            f"images は (N, C, H, W) の 4 次元です (渡された形: {tuple(images.shape)})"
        )
    grid = make_grid(
        images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0,
        normalize=True, value_range=value_range,
    )
    if ax is None:
        w = scale * min(nrow, len(images)) * 0.9
        h = scale * ((len(images) + nrow - 1) // nrow) * 0.9
        fig, ax = plt.subplots(figsize=(max(w, 2.0), max(h, 1.0)))
    else:
        fig = ax.figure
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return fig


def line_plot(
    series: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    x: Sequence[float] | None = None,
    logy: bool = False,
    ax: plt.Axes | None = None,
) -> plt.Figure:
    """名前つきの数列を折れ線で重ねて描きます (学習曲線など)。"""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    for name, ys in series.items():
        xs = list(x) if x is not None else list(range(1, len(ys) + 1))
        ax.plot(xs, list(ys), marker="o" if len(ys) <= 30 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def cpu_gpu_flow_png() -> bytes:
    """CPU と GPU の役割分担 (プログラム → データ → 実行 → 結果) の図を PNG で返します。"""
    import graphviz  # 図を描くときだけ使う

    g = graphviz.Digraph(graph_attr={"rankdir": "LR", "dpi": "110", "fontname": "IPAGothic"})
    g.attr("node", shape="box", style="rounded,filled", fontname="IPAGothic", fontsize="12")
    g.attr("edge", fontname="IPAGothic", fontsize="11")
    g.node("cpu", "CPU\n主記憶 (ホスト)", fillcolor="#dbe9f6", width="1.8", height="1.6")
    g.node("gpu", "GPU\nGPU のメモリ (デバイス)", fillcolor="#fde2c8", width="1.8", height="1.6")
    g.edge("cpu", "gpu", label="1. プログラム (カーネル)")
    g.edge("cpu", "gpu", label="2. データ (cudaMemcpy)")
    g.edge("gpu", "gpu", label="3. 実行 (多数のスレッド)")
    g.edge("gpu", "cpu", label="4. 計算結果 (cudaMemcpy)")
    return g.pipe(format="png")
