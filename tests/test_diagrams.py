"""本の図の検査: graphviz の図は文字を残した SVG で、matplotlib の豆腐はエラーになること。"""

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from booktools import plotting
from torchbook.diffusion import unet

SVG_NS = "{http://www.w3.org/2000/svg}"


def svg_texts(svg: str) -> list[str]:
    root = ET.fromstring(svg.encode("utf-8"))
    assert root.tag == f"{SVG_NS}svg"
    assert list(root.iter(f"{SVG_NS}image")) == []  # 埋め込みのラスター画像は無い
    for t in root.iter(f"{SVG_NS}text"):
        assert t.get("font-family").endswith("sans-serif")  # 最後は汎用フォントに落ちる
    return [t.text or "" for t in root.iter(f"{SVG_NS}text")]


def test_cpu_gpu_flow_is_svg_with_japanese_text():
    texts = svg_texts(plotting.cpu_gpu_flow_svg())
    assert "主記憶 (ホスト)" in texts
    assert "4. 計算結果 (cudaMemcpy)" in texts


def test_unet_diagram_follows_the_config():
    config = unet.UNet(channels=(16, 24), image_size=16, patch_size=2).config
    texts = svg_texts(plotting.unet_diagram_svg(config))
    assert "ResBlock 24ch (中央)" in texts
    assert "出力 (ε の予測) 1×16×16" in texts
    assert texts.count("スキップ接続") == 2


def test_svg_is_the_same_on_every_build():
    assert plotting.cpu_gpu_flow_svg() == plotting.cpu_gpu_flow_svg()


def test_box_is_wide_enough_for_japanese_label():
    """箱の幅は IPAexGothic で測る: 全角 12 文字 (12pt) の箱は 12 × 12pt より広い。"""
    svg = plotting.dot_svg('digraph { a [shape=box fontsize=12 fontname="IPAexGothic" '
                           'label="あいうえおかきくけこさし"] }')
    xs = [float(x) for x in re.findall(r"(-?[\d.]+),-?[\d.]+", svg.split('class="node"')[1])]
    assert max(xs) - min(xs) >= 12 * 12


@pytest.mark.slow
def test_missing_glyph_is_an_error():
    """booktools.plotting を import したカーネルでは、豆腐になる文字を描くとエラーになる。"""
    code = (
        "from booktools import plotting\n"
        "fig, ax = plotting.plt.subplots()\n"
        "ax.set_title('日本語', fontfamily='DejaVu Sans')\n"  # 日本語の字形が無いフォント
        "fig.canvas.draw()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "Agg"}, timeout=120)
    assert proc.returncode != 0
    assert "UserWarning: Glyph" in proc.stderr and "missing from font" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("jupyter-book") is None, reason="jupyter-book が入っていません")
def test_build_warns_when_a_figure_has_tofu(tmp_path):
    """セルの出力に matplotlib の豆腐の警告が残れば、ビルドの警告になる (_ext/figures.py)。"""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "_config.yml").write_text(
        "title: t\nexecute:\n  execute_notebooks: force\nsphinx:\n  local_extensions:\n"
        f"    figures: {root / '_ext'}\n", encoding="utf-8")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: page\n", encoding="utf-8")
    (tmp_path / "page.md").write_text(
        "---\njupytext:\n  text_representation:\n    format_name: myst\nkernelspec:\n"
        "  display_name: Python 3\n  language: python\n  name: python3\n---\n\n# 図\n\n"
        "```{code-cell} ipython3\nimport sys\n"
        "print('UserWarning: Glyph 26085 (\\\\N{CJK UNIFIED IDEOGRAPH-65E5}) missing from "
        "font(s) DejaVu Sans.', file=sys.stderr)\n```\n", encoding="utf-8")
    proc = subprocess.run([shutil.which("jupyter-book"), "build", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert "豆腐" in log and "Glyph 26085" in log
    html = (tmp_path / "_build" / "html" / "page.html").read_text(encoding="utf-8")
    assert "figure-zoom.js" in html  # 図を原寸で開くスクリプトも入る
    assert (tmp_path / "_build" / "html" / "_static" / "figure-zoom.js").exists()


def test_png_records_smallest_font_size_without_patching_matplotlib():
    """本の図の PNG には最小の文字の大きさ (min_font_pt) が入る (CI の文字の大きさの検査が読む)。

    matplotlib そのものは書き換えない: ふつうの savefig の PNG はそのまま。
    """
    import base64
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    assert FigureCanvasAgg.print_png.__module__ == "matplotlib.backends.backend_agg"
    fig, ax = plotting.plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title("題", fontsize=14)
    ax.text(0.5, 0.5, "小さな注記", fontsize=7)
    png = base64.b64decode(plotting.figure_png(fig, base64=True))
    assert Image.open(io.BytesIO(png)).text["min_font_pt"] == "7"
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert "min_font_pt" not in Image.open(io.BytesIO(buf.getvalue())).text
    ax.texts[0].remove()
    ax.axis("off")  # 軸を消すと目盛りの数字 (10 pt) も数えない
    assert plotting.smallest_font_pt(fig) == 14
    fig.suptitle("全体の題", fontsize=9)
    assert plotting.smallest_font_pt(fig) == 9
    plotting.plt.close(fig)


@pytest.mark.slow
def test_notebook_figures_carry_the_smallest_font_size(monkeypatch):
    """ページのカーネルで plt.show() した図も、セルの終わりの図も、PNG に min_font_pt を持つ。"""
    import base64
    import io

    import nbformat
    from nbclient import NotebookClient
    from PIL import Image

    cells = ["from booktools import plotting\nimport matplotlib.pyplot as plt",
             "fig, ax = plt.subplots()\nax.set_title('題', fontsize=14)\n"
             "ax.text(0.5, 0.5, '小', fontsize=7)\nplt.show()",
             "fig, ax = plt.subplots()\nax.axis('off')\nax.set_title('題', fontsize=12)"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    code = str(Path(__file__).resolve().parents[1] / "code")  # カーネルもこのチェックアウトの code/
    monkeypatch.setenv("PYTHONPATH", code + os.pathsep + os.environ.get("PYTHONPATH", ""))
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    found = [Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"]))).text
             for cell in nb.cells for out in cell.outputs if "image/png" in out.get("data", {})]
    assert [t.get("min_font_pt") for t in found] == ["7", "12"]


def test_diffusion_chain_has_both_directions_and_japanese_labels():
    import base64
    import io

    import torch
    from PIL import Image

    svg = plotting.diffusion_chain_svg()
    texts = svg_texts(svg)  # ラスター画像なし、フォントは汎用フォントに落ちる
    assert any("前向き過程" in t for t in texts) and any("逆向き過程" in t for t in texts)
    root = ET.fromstring(svg.encode("utf-8"))
    labels = ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]
    assert "q(xt | xt−1)" in labels and "pθ(xt−1 | xt)" in labels
    assert {"x0", "x1", "xt−1", "xt", "xT"} <= set(labels)
    lines = list(root.iter(f"{SVG_NS}line"))
    assert sum("chain-q" in ln.get("marker-end") for ln in lines) == 6  # 右向きが 6 本
    assert sum("chain-p" in ln.get("marker-end") for ln in lines) == 6  # 左向きが 6 本
    for ln in lines:  # q は右向き、p_θ は左向き
        right = float(ln.get("x2")) > float(ln.get("x1"))
        assert right == ("chain-q" in ln.get("marker-end"))
    for t in root.iter(f"{SVG_NS}text"):  # 添字も含めて、文字は 11 以上
        for n in [t, *t.iter(f"{SVG_NS}tspan")]:
            assert n.get("font-size") is None or float(n.get("font-size")) >= 11

    images = [torch.full((1, 32, 32), v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    svg = plotting.diffusion_chain_svg(images)
    root = ET.fromstring(svg.encode("utf-8"))
    hrefs = [im.get("href") for im in root.iter(f"{SVG_NS}image")]
    assert len(hrefs) == 5 and all(h.startswith("data:image/png;base64,") for h in hrefs)
    png = Image.open(io.BytesIO(base64.b64decode(hrefs[2].split(",", 1)[1])))
    assert png.size == (32, 32) and png.getpixel((0, 0)) in (127, 128)  # 0 は灰色
    assert svg == plotting.diffusion_chain_svg(images)  # ビルドのたびに同じ
    with pytest.raises(ValueError, match="5 枚"):
        plotting.diffusion_chain_svg(images[:3])
