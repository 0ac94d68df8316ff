"""_static/demo-diffusion.js のサンプラーを Node.js で動かし、Python の参照ループと比べます。

ONNX Runtime の代わりに、同じ式を Python と JS で書いた小さな「モデル」を使います。
JS の自己テスト (window.torchbookDemoTests.diffusion) をそのまま呼ぶので、CI のブラウザー
検査と同じ道筋を、ブラウザーなしで数秒で確かめられます。
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from booktools import diffusion_demo
from torchbook.diffusion.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "_static" / "demo-diffusion.js"

# 偽のモデル: ε (または v) = sin(1.3·x + 0.002·t + 0.7·y)。x̂_0 の切り詰めと guidance が効く
# 大きさです。潜在のデモのデコーダーは、画素 j = clamp(1.2·sin(z[j mod |z|] + 0.01·j), -1, 1)。
# ページには data-demo=<name> の要素が 1 つあることにし (画面は作らない)、自己テストを呼びます。
RUNNER = r"""
const fs = require("fs"), vm = require("vm");
const [script, name, metaPath, vecPath] = process.argv.slice(1);
const meta = JSON.parse(fs.readFileSync(metaPath, "utf8"));
const files = { [name + ".json"]: meta,
                [name + "-tests.json"]: JSON.parse(fs.readFileSync(vecPath, "utf8")) };
class Tensor { constructor(type, data, dims) { Object.assign(this, { type, data, dims }); } }
const unet = { run: async (feeds) => {
  const [n, c, h, w] = feeds.x.dims, size = c * h * w, x = feeds.x.data;
  if (x.constructor.name !== "Float32Array" || feeds.t.type !== meta.t_dtype) {
    throw new Error("型が違います");
  }
  const eps = new Float32Array(n * size);
  for (let b = 0; b < n; b++) for (let i = 0; i < size; i++) {
    eps[b * size + i] = Math.sin(1.3 * x[b * size + i] + 0.002 * Number(feeds.t.data[b])
                                 + 0.7 * Number(feeds.y.data[b]));
  }
  return { [meta.outputs[0]]: new Tensor("float32", eps, [n, c, h, w]) };
} };
const decoder = { run: async (feeds) => {
  const z = feeds[meta.decoder_inputs[0]].data, [, H, W] = meta.image_shape;
  const img = new Float32Array(H * W);
  for (let j = 0; j < H * W; j++) {
    img[j] = Math.min(Math.max(1.2 * Math.sin(z[j % z.length] + 0.01 * j), -1), 1);
  }
  return { [meta.decoder_outputs[0]]: new Tensor("float32", img, [1, 1, H, W]) };
} };
const window = { torchbookDemoTests: {}, torchbookDemo: {
  url: (file) => file,
  loadRuntime: async () => ({ Tensor }),
  loadModel: async (file) => (file === meta.decoder ? decoder : unet),
  fetchJSON: async (file) => files[file],
  fileNotice: () => true,
} };
const root = { dataset: { demo: name } };
const context = { window, document: { querySelectorAll: () => [root] }, performance, console };
vm.runInNewContext(fs.readFileSync(script, "utf8"), context);
window.torchbookDemoTests[name]().then((r) => console.log(JSON.stringify(r)));
"""


def fake_predict(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    arg = 1.3 * x.astype(np.float64) + (0.002 * t + 0.7 * y)[:, None, None, None]
    return np.sin(arg).astype(np.float32)


def run_selftest(tmp_path: Path, vectors: dict, meta: dict, name: str = "diffusion") -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js がありません")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "vec.json").write_text(json.dumps(vectors))
    out = subprocess.run([node, "-e", RUNNER, str(SCRIPT), name, str(tmp_path / "meta.json"),
                          str(tmp_path / "vec.json")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def meta():
    from diffusion_fixtures import tiny_unet

    return diffusion_demo.demo_metadata(tiny_unet(), NoiseSchedule.from_name("cosine"), "cosine")


def vectors_for(meta: dict, label: int, steps: int) -> dict:
    x_T = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    cases = [{"guidance": g, "image": diffusion_demo.reference_ddim(
        fake_predict, meta, x_T, label, steps, guidance_scale=g).flatten().tolist()}
        for g in (0.0, 1.0, 1.5)]
    return {"x_T": x_T.flatten().tolist(), "label": label, "steps": steps, "eta": 0.0,
            "cases": cases}


def test_js_sampler_equals_python_reference(tmp_path, meta):
    vectors = vectors_for(meta, label=3, steps=12)
    result = run_selftest(tmp_path, vectors, meta)
    assert result["steps"] == 12
    assert [c["guidance"] for c in result["cases"]] == [0.0, 1.0, 1.5]
    for case in result["cases"]:
        assert case["max_abs_diff"] < 1e-4, case
        assert case["ms"] >= 0
    # 画像どうしが十分に違うので、上の一致は偶然ではない
    images = [np.array(c["image"]) for c in vectors["cases"]]
    assert np.abs(images[1] - images[2]).max() > 0.1


def test_js_selftest_reports_a_wrong_image(tmp_path, meta):
    vectors = vectors_for(meta, label=3, steps=10)
    vectors["cases"][1]["image"][5] += 0.5
    result = run_selftest(tmp_path, vectors, meta)
    assert result["cases"][1]["max_abs_diff"] > 0.4


# ---------------------------------------------------------------- 潜在のデモ (kind "flow")


def fake_decode(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64).ravel()
    j = np.arange(32 * 32)
    return np.clip(1.2 * np.sin(z[j % z.size] + 0.01 * j), -1, 1).astype(np.float32)


@pytest.fixture
def latent_meta():
    from torchbook.diffusion.autoencoder import Autoencoder
    from torchbook.diffusion.latent import LatentFlow, LatentUNet

    model = LatentFlow(LatentUNet(4, (16, 32), heads=2, context_dim=16), Autoencoder(4, 16))
    return diffusion_demo.latent_metadata(model)


def latent_vectors(meta: dict, label: int, steps: int, method: str) -> dict:
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((1, *meta["shape"])).astype(np.float32) for _ in range(2))
    cases = [{"guidance": g, "image": diffusion_demo.reference_flow(
        fake_predict, fake_decode, meta, a, label, steps, method, g).tolist()}
        for g in (0.0, 1.0, 2.5)]
    live = meta["live"]
    live_cases = [{"w": w, "guidance": g, "image": diffusion_demo.reference_flow(
        fake_predict, fake_decode, meta, diffusion_demo.slerp(a, b, w).astype(np.float32),
        label, live["steps"], live["method"], g).tolist()}
        for w, g in ((0.0, 1.0), (0.4, 2.0), (1.0, 3.0))]
    return {"noise_a": a.ravel().tolist(), "noise_b": b.ravel().tolist(), "label": label,
            "method": method, "steps": steps, "cases": cases, "live_cases": live_cases}


@pytest.mark.parametrize(("method", "live_method", "live_steps"),
                         [("heun", "heun", 2), ("euler", "euler", 4)])
def test_js_flow_sampler_and_live_equal_python_reference(tmp_path, latent_meta, method,
                                                         live_method, live_steps):
    # 解き方もステップ数もメタデータだけで決まる (JS は meta.method と meta.live を読むだけ)
    latent_meta["live"].update(method=live_method, steps=live_steps)
    vectors = latent_vectors(latent_meta, label=6, steps=5, method=method)
    result = run_selftest(tmp_path, vectors, latent_meta, name="latent")
    assert result["kind"] == "flow" and result["method"] == method
    assert result["live"]["steps"] == live_steps
    assert [c["guidance"] for c in result["cases"]] == [0.0, 1.0, 2.5]
    assert [(c["w"], c["guidance"]) for c in result["live_cases"]] == [
        (0.0, 1.0), (0.4, 2.0), (1.0, 3.0)]
    for case in result["cases"] + result["live_cases"]:
        assert case["max_abs_diff"] < 1e-4, case
        assert len(case["image"]) == 32 * 32 and case["ms"] >= 0
    images = [np.array(c["image"]) for c in vectors["cases"] + vectors["live_cases"]]
    assert min(np.abs(p - q).max() for i, p in enumerate(images) for q in images[i + 1:]) > 1e-2


def test_js_latent_selftest_reports_a_wrong_live_image(tmp_path, latent_meta):
    vectors = latent_vectors(latent_meta, label=2, steps=3, method="heun")
    vectors["live_cases"][1]["image"][7] += 0.5
    result = run_selftest(tmp_path, vectors, latent_meta, name="latent")
    assert result["live_cases"][1]["max_abs_diff"] > 0.4
    assert result["live_cases"][0]["max_abs_diff"] < 1e-4
