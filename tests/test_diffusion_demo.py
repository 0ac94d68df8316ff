"""booktools.diffusion_demo: ブラウザーの生成デモに渡すメタデータと、JS と同じ手順の参照ループ。"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusion_fixtures import tiny_unet

from booktools import diffusion_demo
from booktools.webdemo import save_json
from torchbook.diffusion.data import CLASSES
from torchbook.diffusion.sampling import ddim_timesteps, sample
from torchbook.diffusion.schedule import NoiseSchedule


@pytest.fixture
def model_and_meta():
    model = tiny_unet()
    sched = NoiseSchedule.from_name("cosine")
    return model, sched, diffusion_demo.demo_metadata(model, sched, "cosine")


def test_metadata_equals_schedule(model_and_meta, tmp_path):
    model, sched, meta = model_and_meta
    meta = json.loads(save_json(tmp_path / "m.json", meta).read_text())
    assert meta["T"] == sched.T == len(meta["alphas_cumprod"])
    # JSON を通しても float64 の値がそのまま戻る (JS の Number も float64)
    assert meta["alphas_cumprod"] == sched.alphas_cumprod.tolist()
    lo, hi = meta["steps_range"]
    assert sorted(int(k) for k in meta["timesteps"]) == list(range(lo, hi + 1))
    for n in (lo, 20, 37, hi):
        assert meta["timesteps"][str(n)] == ddim_timesteps(sched.T, n, meta["spacing"])
    assert meta["classes"] == list(CLASSES)
    assert meta["null_class"] == model.null_class == len(CLASSES)
    assert meta["shape"] == [1, 32, 32]


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [0.0, 1.0, 1.5])
def test_reference_loop_equals_sample(model_and_meta, guidance):
    model, sched, meta = model_and_meta
    x_T = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = sample(model, sched, 1, y=torch.tensor([4]), guidance_scale=guidance,
                 method="ddim", steps=10, eta=0.0, x_T=x_T)
    out = diffusion_demo.reference_ddim(diffusion_demo.torch_predict(model), meta,
                                        x_T.numpy(), 4, steps=10, guidance_scale=guidance)
    assert out.shape == (1, 1, 32, 32)
    # JS と同じく係数は float64 で計算するので、float32 の sample とは丸めの分だけずれる
    # (t = T-1 では 1/√ᾱ_t が大きく、丸め誤差を拡大する)。手順の誤りなら 0.1 の桁でずれる
    diff = np.abs(out - ref.numpy())
    assert diff.max() < 1e-3 and diff.mean() < 1e-5
    assert ref.std() > 0.05  # 比べる画像が一様ではない


@pytest.mark.slow
def test_reference_loop_eta_uses_given_noise(model_and_meta):
    """η > 0 では、与えたノイズで sample と同じ (sample は x_T の後に同じ生成器で引く)。"""
    model, sched, meta = model_and_meta
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(1, 1, 32, 32, generator=g) for _ in range(11)]
    ref = sample(model, sched, 1, y=torch.tensor([2]), method="ddim", steps=10, eta=0.7, seed=5)
    out = diffusion_demo.reference_ddim(diffusion_demo.torch_predict(model), meta,
                                        draws[0].numpy(), 2, steps=10, eta=0.7,
                                        noises=[d.numpy() for d in draws[1:]])
    diff = np.abs(out - ref.numpy())
    assert diff.max() < 1e-3 and diff.mean() < 1e-5
    eta0 = diffusion_demo.reference_ddim(diffusion_demo.torch_predict(model), meta,
                                         draws[0].numpy(), 2, steps=10)
    assert np.abs(out - eta0).max() > 1e-2  # ノイズが実際に効いている


@pytest.mark.slow
def test_vectors_are_sample_outputs(model_and_meta):
    model, sched, _ = model_and_meta
    vec = diffusion_demo.make_test_vectors(model, sched, label=7, seed=11, steps=10)
    assert vec["steps"] == 10 and vec["eta"] == 0.0 and len(vec["x_T"]) == 32 * 32
    assert [c["guidance"] for c in vec["cases"]] == list(diffusion_demo.TEST_GUIDANCE)
    x_T = torch.tensor(vec["x_T"]).view(1, 1, 32, 32)
    for case in vec["cases"]:
        ref = sample(model, sched, 1, y=torch.tensor([7]), guidance_scale=case["guidance"],
                     method="ddim", steps=10, eta=0.0, x_T=x_T)
        assert torch.equal(torch.tensor(case["image"]).view(1, 1, 32, 32), ref)
    a, b = (torch.tensor(c["image"]) for c in vec["cases"])
    assert (a - b).abs().max() > 1e-3  # guidance を変えると画像が変わる


@pytest.mark.slow
def test_export_demo_writes_a_verified_small_model(model_and_meta, tmp_path):
    model, sched, _ = model_and_meta
    r = diffusion_demo.export_demo(model, sched, "cosine", tmp_path, label=1, seed=0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([diffusion_demo.MODEL_FILE, diffusion_demo.META_FILE,
                            diffusion_demo.TEST_FILE])  # 重みの別ファイルも一時ファイルもない
    n_params = sum(p.numel() for p in model.parameters())
    # 重みは 1 回ずつだけ (float32) と、小さなグラフ。来歴を消したので重み以外は 50 kB 未満
    assert 4 * n_params <= r["bytes"] < 4 * n_params + 50_000
    assert r["onnx_diff"] < 1e-4
    meta = json.loads((tmp_path / diffusion_demo.META_FILE).read_text())
    assert meta == r["meta"]
    # ONNX で回した参照ループが、PyTorch の sample() の画像 (テストの入力) と一致する
    vec = json.loads((tmp_path / diffusion_demo.TEST_FILE).read_text())
    predict = diffusion_demo.onnx_predict(r["model"])
    for case in vec["cases"]:
        out = diffusion_demo.reference_ddim(predict, meta, np.array(vec["x_T"], np.float32),
                                            vec["label"], vec["steps"],
                                            guidance_scale=case["guidance"])
        assert np.abs(out.flatten() - np.array(case["image"])).max() < 1e-3


def test_demo_html_controls_come_from_metadata(model_and_meta):
    import re

    _, _, meta = model_and_meta
    page = diffusion_demo.demo_html(meta, label=3, steps=20)
    assert 'data-demo="diffusion"' in page and 'aria-live="polite"' in page
    assert re.findall(r"<option [^>]*>([^<]*)</option>", page) == list(CLASSES)
    assert '<option value="3" selected>' in page
    lo, hi = meta["steps_range"]
    assert f'name="steps" min="{lo}" max="{hi}" step="1" value="20"' in page
    # 入力部品にはすべて <label for> があり、id は重ならない (キーボードと読み上げのため)
    ids = re.findall(r'<(?:input|select) [^>]*id="([^"]+)"', page)
    assert len(ids) == len(set(ids)) == 5
    assert sorted(re.findall(r'<label for="([^"]+)"', page)) == sorted(ids)
    assert page.count('role="img" aria-label=') == 2  # キャンバスの代わりの文


def test_metadata_file_is_the_one_the_site_extension_looks_for():
    # _ext/webdemo.py は data-demo="<name>" のページに <name>.json があるかを確かめ、無ければ
    # ビルドの警告 (CI では失敗) にする。書き出す名前とずれると、デモが読めないまま公開される
    js = (Path(__file__).resolve().parents[1] / "_static" / "demo-diffusion.js").read_text()
    assert diffusion_demo.META_FILE == "diffusion.json"
    assert f'const META = "{diffusion_demo.META_FILE}"' in js
