"""torchbook.device のテスト: デバイスの選択順、名前の検査、再現性、時間計測、写しの一致。"""

import ast
import re
from pathlib import Path

import pytest
import torch

from torchbook import device as D

CODE = Path(D.__file__).resolve().parents[1]  # code/
# 単独でコピーして使えるモジュール (mnist.py、diffusion/) は get_device などの写しを持ちます。
# 写しには "# Copied from <モジュール>.<名前>" の印をつけ、元と同じ文面であることを確かめます。
MARK = re.compile(r"^# Copied from ([\w.]+)\.(\w+)$")


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


def marked_copies(path: Path) -> list[tuple[str, str, str]]:
    """ファイルの "# Copied from" の印を (元のモジュール, 名前, 印の次の行) で返します。"""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(m[1], m[2], lines[i + 1]) for i, line in enumerate(lines)
            if (m := MARK.match(line)) and i + 1 < len(lines)]


def copy_problems(path: Path) -> list[str]:
    """印のある写しのうち、元と文面が違うもの・印と名前が合わないものを挙げます。"""
    problems, here = [], definitions(path)
    for module, name, next_line in marked_copies(path):
        original = definitions(CODE / (module.replace(".", "/") + ".py")).get(name)
        if not re.match(rf"(def |class )?{name}\b", next_line):
            problems.append(f"{path.name}: 印 {name} の次の行が {name} の定義ではありません")
        elif original is None or here.get(name) != original:
            problems.append(f"{path.name}: {name} が {module} と違います")
    return problems


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


def test_marked_copies_match_their_original():
    """code/ の "# Copied from" の印のある定義は、すべて元と一字一句同じです。"""
    files = sorted(CODE.rglob("*.py"))
    marked = {p.relative_to(CODE).as_posix(): [n for _, n, _ in marked_copies(p)] for p in files}
    marked = {k: v for k, v in marked.items() if v}
    shared = ["KNOWN_TYPES", "cuda_available", "mps_available", "get_device"]
    assert marked == {"torchbook/mnist.py": shared, "torchbook/diffusion/device.py": shared}
    assert [problem for p in files for problem in copy_problems(p)] == []


def test_copy_check_detects_a_change(tmp_path):
    """比べ方が本当に違いを見つけること (1 文字変えた写しや、印のずれは見つかる)。"""
    text = (CODE / "torchbook" / "mnist.py").read_text(encoding="utf-8")
    changed = tmp_path / "copy.py"
    changed.write_text(text.replace('return torch.device("cpu")', 'return torch.device("cuda")'))
    assert copy_problems(changed) == ["copy.py: get_device が torchbook.device と違います"]
    moved = text.replace("# Copied from torchbook.device.mps_available\n",
                         "# Copied from torchbook.device.mps_available\n\n")
    changed.write_text(moved)
    assert "次の行" in copy_problems(changed)[0]


def test_bf16_is_not_counted_when_only_emulated(monkeypatch):
    """Ampere より前の GPU は bf16 をエミュレーションでしか計算できない: 速くないので使わない。"""
    from torchbook.diffusion import device as DD

    def pre_ampere(device=None, including_emulation=True):  # T4・V100 の答え方をまねる
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", pre_ampere)
    assert DD.bf16_supported(torch.device("cuda")) is False
    assert DD.fast_formats(torch.device("cuda"))[0] is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda device=None, including_emulation=True: True)  # Ampere 以降
    assert DD.bf16_supported(torch.device("cuda")) is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # 引数の無い古い PyTorch
    assert DD.bf16_supported(torch.device("cuda")) is False
