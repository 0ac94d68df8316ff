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

# 偽のモデル: ε = sin(1.3·x + 0.002·t + 0.7·y)。x̂_0 の切り詰めと guidance が効く大きさです
RUNNER = r"""
const fs = require("fs"), vm = require("vm");
const [script, metaPath, vecPath] = process.argv.slice(1);
const files = { "diffusion.json": JSON.parse(fs.readFileSync(metaPath, "utf8")),
                "diffusion-tests.json": JSON.parse(fs.readFileSync(vecPath, "utf8")) };
class Tensor { constructor(type, data, dims) { Object.assign(this, { type, data, dims }); } }
const session = { run: async (feeds) => {
  const [n, c, h, w] = feeds.x.dims, size = c * h * w, x = feeds.x.data;
  if (x.constructor.name !== "Float32Array" || feeds.t.type !== "int64") {
    throw new Error("型が違います");
  }
  const eps = new Float32Array(n * size);
  for (let b = 0; b < n; b++) for (let i = 0; i < size; i++) {
    eps[b * size + i] = Math.sin(1.3 * x[b * size + i] + 0.002 * Number(feeds.t.data[b])
                                 + 0.7 * Number(feeds.y.data[b]));
  }
  return { eps: new Tensor("float32", eps, [n, c, h, w]) };
} };
const window = { torchbookDemoTests: {}, torchbookDemo: {
  url: (name) => name,
  loadRuntime: async () => ({ Tensor }),
  loadModel: async () => session,
  fetchJSON: async (name) => files[name],
} };
const context = { window, document: { querySelectorAll: () => [] }, performance, console };
vm.runInNewContext(fs.readFileSync(script, "utf8"), context);
window.torchbookDemoTests.diffusion().then((r) => console.log(JSON.stringify(r)));
"""


def fake_predict(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    arg = 1.3 * x.astype(np.float64) + (0.002 * t + 0.7 * y)[:, None, None, None]
    return np.sin(arg).astype(np.float32)


def run_selftest(tmp_path: Path, vectors: dict, meta: dict) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js がありません")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "vec.json").write_text(json.dumps(vectors))
    out = subprocess.run([node, "-e", RUNNER, str(SCRIPT), str(tmp_path / "meta.json"),
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
