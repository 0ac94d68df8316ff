"""本物の GPU (CUDA) での経路: デバイスの選択、bf16 の判定、数ステップの学習、サンプリング、DDP。

ほかのテストは CUDA を mock でしか通りません。ここは GPU のある計算機でだけ動き、無ければ
理由を示して飛ばします。GPU のある計算機では ``bash scripts/gpu_check.sh`` がこれらと
テスト全体を実行し、結果をファイルに書きます。比べる相手は同じ計算の CPU の結果で、GPU の
計算は TF32 を切って (fp32 のまま) 比べます。
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusion_fixtures import tiny_unet
from test_mnist import write_tiny_mnist

from torchbook import device as D
from torchbook import mnist
from torchbook.diffusion import device as diffusion_device
from torchbook.diffusion import train
from torchbook.diffusion.losses import training_loss
from torchbook.diffusion.sampling import sample
from torchbook.diffusion.schedule import NoiseSchedule

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "CUDA の GPU がありません (GPU のある計算機では scripts/gpu_check.sh が実行します)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
CUDA = torch.device("cuda")


@pytest.fixture
def fp32_exact():
    """比べる間は TF32 を使わない (Ampere 以降の既定では行列積・畳み込みの精度が下がる)。"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_every_get_device_chooses_the_gpu_first():
    for get_device in (D.get_device, mnist.get_device, diffusion_device.get_device):
        assert get_device().type == "cuda"
        assert get_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises((ValueError, RuntimeError)):
            get_device(f"cuda:{torch.cuda.device_count()}")  # 無い番号は断る


def test_timing_waits_for_the_gpu():
    x = torch.rand(512, 512, device=CUDA)
    assert D.time_function(lambda: x @ x, CUDA, warmup=1, repeats=3) > 0
    assert D.matmul_gflops(256, CUDA, repeats=2) > 0


def test_bf16_is_chosen_only_where_the_gpu_computes_it_natively():
    """bf16 を既定で使うのは、bf16 の演算器がある GPU (Ampere = 計算能力 8.0 以降) だけ。

    古い GPU (T4、V100) でも ``torch.cuda.is_bf16_supported()`` はエミュレーションで True を
    返すので、それを既定の判断に使ってはいけません。
    """
    native = torch.cuda.get_device_capability(CUDA) >= (8, 0)
    assert diffusion_device.bf16_supported(CUDA) is native
    assert diffusion_device.fast_formats(CUDA) == (native, True)
    assert diffusion_device.fast_formats(CUDA, bf16=False) == (False, True)


def test_bf16_autocast_computes_in_bf16_on_the_gpu():
    if not diffusion_device.bf16_supported(CUDA):
        pytest.skip("この GPU は bf16 の演算器を持ちません (Ampere より前)")
    conv = torch.nn.Conv2d(1, 4, 3).to(CUDA)
    x = torch.randn(2, 1, 8, 8, device=CUDA)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), conv(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", list(mnist.MODELS))
def test_mnist_steps_on_the_gpu_match_the_cpu(name, fp32_exact):
    """同じ初期値・同じバッチで 5 ステップ学習すると、GPU と CPU の損失が一致し、下がる。"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    start = mnist.create_model(name).state_dict()
    losses = {}
    for dev in ("cpu", "cuda"):
        model = mnist.create_model(name, dev)
        model.load_state_dict(start)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        xs, ys = x.to(dev), y.to(dev)
        losses[dev] = []
        for _ in range(5):
            loss = F.cross_entropy(model(xs), ys)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[dev].append(loss.item())
    assert losses["cuda"][-1] < losses["cuda"][0]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3, abs=1e-4)


def test_mnist_cli_trains_on_the_gpu_and_saves_a_cpu_loadable_checkpoint(tmp_path):
    tiny = write_tiny_mnist(tmp_path / "tiny")
    ckpt = tmp_path / "m.pt"
    result = mnist.main(["--device", "cuda", "--epochs", "2", "--batch-size", "16",
                         "--save-model", str(ckpt), str(tiny)])
    assert result["epochs"] == 2 and math.isfinite(result["test_loss"])
    assert 0 <= result["test_accuracy"] <= 1
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in state["model"].values())


def test_diffusion_training_steps_on_the_gpu_match_the_cpu(fp32_exact):
    s = NoiseSchedule.from_name("cosine")
    x0 = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(8) % 10
    start = tiny_unet().train().state_dict()
    losses = {}
    for dev in ("cpu", "cuda"):
        model = tiny_unet().to(dev).train()
        model.load_state_dict(start)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)  # 乱数は CPU で引いて移す (装置によらず同じ)
        losses[dev] = []
        for _ in range(3):
            loss = training_loss(model, s, x0.to(dev), y.to(dev), 0.1, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[dev].append(loss.item())
    assert all(math.isfinite(v) for v in losses["cuda"])
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3, abs=1e-4)


def test_diffusion_cli_dry_run_on_the_gpu(tmp_path):
    result = train.main(["--dry-run", "--device", "cuda", "--out", str(tmp_path / "run"),
                         "--channels", "16,32", "--batch-size", "8", "--steps", "2"])
    losses = [loss for _, loss in result["history"]]
    assert losses and all(math.isfinite(v) for v in losses)


def test_sampling_on_the_gpu_matches_the_cpu(fp32_exact):
    model = tiny_unet()
    s = NoiseSchedule.from_name("cosine")
    y = torch.tensor([1, 7])
    cpu = sample(model, s, 2, y=y, method="ddim", steps=5, seed=3, device="cpu")
    gpu = sample(model.to(CUDA), s, 2, y=y, method="ddim", steps=5, seed=3, device="cuda")
    assert gpu.device.type == "cpu"  # 画像は CPU に戻して返す
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=0)


def test_bf16_sampling_on_the_gpu_stays_close_to_fp32():
    if not diffusion_device.bf16_supported(CUDA):
        pytest.skip("この GPU は bf16 の演算器を持ちません (Ampere より前)")
    model = tiny_unet().to(CUDA)
    s = NoiseSchedule.from_name("cosine")
    kw = dict(y=torch.tensor([2, 5]), method="ddim", steps=5, seed=4, device="cuda")
    fp32 = sample(model, s, 2, **kw)
    bf16 = sample(model, s, 2, bf16=True, **kw)
    assert torch.isfinite(bf16).all() and bf16.abs().max() <= 1
    assert (bf16 - fp32).abs().mean() < 0.05


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP (NCCL) には GPU が 2 つ以上要ります")
def test_ddp_with_nccl_on_two_gpus_matches_one_process(tmp_path, fp32_exact):
    """torchrun で GPU 2 つ × バッチ 8 (NCCL) は、1 プロセス × バッチ 16 と同じ重みになる。"""
    if not torch.distributed.is_nccl_available():
        pytest.skip("この torch は NCCL なしでビルドされています")
    datadir = write_tiny_mnist(tmp_path / "d", n_train=64, n_test=16)
    common = ["--device", "cuda", "--no-shuffle", "--epochs", "2", "--optimizer", "sgd",
              "--lr", "0.05", str(datadir)]
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0")  # 子プロセスでも TF32 を使わない
    env["PYTHONPATH"] = str(REPO / "code") + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)

    def run(launcher, args):
        return subprocess.run([*launcher, "-m", "torchbook.mnist", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    single = run([sys.executable], ["--batch-size", "16", "--save-model", "single.pt", *common])
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2"], ["--batch-size", "8", "--save-model", "ddp.pt", *common])
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "プロセス数 2" in ddp.stdout
    a = torch.load(tmp_path / "single.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp.pt", map_location="cpu", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
