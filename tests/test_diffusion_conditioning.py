"""torchbook.diffusion.conditioning: クラス名のトークン、クロスアテンション、アテンションの重み。"""

from __future__ import annotations

import pytest
import torch

from torchbook.diffusion.conditioning import (
    BOS,
    PAD,
    CrossAttention,
    TokenEncoder,
    attention_maps,
    build_vocab,
    tokenize,
)
from torchbook.diffusion.data import CLASSES


def test_tokens_are_the_characters_of_the_class_names():
    table, vocab = tokenize(), build_vocab()
    assert table.shape == (len(CLASSES) + 1, 1 + max(len(n) for n in CLASSES))
    assert (table[:, 0] == BOS).all()
    for i, name in enumerate(CLASSES):
        assert table[i, 1 : 1 + len(name)].tolist() == [vocab[c] for c in name]
        assert (table[i, 1 + len(name) :] == PAD).all()
    assert (table[-1, 1:] == PAD).all()  # 条件なしは BOS だけの空の列
    # 「シャツ」は Tシャツ/トップ とシャツで同じトークンになる
    shirt = table[CLASSES.index("シャツ"), 1:4]
    assert table[CLASSES.index("Tシャツ/トップ"), 2:5].tolist() == shirt.tolist()


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        if not p.any():  # 0 で初期化した出力層も乱数にする (効果が 0 では比べられない)
            torch.nn.init.normal_(p, std=0.2)
    return module


def test_cross_attention_ignores_padding_and_starts_as_identity():
    enc = TokenEncoder(16)
    attn = CrossAttention(16, 16, heads=4)
    x = torch.randn(3, 16, 4, 4)
    y = torch.tensor([1, 9, 10])  # ズボン (3 文字)、アンクルブーツ (7 文字)、条件なし
    context, pad = enc(y)
    torch.testing.assert_close(attn(x, context, pad), x)  # 出力層が 0: 恒等写像から始まる
    maps = attention_maps(attn, x, context, pad)[""]
    assert maps.shape == (3, 4, 4, enc.tokens.shape[1])
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 4, 4))
    assert (maps[pad[:, None, None, :].expand_as(maps)] == 0).all()
    assert (maps[2, ..., 0] == 1).all()  # 空の列では BOS しか見るものがない
    assert attn.weights is None and not attn.keep_weights  # 記録は後始末される


def test_different_names_give_different_outputs():
    enc, attn = randomized(TokenEncoder(16)), randomized(CrossAttention(16, 16, heads=4))
    x = torch.randn(1, 16, 4, 4).repeat(2, 1, 1, 1)
    out = attn(x, *enc(torch.tensor([0, 6])))  # Tシャツ/トップ と シャツ
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="heads"):
        CrossAttention(18, 16, heads=4)
