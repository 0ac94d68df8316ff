"""クロスアテンションによる条件付け: クラス名の文字の列を「文」として UNet に読ませます。

Stable Diffusion は文章をトークンの列にし、UNet の特徴マップの各位置から
その列へのアテンション (cross-attention) で条件を取り込みます。ここでは同じ仕組みを、
クラスの日本語の名前 (``data.CLASSES``) の 1 文字ずつをトークンにして作ります。
クラスが 10 個しかないので、これは仕組みを見るためのもので、言葉の理解ではありません。

列の先頭にはいつも「始まり」のトークン (BOS) を置きます。classifier-free guidance の
「条件なし」は BOS だけの空の列です (アテンションの相手が 1 つは残るように)。
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import CLASSES

PAD, BOS = 0, 1  # 詰め物 (アテンションで無視する) と、列の始まり


def build_vocab(names: tuple[str, ...] = CLASSES) -> dict[str, int]:
    """クラス名に出てくる文字 → 番号 (2 から。0 は PAD、1 は BOS)。文字の順で決定的です。"""
    chars = sorted({c for name in names for c in name})
    return {c: i + 2 for i, c in enumerate(chars)}


def tokenize(names: tuple[str, ...] = CLASSES) -> torch.Tensor:
    """クラス名を (クラス数 + 1, 1 + 最長の名前の文字数) のトークン番号の表にします。

    行 i はクラス i の名前 [BOS, 文字, 文字, ..., PAD, ...]、最後の行は条件なしの
    空の名前 [BOS, PAD, ...] です (番号 = クラス数が「クラスなし」なのは UNet と同じ約束)。
    """
    vocab = build_vocab(names)
    length = 1 + max(len(n) for n in names)
    table = torch.full((len(names) + 1, length), PAD, dtype=torch.long)
    table[:, 0] = BOS
    for i, name in enumerate(names):
        table[i, 1 : 1 + len(name)] = torch.tensor([vocab[c] for c in name])
    return table


class TokenEncoder(nn.Module):
    """クラスの番号 y → トークンの列の埋め込み (N, L, dim) と、PAD の位置の印 (N, L)。

    文字の埋め込みに位置の埋め込みを足し、LayerNorm を通すだけの小さな符号化器です。
    """

    def __init__(self, dim: int, names: tuple[str, ...] = CLASSES) -> None:
        super().__init__()
        self.names = tuple(names)
        self.register_buffer("tokens", tokenize(self.names), persistent=False)
        vocab_size = 2 + len(build_vocab(self.names))
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.randn(self.tokens.shape[1], dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokens[y]  # (N, L)
        return self.norm(self.token_emb(tok) + self.pos_emb), tok == PAD


class CrossAttention(nn.Module):
    """特徴マップの各位置 (クエリ) から、トークンの列 (キーと値) へのアテンション。

    softmax(Q Kᵀ / √d) V を、頭 (head) ごとに計算して足し戻します (残差接続)。
    ``keep_weights = True`` にすると、直前の順伝播の重み (N, heads, H·W, L) を
    ``weights`` に残します (どの文字を見ているかを図にするため)。
    """

    def __init__(self, channels: int, context_dim: int, heads: int = 4, groups: int = 8) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) は heads ({heads}) で割り切れる数に"
                             "してください")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)  # 学習開始時は何も足さない (恒等写像)
        nn.init.zeros_(self.out.bias)
        self.keep_weights = False
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                pad_mask: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.to_q(self.norm(x).flatten(2).transpose(1, 2))  # (N, H·W, C)
        k, v = self.to_k(context), self.to_v(context)  # (N, L, C)

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, ·, C) → (N, heads, ·, C/heads)
            return t.reshape(n, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads)  # (N, heads, H·W, L)
        scores = scores.masked_fill(pad_mask[:, None, None, :], float("-inf"))
        attn = F.softmax(scores.float(), dim=-1).to(v.dtype)
        if self.keep_weights:
            self.weights = attn.detach()
        out = (attn @ v).transpose(1, 2).reshape(n, h * w, c)
        return x + self.out(out).transpose(1, 2).reshape(n, c, h, w)


@torch.no_grad()
def attention_maps(model: nn.Module, *inputs) -> dict[str, torch.Tensor]:
    """model(*inputs) を 1 回計算し、各 CrossAttention の重みを頭で平均して返します。

    戻り値は {層の名前: (N, H, W, L)} で、[..., j] が特徴マップの各位置が j 番目の
    トークンに置いた重みです (各位置で L 個の和が 1)。
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CrossAttention)}
    for m in layers.values():
        m.keep_weights = True
    try:
        model(*inputs)
        maps = {}
        for name, m in layers.items():
            w = m.weights.float().mean(1)  # (N, H·W, L)
            side = math.isqrt(w.shape[1])
            maps[name] = w.reshape(w.shape[0], side, side, w.shape[2])
    finally:
        for m in layers.values():
            m.keep_weights, m.weights = False, None
    return maps
