"""torchbook.device のテスト: デバイスの選択順、名前の検査、再現性、時間計測、写しの一致。"""

import ast
from pathlib import Path

import pytest
import torch

from torchbook import device as D

PACKAGE = Path(D.__file__).resolve().parent
# 単独でコピーして使えるモジュールは get_device の写しを持ちます。写しは device.py と同じ文面です。
COPIES = [PACKAGE / "mnist.py", PACKAGE / "diffusion" / "device.py"]
# 写しが一致していなければならない定義 (get_device と、それが使う名前)
SHARED_NAMES = ("KNOWN_TYPES", "cuda_available", "mps_available", "get_device")


def definitions(path: Path) -> dict[str, str]:
    """ファイルの最上位の関数定義と代入文を、名前 → ソースの文面 の辞書で返します。"""
    text = path.read_text(encoding="utf-8")
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(text, node)
    return found


def fake_availability(monkeypatch, cuda: bool, mps: bool, count: int = 1):
    monkeypatch.setattr(D, "cuda_available", lambda: cuda)
    monkeypatch.setattr(D, "mps_available", lambda: mps)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if cuda else 0)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_default_order_is_cuda_mps_cpu(monkeypatch, cuda, mps, expected):
    fake_availability(monkeypatch, cuda, mps)
    assert D.get_device().type == expected


def test_explicit_names_when_available(monkeypatch):
    fake_availability(monkeypatch, cuda=True, mps=True, count=2)
    assert D.get_device("cpu") == torch.device("cpu")
    assert D.get_device("cuda:1") == torch.device("cuda", 1)
    assert D.get_device("mps").type == "mps"
    assert D.get_device("cpu").type == "cpu"  # GPU があっても CPU を選べる


def test_unknown_name_is_value_error():
    with pytest.raises(ValueError, match="知らないデバイス名"):
        D.get_device("gpu")
    with pytest.raises(ValueError, match="扱うデバイス"):
        D.get_device("meta")


def test_unavailable_devices_raise_with_hint(monkeypatch):
    fake_availability(monkeypatch, cuda=False, mps=False)
    with pytest.raises(RuntimeError, match="CUDA が使えません"):
        D.get_device("cuda")
    with pytest.raises(RuntimeError, match="MPS"):
        D.get_device("mps")


def test_cuda_index_out_of_range(monkeypatch):
    fake_availability(monkeypatch, cuda=True, mps=False, count=1)
    assert D.get_device("cuda:0").index == 0
    with pytest.raises(RuntimeError, match="1 台"):
        D.get_device("cuda:1")


def test_real_cpu_is_always_available():
    assert D.get_device("cpu").type == "cpu"
    assert "cpu" in D.describe_device(torch.device("cpu"))


@pytest.mark.usefixtures("restore_determinism")
def test_seed_everything_reproduces_random_numbers():
    D.seed_everything(123)
    a = torch.randn(5)
    D.seed_everything(123)
    b = torch.randn(5)
    D.seed_everything(124)
    c = torch.randn(5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.usefixtures("restore_determinism")
def test_seed_everything_sets_flags():
    D.seed_everything(0)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    D.seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark


def test_time_function_runs_warmup_and_repeats():
    calls = []
    t = D.time_function(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5
    assert t >= 0


def test_time_function_positive_for_real_work():
    x = torch.rand(64, 64)
    assert D.time_function(lambda: x @ x, torch.device("cpu"), repeats=2) > 0
    assert D.matmul_gflops(32, torch.device("cpu"), repeats=2) > 0


def test_time_function_synchronizes_gpu(monkeypatch):
    synced = []
    monkeypatch.setattr(D, "synchronize", lambda dev: synced.append(dev.type))
    D.time_function(lambda: None, torch.device("cuda"), warmup=1, repeats=2)
    assert synced == ["cuda"] * 3  # 計測前に 1 回、各計測の後に 1 回ずつ


def test_time_function_rejects_bad_arguments():
    with pytest.raises(ValueError):
        D.time_function(lambda: None, torch.device("cpu"), repeats=0)


@pytest.mark.parametrize("path", COPIES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_copies_identical(path):
    """コピー用モジュールの get_device は、章が教える device.get_device と一字一句同じです。"""
    if not path.exists():
        pytest.skip(f"{path.relative_to(PACKAGE)} はまだこのブランチにありません")
    original, copy = definitions(Path(D.__file__)), definitions(path)
    assert "get_device" in copy, f"{path.name} に get_device がありません"
    for name in SHARED_NAMES:
        assert copy.get(name) == original[name], f"{path.name} の {name} が device.py と違います"


def test_copy_comparison_detects_a_change(tmp_path):
    """比べ方が本当に違いを見つけること (1 文字変えた写しは一致しない)。"""
    text = Path(D.__file__).read_text(encoding="utf-8")
    changed = tmp_path / "copy.py"
    changed.write_text(text.replace('return torch.device("cpu")', 'return torch.device("cuda")'))
    assert definitions(changed)["get_device"] != definitions(Path(D.__file__))["get_device"]
    assert definitions(changed)["KNOWN_TYPES"] == definitions(Path(D.__file__))["KNOWN_TYPES"]
