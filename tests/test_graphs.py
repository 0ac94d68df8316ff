"""booktools.graphs のテスト: 計算グラフの図と、章の例が示す値。"""

import re

import pytest
import torch
from torch import nn

from booktools import graphs


def node_ids(dot) -> list[tuple[str, str]]:
    """Digraph のソースから、ノード定義の (id, ラベルの 1 行目) を順に取り出します。"""
    found = re.findall(r'^\t(\w+) \[label=(?:"([^"]*)"|(\S+))', dot.source, flags=re.M)
    return [(nid, (quoted or bare).split("\n")[0]) for nid, quoted, bare in found]


def node_labels(dot) -> list[str]:
    return [label for _, label in node_ids(dot)]


def edges(dot) -> list[tuple[str, str]]:
    return re.findall(r"^\t(\w+) -> (\w+)", dot.source, flags=re.M)


def test_autograd_graph_of_linear_expression():
    x = torch.tensor(3.0, requires_grad=True)
    w = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(2.0, requires_grad=True)
    y = w * x + b
    dot = graphs.autograd_graph(y, {"x": x, "w": w, "b": b}, output_name="y")
    labels = node_labels(dot)
    assert sorted(labels) == sorted(["y", "AddBackward0", "MulBackward0", "w", "x", "b"])
    by_label = {label: nid for nid, label in node_ids(dot)}
    e = set(edges(dot))
    assert (by_label["MulBackward0"], by_label["AddBackward0"]) in e
    assert (by_label["w"], by_label["MulBackward0"]) in e
    assert (by_label["x"], by_label["MulBackward0"]) in e
    assert (by_label["b"], by_label["AddBackward0"]) in e
    assert (by_label["AddBackward0"], by_label["y"]) in e
    dot.pipe(format="svg")  # dot で実際に描けること


def test_shared_subexpression_is_drawn_once():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    a = x + 2
    y = (a * a + a).sum()  # a を 3 回使う
    dot = graphs.autograd_graph(y, {"x": x})
    labels = node_labels(dot)
    assert labels.count("x") == 1
    # a を作った AddBackward0 と、最後の AddBackward0 の 2 つだけ
    assert labels.count("AddBackward0") == 2
    assert labels.count("MulBackward0") == 1
    # a → Mul の辺は 2 本 (a が左右両方の入力)
    add_ids = [nid for nid, label in node_ids(dot) if label == "AddBackward0"]
    mul_id = [nid for nid, label in node_ids(dot) if label == "MulBackward0"][0]
    assert max(edges(dot).count((a_id, mul_id)) for a_id in add_ids) == 2


def test_unnamed_leaf_and_constants():
    x = torch.tensor(2.0, requires_grad=True)
    c = torch.tensor(5.0)  # 勾配のいらない定数は図に現れない
    dot = graphs.autograd_graph(x * c)
    assert node_labels(dot) == ["出力", "MulBackward0", "?"]


def test_mlp_graph_names_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    loss = model(torch.randn(5, 4)).pow(2).mean()
    dot = graphs.autograd_graph(loss, dict(model.named_parameters()))
    labels = node_labels(dot)
    for name, _ in model.named_parameters():
        assert labels.count(name) == 1
    assert "ReluBackward0" in labels
    assert labels.count("AddmmBackward0") == 2
    assert "?" not in labels


def test_tensor_without_graph_gives_clear_error():
    with pytest.raises(ValueError, match="requires_grad"):
        graphs.autograd_graph(torch.ones(3) * 2)
    with pytest.raises(ValueError, match="葉"):
        graphs.autograd_graph(torch.ones(3, requires_grad=True))


def test_concept_graph():
    dot = graphs.concept_graph()
    assert set(edges(dot)) == {("w", "mul"), ("x", "mul"), ("mul", "a"), ("a", "add"),
                               ("b", "add"), ("add", "y")}
    assert dot.pipe(format="svg").startswith(b"<?xml")


def test_tensor_tree_expands_first_branch_only():
    dot = graphs.tensor_tree([("N", 4), ("C", 3), ("H", 2)], shown=2)
    labels = node_labels(dot)
    assert labels.count("N=0") == 1 and labels.count("N=1") == 1
    assert labels.count("C=0") == 1 and labels.count("C=1") == 1
    assert labels.count("H=0") == 1 and labels.count("H=1") == 1
    assert sum(label.startswith("…") for label in labels) == 2  # N と C に残りがある
    assert "(画素" not in dot.source
    noted = graphs.tensor_tree([("H", 2), ("W", 2)], leaf_note="画素の値")
    assert noted.source.count("(画素の値)") == 2  # W=0 と W=1


def test_linear_example_gradients():
    r = graphs.linear_example()
    assert r["y"].item() == 5.0
    assert (r["x"].item(), r["w"].item(), r["b"].item()) == (1.0, 3.0, 1.0)


def test_mean_square_example_matches_hand_derivation():
    y, grad = graphs.mean_square_example()
    assert y.item() == pytest.approx(38 / 3)
    torch.testing.assert_close(grad, torch.tensor([4 / 3, 2.0, 8 / 3]))
    x = torch.arange(3, dtype=torch.float32)
    torch.testing.assert_close(graphs.mean_square_grad_by_hand(x), grad)


def test_gradients_accumulate():
    assert graphs.accumulated_grads(3) == [5.0, 10.0, 15.0]


def test_long_chain_has_one_node_per_operation():
    x = torch.tensor(1.0, requires_grad=True)
    y = x
    for _ in range(30):
        y = y * 1.5 + 1.0
    labels = node_labels(graphs.autograd_graph(y, {"x": x}))
    assert labels.count("MulBackward0") == 30
    assert labels.count("AddBackward0") == 30
    assert labels.count("x") == 1
    assert len(labels) == 30 + 30 + 1 + 1  # 演算、葉、出力


def test_autograd_graph_direction():
    x = torch.tensor(3.0, requires_grad=True)
    y = x * 2
    assert "rankdir=TB" in graphs.autograd_graph(y, {"x": x}, rankdir="TB").source
    assert "rankdir=LR" in graphs.autograd_graph(y, {"x": x}).source
    with pytest.raises(ValueError, match="rankdir"):
        graphs.autograd_graph(y, {"x": x}, rankdir="RL ")
