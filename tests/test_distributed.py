"""torchbook.mnist のデータ並列 (DDP): torchrun で 2 プロセスを実際に起動して確かめます。"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_mnist import write_tiny_mnist

from torchbook import mnist

REPO = Path(__file__).resolve().parents[1]


def run_mnist(launcher: list[str], args: list[str], cwd: Path,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """プログラムを起動します。時間切れなら、torchrun が起動したプロセスも止めてから知らせます。"""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "code") + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [*launcher, "-m", "torchbook.mnist", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun は SIGTERM を受けると、起動した全員を止める
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    """2 プロセス × バッチ 8 の DDP は、1 プロセス × バッチ 16 と同じ重みになる。"""
    datadir = write_tiny_mnist(tmp_path / "d", n_train=64, n_test=16)
    common = ["--device", "cpu", "--no-shuffle", "--epochs", "2", "--optimizer", "sgd",
              "--lr", "0.05", str(datadir)]
    single = run_mnist([sys.executable],
                       ["--batch-size", "16", "--save-model", "single.pt", *common], tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = run_mnist(TORCHRUN, ["--batch-size", "8", "--save-model", "ddp.pt", *common], tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    assert "プロセス数 2" in ddp.stdout
    assert ddp.stdout.count("テスト正解率") == 1  # 評価と表示は rank 0 だけ
    a = torch.load(tmp_path / "single.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    torch.manual_seed(1)  # main() と同じシードで作った初期値から、学習で動いていること
    start = mnist.MNISTNet().state_dict()
    assert any(not torch.allclose(a[k], start[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("model", list(mnist.MODELS))
def test_ddp_trains_every_model_past_epoch_one(tmp_path: Path, model: str) -> None:
    """BatchNorm のある FastNet でも、2 エポック目で止まらない (rank 0 は DDP の外で評価する)。"""
    datadir = write_tiny_mnist(tmp_path / "d", n_train=48, n_test=8)
    args = ["--device", "cpu", "--model", model, "--epochs", "3", "--batch-size", "8",
            "--save-model", "ddp.pt", str(datadir)]
    try:
        ddp = run_mnist(TORCHRUN, args, tmp_path, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("DDP の学習が止まったまま終わりません (評価で DDP の同期を待っている)")
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("検証の正解率") == 3
    checkpoint = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # 包む前のモデル
    assert len(checkpoint["history"]) == 3


def test_allreduce_mean_equals_full_batch_gradient() -> None:
    """半分ずつのバッチの勾配の平均は、全体のバッチの勾配に等しい (DDP の原理)。"""
    torch.manual_seed(0)
    model = mnist.MNISTNet()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    def grads(xb: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        return [p.grad.clone() for p in model.parameters()]

    full = grads(x, y)
    halves = [grads(x[r::2], y[r::2]) for r in range(2)]  # DistributedSampler と同じ分け方
    for g, g0, g1 in zip(full, *halves, strict=True):
        torch.testing.assert_close(g, (g0 + g1) / 2, atol=1e-6, rtol=1e-5)


def test_distributed_sampler_splits_like_one_big_batch() -> None:
    """shuffle なしなら、各ランクの k 番目のバッチを合わせると 1 プロセスの k 番目になる。"""
    data = list(range(64))
    world, per_rank = 2, 8
    parts = [list(torch.utils.data.DistributedSampler(data, num_replicas=world, rank=r,
                                                      shuffle=False)) for r in range(world)]
    for k in range(64 // (world * per_rank)):
        merged = sorted(i for p in parts for i in p[k * per_rank : (k + 1) * per_rank])
        assert merged == data[k * world * per_rank : (k + 1) * world * per_rank]


def test_wrong_launch_gets_a_clear_error(monkeypatch, capsys, tmp_path: Path) -> None:
    datadir = write_tiny_mnist(tmp_path / "d", n_train=8, n_test=4)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")  # ランクだけあって、ワールドサイズがない
    with pytest.raises(SystemExit) as e:
        mnist.main(["--dry-run", "--device", "cpu", str(datadir)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE" in err and "torchrun" in err
