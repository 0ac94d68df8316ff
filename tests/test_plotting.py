"""booktools.plotting のテスト: テンソルの章の図と表を作る関数。"""

import torch

from booktools import plotting


def test_dtype_table_is_built_from_torch():
    table = plotting.dtype_table([torch.float32, torch.uint8, torch.int64, torch.bool])
    lines = table.splitlines()
    assert len(lines) == 2 + 4  # 見出し 2 行 + データ型ごとに 1 行
    assert "| 32 ビット浮動小数点数 | `torch.float32` | `torch.FloatTensor` | 4 |" in lines
    assert "| 8 ビット整数 (符号なし) | `torch.uint8` | `torch.ByteTensor` | 1 |" in lines
    assert "| 64 ビット整数 (符号あり) | `torch.int64` | `torch.LongTensor` | 8 |" in lines
    assert "| 真偽値 | `torch.bool` | `torch.BoolTensor` | 1 |" in lines


def test_broadcast_figure_shows_every_result_value():
    a = torch.tensor([[1], [2], [3]])
    b = torch.tensor([[10, 20, 30, 40]])
    fig = plotting.broadcast_figure(a, b)
    texts = [t.get_text() for t in fig.axes[0].texts]
    for v in (a + b).flatten().tolist():
        assert str(v) in texts
    assert "a + b (3, 4)" in texts
    plotting.plt.close(fig)


def test_channel_layout_figure_has_one_panel_per_channel():
    image = torch.rand(4, 6, 3)
    fig = plotting.channel_layout_figure(image)
    assert len(fig.axes) == 4
    shown = fig.axes[2].images[0].get_array()
    assert torch.allclose(torch.as_tensor(shown.data), image[:, :, 1])
    plotting.plt.close(fig)
