"""torchbook.scratch のテスト: 自作の関数が torch の関数と値・勾配で一致すること。"""

import math

import pytest
import torch
import torch.nn.functional as F

from torchbook import scratch


def logits(seed=0, n=6, c=10, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=dtype) * scale).requires_grad_()


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_log_softmax_matches_torch_values_and_grads(scale):
    x1 = logits(scale=scale)
    x2 = x1.detach().clone().requires_grad_()
    ours, ref = scratch.log_softmax(x1), F.log_softmax(x2, dim=-1)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref)
    w = torch.randn(ours.shape, dtype=ours.dtype)  # 任意の重みで下流の勾配を作る
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_naive_log_softmax_overflows_but_stable_does_not():
    x = torch.tensor([[100.0, 200.0, 1000.0]])
    assert not torch.isfinite(scratch.naive_log_softmax(x)).all()
    torch.testing.assert_close(scratch.log_softmax(x), torch.tensor([[-900.0, -800.0, 0.0]]))
    small = torch.tensor([[0.1, -0.3, 0.5]])
    torch.testing.assert_close(scratch.naive_log_softmax(small), scratch.log_softmax(small))


def test_nll_matches_nll_loss():
    lp = F.log_softmax(logits(1), dim=-1)
    target = torch.tensor([0, 3, 9, 3, 5, 1])
    torch.testing.assert_close(scratch.nll(lp, target), F.nll_loss(lp, target))


def test_combined_loss_matches_cross_entropy_with_grads():
    x1 = logits(2, scale=5.0)
    x2 = x1.detach().clone().requires_grad_()
    target = torch.tensor([1, 1, 0, 7, 2, 9])
    ours = scratch.nll(scratch.log_softmax(x1), target)
    ref = F.cross_entropy(x2, target)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_accuracy_hand_made():
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    assert scratch.accuracy(out, torch.tensor([1, 0, 0, 2])).item() == pytest.approx(0.75)
    assert scratch.accuracy(out, torch.tensor([0, 1, 0, 0])).item() == 0.0


def test_xavier_init_shapes_and_scale():
    g = torch.Generator().manual_seed(0)
    w, b = scratch.xavier_init(400, 600, g)
    assert w.shape == (400, 600) and b.shape == (600,)
    assert w.requires_grad and b.requires_grad and w.is_leaf
    assert torch.count_nonzero(b) == 0
    assert w.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.02)


def synthetic(n=256, d=20, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :c]).argmax(1)  # 線形で分けられるラベル
    return x, y


def test_one_sgd_step_lowers_loss():
    x, y = synthetic()
    w, b = scratch.xavier_init(20, 4, torch.Generator().manual_seed(1))
    before = scratch.nll(scratch.model(x, w, b), y).item()
    scratch.fit(x, y, w, b, lr=0.1, epochs=1, bs=len(x))  # 全データで 1 ステップ
    after = scratch.nll(scratch.model(x, w, b), y).item()
    assert after < before
    assert torch.count_nonzero(w.grad) == 0  # 更新の後で勾配は 0 に戻っている


def test_fit_learns_and_records_each_step():
    x, y = synthetic()
    w, b = scratch.xavier_init(20, 4, torch.Generator().manual_seed(1))
    losses = scratch.fit(x, y, w, b, lr=0.5, epochs=3, bs=64)
    assert len(losses) == 3 * 4
    assert losses[-1] < losses[0]
    assert scratch.accuracy(scratch.model(x, w, b), y).item() > 0.8


def test_scratch_equals_nn_linear_training():
    x, y = synthetic(n=200)
    x = x.double()
    w, b = scratch.xavier_init(20, 4, torch.Generator().manual_seed(3))
    w, b = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    layer = scratch.linear_from(w, b)
    assert layer.weight.dtype == torch.float64
    ours = scratch.fit(x, y, w, b, lr=0.3, epochs=2, bs=32)
    ref = scratch.fit_torch(x, y, layer, lr=0.3, epochs=2, bs=32)
    assert len(ours) == len(ref) == 2 * 7
    assert max(abs(a - r) for a, r in zip(ours, ref, strict=True)) < 1e-10
    torch.testing.assert_close(layer.weight.detach().T, w.detach())
    torch.testing.assert_close(layer.bias.detach(), b.detach())


def test_model_output_is_log_probabilities():
    x, _ = synthetic(n=5)
    w, b = scratch.xavier_init(20, 4)
    out = scratch.model(x, w, b)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(5))
