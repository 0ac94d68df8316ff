"""torchbook.diffusion.latent と潜在拡散の CLI: 形、guidance、デコード、チェックポイントの種類。"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusion_fixtures import SRC, fashion_root, run_module

from torchbook.diffusion import evaluate, sample, train, train_autoencoder
from torchbook.diffusion.autoencoder import Autoencoder
from torchbook.diffusion.checkpoint import (
    AUTOENCODER_KIND,
    LATENT_FLOW_KIND,
    load_autoencoder,
    load_checkpoint,
    read_autoencoder,
    read_checkpoint,
    read_diffusion,
)
from torchbook.diffusion.conditioning import attention_maps
from torchbook.diffusion.latent import LatentFlow, LatentUNet
from torchbook.diffusion.sampling import guided_eps
from torchbook.diffusion.sampling import sample as run_sampler


def tiny_latent(seed: int = 0) -> LatentFlow:
    """0 で初期化した層も乱数にした小さな LatentFlow (条件の効果が 0 では比べられない)。"""
    torch.manual_seed(seed)
    model = LatentFlow(LatentUNet(4, (16, 32), heads=2, context_dim=16),
                       Autoencoder(4, width=16, latent_scale=2.0))
    for p in model.unet.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_latent_unet_shapes_and_null_class():
    model = tiny_latent()
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3) * 1000
    out = model(x, t, torch.tensor([0, 5, 9]))
    assert out.shape == x.shape
    null = torch.full((3,), model.null_class)
    torch.testing.assert_close(model(x, t, None), model(x, t, null))
    assert not torch.allclose(model(x, t, torch.tensor([0, 0, 0])), model(x, t, null))
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\)"):
        model(torch.randn(1, 1, 32, 32), t[:1])


def test_guidance_through_cross_attention():
    model = tiny_latent()
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 500.0), torch.tensor([1, 3, 6, 8])
    cond, uncond = model(x, t, y), model(x, t, None)
    torch.testing.assert_close(guided_eps(model, x, t, y, 1.0), cond)
    torch.testing.assert_close(guided_eps(model, x, t, y, 0.0), uncond)
    torch.testing.assert_close(guided_eps(model, x, t, y, 2.5), uncond + 2.5 * (cond - uncond),
                               atol=1e-5, rtol=1e-4)


def test_attention_maps_of_the_latent_unet():
    model = tiny_latent()
    maps = attention_maps(model, torch.randn(2, 4, 8, 8), torch.full((2,), 300.0),
                          torch.tensor([1, 10]))
    assert set(maps) >= {"unet.down_attn.0", "unet.mid_attn", "unet.up_attn.1"}
    assert maps["unet.down_attn.0"].shape == (2, 8, 8, 9)
    assert maps["unet.mid_attn"].shape == (2, 4, 4, 9)
    # ズボン (3 文字): 4 番目以降 (PAD) は見ない。条件なし: BOS だけを見る
    assert maps["unet.down_attn.0"][0, ..., 4:].abs().max() == 0
    assert (maps["unet.mid_attn"][1, ..., 0] == 1).all()


def test_sampler_decodes_latents_to_images():
    model = tiny_latent()
    last = {}
    imgs = run_sampler(model, None, 3, y=torch.tensor([0, 1, 2]), method="euler", steps=3,
                       seed=0, callback=lambda i, t, x: last.update(x=x))
    assert last["x"].shape == (3, 4, 8, 8)  # サンプラーは潜在空間を進む
    assert imgs.shape == (3, 1, 32, 32) and imgs.min() >= -1 and imgs.max() <= 1
    torch.testing.assert_close(imgs, model.decode_latents(last["x"]))
    with pytest.raises(ValueError, match="euler"):
        run_sampler(model, None, 1, method="ddim", steps=2)


# ---------------------------------------------------------------- CLI とチェックポイント


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """CLI で作った小さな自己符号化器と潜在フローのモデル (実際の Fashion-MNIST を少し)."""
    root = fashion_root()
    d = tmp_path_factory.mktemp("latent")
    ae = d / "ae.pt"
    train_autoencoder.main(["--data-root", str(root), "--out", str(d / "ae_run"), "--steps", "3",
                            "--batch-size", "8", "--limit", "64", "--val-size", "32",
                            "--width", "16", "--threads", "1", "--export", str(ae)])
    flow = d / "latent.pt"
    train.main(["--data-root", str(root), "--latent", str(ae), "--out", str(d / "run"),
                "--steps", "2", "--batch-size", "8", "--limit", "64", "--channels", "16,32",
                "--threads", "1", "--save-every", "1", "--export", str(flow)])
    return d, ae, flow


def test_cli_writes_both_kinds_with_provenance(trained):
    d, ae, flow = trained
    info = json.loads(ae.with_suffix(".json").read_text())["train"]
    assert read_autoencoder(ae)["kind"] == AUTOENCODER_KIND and "optimizer" not in \
        read_checkpoint(ae)
    assert info["command"].startswith("python -m torchbook.diffusion.train_autoencoder")
    assert info["latent_shape"] == [4, 8, 8] and info["val_mse"] > 0 and info["cpu_seconds"] > 0
    assert info["cpu_model"] and info["step"] == 3
    ckpt = read_diffusion(flow)
    assert ckpt["kind"] == LATENT_FLOW_KIND and ckpt["unet"]["autoencoder"]["width"] == 16
    finfo = json.loads(flow.with_suffix(".json").read_text())["train"]
    assert finfo["autoencoder"]["path"] == str(ae) and finfo["autoencoder"]["val_mse"] > 0
    model, sched, _ = load_checkpoint(flow)
    assert isinstance(model, LatentFlow) and sched is None
    torch.testing.assert_close(model.autoencoder.latent_scale,
                               load_autoencoder(ae)[0].latent_scale)


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(trained, capsys):
    d, ae, _ = trained
    summary = train.main(["--data-root", str(fashion_root()), "--latent", str(ae), "--out",
                          str(d / "run"), "--steps", "3", "--batch-size", "8", "--limit", "64",
                          "--channels", "16,32", "--threads", "1", "--resume", "--extend"])
    assert "ステップ 2 から再開" in capsys.readouterr().out and summary["step"] == 3


def test_checkpoint_kinds_are_refused_across_models(trained, tmp_path, capsys):
    d, ae, flow = trained
    with pytest.raises(ValueError, match="拡散モデルのチェックポイント"):
        read_diffusion(ae)
    with pytest.raises(ValueError, match="自己符号化器のチェックポイント"):
        read_autoencoder(flow)
    for parse, argv in [
        (train.parse_args, ["--latent", str(flow), "--out", str(tmp_path / "a")]),
        (train.parse_args, ["--latent", str(ae), "--objective", "eps", "--out",
                            str(tmp_path / "b")]),
        (sample.parse_args, ["--checkpoint", str(ae), "--out", str(tmp_path / "g.png")]),
        (evaluate.parse_args, ["--checkpoint", str(ae), "--out", str(tmp_path / "e.json")]),
        (evaluate.parse_args, ["--checkpoint", str(flow), "--tasks", "ddim:10",
                               "--out", str(tmp_path / "e.json")]),
    ]:
        with pytest.raises(SystemExit) as e:
            parse(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "Traceback" not in "\n".join(err), argv
    # 潜在の学習を画素の学習として再開しない (逆も): 違いを 1 行で示す
    with pytest.raises(SystemExit) as e:
        train.main(["--data-root", str(fashion_root()), "--out", str(d / "run"), "--steps", "3",
                    "--batch-size", "8", "--limit", "64", "--objective", "flow",
                    "--channels", "16,32", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--latent" in err[-1] and "Traceback" not in "\n".join(err)
    # 自己符号化器の学習の再開に拡散モデルの last.pt を渡さない (作業の前に 1 行で)
    with pytest.raises(SystemExit) as e:
        train_autoencoder.main(["--data-root", str(fashion_root()), "--out", str(d / "run"),
                                "--steps", "4", "--limit", "64", "--val-size", "32",
                                "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "自己符号化器" in err[-1] and "Traceback" not in "\n".join(err)


def test_sample_cli_decodes_a_latent_checkpoint(trained, tmp_path):
    _, _, flow = trained
    x = sample.main(["--checkpoint", str(flow), "-n", "4", "--steps", "2", "--threads", "1",
                     "--out", str(tmp_path / "g.png")])
    assert x.shape == (4, 1, 32, 32) and (tmp_path / "g.png").stat().st_size > 0


@pytest.mark.slow
def test_copied_folder_trains_latent_diffusion_alone(trained, tmp_path):
    """コピーしたフォルダーだけで、自己符号化器の試しと潜在の学習が動く。"""
    _, ae, _ = trained
    shutil.copytree(SRC, tmp_path / "diffusion",
                    ignore=shutil.ignore_patterns("weights", "__pycache__"))
    env = {"cwd": tmp_path, "pythonpath": ""}
    r = run_module("diffusion.train_autoencoder", "--dry-run", "--width", "16", **env)
    assert r.returncode == 0 and "完了" in r.stdout, r.stderr
    r = run_module("diffusion.train", "--dry-run", "--latent", str(ae), "--channels", "16,32",
                   "--batch-size", "8", "--threads", "1", **env)
    assert r.returncode == 0 and "LatentUNet" in r.stdout and "完了" in r.stdout, r.stderr
    r = run_module("diffusion.train", "--latent", "missing.pt", **env)
    assert r.returncode == 2 and "train_autoencoder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()
