"""計算グラフを graphviz で描く関数と、テンソル・自動微分の章の小さな例。

`autograd_graph` は、テンソルの `grad_fn` から `next_functions` を逆向きにたどり、
PyTorch が実際に記録した計算グラフを `graphviz.Digraph` として返します。
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import graphviz
import torch

# 図の見た目 (すべての図で共通)
_LEAF_STYLE = {"shape": "ellipse", "style": "filled", "fillcolor": "lightblue"}
_OP_STYLE = {"shape": "box", "style": "rounded,filled", "fillcolor": "lightyellow"}
_OUT_STYLE = {"shape": "ellipse", "style": "filled", "fillcolor": "palegreen"}
_FONT = "IPAGothic"  # 日本語の入ったフォント (Debian の fonts-ipafont-gothic)


def concept_graph() -> graphviz.Digraph:
    """y = wx + b の計算を、変数 (丸) と演算 (記号) で描いた概念図を返します。"""
    dot = graphviz.Digraph(name="y_wx_b")
    dot.attr("graph", rankdir="LR")
    dot.attr("node", shape="circle", fontname=_FONT)
    for name in ["w", "x", "a", "b", "y"]:
        dot.node(name, name)
    dot.node("mul", "×", shape="plaintext", fontsize="20")
    dot.node("add", "+", shape="plaintext", fontsize="20")
    dot.edges([("w", "mul"), ("x", "mul"), ("mul", "a"), ("a", "add"), ("b", "add"),
               ("add", "y")])
    return dot


def autograd_graph(
    output: torch.Tensor,
    names: Mapping[str, torch.Tensor] | None = None,
    output_name: str = "出力",
    rankdir: str = "LR",
) -> graphviz.Digraph:
    """テンソル `output` の計算グラフ (grad_fn の連鎖) を描いた Digraph を返します。

    names は「名前 → 葉のテンソル」の辞書です (例: {"x": x} や model.named_parameters())。
    rankdir は矢印の向きです ("LR" は左から右、長いグラフは "TB" で上から下)。
    葉のテンソルの勾配をためる AccumulateGrad ノードは、その変数の名前で表示します。
    同じノードに何度たどり着いても、ノードは 1 つだけ描きます。
    """
    if output.grad_fn is None:
        if output.requires_grad:
            raise ValueError("このテンソルは葉 (自分で作った変数) なので、計算グラフがありません。"
                             "計算の結果のテンソルを渡してください。")
        raise ValueError("このテンソルには grad_fn がありません (requires_grad=False)。"
                         "requires_grad=True のテンソルから計算したテンソルを渡してください。")
    leaf_names = {id(t): n for n, t in (names or {}).items()}
    if rankdir not in ("LR", "TB"):
        raise ValueError(f'rankdir は "LR" か "TB" です (渡された値: {rankdir!r})')
    dot = graphviz.Digraph(name="autograd")
    dot.attr("graph", rankdir=rankdir)
    dot.attr("node", fontname=_FONT, fontsize="12")

    # id(grad_fn) → (grad_fn, "n0") 。番号にするのはビルドごとに同じ SVG にするため、
    # grad_fn 自体も持っておくのは、途中で解放されて id が別のノードに再利用されないためです。
    ids: dict[int, tuple[object, str]] = {}

    def node_id(fn: object) -> str:
        if id(fn) not in ids:
            ids[id(fn)] = (fn, f"n{len(ids)}")
        return ids[id(fn)][1]

    out_id = "out"
    dot.node(out_id, f"{output_name}\n{_shape(output)}", **_OUT_STYLE)
    seen: set[str] = set()
    stack = [output.grad_fn]
    dot.edge(node_id(output.grad_fn), out_id)
    while stack:
        fn = stack.pop()
        fid = node_id(fn)
        if fid in seen:
            continue
        seen.add(fid)
        variable = getattr(fn, "variable", None)  # AccumulateGrad だけが持つ
        if variable is not None:
            name = leaf_names.get(id(variable), "?")
            dot.node(fid, f"{name}\n{_shape(variable)}", **_LEAF_STYLE)
        else:
            dot.node(fid, type(fn).__name__, **_OP_STYLE)
        for child, _ in fn.next_functions:
            if child is None:  # requires_grad=False の入力 (定数) は描かない
                continue
            dot.edge(node_id(child), fid)
            stack.append(child)
    return dot


def tensor_tree(
    dims: Sequence[tuple[str, int]], shown: int = 2, leaf_note: str | None = None
) -> graphviz.Digraph:
    """N×C×H×W のような多次元配列を木構造として描きます。

    dims は (次元の名前, 大きさ) の列です。各次元では最初の shown 個だけを枝として描き、
    残りは「…」で表します。枝を伸ばすのは各次元の先頭 (番号 0) だけです。
    leaf_note を渡すと、葉 (最後の次元) のノードにその説明を添えます。
    """
    dot = graphviz.Digraph(name="tensor_tree")
    dot.attr("graph", rankdir="TB", nodesep="0.15", ranksep="0.35")
    dot.attr("node", fontname=_FONT, fontsize="11", shape="box", style="rounded",
             height="0.3")
    shape = "×".join(f"{n}" for n, _ in dims)
    dot.node("root", f"テンソル ({shape})")

    def grow(parent: str, depth: int, prefix: str) -> None:
        if depth == len(dims):
            return
        name, size = dims[depth]
        for i in range(min(shown, size)):
            nid = f"{prefix}_{i}"
            label = f"{name}={i}"
            if leaf_note and depth == len(dims) - 1:
                label += f"\n({leaf_note})"
            dot.node(nid, label)
            dot.edge(parent, nid)
            if i == 0:
                grow(nid, depth + 1, nid)
        if size > shown:
            nid = f"{prefix}_more"
            dot.node(nid, f"… ({name} は全部で {size} 個)", shape="plaintext")
            dot.edge(parent, nid, style="dashed")

    grow("root", 0, "n")
    return dot


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")" if t.dim() else "スカラー"


# ---- 章で使う小さな例 ----

def linear_example() -> dict[str, torch.Tensor]:
    """y = wx + b (x=3, w=1, b=2) を計算し、y と各変数の勾配を返します。"""
    x = torch.tensor(3.0, requires_grad=True)
    w = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(2.0, requires_grad=True)
    y = w * x + b
    y.backward()
    return {"y": y.detach(), "x": x.grad, "w": w.grad, "b": b.grad}


def mean_square_example() -> tuple[torch.Tensor, torch.Tensor]:
    """a = x + 2, b = a², c = b + 3, y = mean(c) を x = [0, 1, 2] で計算します。

    戻り値は (y, x.grad) です。
    """
    x = torch.arange(3, dtype=torch.float32, requires_grad=True)
    a = x + 2
    b = a**2
    c = b + 3
    y = c.mean()
    y.backward()
    return y.detach(), x.grad


def mean_square_grad_by_hand(x: torch.Tensor) -> torch.Tensor:
    """y = mean((x + 2)² + 3) の勾配を手で微分した式 dy/dx_i = 2(x_i + 2) / n で求めます。"""
    return 2 * (x + 2) / x.numel()


def accumulated_grads(times: int = 2) -> list[float]:
    """y = x³ + 2x + 1 (x = 1) の backward を times 回呼び、毎回の x.grad を返します。"""
    x = torch.tensor(1.0, requires_grad=True)
    grads = []
    for _ in range(times):
        y = x**3 + 2 * x + 1
        y.backward()  # 勾配は上書きされず、x.grad に足される
        grads.append(x.grad.item())
    return grads
