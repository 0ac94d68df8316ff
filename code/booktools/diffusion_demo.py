"""第 6 章「ブラウザーで生成する」のデモが読むファイルを作ります (本のビルド時に実行)。

- ``demo_metadata``: ブラウザーのサンプラーが使う値 (ᾱ_t、DDIM の時刻、クラス名など)。
  JavaScript には数値を書き写さず、すべてこの JSON から読みます。
- ``reference_ddim``: ``_static/demo-diffusion.js`` の生成ループを numpy で書いたもの。
  メタデータだけを使い、``sampling.sample`` と同じ画像になることをテストで確かめます。
- ``make_test_vectors``: 固定したノイズ x_T から PyTorch の ``sample`` で作った画像。
  CI のブラウザー検査が、ブラウザーの結果と比べます。
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from booktools.data import atomic_write
from torchbook.diffusion.data import CLASSES
from torchbook.diffusion.sampling import DEFAULT_SPACING, ddim_timesteps, sample
from torchbook.diffusion.schedule import NoiseSchedule
from torchbook.diffusion.unet import UNet

STEPS_RANGE = (10, 50)  # デモで選べる DDIM のステップ数
TEST_STEPS = 20
TEST_GUIDANCE = (1.0, 1.5)  # guidance なし (条件付きモデルそのもの) とあり
INPUT_NAMES = ["x", "t", "y"]
OUTPUT_NAMES = ["eps"]

# predict(x, t, y) → ε: x (N, C, H, W) float32、t と y (N,) int64 の numpy 配列を受け取る関数
Predict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def demo_metadata(model: UNet, sched: NoiseSchedule, schedule_name: str,
                  spacing: str = DEFAULT_SPACING,
                  steps_range: tuple[int, int] = STEPS_RANGE) -> dict:
    """ブラウザーのサンプラーに渡す値。DDIM の時刻は選べるステップ数ごとに書き出します。"""
    lo, hi = steps_range
    return {
        "T": sched.T,
        "schedule": schedule_name,
        "alphas_cumprod": sched.alphas_cumprod.tolist(),  # float64 のまま
        "spacing": spacing,
        "steps_range": [lo, hi],
        "timesteps": {str(n): ddim_timesteps(sched.T, n, spacing) for n in range(lo, hi + 1)},
        "classes": list(CLASSES),
        "null_class": model.null_class,
        "shape": [model.in_channels, model.image_size, model.image_size],
        "inputs": INPUT_NAMES,
        "outputs": OUTPUT_NAMES,
    }


def torch_predict(model: UNet) -> Predict:
    """PyTorch のモデルを ``Predict`` の形にします。"""
    def predict(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
        return out.float().numpy()
    return predict


def reference_ddim(predict: Predict, meta: dict, x_T: np.ndarray, y: int, steps: int,
                   eta: float = 0.0, guidance_scale: float = 1.0,
                   noises: list[np.ndarray] | None = None) -> np.ndarray:
    """demo-diffusion.js と同じ手順の DDIM (1 枚)。係数は meta から読み、float64 で計算します。

    各ステップの結果は float32 に丸めます (ブラウザーの Float32Array と同じ)。
    η > 0 なら noises[i] を i 番目のステップのノイズに使います。
    """
    ab = meta["alphas_cumprod"]
    times = meta["timesteps"][str(steps)]
    null = meta["null_class"]
    x = x_T.astype(np.float32).reshape(1, *meta["shape"])
    for i, t in enumerate(times):
        # guided_eps: s = 0 はクラスなし、s = 1 は条件付き、それ以外は 2 枚のバッチ
        tt = np.array([t], dtype=np.int64)
        if guidance_scale == 0:
            eps = predict(x, tt, np.array([null], dtype=np.int64)).astype(np.float64)
        elif guidance_scale == 1:
            eps = predict(x, tt, np.array([y], dtype=np.int64)).astype(np.float64)
        else:
            out = predict(np.concatenate([x, x]), np.concatenate([tt, tt]),
                          np.array([y, null], dtype=np.int64)).astype(np.float64)
            eps_c, eps_u = out[:1], out[1:]
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        # ddim_step (clip=True)
        t_prev = times[i + 1] if i + 1 < len(times) else -1
        ac = ab[t]
        ac_prev = ab[t_prev] if t_prev >= 0 else 1.0
        x_t = x.astype(np.float64)
        x0 = np.clip((x_t - (1 - ac) ** 0.5 * eps) / ac**0.5, -1, 1)
        eps = (x_t - ac**0.5 * x0) / (1 - ac) ** 0.5
        var = (1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)
        std = eta * var**0.5
        x_prev = ac_prev**0.5 * x0 + (1 - ac_prev - std**2) ** 0.5 * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + std * noises[i].reshape(x_prev.shape)
        x = x_prev.astype(np.float32)
    return np.clip(x, -1, 1)


def make_test_vectors(model: UNet, sched: NoiseSchedule, label: int, seed: int,
                      steps: int = TEST_STEPS,
                      guidances: tuple[float, ...] = TEST_GUIDANCE) -> dict:
    """固定した x_T (seed から) とクラスで、PyTorch の ``sample`` (DDIM、η = 0) の画像を作ります。

    x_T は float32 の値を JSON の小数にしたもので、ブラウザーで Float32Array に戻すと同じ値です。
    """
    shape = (1, model.in_channels, model.image_size, model.image_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    cases = []
    for g in guidances:
        image = sample(model, sched, 1, y=torch.tensor([label]), guidance_scale=g,
                       method="ddim", steps=steps, eta=0.0, x_T=x_T)
        cases.append({"guidance": g, "image": image.flatten().tolist()})
    return {"x_T": x_T.flatten().tolist(), "label": label, "steps": steps, "eta": 0.0,
            "spacing": DEFAULT_SPACING, "cases": cases}


def write_json(path: str | Path, obj: dict) -> Path:
    """JSON を原子的に書きます (小数は Python の repr のまま、往復で値が変わりません)。"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())
    return path
