"""evaluate と sample の CLI: DPM-Solver++ とフローの方法、モデルの種類の確認、test の規則、
NFE ごとの選択。"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusion_fixtures import WEIGHTS, fashion_root, tiny_unet

from torchbook.diffusion import evaluate, evaluation, sample
from torchbook.diffusion.checkpoint import save_checkpoint


class _Ema:
    def __init__(self, model):
        self.model, self.step = model, 1


def tiny_checkpoint(path: Path, objective: str) -> Path:
    model = tiny_unet()
    schedule = "flow" if objective == "flow" else "cosine"
    save_checkpoint(path, model, _Ema(model), schedule, 1000, ema_only=True, objective=objective)
    return path


def test_new_tasks_parse_with_canonical_names(capsys, tmp_path):
    d = evaluation.parse_task("dpm:10")
    assert (d["method"], d["steps"], d["guidance_scale"], d["task"]) == ("dpm++2m", 10, 1.0,
                                                                         "dpm:10:1")
    assert evaluation.parse_task("heun:5:1.5")["task"] == "heun:5:1.5"
    assert evaluation.task_nfe(evaluation.parse_task("heun:5")) == 9
    assert evaluation.task_nfe(evaluation.parse_task("euler:5")) == 5
    assert evaluation.task_nfe(evaluation.parse_task("dpm:20:2")) == 20
    assert evaluation.task_nfe(evaluation.parse_task("ddpm")) == 1000
    for bad in ["dpm", "dpm:0", "dpm:10:1:1", "euler:x", "heun:3:nan", "rk4:10"]:
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(["--out", str(tmp_path / "e.json"), "--tasks", bad])
        assert e.value.code == 2 and "dpm:<steps>[:<s>]" in capsys.readouterr().err


def test_tasks_for_the_other_kind_of_model_are_refused_before_work(capsys, tmp_path):
    out = ["--out", str(tmp_path / "e.json")]
    flow = tiny_checkpoint(tmp_path / "flow.pt", "flow")
    with pytest.raises(SystemExit) as e:  # 既定は同梱の ε 予測の DDPM
        evaluate.parse_args([*out, "--tasks", "reference", "euler:10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "euler:10:1" in err and "dpm:<steps>" in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert "error: タスク euler:10:1" in err.strip().splitlines()[-1]  # 1 行の説明
    for task in ("ddim:10", "dpm:10", "ddpm"):
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args([*out, "--checkpoint", str(flow), "--tasks", task])
        assert e.value.code == 2 and "heun:<steps>" in capsys.readouterr().err
    args = evaluate.parse_args([*out, "--checkpoint", str(flow), "--tasks", "reference",
                                "euler:4", "heun:3"])
    assert [k["method"] for k in args.parsed[1:]] == ["euler", "heun"]
    args = evaluate.parse_args([*out, "--tasks", "dpm:10", "ddim:10:0"])
    assert [k["method"] for k in args.parsed] == ["dpm++2m", "ddim"]


def _entry(split, task, n, fid, ckpt="ddpm_fashion.pt", **extra):
    return {"split": split, "task": task, "n": n, "fid": fid, "checkpoint": ckpt, **extra}


def test_test_split_reports_only_what_val_measured(capsys, tmp_path):
    path = tmp_path / "e.json"
    evaluation.add_entry(path, "val/dpm:10:1@100", _entry("val", "dpm:10:1", 100, 3.0))
    evaluation.add_entry(path, "val/ddim:20:1:1@100", _entry("val", "ddim:20:1:1", 100, 2.0,
                                                           ckpt="other.pt"))
    base = ["--out", str(path), "--split", "test"]
    args = evaluate.parse_args([*base, "--n", "100", "--tasks", "reference", "dpm:10"])
    assert [k["task"] for k in args.parsed] == ["reference", "dpm:10:1"]
    refused = [(["--n", "100", "--tasks", "dpm:20"], "dpm:20:1"),   # val で測っていない
               (["--n", "200", "--tasks", "dpm:10"], "dpm:10:1"),   # n が違う
               (["--n", "100", "--tasks", "ddim:20"], "ddim:20:1:1")]  # チェックポイントが違う
    for extra, task in refused:
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args([*base, *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and task in err and "val" in err


def test_choose_records_the_best_task_per_nfe_budget(tmp_path, capsys):
    path = tmp_path / "e.json"
    rows = [("ddim:10:1:1", 4.0, 10), ("dpm:5:1", 5.0, 5), ("dpm:10:1", 3.0, 10),
            ("ddim:50:1:1", 2.5, 50), ("ddim:100:1:1", 2.6, 100)]
    for task, fid, nfe in rows:
        evaluation.add_entry(path, f"val/{task}@100", _entry("val", task, 100, fid, nfe=nfe))
    evaluation.add_entry(path, "val/reference@100", _entry("val", "reference", 100, 0.9))
    evaluation.add_entry(path, "test/dpm:5:1@100", _entry("test", "dpm:5:1", 100, 0.1, nfe=5))
    # 古い結果 (nfe を記録する前) はタスク名から数える
    evaluation.add_entry(path, "val/ddim:20:0:1@100", _entry("val", "ddim:20:0:1", 100, 2.8))
    evaluate.main(["--out", str(path), "--n", "100", "--choose"])
    sel = json.loads(path.read_text())["selection"]
    assert sel["chosen"] == "ddim:50:1:1" and sel["chosen_nfe"] == 50
    best = {b: v["task"] for b, v in sel["best_per_nfe"].items()}
    assert best == {"5": "dpm:5:1", "10": "dpm:10:1", "20": "ddim:20:0:1",
                    "50": "ddim:50:1:1", "100": "ddim:50:1:1"}
    assert "NFE ≤  10: dpm:10:1" in capsys.readouterr().out


def test_choose_without_val_results_says_how_to_fix(tmp_path):
    with pytest.raises(SystemExit, match="--split val"):
        evaluate.main(["--out", str(tmp_path / "none.json"), "--n", "100", "--choose"])


@pytest.mark.parametrize("objective, tasks, nfes", [
    ("flow", ["euler:2", "heun:2"], [2, 3]),
    ("eps", ["dpm:3", "ddim:2:0"], [3, 2]),
])
def test_evaluate_records_method_and_nfe(objective, tasks, nfes, tmp_path):
    assert (WEIGHTS / "fashion_classifier.pt").is_file()
    ckpt = tiny_checkpoint(tmp_path / f"{objective}.pt", objective)
    out = tmp_path / "eval.json"
    res = evaluate.main(["--checkpoint", str(ckpt), "--data-root", str(fashion_root()),
                         "--out", str(out), "--n", "20", "--threads", "1", "--device", "cpu",
                         "--tasks", *tasks])
    for task, n in zip(tasks, nfes, strict=True):
        entry = res[f"val/{evaluation.parse_task(task)['task']}@20"]
        assert entry["nfe"] == n and entry["checkpoint"] == ckpt.name
        assert entry["method"] == evaluation.parse_task(task)["method"]
        assert entry["fid"] > 0
    assert json.loads(out.read_text())["eval"].keys() == res.keys()


def test_sample_cli_accepts_new_methods_and_refuses_mismatches(tmp_path, capsys):
    flow = tiny_checkpoint(tmp_path / "flow.pt", "flow")
    eps = tiny_checkpoint(tmp_path / "eps.pt", "eps")
    out = ["--out", str(tmp_path / "g.png"), "-n", "2", "--steps", "2", "--device", "cpu"]
    for ckpt, method in [(flow, "ddim"), (flow, "dpm++2m"), (eps, "heun"), (eps, "euler")]:
        with pytest.raises(SystemExit) as e:
            sample.parse_args([*out, "--checkpoint", str(ckpt), "--method", method])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--method" in err.strip().splitlines()[-1]
    for ckpt, method in [(flow, "euler"), (flow, "heun"), (eps, "dpm++2m")]:
        x = sample.main([*out, "--checkpoint", str(ckpt), "--method", method])
        assert x.shape == (2, 1, 32, 32) and (tmp_path / "g.png").is_file()
    x = sample.main([*out, "--dry-run", "--method", "heun"])
    assert x.shape[0] == 2


def test_json_lock_leaves_no_file_and_breaks_a_stale_lock(tmp_path, monkeypatch):
    """ロックは JSON の隣に作って消す (一時フォルダーにも JSON の隣にも何も残さない)。"""
    import os
    import tempfile
    import time

    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("torchbook-eval-*"))
    path = tmp_path / "ddpm.json"
    evaluation.add_entry(path, "val/a@100", {"fid": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpm.json"]
    assert set(tmp.glob("torchbook-eval-*")) == before
    lock = tmp_path / ".ddpm.json.lock"
    lock.touch()  # 落ちたプロセスが残したロック
    old = time.time() - evaluation.LOCK_STALE_SECONDS - 10
    os.utime(lock, (old, old))
    evaluation.add_entry(path, "val/b@100", {"fid": 2.0})
    assert not lock.exists() and set(json.loads(path.read_text())["eval"]) == {"val/a@100",
                                                                                "val/b@100"}
    lock.touch()  # 新しいロックは待ち、時間切れは 1 行で直し方を言う
    monkeypatch.setattr(evaluation, "LOCK_WAIT_SECONDS", 0.2)
    with pytest.raises(TimeoutError, match="消してください"):
        evaluation.add_entry(path, "val/c@100", {"fid": 3.0})


@pytest.mark.slow
def test_diffusion_folder_imports_without_fcntl():
    """Windows (fcntl なし) でもサンプリングと評価の部品を import できる。"""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import torchbook.diffusion.evaluate, torchbook.diffusion.sample\n"
            "import torchbook.diffusion.evaluation as e, torchbook.diffusion.sampling\n"
            "print('ok', e.entry_key('val', 'heun:5:1', 1000, 777))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok val/heun:5:1@1000/seed777" in r.stdout, r.stderr
    src = Path(evaluation.__file__).parent
    assert not [p.name for p in src.glob("*.py") if "import fcntl" in p.read_text("utf-8")]
