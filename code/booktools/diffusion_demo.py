"""ブラウザーの生成デモ (第 8 章の画素の DDIM、第 10 章の潜在拡散) が読むファイルを作ります。

- ``demo_metadata``: ブラウザーのサンプラーが使う値 (ᾱ_t、DDIM の時刻、クラス名など)。
  JavaScript には数値を書き写さず、すべてこの JSON から読みます。
- ``reference_ddim``: ``_static/demo-diffusion.js`` の生成ループを numpy で書いたもの。
  メタデータだけを使い、``sampling.sample`` と同じ画像になることをテストで確かめます。
- ``make_test_vectors``: 固定したノイズ x_T から PyTorch の ``sample`` で作った画像。
  CI のブラウザー検査が、ブラウザーの結果と比べます。
- 潜在拡散: ``export_latent_demo`` (LatentUNet とデコーダーの 2 つのグラフ)、``reference_flow``
  (JS と同じ手順のフローの ODE とデコード)、``latent_demo`` (本のビルドが
  ``python -m booktools.diffusion_demo --html`` で呼ぶ入口。下の ``main``)。
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from booktools.data import atomic_write
from booktools.webdemo import demo_dir, export_onnx, save_json, verify_onnx
from torchbook.diffusion.autoencoder import IMAGE_SIZE
from torchbook.diffusion.checkpoint import LATENT_FLOW_KIND, load_checkpoint
from torchbook.diffusion.data import CLASSES
from torchbook.diffusion.latent import LatentFlow
from torchbook.diffusion.losses import FLOW_TIME_SCALE
from torchbook.diffusion.sampling import (
    DEFAULT_SPACING,
    FLOW_METHODS,
    check_sampler,
    ddim_timesteps,
    nfe,
    sample,
)
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
# decode(z) → 画像: z (N, C, h, w) float32 の numpy 配列を受け取る関数
Decode = Callable[[np.ndarray], np.ndarray]


def demo_metadata(model: UNet, sched: NoiseSchedule, schedule_name: str,
                  spacing: str = DEFAULT_SPACING,
                  steps_range: tuple[int, int] = STEPS_RANGE) -> dict:
    """ブラウザーのサンプラーに渡す値。DDIM の時刻は選べるステップ数ごとに書き出します。"""
    lo, hi = steps_range
    return {
        "kind": "ddim",  # JS のサンプラーの選び方 (画素の ε 予測モデル)
        "model": MODEL_FILE,
        "t_dtype": "int64",
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


def reference_guided(predict: Predict, x: np.ndarray, tt: np.ndarray, y: int, null: int,
                     guidance_scale: float) -> np.ndarray:
    """guided_eps (1 枚、float64): s = 0 はクラスなし、s = 1 は条件付き、ほかは 2 枚のバッチ。"""
    if guidance_scale == 0:
        return predict(x, tt, np.array([null], dtype=np.int64)).astype(np.float64)
    if guidance_scale == 1:
        return predict(x, tt, np.array([y], dtype=np.int64)).astype(np.float64)
    out = predict(np.concatenate([x, x]), np.concatenate([tt, tt]),
                  np.array([y, null], dtype=np.int64)).astype(np.float64)
    eps_c, eps_u = out[:1], out[1:]
    return eps_u + guidance_scale * (eps_c - eps_u)


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
        eps = reference_guided(predict, x, np.array([t], dtype=np.int64), y, null,
                               guidance_scale)
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

    names = [i.name for i in session.get_inputs()]  # 画素は x, t, y、潜在も同じ順

    def predict(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return session.run(None, dict(zip(names, (x, t, y), strict=True)))[0]
    return predict


def onnx_decode(path: str | Path) -> Decode:
    """onnxruntime (Python、1 スレッド) でデコーダーのグラフを ``Decode`` の形にします。"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def decode(z: np.ndarray) -> np.ndarray:
        return session.run(None, {name: z})[0]
    return decode


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


# ---------------------------------------------------------------- 潜在拡散のデモ (第 10 章)
# LatentFlow の LatentUNet (クラス名の文字へのクロスアテンションを含む) と、自己符号化器の
# デコーダーを別々の ONNX にします。ブラウザーは潜在変数 (例: 4×8×8) の上でフローの ODE を
# 解き (demo-diffusion.js の sample、meta["kind"] == "flow")、最後にデコーダーを 1 回通します。
# 「ライブ」は少ないステップの設定 (meta["live"]: モデルのファイル、解き方、ステップ数) で、
# 2 つのシードのノイズの間の slerp とガイダンスの強さを、スライダーを動かすたびに描き直します。

LATENT_NAME = "latent"  # data-demo の名前 (= メタデータ latent.json、テスト latent-tests.json)
LATENT_UNET_FILE = "latent-unet.onnx"
LATENT_DECODER_FILE = "latent-decoder.onnx"
LATENT_LIVE_FILE = "latent-live-unet.onnx"  # ライブ用に別のモデル (蒸留したものなど) を使うとき
LATENT_INPUTS = ["x", "t", "y"]
LATENT_OUTPUTS = ["v"]
DECODER_INPUTS = ["z"]
DECODER_OUTPUTS = ["image"]
LATENT_METHOD = "heun"  # 「生成」ボタンの解き方
LATENT_STEPS = 10  # 「生成」ボタンのステップ数の既定 (スライダーの初期値)
LATENT_STEPS_RANGE = (1, 30)
LATENT_TEST_STEPS = 5
LATENT_TEST_GUIDANCE = (1.0, 2.0)
LIVE_METHOD = "heun"  # ライブの解き方とステップ数 (ホイン法 2 ステップは NFE 3)
LIVE_STEPS = 2
LIVE_TEST_POINTS = ((0.0, 1.0), (0.35, 2.0), (0.8, 3.0))  # CI が照合する (w, s)
GUIDANCE_RANGE = (0.0, 5.0, 0.5)  # スライダー (最小、最大、刻み)

class _Decoder(torch.nn.Module):
    """自己符号化器の decode (latent_scale で割る → デコーダー → [-1, 1]) を 1 つのグラフに。"""

    def __init__(self, autoencoder: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)


def slerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """ノイズ a と b の間の球面線形補間 (float64)。demo-diffusion.js の slerp と同じ式です。

    a と b が同じ向き (角度 0) なら a を返します。
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
    theta = math.acos(min(max(cos, -1.0), 1.0))
    if math.sin(theta) < 1e-6:
        return a.copy()
    return (math.sin((1 - w) * theta) * a + math.sin(w * theta) * b) / math.sin(theta)


def latent_metadata(model: LatentFlow, live_model_file: str = LATENT_UNET_FILE,
                    live_method: str = LIVE_METHOD, live_steps: int = LIVE_STEPS) -> dict:
    """潜在のデモのメタデータ。モデルのファイル・解き方・ステップ数も書きます (JS は読むだけ)。"""
    check_sampler(model, None, live_method)
    lo, hi = LATENT_STEPS_RANGE
    return {
        "kind": "flow",
        "model": LATENT_UNET_FILE,
        "decoder": LATENT_DECODER_FILE,
        "t_dtype": "float32",
        "time_scale": FLOW_TIME_SCALE,
        "method": LATENT_METHOD,
        "steps": LATENT_STEPS,
        "steps_range": [lo, hi],
        "guidance_range": list(GUIDANCE_RANGE),
        "live": {"model": live_model_file, "method": live_method, "steps": live_steps,
                 "nfe": nfe(live_method, live_steps)},
        "classes": list(CLASSES),
        "null_class": model.null_class,
        "shape": list(model.sample_shape),
        "image_shape": [1, IMAGE_SIZE, IMAGE_SIZE],
        "inputs": LATENT_INPUTS,
        "outputs": LATENT_OUTPUTS,
        "decoder_inputs": DECODER_INPUTS,
        "decoder_outputs": DECODER_OUTPUTS,
    }


def torch_decode(model: LatentFlow) -> Decode:
    """PyTorch のデコーダーを ``Decode`` の形にします。"""
    def decode(z: np.ndarray) -> np.ndarray:
        return model.decode_latents(torch.from_numpy(z)).numpy()
    return decode


def torch_flow_predict(model: torch.nn.Module) -> Predict:
    """PyTorch の潜在モデルを ``Predict`` の形にします (t は float32)。"""
    def predict(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
        return out.float().numpy()
    return predict


def reference_flow(predict: Predict, decode: Decode, meta: dict, x_T: np.ndarray, y: int,
                   steps: int, method: str, guidance_scale: float = 1.0) -> np.ndarray:
    """demo-diffusion.js と同じ手順のフローの ODE (1 枚、オイラー法かホイン法) とデコード。

    sampling.flow_step と同じ式で、各ステップの結果を float32 に丸めます (Float32Array と同じ)。
    """
    times = [1 - i / steps for i in range(steps + 1)]  # sampling.flow_times
    null = meta["null_class"]
    x = x_T.astype(np.float32).reshape(1, *meta["shape"])

    def velocity(x: np.ndarray, t: float) -> np.ndarray:
        tt = np.array([t * meta["time_scale"]], dtype=np.float32)
        return reference_guided(predict, x, tt, y, null, guidance_scale)

    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t)
        x_next = (x + (t_next - t) * v).astype(np.float32)
        if method == "heun" and t_next > 0:
            v_next = velocity(x_next, t_next)
            x_next = (x + (t_next - t) * (v + v_next) / 2).astype(np.float32)
        x = x_next
    return decode(x)


def make_latent_vectors(model: LatentFlow, meta: dict, label: int, seed: int,
                        live_model: LatentFlow | None = None,
                        steps: int = LATENT_TEST_STEPS,
                        guidances: tuple[float, ...] = LATENT_TEST_GUIDANCE,
                        live_points: tuple[tuple[float, float], ...] = LIVE_TEST_POINTS) -> dict:
    """2 つのノイズ (seed から) と、PyTorch の ``sample`` の画像 (「生成」とライブの設定)。

    ライブの x_T は、2 つのノイズの slerp (float64) を float32 に丸めたものです (JS と同じ)。
    """
    g = torch.Generator().manual_seed(seed)
    shape = (1, *model.sample_shape)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    y = torch.tensor([label])
    cases = []
    for s in guidances:
        image = sample(model, None, 1, y=y, guidance_scale=s, method=meta["method"],
                       steps=steps, x_T=a)
        cases.append({"guidance": s, "image": image.flatten().tolist()})
    live = meta["live"]
    live_cases = []
    for w, s in live_points:
        x_T = torch.from_numpy(slerp(a.numpy(), b.numpy(), w).astype(np.float32))
        image = sample(live_model or model, None, 1, y=y, guidance_scale=s,
                       method=live["method"], steps=live["steps"], x_T=x_T)
        live_cases.append({"w": w, "guidance": s, "image": image.flatten().tolist()})
    return {"noise_a": a.flatten().tolist(), "noise_b": b.flatten().tolist(), "label": label,
            "method": meta["method"], "steps": steps, "cases": cases, "live_cases": live_cases}


def _export_graph(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
                  input_names: list[str], output_names: list[str]) -> float:
    """バッチの次元を可変にして書き出し、来歴を消し、N = 1, 2 で PyTorch と照合した差を返します。"""
    axes = {name: {0: "N"} for name in input_names + output_names}
    export_onnx(module, inputs, path, input_names, output_names, axes)
    strip_debug_info(path)
    return max(verify_onnx(path, module, tuple(x[:n] for x in inputs)) for n in (1, 2))


def export_latent_demo(model: LatentFlow, out_dir: str | Path, label: int, seed: int,
                       live_model: LatentFlow | None = None, live_method: str = LIVE_METHOD,
                       live_steps: int = LIVE_STEPS) -> dict:
    """潜在の UNet とデコーダーを ONNX に書き出して照合し、メタデータとテストの入力も書きます。

    live_model (蒸留した少ないステップのモデルなど) を渡すと、ライブはそのモデルを使います
    (デコーダーは model のもの。自己符号化器が違えば ValueError)。
    返す辞書: files (書き出したファイルの名前 → 大きさ)、onnx_diff、meta、vectors。
    """
    out_dir = Path(out_dir)
    live_file = LATENT_UNET_FILE
    if live_model is not None:
        same = all(torch.equal(p, q) for p, q in zip(
            model.autoencoder.state_dict().values(),
            live_model.autoencoder.state_dict().values(), strict=True))
        if not same:
            raise ValueError("ライブのモデルの自己符号化器が、潜在のモデルのものと違います "
                             "(同じ自己符号化器で学習したモデルを渡してください)")
        live_file = LATENT_LIVE_FILE
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *model.sample_shape, generator=g)
    t = torch.tensor([FLOW_TIME_SCALE, 0.37 * FLOW_TIME_SCALE])
    y = torch.tensor([label, model.null_class])
    diffs = [_export_graph(model.unet, (x, t, y), out_dir / LATENT_UNET_FILE,
                           LATENT_INPUTS, LATENT_OUTPUTS),
             _export_graph(_Decoder(model.autoencoder).eval(), (x,),
                           out_dir / LATENT_DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS)]
    if live_model is not None:
        diffs.append(_export_graph(live_model.unet, (x, t, y), out_dir / live_file,
                                   LATENT_INPUTS, LATENT_OUTPUTS))
    meta = latent_metadata(model, live_file, live_method, live_steps)
    vectors = make_latent_vectors(model, meta, label, seed, live_model)
    save_json(out_dir / f"{LATENT_NAME}.json", meta)
    save_json(out_dir / f"{LATENT_NAME}-tests.json", vectors)
    files = {name: (out_dir / name).stat().st_size
             for name in dict.fromkeys([LATENT_UNET_FILE, LATENT_DECODER_FILE, live_file])}
    return {"files": files, "onnx_diff": max(diffs), "meta": meta, "vectors": vectors}


def latent_demo_html(meta: dict, label: int = 0, guidance: float = 2.0, seeds: tuple[int, int]
                     = (0, 1), w: float = 0.0) -> str:
    """潜在のデモの操作部品 (HTML)。クラス名・範囲・ステップ数は meta から作ります。

    動かすのは demo-diffusion.js です (data-script)。クラス・ガイダンス・2 つのシード・
    w を動かすと、ライブの画像 (左) を少ないステップで描き直します。「生成」は右の画像を
    meta["method"] のステップ数で作ります。
    """
    lo, hi = meta["steps_range"]
    g_lo, g_hi, g_step = meta["guidance_range"]
    live = meta["live"]
    options = "".join(
        f'<option value="{i}"{" selected" if i == label else ""}>{html.escape(name)}</option>'
        for i, name in enumerate(meta["classes"]))
    _, h, wid = meta["image_shape"]
    size = 4 * h
    method = {"heun": "ホイン法", "euler": "オイラー法"}

    def slider(name: str, text: str, lo: float, hi: float, step: float, value: float) -> str:
        return (f'<label for="dl-{name}">{text}</label>'
                f'<input type="range" id="dl-{name}" name="{name}" min="{lo}" max="{hi}" '
                f'step="{step}" value="{value}"><output for="dl-{name}"></output>')

    def number(name: str, text: str, value: int) -> str:
        return (f'<label for="dl-{name}">{text}</label><input type="number" id="dl-{name}" '
                f'name="{name}" min="0" step="1" value="{value}" '
                'style="width:8em;grid-column:span 2">')

    def canvas(caption: str, alt: str) -> str:
        return (f'<figure style="margin:0;text-align:center">'
                f'<canvas width="{wid}" height="{h}" role="img" aria-label="{alt}" '
                f'style="width:{size}px;height:{size}px;image-rendering:pixelated;'
                f'background:#000"></canvas><figcaption>{caption}</figcaption></figure>')

    grid = ("display:grid;grid-template-columns:max-content minmax(8em,16em) 3em;"
            "gap:.4em .6em;align-items:center")
    live_name = f'{method[live["method"]]} {live["steps"]} ステップ、NFE {live["nfe"]}'
    return (
        f'<div class="torchbook-demo" data-demo="{LATENT_NAME}" data-script="diffusion">'
        f'<form style="{grid}" aria-label="潜在拡散の生成の設定">'
        f'<label for="dl-label">クラス</label><select id="dl-label" name="label" '
        f'style="grid-column:span 2">{options}</select>'
        + slider("guidance", "ガイダンスの強さ s", g_lo, g_hi, g_step, guidance)
        + number("seed", "シード A", seeds[0])
        + number("seed2", "シード B", seeds[1])
        + slider("w", "A と B の間 w (slerp)", 0, 1, 0.05, w)
        + slider("steps", f'{method[meta["method"]]}のステップ数', lo, hi, 1, meta["steps"])
        + '<button type="submit" style="grid-column:1/-1;justify-self:start;margin:0">'
        '生成</button></form>'
        '<div style="display:flex;gap:1.5em;flex-wrap:wrap;margin:.8em 0">'
        + canvas(f"ライブ ({live_name})", "ライブの画像 (まだ生成していません)")
        + canvas("「生成」の画像", "「生成」の画像 (まだ生成していません)")
        + '</div><p role="status" aria-live="polite">スライダーを動かすと、ランタイムとモデルを'
        '読み込んでから、ライブの画像を描き直します。</p></div>')


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def latent_demo(checkpoint: str | Path, out_dir: str | Path, label: int = 0, seed: int = 0,
                live_checkpoint: str | Path | None = None, live_method: str = LIVE_METHOD,
                live_steps: int = LIVE_STEPS, force: bool = False) -> dict:
    """チェックポイントから潜在のデモのファイルを作ります (前と同じ入力なら作り直しません)。

    入力 (重みのファイル、このモジュール、設定) の指紋をメタデータの ``source`` に残し、
    同じ指紋のファイルがそろっていれば書き出しを省きます。メタデータを返します。
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    live_path = Path(live_checkpoint) if live_checkpoint else None
    source = {"checkpoint": _sha256(checkpoint), "exporter": _sha256(Path(__file__)),
              "live_checkpoint": _sha256(live_path) if live_path else None,
              "label": label, "seed": seed, "live_method": live_method,
              "live_steps": live_steps}
    meta_path = out_dir / f"{LATENT_NAME}.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = [meta.get("model"), meta.get("decoder"), meta.get("live", {}).get("model"),
                 f"{LATENT_NAME}-tests.json"]
        if meta.get("source") == source and all(f and (out_dir / f).is_file() for f in files):
            return meta
    model, _, ckpt = load_checkpoint(checkpoint)
    if ckpt["kind"] != LATENT_FLOW_KIND:
        raise ValueError(f"{checkpoint} は潜在フローのチェックポイント ({LATENT_FLOW_KIND}) では"
                         f"ありません ({ckpt['kind']})")
    live_model = None
    if live_path is not None:
        live_model, _, live_ckpt = load_checkpoint(live_path)
        if live_ckpt["kind"] != LATENT_FLOW_KIND:
            raise ValueError(f"{live_path} は潜在フローのチェックポイントではありません "
                             f"({live_ckpt['kind']})")
    r = export_latent_demo(model, out_dir, label, seed, live_model, live_method, live_steps)
    meta = {**r["meta"], "source": source, "onnx_diff": r["onnx_diff"], "bytes": r["files"]}
    save_json(meta_path, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    """潜在のデモのファイルを書き出し、--html ならデモの HTML を標準出力に書きます。

    Sphinx 拡張 (_ext/webdemo.py の torchbook-demo 指令) が別のプロセスで呼びます。
    """
    import argparse

    from torchbook.diffusion.checkpoint import WEIGHTS_DIR

    ap = argparse.ArgumentParser(description="潜在拡散のブラウザーのデモのファイルを書き出します",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=WEIGHTS_DIR / "latent_fashion.pt",
                    help="潜在フローのチェックポイント")
    ap.add_argument("--live-checkpoint", type=Path, default=None,
                    help="ライブに使う別のチェックポイント (蒸留したモデルなど。省くと同じもの)")
    ap.add_argument("--live-method", choices=FLOW_METHODS, default=LIVE_METHOD,
                    help="ライブの解き方")
    ap.add_argument("--live-steps", type=int, default=LIVE_STEPS, help="ライブのステップ数")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="書き出し先 (省くと booktools.webdemo.demo_dir())")
    ap.add_argument("--label", type=int, default=0, help="デモの初めのクラスと CI の照合のクラス")
    ap.add_argument("--seed", type=int, default=0, help="CI の照合に使う 2 つのノイズのシード")
    ap.add_argument("--force", action="store_true", help="前と同じ入力でも書き出し直す")
    ap.add_argument("--html", action="store_true", help="デモの HTML を標準出力に書く")
    args = ap.parse_args(argv)
    if not 1 <= args.live_steps <= LATENT_STEPS_RANGE[1]:
        ap.error(f"--live-steps は 1〜{LATENT_STEPS_RANGE[1]} にしてください")
    if not 0 <= args.label < len(CLASSES):
        ap.error(f"--label は 0〜{len(CLASSES) - 1} にしてください")
    for path in (args.checkpoint, args.live_checkpoint):
        if path is not None and not path.is_file():
            ap.error(f"{path} がありません")
    out_dir = args.out_dir or demo_dir()
    try:
        meta = latent_demo(args.checkpoint, out_dir, args.label, args.seed,
                           args.live_checkpoint, args.live_method, args.live_steps, args.force)
    except ValueError as e:
        ap.exit(1, f"{ap.prog}: {e}\n")
    if args.html:
        print(latent_demo_html(meta, label=args.label, seeds=(args.seed, args.seed + 1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
