"""booktools.latent_chapter: 掃引の読み込み、形の選び方、画素と潜在の表の値、測定の補助。"""

import json

import pytest
import torch
from torch import nn

from booktools import latent_chapter as lc
from torchbook.diffusion.autoencoder import Autoencoder
from torchbook.diffusion.latent import LatentFlow, LatentUNet


def write_run(folder, name, channels, beta, val_mse, weights=True):
    info = {"latent_shape": [channels, 8, 8], "beta": beta, "val_mse": val_mse, "val_kl": 10.0,
            "step": 400, "cpu_seconds": 60.0, "command": f"train {name}"}
    (folder / f"{name}.json").write_text(json.dumps({"train": info}), encoding="utf-8")
    if weights:
        (folder / f"{name}.pt").write_bytes(b"")


def test_sweep_runs_reads_the_provenance_and_counts_the_compression(tmp_path):
    write_run(tmp_path, "b", 8, 0.01, 0.01)
    write_run(tmp_path, "a", 2, 0.01, 0.05)
    runs = lc.sweep_runs(tmp_path)
    assert [r["name"] for r in runs] == ["a", "b"]  # チャンネル数の順
    assert runs[0]["numbers"] == 128 and runs[0]["compression"] == 8.0
    assert runs[1]["numbers"] == 512 and runs[1]["compression"] == 2.0
    assert runs[0]["path"] == tmp_path / "a.pt"


def test_sweep_runs_refuses_a_json_without_its_weights(tmp_path):
    write_run(tmp_path, "c4", 4, 0.01, 0.02, weights=False)
    with pytest.raises(ValueError, match="c4.pt がありません"):
        lc.sweep_runs(tmp_path)
    with pytest.raises(ValueError, match="来歴 JSON がありません"):
        lc.sweep_runs(tmp_path / "empty")


def test_choose_shape_keeps_only_shapes_that_compress_four_times(tmp_path):
    write_run(tmp_path, "c2", 2, 0.01, 0.040)
    write_run(tmp_path, "c4", 4, 0.01, 0.030)
    write_run(tmp_path, "c8", 8, 0.01, 0.010)  # 最も良いが 2 倍しか縮めない
    write_run(tmp_path, "c4b", 4, 1.0, 0.001)  # 別の β は比べない
    chosen, compared = lc.choose_shape(lc.sweep_runs(tmp_path), 0.01)
    assert chosen["name"] == "c4"
    assert [(r["name"], r["eligible"]) for r in compared] == [
        ("c2", True), ("c4", True), ("c8", False)]
    with pytest.raises(ValueError, match="縮める学習がありません"):
        lc.choose_shape(lc.sweep_runs(tmp_path), 0.01, min_compression=16)


def entry(split, task, fid, nfe, method="heun", s=1.5):
    return {f"{split}/{task}@1000": {"split": split, "task": task, "fid": fid, "nfe": nfe,
                                     "method": method, "guidance_scale": s, "n": 1000}}


def write_eval(path, with_floor=True):
    evals = {"val/reference@1000": {"fid": 1.0, "fid_mean": 1.0, "split": "val", "n": 1000},
             "test/reference@1000": {"fid": 2.0, "fid_mean": 2.0, "split": "test", "n": 1000}}
    # val では heun:3 (NFE 5) より euler:5 (NFE 5) が良い。test では逆だが、選ぶのは val
    evals |= entry("val", "heun:3:1.5", 9.0, 5) | entry("test", "heun:3:1.5", 4.0, 5)
    evals |= entry("val", "euler:5:1.5", 8.0, 5, "euler") | entry("test", "euler:5:1.5", 6.0,
                                                                    5, "euler")
    evals |= entry("val", "heun:10:1.5", 3.0, 19) | entry("test", "heun:10:1.5", 5.0, 19)
    evals |= entry("val", "heun:10:1", 1.0, 19, s=1.0)  # 選んだスケール以外は比べない
    if with_floor:
        evals["test/reconstruction@1000"] = {"fid": 3.0, "mse": 0.02}
    path.write_text(json.dumps({"eval": evals, "selection": {"chosen": "heun:10:1.5"}}),
                    encoding="utf-8")


def test_model_trade_selects_on_val_and_reports_test(tmp_path):
    path = tmp_path / "m.json"
    write_eval(path)
    trade = lc.model_trade(path, budgets=(5, 20))
    assert trade["reference"] == 2.0 and trade["scale"] == 1.5
    assert trade["cells"][5]["task"] == "euler:5:1.5"
    assert trade["cells"][5]["fid"] == 6.0 and trade["cells"][5]["ratio"] == 3.0
    assert trade["cells"][20]["task"] == "heun:10:1.5"
    assert trade["cells"][20]["ratio"] == 2.5


def test_reconstruction_floor_is_a_ratio_to_the_same_reference(tmp_path):
    path = tmp_path / "m.json"
    write_eval(path)
    floor = lc.reconstruction_floor(path)
    assert floor["ratio"] == 1.5 and floor["fid"] == 3.0 and floor["mse"] == 0.02
    write_eval(path, with_floor=False)
    assert lc.reconstruction_floor(path) is None


def test_activation_numbers_counts_the_outputs_of_each_leaf_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 5)))
    assert lc.activation_numbers(model, torch.zeros(2, 3)) == 2 * 4 + 2 * 4 + 2 * 5
    assert not model[0]._forward_hooks  # フックは外してある
    assert lc.parameter_count(model) == 3 * 4 + 4 + 4 * 5 + 5


def test_seconds_per_image_runs_the_sampler_with_the_decoder():
    torch.manual_seed(0)
    unet = LatentUNet(in_channels=2, channels=(8, 16), groups=4, heads=2, context_dim=8)
    model = LatentFlow(unet, Autoencoder(2, width=8)).eval()
    calls = []
    model.autoencoder.decoder.register_forward_hook(lambda *a: calls.append(a[2].shape))
    seconds = lc.seconds_per_image(model, None, "euler:2:1.5", n=3, repeats=2)
    assert seconds > 0
    # 準備の 1 枚と、数える 2 回の 3 枚: デコーダーが画像の大きさで通った
    assert calls == [(1, 1, 32, 32), (3, 1, 32, 32), (3, 1, 32, 32)]


def test_shipped_sweep_matches_its_provenance():
    """book/assets/ae_sweep/ の重みは、隣の JSON に書いた CLI の学習の結果です。"""
    from torchbook.diffusion.checkpoint import load_autoencoder

    runs = lc.sweep_runs()
    assert {(r["latent_shape"][0], r["beta"]) for r in runs} >= {
        (2, 0.01), (4, 0.01), (8, 0.01), (4, 0.001), (4, 0.1), (4, 1.0)}
    for r in runs:
        model, ckpt = load_autoencoder(r["path"])
        assert model.latent_shape == r["latent_shape"]
        assert ckpt["step"] == r["step"]
        assert "torchbook.diffusion.train_autoencoder" in r["command"]
        assert f"--steps {r['step']}" in r["command"]
        assert f"--beta {r['beta']:g}" in r["command"]


def test_live_choice_takes_the_best_val_setting_within_the_nfe_limit(tmp_path):
    def e(split, task, fid, nfe, s=2.0, seed=1234):
        return {"split": split, "task": task, "fid": fid, "nfe": nfe, "guidance_scale": s,
                "sampler_seed": seed, "n": 1000, "method": task.split(":")[0]}

    ev = {"val/euler:2:2@1000": e("val", "euler:2:2", 9.0, 2),
          "val/euler:4:2@1000": e("val", "euler:4:2", 7.0, 4),
          "val/heun:3:2@1000": e("val", "heun:3:2", 5.0, 5),  # NFE 5: 上限の外
          "test/heun:2:2@1000": e("test", "heun:2:2", 1.0, 3),  # test では選ばない
          "val/euler:4:1.5@1000": e("val", "euler:4:1.5", 6.0, 4, s=1.5),  # 別のスケール
          "val/euler:2:2@1000/seed777": e("val", "euler:2:2", 1.0, 2, seed=777)}
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"eval": ev}), encoding="utf-8")
    assert lc.live_choice(path) == ("euler:4:2", 7.0)
    with pytest.raises(ValueError, match="NFE 1 以下"):
        lc.live_choice(path, max_nfe=1)


def test_the_page_demo_uses_the_live_setting_chosen_on_val():
    """第 10 章のデモの :live-method: と :live-steps: が、来歴 JSON で val が選ぶ設定と同じ。"""
    import re

    from booktools.data import REPO_ROOT
    from torchbook.diffusion.checkpoint import WEIGHTS_DIR
    from torchbook.diffusion.evaluation import parse_task

    page = (REPO_ROOT / "book" / "10_latent.md").read_text(encoding="utf-8")
    block = re.search(r"```\{torchbook-demo\} latent\n(.*?)```", page, re.S).group(1)
    options = dict(re.findall(r"^:([\w-]+):\s*(\S+)", block, re.M))
    task, _ = lc.live_choice(WEIGHTS_DIR / "latent_fashion.json")
    chosen = parse_task(task)
    assert options["live-method"] == chosen["method"]
    assert int(options["live-steps"]) == chosen["steps"]
    assert chosen["guidance_scale"] == lc.LIVE_GUIDANCE
