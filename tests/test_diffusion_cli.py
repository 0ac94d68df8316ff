"""diffusion/ の CLI のテスト: フォルダー単独のコピーで動くこと、評価 JSON の並行書き込み。"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torchbook.diffusion as pkg

SRC = Path(pkg.__file__).resolve().parent


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_copied_folder_runs_alone(tmp_path):
    """本のほかのモジュールなしで、コピーしたフォルダーが import でき CLI が動く。"""
    dst = tmp_path / "diffusion"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    for name in dst.glob("*.py"):
        for line in name.read_text(encoding="utf-8").splitlines():
            assert not line.lstrip().startswith(("import torchbook", "from torchbook")), name
    r = run(["-m", "diffusion.train", "--help"], tmp_path)
    assert r.returncode == 0 and "--max-minutes" in r.stdout, r.stderr
    r = run(["-m", "diffusion.train", "--dry-run", "--threads", "1", "--batch-size", "8"],
            tmp_path)
    assert r.returncode == 0 and "完了" in r.stdout, r.stderr
    r = run(["-m", "diffusion.sample", "--dry-run", "--out", "g.png"], tmp_path)
    assert r.returncode == 0 and (tmp_path / "g.png").stat().st_size > 0, r.stderr
    r = run(["-m", "diffusion.sample", "--checkpoint", "missing.pt"], tmp_path)
    assert r.returncode != 0


def _write_keys(path: str, prefix: str, n: int) -> None:
    from torchbook.diffusion.evaluate import update_json

    for i in range(n):
        update_json(Path(path), f"{prefix}{i}", {"fid": float(i)})


def test_evaluate_json_updates_from_parallel_processes_are_all_kept(tmp_path):
    import json
    import multiprocessing as mp

    path = tmp_path / "ddpm.json"
    path.write_text(json.dumps({"train": {"step": 7}}))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_keys, args=(str(path), p, 30)) for p in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())
    assert data["train"] == {"step": 7}
    assert sorted(data["eval"]) == sorted(f"{p}{i}" for p in "ab" for i in range(30))


def test_evaluate_tasks_parse_eta_and_reject_typos(capsys):
    import pytest

    from torchbook.diffusion.evaluate import parse_args, parse_task

    assert parse_task("floor") == {}
    assert parse_task("ddim:20")["steps"] == 20 and parse_task("ddim:20")["eta"] == 0.0
    assert parse_task("ddim:50:1")["eta"] == 1.0
    g = parse_task("guidance:2.5:0.5")
    assert (g["guidance_scale"], g["steps"], g["eta"]) == (2.5, 50, 0.5)
    assert parse_task("ddpm")["method"] == "ddpm"
    # 綴りの誤りはモデルを読み込む前に、使えるタスクを示して止まる
    for bad in ["ddim", "ddim:x", "ddpm:3", "guidance:1:2:3", "fid"]:
        with pytest.raises(SystemExit):
            parse_args(["--tasks", "floor", bad])
        assert "ddim:<steps>[:<eta>]" in capsys.readouterr().err
