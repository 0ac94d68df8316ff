"""本の図を描くための補助関数 (本書専用。読者のプロジェクトにコピーする必要はありません)。

import するだけで matplotlib に日本語フォント (IPAexGothic, matplotlib-fontja) を設定し、
図のラベルが豆腐 (□) にならないようにします。それでも字形の無い文字が出たときは、
警告ではなくエラーにして、ビルドを止めます。本のページ (IPython) では、図の PNG に
最小の文字の大きさを書き込みます (:func:`figure_png`。CI のブラウザー検査が読みます)。

graphviz の図は SVG で返し、文字は文字のまま残します (読者のブラウザーが自分の日本語フォントで
描くので、どの環境でも豆腐になりません)。
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib_fontja
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from torchvision.utils import make_grid

matplotlib_fontja.japanize()
# 字形の無い文字 (豆腐) は、図を描いた時点でエラーにする (警告のままだと見落とす)
warnings.filterwarnings("error", message=r"Glyph \d+ .*missing from font", category=UserWarning)
plt.rcParams["axes.unicode_minus"] = False  # マイナス記号の豆腐を防ぐ
plt.rcParams["figure.dpi"] = 100
plt.rcParams["savefig.bbox"] = "tight"


def smallest_font_pt(fig: plt.Figure) -> float:
    """図に描かれる文字のうち、最も小さい文字の大きさ (pt) を返します (文字が無ければ 0)。

    目盛りの数字は、軸を表示している (axis("off") でない) ときだけ数えます。
    """
    texts = list(fig.texts)  # fig.suptitle もここに入る
    for ax in fig.axes:
        texts += [a for a in ax.get_children() if isinstance(a, Text)]  # 題と ax.text
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
        if ax.axison:
            for axis in (ax.xaxis, ax.yaxis):
                texts.append(axis.label)
                texts += axis.get_ticklabels()
    sizes = [t.get_fontsize() for t in texts if t.get_visible() and t.get_text().strip()]
    return float(min(sizes)) if sizes else 0.0


def figure_png(fig: plt.Figure, **kwargs) -> bytes | str | None:
    """ノートブックに表示する PNG を作ります。最小の文字の大きさを PNG に書き込みます。

    IPython の PNG の作り方 (``print_figure``) と同じで、違いは PNG のテキスト
    ``min_font_pt`` だけです。CI のブラウザー検査は、これと表示の倍率から、
    文字が読める大きさで表示されているかを確かめます。
    """
    from IPython.core.pylabtools import print_figure

    metadata = {"min_font_pt": f"{smallest_font_pt(fig):g}"}
    return print_figure(fig, "png", metadata=metadata, **kwargs)


def show_font_size_in_notebook_pngs() -> bool:
    """IPython (本のページのカーネル) で、図の PNG を :func:`figure_png` で作るようにします。

    matplotlib は書き換えず、IPython の表示の仕組み (型ごとの formatter) に登録します。
    IPython の中でなければ何もせず False を返します。
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    if "inline" in matplotlib.get_backend():  # inline の設定を先に済ませる (最初の図を作る
        importlib.import_module("matplotlib_inline.backend_inline")  # ときだと、登録が上書きされる)
    shell.display_formatter.formatters["image/png"].for_type(
        Figure, functools.partial(figure_png, base64=True))  # inline と同じ base64 の文字列
    return True


show_font_size_in_notebook_pngs()


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


# SVG に書くフォント名。先頭の IPAexGothic で配置を計算し、ブラウザーは入っているものを使う
SVG_FONTS = "IPAexGothic,Hiragino Sans,Yu Gothic,Meiryo,Noto Sans CJK JP,sans-serif"


def dot_svg(source: str) -> str:
    """graphviz の DOT ソースを SVG の文字列にします (文字は <text> のまま)。

    文字の幅は matplotlib-fontja の IPAexGothic で測ります。計算機に入っているフォントに
    よらず同じ SVG になり、日本語の入った箱の大きさも正しくなります。
    """
    fonts = Path(matplotlib_fontja.__file__).parent / "fonts"
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "fonts.conf"
        conf.write_text(
            '<?xml version="1.0"?><fontconfig>'
            '<include ignore_missing="yes">/etc/fonts/fonts.conf</include>'
            f"<dir>{fonts}</dir><cachedir>{tmp}</cachedir></fontconfig>",
            encoding="utf-8",
        )
        proc = subprocess.run(["dot", "-Tsvg"], input=source.encode("utf-8"),
                              capture_output=True, check=True,
                              env={**os.environ, "FONTCONFIG_FILE": str(conf)})
    return proc.stdout.decode("utf-8")


def cpu_gpu_flow_svg() -> str:
    """CPU と GPU の役割分担 (プログラム → データ → 実行 → 結果) の図を SVG で返します。"""
    import graphviz  # 図を描くときだけ使う

    g = graphviz.Digraph(graph_attr={"rankdir": "LR", "fontname": SVG_FONTS})
    g.attr("node", shape="box", style="rounded,filled", fontname=SVG_FONTS, fontsize="12")
    g.attr("edge", fontname=SVG_FONTS, fontsize="11")
    g.node("cpu", "CPU\n主記憶 (ホスト)", fillcolor="#dbe9f6", width="1.8", height="1.6")
    g.node("gpu", "GPU\nGPU のメモリ (デバイス)", fillcolor="#fde2c8", width="1.8", height="1.6")
    g.edge("cpu", "gpu", label="1. プログラム (カーネル)")
    g.edge("cpu", "gpu", label="2. データ (cudaMemcpy)")
    g.edge("gpu", "gpu", label="3. 実行 (多数のスレッド)")
    g.edge("gpu", "cpu", label="4. 計算結果 (cudaMemcpy)")
    return dot_svg(g.source)


def _draw_cells(ax: plt.Axes, t: torch.Tensor, x0: float, y0: float, title: str,
                color: str, ghost_from: tuple[int, int] | None = None) -> None:
    """2 次元テンソルの各要素をマス目として描きます (ghost_from 以降のマスは薄く描く)。"""
    rows, cols = t.shape
    for i in range(rows):
        for j in range(cols):
            ghost = ghost_from is not None and (i >= ghost_from[0] or j >= ghost_from[1])
            ax.add_patch(plt.Rectangle((x0 + j, y0 - i - 1), 1, 1, facecolor=color,
                                       edgecolor="gray", alpha=0.35 if ghost else 1.0,
                                       linestyle="--" if ghost else "-"))
            ax.text(x0 + j + 0.5, y0 - i - 0.5, f"{t[i, j].item():g}", ha="center",
                    va="center", color="gray" if ghost else "black", fontsize=11)
    ax.text(x0 + cols / 2, y0 + 0.3, title, ha="center", va="bottom", fontsize=10)


def broadcast_figure(a: torch.Tensor, b: torch.Tensor) -> plt.Figure:
    """2 次元テンソル a + b のブロードキャストを、元の形・引き伸ばした形・結果の順に描きます。"""
    out = a + b
    rows, cols = out.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * (4 * cols + 6), 0.9 + 0.55 * rows + 0.6))
    x = 0.0
    _draw_cells(ax, a, x, 0, f"a {tuple(a.shape)}", "lightblue")
    x += a.shape[1] + 1.5
    _draw_cells(ax, b, x, 0, f"b {tuple(b.shape)}", "moccasin")
    x += b.shape[1] + 1.0
    ax.text(x, -rows / 2, "→", fontsize=16, ha="center", va="center")
    x += 1.0
    _draw_cells(ax, a.expand(rows, cols), x, 0, f"a を {rows}×{cols} に", "lightblue",
                ghost_from=(a.shape[0], a.shape[1]))
    x += cols + 0.5
    ax.text(x, -rows / 2, "+", fontsize=16, ha="center", va="center")
    x += 0.5
    _draw_cells(ax, b.expand(rows, cols), x, 0, f"b を {rows}×{cols} に", "moccasin",
                ghost_from=(b.shape[0], b.shape[1]))
    x += cols + 0.5
    ax.text(x, -rows / 2, "=", fontsize=16, ha="center", va="center")
    x += 0.5
    _draw_cells(ax, out, x, 0, f"a + b {tuple(out.shape)}", "palegreen")
    ax.set_xlim(-0.2, x + cols + 0.2)
    ax.set_ylim(-rows - 0.3, 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig


def channel_layout_figure(image_hwc: torch.Tensor) -> plt.Figure:
    """(H, W, C) の RGB 画像と、permute(2, 0, 1) で (C, H, W) にした 3 枚のチャンネルを並べます。"""
    chw = image_hwc.permute(2, 0, 1)
    fig, axes = plt.subplots(1, 4, figsize=(9, 2.6))
    axes[0].imshow(image_hwc.numpy())
    axes[0].set_title(f"(H, W, C) = {tuple(image_hwc.shape)}\nふつうの画像の並び", fontsize=10)
    cmaps = ["Reds", "Greens", "Blues"]
    for c, (ax, name) in enumerate(zip(axes[1:], ["R", "G", "B"], strict=True)):
        ax.imshow(chw[c].numpy(), cmap=cmaps[c], vmin=0, vmax=1)
        ax.set_title(f"チャンネル {c} ({name})\nchw[{c}] の形 {tuple(chw[c].shape)}", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("permute(2, 0, 1) で (C, H, W) = " + str(tuple(chw.shape)) + " に並べ替える",
                 fontsize=11)
    fig.tight_layout()
    return fig


def dtype_table(dtypes: Sequence[torch.dtype]) -> str:
    """データ型の一覧を Markdown の表にして返します (説明や型名はすべて torch から作る)。"""
    rows = ["| データ型 | dtype | 旧来のテンソル型 | 要素 1 個のバイト数 |", "|---|---|---|---|"]
    for dt in dtypes:
        bits = dt.itemsize * 8
        if dt == torch.bool:
            kind = "真偽値"
        elif dt.is_floating_point:
            kind = f"{bits} ビット浮動小数点数"
        else:
            sign = "符号あり" if dt.is_signed else "符号なし"
            kind = f"{bits} ビット整数 ({sign})"
        legacy = torch.empty(0, dtype=dt).type()
        rows.append(f"| {kind} | `{dt}` | `{legacy}` | {dt.itemsize} |")
    return "\n".join(rows)


def confusion_matrix_plot(
    matrix: torch.Tensor, title: str | None = None, ax: plt.Axes | None = None
) -> plt.Figure:
    """混同行列 (行 = 正解、列 = 予測) を、対角以外を強調した色と件数で描きます。"""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 4.6))
    else:
        fig = ax.figure
    m = matrix.detach().cpu().long()
    off = m.clone().float()
    off.fill_diagonal_(float("nan"))  # 対角 (正解) は色をつけず、間違いを目立たせる
    worst = max(int(off.nan_to_num(0).max()), 1)
    im = ax.imshow(off.numpy(), cmap="Reds", vmin=0, vmax=worst)
    n = len(m)
    for i in range(n):
        for j in range(n):
            v = int(m[i, j])
            if v:
                color = "tab:blue" if i == j else ("white" if v > worst / 2 else "black")
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("予測したクラス")
    ax.set_ylabel("正解のクラス")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="間違えた枚数")
    bar.set_ticks(sorted({round(worst * k / 4) for k in range(5)}))  # 整数の目盛り
    if title:
        ax.set_title(title)
    return fig


def captioned_images(
    images: torch.Tensor, captions: Sequence[str], ncol: int = 8, title: str | None = None
) -> plt.Figure:
    """(N, 1, H, W) の画像を、それぞれの下に短い説明をつけて並べます。"""
    n = len(images)
    nrow = (n + ncol - 1) // ncol
    # 1 マス 1 インチ: 8 列で本文の幅 (688 px) にほぼ収まり、8 pt の説明が 9 px 以上で読める
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.0 * ncol, 1.45 * nrow), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k, 0].detach().cpu().numpy(), cmap="gray")
            ax.set_title(captions[k], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def unet_diagram_svg(config: dict) -> str:
    """拡散モデルの章の UNet (``UNet.config``) の構成図を graphviz で描き、SVG を返します。"""
    import graphviz

    ch = config["channels"]
    p = config["patch_size"]
    s = config["image_size"] // p
    c_io = config["in_channels"] * p * p
    g = graphviz.Digraph(graph_attr={"rankdir": "TB", "fontname": SVG_FONTS,
                                     "nodesep": "0.25", "ranksep": "0.3"},
                         node_attr={"shape": "box", "style": "rounded,filled",
                                    "fontname": SVG_FONTS, "fontsize": "12",
                                    "fillcolor": "#eef3fb"},
                         edge_attr={"fontname": SVG_FONTS, "fontsize": "11"})
    g.node("x", f"入力 x_t\n1×{config['image_size']}×{config['image_size']}", fillcolor="#ffffff")
    g.node("unshuf", f"pixel_unshuffle ({p}×{p} の区画をチャンネルへ)\n{c_io}×{s}×{s}")
    g.node("conv_in", f"3×3 畳み込み\n{ch[0]}×{s}×{s}")
    g.edges([("x", "unshuf"), ("unshuf", "conv_in")])
    prev, res = "conv_in", s
    for i, c in enumerate(ch):
        g.node(f"d{i}", f"ResBlock {c}ch\n{res}×{res}", fillcolor="#d8e6f7")
        g.edge(prev, f"d{i}")
        prev = f"d{i}"
        if i < len(ch) - 1:
            g.node(f"ds{i}", f"3×3 畳み込み (stride 2)\n{c}×{res // 2}×{res // 2}")
            g.edge(prev, f"ds{i}")
            prev, res = f"ds{i}", res // 2
    g.node("mid", f"ResBlock {ch[-1]}ch (中央)\n{res}×{res}", fillcolor="#c9dbf2")
    g.edge(prev, "mid")
    prev = "mid"
    for i in reversed(range(len(ch))):
        g.node(f"u{i}", f"連結 → ResBlock {ch[i]}ch\n{res}×{res}", fillcolor="#f7e3d8")
        g.edge(prev, f"u{i}")
        g.edge(f"d{i}", f"u{i}", style="dashed", color="#888888", label="スキップ接続",
               constraint="false")
        prev = f"u{i}"
        if i > 0:
            g.node(f"us{i}", f"2 倍に拡大 + 3×3 畳み込み\n{ch[i - 1]}×{res * 2}×{res * 2}")
            g.edge(prev, f"us{i}")
            prev, res = f"us{i}", res * 2
    g.node("out", f"GroupNorm → SiLU → 3×3 畳み込み\n{c_io}×{s}×{s}")
    size = config["image_size"]
    g.node("shuf", f"pixel_shuffle\n出力 (ε の予測) 1×{size}×{size}", fillcolor="#ffffff")
    g.edges([(prev, "out"), ("out", "shuf")])
    with g.subgraph(name="cluster_emb") as e:
        e.attr(label="条件の埋め込み", fontname=SVG_FONTS, style="dashed")
        e.node("t", "時刻 t (整数)\n正弦波埋め込み → MLP", fillcolor="#e6f4e6")
        e.node("y", "クラス y (0〜9、10 = クラスなし)\nnn.Embedding", fillcolor="#e6f4e6")
        e.node("emb", f"和 ({4 * ch[0]} 次元)\n各 ResBlock へ", fillcolor="#e6f4e6")
        e.edges([("t", "emb"), ("y", "emb")])
    return dot_svg(g.source)



def _png_data_uri(image: torch.Tensor, value_range: tuple[float, float] = (-1, 1)) -> str:
    """(1, H, W) か (H, W) の灰色の画像を、SVG に埋め込める PNG の data URI にします。"""
    import base64
    import io

    from PIL import Image

    lo, hi = value_range
    a = ((image.detach().float().reshape(image.shape[-2:]) - lo) / (hi - lo)).clamp(0, 1)
    buf = io.BytesIO()
    Image.fromarray((a * 255).round().to(torch.uint8).numpy(), mode="L").save(
        buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _math_text(x: float, y: float, parts: Sequence[tuple[str, str]], size: int = 14,
               color: str = "#222222") -> str:
    """数式の小さな断片を SVG の <text> にします。parts は (文字, 種類) の列です。

    種類は "i" (斜体の変数)、"r" (立体)、"si" / "sr" (添字の斜体 / 立体) です。添字は
    小さくして下げます (tspan の dy)。文字は文字のまま残ります。
    """
    from xml.sax.saxutils import escape

    spans, low = [], False
    for text, kind in parts:
        sub = kind.startswith("s")
        attrs = ' font-style="italic"' if kind.endswith("i") else ""
        if sub:
            attrs += f' font-size="{round(size * 0.78)}"'
        if sub != low:
            attrs += f' dy="{4 if sub else -4}"'
            low = sub
        spans.append(f"<tspan{attrs}>{escape(text)}</tspan>")
    return (f'<text x="{x:g}" y="{y:g}" text-anchor="middle" font-family="{SVG_FONTS}" '
            f'font-size="{size}" fill="{color}">{"".join(spans)}</text>')


def diffusion_chain_svg(thumbnails: Sequence[torch.Tensor] | None = None) -> str:
    """拡散モデルの鎖 x_0 → x_1 → … → x_{t-1} → x_t → … → x_T を SVG で返します。

    右向きの矢印 (上、橙) が前向き過程 q(x_t | x_{t-1})、左向きの矢印 (下、青) が逆向き過程
    p_θ(x_{t-1} | x_t) です。thumbnails に 5 枚の画像 (x_0, x_1, x_{t-1}, x_t, x_T の順、
    画素値 [-1, 1]) を渡すと、各ノードの中に小さく描きます (PNG を data URI で埋め込みます)。
    文字は <text> のまま残し、読者のブラウザーが自分の日本語フォントで描きます。
    """
    from xml.sax.saxutils import escape

    subs = [[("0", "sr")], [("1", "sr")], [("t", "si"), ("−1", "sr")], [("t", "si")],
            [("T", "si")]]
    notes = ["画像", "", "", "", "ノイズ"]
    if thumbnails is not None and len(thumbnails) != len(subs):
        raise ValueError(f"thumbnails は {len(subs)} 枚にしてください "
                         f"(受け取ったのは {len(thumbnails)} 枚)")
    q_color, p_color, width = "#a85400", "#1f5fa8", 680
    box_w, thumb = 66, 44
    box_h = 26 + (thumb + 4 if thumbnails is not None else 0) + 18
    top, mid_gap = 44, 12  # ノードの上端、矢印を中央から上下にずらす量
    mid = top + box_h / 2
    centers = {"n0": 46, "n1": 150, "d1": 224, "n2": 298, "n3": 494, "d3": 568, "n4": 634}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{top + box_h + 44}" viewBox="0 0 {width} {top + box_h + 44}">',
           "<defs>"]
    for name, c in (("q", q_color), ("p", p_color)):
        out.append(f'<marker id="chain-{name}" viewBox="0 0 10 10" refX="9" refY="5" '
                   f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
                   f'<path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>')
    out.append("</defs>")
    out.append(f'<rect width="{width}" height="{top + box_h + 44}" fill="#ffffff"/>')

    def legend(y: float, color: str, text: str) -> str:
        return (f'<text x="{width / 2:g}" y="{y:g}" text-anchor="middle" '
                f'font-family="{SVG_FONTS}" font-size="14" fill="{color}">{escape(text)}</text>')

    out.append(legend(22, q_color,
                      "→ 前向き過程: ノイズを少しずつ加える (決まった式で、学習しない)"))
    for k, key in enumerate(["n0", "n1", "n2", "n3", "n4"]):
        cx = centers[key]
        out.append(f'<rect x="{cx - box_w / 2:g}" y="{top}" width="{box_w}" height="{box_h}" '
                   f'rx="8" fill="#f4f6fa" stroke="#8a94a6"/>')
        out.append(_math_text(cx, top + 19, [("x", "i"), *subs[k]], size=16))
        y = top + 26
        if thumbnails is not None:
            out.append(f'<image x="{cx - thumb / 2:g}" y="{y}" width="{thumb}" height="{thumb}" '
                       f'style="image-rendering:pixelated" href="{_png_data_uri(thumbnails[k])}"/>')
            y += thumb + 4
        if notes[k]:
            out.append(f'<text x="{cx}" y="{y + 12}" text-anchor="middle" '
                       f'font-family="{SVG_FONTS}" font-size="12" fill="#333333">'
                       f"{notes[k]}</text>")
    for key in ("d1", "d3"):
        out.append(f'<text x="{centers[key]}" y="{mid + 5:g}" text-anchor="middle" '
                   f'font-family="{SVG_FONTS}" font-size="18" fill="#333333">…</text>')
    order = ["n0", "n1", "d1", "n2", "n3", "d3", "n4"]
    for a, b in zip(order[:-1], order[1:], strict=True):
        x0 = centers[a] + (box_w / 2 if a.startswith("n") else 12) + 3
        x1 = centers[b] - (box_w / 2 if b.startswith("n") else 12) - 3
        out.append(f'<line x1="{x0:g}" y1="{mid - mid_gap:g}" x2="{x1:g}" y2="{mid - mid_gap:g}" '
                   f'stroke="{q_color}" stroke-width="1.6" marker-end="url(#chain-q)"/>')
        out.append(f'<line x1="{x1:g}" y1="{mid + mid_gap:g}" x2="{x0:g}" y2="{mid + mid_gap:g}" '
                   f'stroke="{p_color}" stroke-width="1.6" marker-end="url(#chain-p)"/>')
    cq = (centers["n2"] + centers["n3"]) / 2
    out.append(_math_text(cq, mid - mid_gap - 8, [("q", "i"), ("(", "r"), ("x", "i"), ("t", "si"),
                                                  (" | ", "r"), ("x", "i"), ("t", "si"),
                                                  ("−1", "sr"), (")", "r")], color=q_color))
    out.append(_math_text(cq, mid + mid_gap + 20, [("p", "i"), ("θ", "sr"), ("(", "r"),
                                                   ("x", "i"), ("t", "si"), ("−1", "sr"),
                                                   (" | ", "r"), ("x", "i"), ("t", "si"),
                                                   (")", "r")], color=p_color))
    out.append(legend(top + box_h + 30, p_color,
                      "← 逆向き過程: ノイズを少しずつ取り除く (ニューラルネットワークで学習する)"))
    out.append("</svg>")
    return "\n".join(out)
