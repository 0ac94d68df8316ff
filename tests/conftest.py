"""テスト全体で使う fixture。

テストは、このチェックアウトの ``code/`` を読みます (pyproject.toml の ``pythonpath``)。
"""

from __future__ import annotations

import pytest
import torch

from booktools import data


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """テストごとの空のデータ置き場。``TORCHBOOK_DATA`` もここを指します。"""
    root = tmp_path / "data"
    monkeypatch.setenv(data.ENV_ROOT, str(root))
    monkeypatch.setenv(data.ENV_OFFLINE, "1")  # テストはダウンロードを試さない
    return root


@pytest.fixture
def restore_determinism():
    """seed_everything などが変える全体設定を、テストの後で元に戻します。"""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]
