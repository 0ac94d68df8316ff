"""torchbook.diffusion.unet: 時刻の埋め込み、形、classifier-free guidance の線形性。"""

from __future__ import annotations

import pytest
import torch
from diffusion_fixtures import tiny_unet

from torchbook.diffusion.sampling import guided_eps
from torchbook.diffusion.unet import UNet, timestep_embedding, trace_shapes


def test_timestep_embedding_integer_t():
    e = timestep_embedding(torch.tensor([0, 1, 500, 999]), 32)
    assert e.shape == (4, 32)
    assert (e[1] - e[0]).abs().max() > 0.1  # 隣の整数 t でも区別できる
    e_frac = timestep_embedding(torch.tensor([0, 1, 500, 999]) / 1000, 32)
    assert (e_frac[1] - e_frac[0]).abs().max() < 0.01  # t/T ではほとんど区別できない


def test_unet_shapes_and_errors():
    model = tiny_unet()
    x = torch.randn(2, 1, 32, 32)
    t = torch.tensor([3, 900])
    assert model(x, t, torch.tensor([1, 10])).shape == x.shape
    assert model(x, t).shape == x.shape  # y=None はクラスなし
    with pytest.raises(ValueError, match="32"):
        model(torch.randn(2, 1, 28, 28), t)


def test_skip_connections_are_concatenated():
    """上りのブロックは、下りの特徴をチャンネル方向に連結 (torch.cat) して受け取る。"""
    model = tiny_unet()
    c = model.config["channels"]
    assert model.up[0].norm1.num_channels == c[-1] + c[-1]
    assert model.up[-1].norm1.num_channels == c[0] + c[0]


def test_guidance_endpoints_and_linearity():
    model = tiny_unet()
    x = torch.randn(3, 1, 32, 32)
    t = torch.tensor([10, 400, 900])
    y = torch.tensor([0, 4, 9])
    with torch.no_grad():
        e_u, e_c = model(x, t, None), model(x, t, y)
        torch.testing.assert_close(guided_eps(model, x, t, y, 0.0), e_u)
        torch.testing.assert_close(guided_eps(model, x, t, y, 1.0), e_c)
        assert (e_c - e_u).abs().max() > 1e-4  # クラスで予測が変わる
        torch.testing.assert_close(guided_eps(model, x, t, y, 3.0), e_u + 3 * (e_c - e_u),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_trace_shapes_follows_one_forward_pass(patch_size):
    """trace_shapes: 実行順の形、連結したスキップのチャンネル数、パラメーター数の合計。"""
    model = UNet(channels=(16, 32, 48), patch_size=patch_size)
    x = torch.randn(1, 1, 32, 32)
    rows = trace_shapes(model, x, torch.tensor([7]), torch.tensor([3]))
    names = [r["name"] for r in rows]
    assert names == ["time_mlp", "class_emb", "pixel_unshuffle", "conv_in",
                     "down.0", "downsample.0", "down.1", "downsample.1", "down.2", "mid",
                     "up.0", "upsample.0", "up.1", "upsample.1", "up.2",
                     "norm_out", "conv_out", "pixel_shuffle"]
    by = {r["name"]: r for r in rows}
    s = 32 // patch_size
    assert by["pixel_unshuffle"]["out"] == (1, patch_size**2, s, s)
    assert by["downsample.1"]["out"] == (1, 32, s // 4, s // 4)
    assert by["up.0"]["in"] == (1, 48 + 48, s // 4, s // 4)  # 中央の出力 + スキップ
    assert by["up.2"]["in"] == (1, 16 + 16, s, s)
    for a, b in zip(rows[2:-1], rows[3:], strict=True):  # 前の出力が次の入力 (上りはスキップ分多い)
        skip = f"down.{2 - int(b['name'][3:])}" if b["name"].startswith("up.") else None
        extra = by[skip]["out"][1] if skip else 0
        assert (a["out"][1] + extra, *a["out"][2:]) == b["in"][1:], (a["name"], b["name"])
    assert rows[-1]["out"] == tuple(x.shape)
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # フックは外してある
