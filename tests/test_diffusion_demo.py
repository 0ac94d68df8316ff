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


def test_metadata_files_are_the_ones_the_site_extension_looks_for():
    # _ext/webdemo.py は data-demo="<name>" のページに <name>.json があるかを確かめ、無ければ
    # ビルドの警告 (CI では失敗) にする。JS も <name>.json を読む。書き出す名前とずれると、
    # デモが読めないまま公開される
    js = (Path(__file__).resolve().parents[1] / "_static" / "demo-diffusion.js").read_text()
    assert diffusion_demo.META_FILE == "diffusion.json"
    assert "demo.url(`${name}.json`)" in js and "demo.url(`${name}-tests.json`)" in js
    assert diffusion_demo.TEST_FILE == "diffusion-tests.json"
    meta = diffusion_demo.latent_metadata(tiny_latent())
    page = diffusion_demo.latent_demo_html(meta)
    assert f'data-demo="{diffusion_demo.LATENT_NAME}"' in page


# ---------------------------------------------------------------- 潜在拡散のデモ


def tiny_latent(seed: int = 0):
    """0 で初期化した層も乱数にした小さな LatentFlow (条件とデコーダーの効果が見える)。"""
    from torchbook.diffusion.autoencoder import Autoencoder
    from torchbook.diffusion.latent import LatentFlow, LatentUNet

    torch.manual_seed(seed)
    model = LatentFlow(LatentUNet(4, (16, 32), heads=2, context_dim=16),
                       Autoencoder(4, width=16, latent_scale=1.7))
    for p in model.unet.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    for m in model.autoencoder.decoder.modules():  # 画素が 0 の近くに固まらない大きさに
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=2 / m.weight[0].numel() ** 0.5)
    return model.eval()


def test_slerp_keeps_the_ends_and_the_norm():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(256), rng.standard_normal(256)
    assert np.allclose(diffusion_demo.slerp(a, b, 0.0), a)
    assert np.allclose(diffusion_demo.slerp(a, b, 1.0), b)
    mid = diffusion_demo.slerp(a, b, 0.5)
    # ノルムの近い 2 つのノイズの中点は、ノルムがほぼ保たれる (直線の補間なら約 1/√2 倍)
    assert abs(np.linalg.norm(mid) / np.linalg.norm(a) - 1) < 0.1
    assert np.linalg.norm((a + b) / 2) / np.linalg.norm(a) < 0.8
    assert np.array_equal(diffusion_demo.slerp(a, a, 0.3), a)  # 同じ向きでも割り算しない


@pytest.mark.parametrize(("method", "guidance"), [("heun", 2.0), ("euler", 1.0),
                                                  ("heun", 0.0)])
def test_flow_reference_loop_equals_sample(method, guidance):
    model = tiny_latent()
    meta = diffusion_demo.latent_metadata(model)
    x_T = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(2))
    ref = sample(model, None, 1, y=torch.tensor([5]), guidance_scale=guidance, method=method,
                 steps=4, x_T=x_T)
    out = diffusion_demo.reference_flow(
        diffusion_demo.torch_flow_predict(model.unet), diffusion_demo.torch_decode(model), meta,
        x_T.numpy(), 5, steps=4, method=method, guidance_scale=guidance)
    assert out.shape == ref.shape == (1, 1, 32, 32)
    assert np.abs(out - ref.numpy()).max() < 1e-4
    assert ref.std() > 0.05


def test_latent_metadata_takes_the_live_settings_as_data():
    model = tiny_latent()
    meta = diffusion_demo.latent_metadata(model, "other.onnx", "euler", 4)
    assert meta["live"] == {"model": "other.onnx", "method": "euler", "steps": 4, "nfe": 4}
    assert meta["shape"] == [4, 8, 8] and meta["image_shape"] == [1, 32, 32]
    assert meta["null_class"] == model.null_class and meta["classes"] == list(CLASSES)
    with pytest.raises(ValueError, match="method"):
        diffusion_demo.latent_metadata(model, live_method="ddim")


@pytest.mark.slow
def test_export_latent_demo_graphs_equal_pytorch(tmp_path):
    """2 つのグラフ (LatentUNet とデコーダー) を onnxruntime で回した参照ループが、PyTorch の
    sample() の画像 (「生成」とライブ、テストの入力) と一致する。"""
    import copy

    model = tiny_latent()
    # ライブ用の別のモデル (蒸留したものの代わり): 同じ自己符号化器で、UNet の重みだけ違う
    live_model = copy.deepcopy(model)
    with torch.no_grad():
        live_model.unet.conv_out.weight.mul_(-1.5)
    r = diffusion_demo.export_latent_demo(model, tmp_path, label=3, seed=1,
                                          live_model=live_model, live_method="euler",
                                          live_steps=3)
    meta, vec = r["meta"], r["vectors"]
    assert meta["live"] == {"model": diffusion_demo.LATENT_LIVE_FILE, "method": "euler",
                            "steps": 3, "nfe": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [diffusion_demo.LATENT_UNET_FILE, diffusion_demo.LATENT_DECODER_FILE,
         diffusion_demo.LATENT_LIVE_FILE, "latent.json", "latent-tests.json"])
    assert r["onnx_diff"] < 1e-4
    assert json.loads((tmp_path / "latent.json").read_text()) == meta
    predict = diffusion_demo.onnx_predict(tmp_path / meta["model"])
    live_predict = diffusion_demo.onnx_predict(tmp_path / meta["live"]["model"])
    decode = diffusion_demo.onnx_decode(tmp_path / meta["decoder"])
    a, b = (np.array(vec[k], np.float32) for k in ("noise_a", "noise_b"))
    for case in vec["cases"]:
        out = diffusion_demo.reference_flow(predict, decode, meta, a, vec["label"],
                                            vec["steps"], vec["method"], case["guidance"])
        assert np.abs(out.ravel() - np.array(case["image"])).max() < 1e-3
    live = meta["live"]
    for case in vec["live_cases"]:
        x_T = diffusion_demo.slerp(a, b, case["w"]).astype(np.float32)
        out = diffusion_demo.reference_flow(live_predict, decode, meta, x_T, vec["label"],
                                            live["steps"], live["method"], case["guidance"])
        assert np.abs(out.ravel() - np.array(case["image"])).max() < 1e-3
    images = [np.array(c["image"]) for c in vec["cases"] + vec["live_cases"]]
    assert min(np.abs(p - q).max() for i, p in enumerate(images) for q in images[i + 1:]) > 1e-3


def test_live_model_with_another_autoencoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="自己符号化器"):
        diffusion_demo.export_latent_demo(tiny_latent(0), tmp_path, 0, 0,
                                          live_model=tiny_latent(1))
    assert list(tmp_path.iterdir()) == []  # 何も書かない


def test_latent_demo_html_controls_come_from_metadata():
    import re

    meta = diffusion_demo.latent_metadata(tiny_latent(), live_steps=3)
    page = diffusion_demo.latent_demo_html(meta, label=2, seeds=(4, 5))
    assert 'data-demo="latent" data-script="diffusion"' in page
    assert re.findall(r"<option [^>]*>([^<]*)</option>", page) == list(CLASSES)
    assert '<option value="2" selected>' in page
    lo, hi = meta["steps_range"]
    assert f'name="steps" min="{lo}" max="{hi}" step="1" value="{meta["steps"]}"' in page
    assert "ホイン法 3 ステップ、NFE 5" in page  # ライブの説明もメタデータから
    ids = re.findall(r'<(?:input|select) [^>]*id="([^"]+)"', page)
    assert len(ids) == len(set(ids)) == 6
    assert sorted(re.findall(r'<label for="([^"]+)"', page)) == sorted(ids)


def save_tiny_checkpoint(path, model):
    from types import SimpleNamespace

    from torchbook.diffusion.checkpoint import save_checkpoint

    save_checkpoint(path, model, SimpleNamespace(model=model, step=0), "flow", 1000,
                    ema_only=True)
    return path


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    from torchbook.diffusion.checkpoint import save_checkpoint

    with pytest.raises(SystemExit) as e:
        diffusion_demo.main(["--label", "10", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "--label は 0〜9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diffusion_demo.main(["--checkpoint", str(tmp_path / "none.pt")])
    assert "none.pt がありません" in capsys.readouterr().err
    # 画素のモデルのチェックポイントは、1 行で断る (書き出しを始めない)
    pixel = tmp_path / "pixel.pt"
    unet = tiny_unet()
    from types import SimpleNamespace
    save_checkpoint(pixel, unet, SimpleNamespace(model=unet, step=0), "cosine", 1000,
                    ema_only=True)
    with pytest.raises(SystemExit) as e:
        diffusion_demo.main(["--checkpoint", str(pixel), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "潜在フローのチェックポイント" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "latent.json").exists()


@pytest.mark.slow
def test_cli_writes_once_and_prints_the_demo_html(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "latent.pt", tiny_latent())
    out = tmp_path / "demo"
    assert diffusion_demo.main(["--checkpoint", str(ckpt), "--out-dir", str(out), "--html",
                                "--label", "4"]) == 0
    page = capsys.readouterr().out
    assert 'data-demo="latent"' in page and '<option value="4" selected>' in page
    meta = json.loads((out / "latent.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(stamps) == {meta["model"], meta["decoder"], "latent.json", "latent-tests.json"}
    # 同じ入力なら書き出さない (本のページを読み直すたびに数十秒かけない)
    diffusion_demo.main(["--checkpoint", str(ckpt), "--out-dir", str(out), "--label", "4"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # 重みが替われば (統合の後の学習し直しなど) 書き出し直す
    save_tiny_checkpoint(ckpt, tiny_latent(seed=1))
    diffusion_demo.main(["--checkpoint", str(ckpt), "--out-dir", str(out), "--label", "4"])
    assert (out / meta["model"]).stat().st_mtime_ns != stamps[meta["model"]]
    assert json.loads((out / "latent.json").read_text())["source"] != meta["source"]
