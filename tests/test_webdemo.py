"""ブラウザーのデモのための書き出し (booktools.webdemo) と Sphinx 拡張 (_ext/webdemo.py)。

ブラウザーで PyTorch と同じ答えになること、遅延読み込み、file:// の案内は
.ci/demo_check.py (headless Chromium) が確かめます。
"""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from docutils import nodes
from docutils.utils import new_document
from sphinx.errors import ExtensionError

from booktools import webdemo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "_ext"))
import webdemo as ext  # noqa: E402


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3),
    )
    model.train()
    model(torch.randn(8, 1, 6, 6))  # BatchNorm の統計を既定値から動かす
    return model.eval()


@pytest.mark.slow
def test_export_writes_one_self_contained_file_that_matches_pytorch(tmp_path):
    model = tiny_model()
    path = webdemo.export_onnx(model, (torch.randn(1, 1, 6, 6),), tmp_path / "m.onnx",
                               ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # 重みも 1 つのファイルに
    diff = webdemo.verify_onnx(path, model, (torch.randn(5, 1, 6, 6),))  # バッチの大きさは自由
    assert 0 <= diff < 1e-5


def test_exported_files_follow_the_umask(tmp_path):
    """書き出した ONNX・JSON・重みの権限は umask で決まる (mkstemp の 0600 ではない)。"""
    old = os.umask(0o022)
    try:
        written = [webdemo.export_onnx(tiny_model(), (torch.randn(1, 1, 6, 6),),
                                       tmp_path / "m.onnx", ["x"], ["y"]),
                   webdemo.save_json(tmp_path / "m.json", {"a": 1}),
                   webdemo.save_state_dict(tmp_path / "m.pt", tiny_model())]
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in written] == [0o644] * 3


@pytest.mark.slow
def test_verify_refuses_a_graph_that_differs_from_the_model(tmp_path):
    model = tiny_model()
    path = webdemo.export_onnx(model, (torch.randn(1, 1, 6, 6),), tmp_path / "m.onnx",
                               ["x"], ["y"])
    with torch.no_grad():
        model[4].bias += 0.01
    with pytest.raises(webdemo.ExportError, match="許容値"):
        webdemo.verify_onnx(path, model, (torch.randn(1, 1, 6, 6),))


@pytest.mark.slow
def test_failed_export_leaves_no_file(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("壊れたモデル")

    with pytest.raises(Exception, match="壊れたモデル"):
        webdemo.export_onnx(Broken(), (torch.zeros(1),), tmp_path / "b.onnx", ["x"], ["y"])
    assert list(tmp_path.iterdir()) == []


def test_saved_state_dict_loads_with_weights_only(tmp_path):
    model = tiny_model()
    path = webdemo.save_state_dict(tmp_path / "w.pt", model)
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["4.weight"], model[4].weight)


def test_preprocess_scales_the_box_to_20_and_centres_the_mass():
    ink = torch.zeros(280, 280)
    ink[30:130, 200:250] = 1.0  # 縦 100・横 50 の長方形を右上に
    out = webdemo.mnist_preprocess(ink)
    rows, cols = (out > 0).nonzero(as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 10  # 縦横比
    assert torch.allclose(out[out > 0], torch.tensor(1.0))  # 面積の平均は一様な濃さを保つ
    grid = torch.arange(28) + 0.5
    assert abs((out.sum(1) * grid).sum() / out.sum() - 14) <= 0.5
    assert abs((out.sum(0) * grid).sum() / out.sum() - 14) <= 0.5
    assert webdemo.mnist_preprocess(torch.zeros(10, 10)) is None


def test_preprocess_area_weights_keep_total_ink():
    weights = webdemo._area_weights(93, 20)
    assert torch.allclose(weights.sum(1), torch.ones(20, dtype=torch.float64))
    assert torch.allclose(weights.sum(0) * 93 / 20, torch.ones(93, dtype=torch.float64))


def fake_runtime(folder: Path) -> Path:
    folder.mkdir()
    for name in ext.RUNTIME_FILES:
        (folder / name).write_bytes(b"x")
    (folder / "ort-wasm-simd-threaded.jsep.wasm").write_bytes(b"big")  # 写さない
    return folder


def test_copy_assets_copies_the_runtime_and_only_published_demo_files(tmp_path):
    dist = fake_runtime(tmp_path / "dist")
    source = tmp_path / "webdemo"
    source.mkdir()
    for name in ("mnist.onnx", "mnist.json", "mnist.pt", ".mnist.x.onnx"):
        (source / name).write_bytes(b"m")
    static = tmp_path / "html" / "_static"
    copied = ext.copy_assets(dist, source, static)
    got = sorted(p.relative_to(static).as_posix() for p in copied)
    assert got == sorted([*(f"webdemo/ort/{n}" for n in ext.RUNTIME_FILES),
                          "webdemo/mnist.json", "webdemo/mnist.onnx"])
    assert not (static / "webdemo" / "ort" / "ort-wasm-simd-threaded.jsep.wasm").exists()


def test_missing_runtime_stops_with_the_fix(tmp_path):
    with pytest.raises(ExtensionError, match="npm ci"):
        ext.copy_assets(tmp_path / "none", tmp_path, tmp_path / "out")


def test_demo_assets_are_loaded_only_on_pages_with_a_demo():
    config = SimpleNamespace(
        html_js_files=["reader-nav.js", "webdemo-loader.js", "demo-mnist.js"],
        html_css_files=["reader.css", "webdemo.css"],
    )
    ext._config(None, config)
    assert config.html_js_files == ["reader-nav.js"] and config.html_css_files == ["reader.css"]
    doc = new_document("page")
    assert ext.demos_in(doc) == []
    doc += nodes.raw("", '<div class="torchbook-demo" data-demo="mnist"></div>', format="html")
    assert ext.demos_in(doc) == ["mnist"]


def test_extension_and_book_helper_agree_on_the_runtime_and_the_folder(tmp_path, monkeypatch):
    assert ext.RUNTIME_FILES == webdemo.RUNTIME_FILES
    monkeypatch.setenv(webdemo.ENV_DIR, str(tmp_path / "demo"))
    assert webdemo.demo_dir() == ext.demo_source() == tmp_path / "demo"


def _recording_app(tmp_path, monkeypatch):
    """足した CSS・JS と警告を記録する、Sphinx の app の代わり (デモの置き場所は tmp_path)。"""
    monkeypatch.setenv(webdemo.ENV_DIR, str(tmp_path))
    added, warnings = [], []
    app = SimpleNamespace(add_css_file=added.append,
                          add_js_file=lambda name, **kw: added.append(name))
    monkeypatch.setattr(ext.logger, "warning", lambda msg, **kw: warnings.append(msg))
    return app, added, warnings


def test_a_demo_page_without_its_exported_files_is_a_build_warning(tmp_path, monkeypatch):
    app, added, warnings = _recording_app(tmp_path, monkeypatch)
    doc = new_document("page")
    doc += nodes.raw("", '<div data-demo="mnist"></div>', format="html")
    ext._page_assets(app, "book/05_mnist", "page.html", {}, doc)
    assert added == ["webdemo.css", "webdemo-loader.js", "demo-mnist.js"]
    assert len(warnings) == 1 and "mnist.json" in warnings[0]
    (tmp_path / "mnist.json").write_text("{}")
    warnings.clear()
    ext._page_assets(app, "book/05_mnist", "page.html", {}, doc)
    assert warnings == []


def test_a_demo_with_data_script_loads_that_script_once(tmp_path, monkeypatch):
    # 潜在のデモ (data-demo="latent") は demo-diffusion.js のサンプラーで動く。画素のデモと
    # 同じページにあっても JS は 1 回だけ読み、メタデータはデモの名前ごとに確かめる
    app, added, warnings = _recording_app(tmp_path, monkeypatch)
    doc = new_document("page")
    doc += nodes.raw("", '<div class="torchbook-demo" data-demo="latent" data-script="diffusion">'
                     '<form></form></div><p data-script="mnist">x</p>', format="html")
    doc += nodes.raw("", '<div data-demo="diffusion"></div>', format="html")
    assert ext.demos_in(doc) == ["latent", "diffusion"]
    assert ext.scripts_in(doc) == ["diffusion"]
    ext._page_assets(app, "book/10_latent", "page.html", {}, doc)
    assert added == ["webdemo.css", "webdemo-loader.js", "demo-diffusion.js"]
    assert sorted(w.split()[1] for w in warnings) == ["diffusion", "latent"]
