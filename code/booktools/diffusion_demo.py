"""第 8 章「ブラウザーで生成する」のデモが読むファイルを作ります (本のビルド時に実行)。

- ``demo_metadata``: ブラウザーのサンプラーが使う値 (ᾱ_t、DDIM の時刻、クラス名など)。
  JavaScript には数値を書き写さず、すべてこの JSON から読みます。
- ``reference_ddim``: ``_static/demo-diffusion.js`` の生成ループを numpy で書いたもの。
  メタデータだけを使い、``sampling.sample`` と同じ画像になることをテストで確かめます。
- ``make_test_vectors``: 固定したノイズ x_T から PyTorch の ``sample`` で作った画像。
  CI のブラウザー検査が、ブラウザーの結果と比べます。
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from booktools.data import atomic_write
from booktools.webdemo import export_onnx, save_json, verify_onnx
from torchbook.diffusion.data import CLASSES
from torchbook.diffusion.sampling import DEFAULT_SPACING, ddim_timesteps, sample
from torchbook.diffusion.schedule import NoiseSchedule
from torchbook.diffusion.unet import UNet

MODEL_FILE = "diffusion-unet.onnx"  # 名前は demo-diffusion.js と同じ
META_FILE = "diffusion.json"
TEST_FILE = "diffusion-tests.json"
STEPS_RANGE = (10, 50)  # デモで選べる DDIM のステップ数
TEST_STEPS = 20
TEST_GUIDANCE = (1.0, 1.5)  # ガイダンスなし (条件付きモデルそのもの) とあり
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


def strip_debug_info(path: str | Path) -> int:
    """ONNX の各ノードの来歴 (PyTorch のどの行から来たか) と途中の形の情報を消します。

    計算には使われない情報で、この UNet では 200 kB ほどあります (ブラウザーが読む量を減らす)。
    消したあとの大きさを返します。
    """
    import onnx

    path = Path(path)
    graph = onnx.load(str(path))
    for node in graph.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.graph.value_info[:]
    onnx.checker.check_model(graph)
    payload = graph.SerializeToString()
    atomic_write(path, payload)
    return len(payload)


def onnx_predict(path: str | Path) -> Predict:
    """onnxruntime (Python、1 スレッド) で書き出したグラフを ``Predict`` の形にします。"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return session.run(OUTPUT_NAMES, dict(zip(INPUT_NAMES, (x, t, y), strict=True)))[0]
    return predict


def demo_html(meta: dict, label: int = 0, guidance: float = 1.5, steps: int = TEST_STEPS,
              eta: float = 0.0, seed: int = 0) -> str:
    """デモの操作部品 (HTML)。クラス名とステップ数の範囲は meta から作ります。

    動かすのは demo-diffusion.js で、data-demo="diffusion" の要素を探して使います。
    """
    lo, hi = meta["steps_range"]
    options = "".join(
        f'<option value="{i}"{" selected" if i == label else ""}>{html.escape(name)}</option>'
        for i, name in enumerate(meta["classes"]))
    size = 4 * meta["shape"][1]  # 32×32 を 4 倍に拡大して表示

    def slider(name: str, text: str, lo: float, hi: float, step: float, value: float) -> str:
        return (f'<label for="dd-{name}">{text}</label>'
                f'<input type="range" id="dd-{name}" name="{name}" min="{lo}" max="{hi}" '
                f'step="{step}" value="{value}"><output for="dd-{name}"></output>')

    def canvas(caption: str, alt: str) -> str:
        return (f'<figure style="margin:0;text-align:center">'
                f'<canvas width="{meta["shape"][2]}" height="{meta["shape"][1]}" role="img" '
                f'aria-label="{alt}" style="width:{size}px;height:{size}px;'
                f'image-rendering:pixelated;background:#000"></canvas>'
                f'<figcaption>{caption}</figcaption></figure>')

    grid = ("display:grid;grid-template-columns:max-content minmax(8em,16em) 3em;"
            "gap:.4em .6em;align-items:center")
    return (
        '<div class="torchbook-demo" data-demo="diffusion">'
        f'<form style="{grid}" aria-label="生成の設定">'
        f'<label for="dd-label">クラス</label><select id="dd-label" name="label" '
        f'style="grid-column:span 2">{options}</select>'
        + slider("guidance", "ガイダンスの強さ s", 0, 5, 0.5, guidance)
        + slider("steps", "DDIM のステップ数", lo, hi, 1, steps)
        + slider("eta", "η", 0, 1, 0.1, eta)
        + f'<label for="dd-seed">シード</label><input type="number" id="dd-seed" name="seed" '
        f'min="0" step="1" value="{seed}" style="width:8em;grid-column:span 2">'
        '<button type="submit" style="grid-column:1/-1;justify-self:start;margin:0">生成</button>'
        '</form>'
        '<div style="display:flex;gap:1.5em;flex-wrap:wrap;margin:.8em 0">'
        + canvas("x<sub>t</sub> (生成中の画像)", "生成中の x_t (まだ生成していません)")
        + canvas("予測した x̂<sub>0</sub>", "x_t から予測した x̂_0 (まだ生成していません)")
        + '</div><p role="status" aria-live="polite">「生成」を押すと、ランタイムとモデルを'
        '読み込んでから生成を始めます。</p></div>')


def export_demo(model: UNet, sched: NoiseSchedule, schedule_name: str, out_dir: str | Path,
                label: int, seed: int) -> dict:
    """UNet を ONNX に書き出して照合し、メタデータとテストの入力も書きます。

    返す辞書: model (ONNX のパス)、bytes (その大きさ)、onnx_diff (N = 1, 2 の入力での
    onnxruntime と PyTorch の最大の差)、meta、vectors (テストの入力と PyTorch の画像)。
    """
    out_dir = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.in_channels, model.image_size, model.image_size, generator=g)
    t = torch.tensor([sched.T - 1, 10])
    y = torch.tensor([label, model.null_class])
    axes = {name: {0: "N"} for name in INPUT_NAMES + OUTPUT_NAMES}  # N = 1 か 2 (ガイダンス)
    path = export_onnx(model, (x, t, y), out_dir / MODEL_FILE, INPUT_NAMES, OUTPUT_NAMES, axes)
    strip_debug_info(path)
    diff = max(verify_onnx(path, model, (x[:n], t[:n], y[:n])) for n in (1, 2))
    meta = demo_metadata(model, sched, schedule_name)
    vectors = make_test_vectors(model, sched, label, seed)
    save_json(out_dir / META_FILE, meta)
    save_json(out_dir / TEST_FILE, vectors)
    return {"model": path, "bytes": path.stat().st_size, "onnx_diff": diff, "meta": meta,
            "vectors": vectors}
