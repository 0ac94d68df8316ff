"""diffusion/ の層と CLI: CLI は CLI を import しない、悪い入力は作業の前に 1 行で止まる、
コピーしたフォルダーだけで動く、同梱のファイルを黙って書き換えない。"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import SRC, WEIGHTS, fashion_root, run_module

from torchbook.diffusion import (
    classifier,
    evaluate,
    evaluation,
    make_pairs,
    options,
    sample,
    train,
    train_autoencoder,
)

LIBRARY = {"schedule", "unet", "sampling", "checkpoint", "data", "metrics", "device", "options",
           "toy", "losses", "algorithms", "training", "evaluation", "direct_run",
           "fashion_classifier", "autoencoder", "conditioning", "latent", "reflow",
           "distill"}
CLIS = {"train", "sample", "evaluate", "classifier", "train_autoencoder", "make_pairs"}


def local_imports(path: Path) -> set[str]:
    """``from .x import ...``・``from . import x`` で import する同じパッケージのモジュール。"""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names |= {a.name for a in node.names}
    return names


def test_every_module_is_either_library_or_cli():
    assert {p.stem for p in SRC.glob("*.py")} - {"__init__"} == LIBRARY | CLIS


@pytest.mark.parametrize("name", sorted(LIBRARY | CLIS))
def test_layers_no_cli_imports_a_cli_and_library_never_imports_a_cli(name):
    imports = local_imports(SRC / f"{name}.py")
    assert not imports & CLIS, f"{name}.py が CLI {sorted(imports & CLIS)} を import しています"


def test_bf16_and_channels_last_are_decided_in_one_place():
    """bf16_supported / channels_last の既定を決めるコードは device.py だけにある。"""
    for path in SRC.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name != "device.py":
            assert "_is_mkldnn_bf16_supported" not in text, path.name
            assert "def uses_channels_last" not in text and "def bf16_supported" not in text


def test_device_get_device_is_used_everywhere():
    for path in SRC.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "def default_device" not in text and "def pick_device" not in text, path.name
        assert "cuda.is_available()" not in text or path.name == "device.py", path.name


# ---------------------------------------------------------------- 悪い入力


BAD_TRAIN = [["--steps", "0"], ["--batch-size", "0"], ["--lr", "-1"], ["--lr", "inf"],
             ["--lr", "nan"], ["--channels", "abc"], ["--channels", "30,60"],
             ["--patch-size", "3"], ["--T", "0"], ["--threads", "-1"], ["--device", "foo"],
             ["--export", "model"], ["--ema-decay", "1.5"]]


@pytest.mark.parametrize("bad", BAD_TRAIN, ids=" ".join)
def test_train_rejects_bad_input_with_one_line(bad, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--out", str(tmp_path / "run"), *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("usage") is False
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_unavailable_device_is_refused_before_work(name, capsys, monkeypatch):
    # GPU のある計算機でも飛ばさず調べるため、装置が無いことにする (本物の GPU は test_gpu.py)
    from torchbook.diffusion import device
    monkeypatch.setattr(device, f"{name}_available", lambda: False)
    for cli in (train, sample, evaluate):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(["--device", name])
        assert e.value.code == 2 and "使えません" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["-n", "0"], ["--steps", "0"], ["--eta", "-1"],
                                  ["--class", "10"], ["--out", "samples"],
                                  ["--checkpoint", "missing.pt"]], ids=" ".join)
def test_sample_rejects_bad_input(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--out", str(tmp_path / "a.png"), *args])
    assert e.value.code == 2 and capsys.readouterr().err


def test_output_paths_are_checked_at_start(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cli, args in [(train, ["--out", str(blocker)]),
                      (train, ["--out", str(tmp_path / "r"), "--export", str(blocker / "m.pt")]),
                      (sample, ["--out", str(blocker / "a.png")]),
                      (evaluate, ["--out", str(tmp_path / "eval.txt")]),
                      (classifier, ["--save", str(tmp_path / "clf")])]:
        with pytest.raises(SystemExit) as e:
            cli.parse_args(args)
        assert e.value.code == 2, (cli.__name__, args)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    real_access = os.access
    if real_access(readonly, os.W_OK):  # root は権限に関係なく書けるので、権限の答えを真似る
        def access(path, mode, *args, **kwargs):
            if Path(path) == readonly and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(options.os, "access", access)
    try:
        with pytest.raises(SystemExit) as e:
            sample.parse_args(["--out", str(readonly / "a.png")])
        assert e.value.code == 2 and "書き込めない" in capsys.readouterr().err
    finally:
        readonly.chmod(0o700)


def test_missing_parent_folders_are_created(tmp_path):
    args = sample.parse_args(["--dry-run", "--out", str(tmp_path / "new" / "deep" / "a.png")])
    assert (tmp_path / "new" / "deep").is_dir() and args.out.endswith("a.png")


# ---------------------------------------------------------------- コピーしたフォルダー


@pytest.mark.slow
def test_copied_folder_runs_alone(tmp_path):
    """本のほかのモジュールなしで、コピーしたフォルダーが import でき CLI が動く。"""
    dst = tmp_path / "diffusion"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    for name in dst.glob("*.py"):
        for line in name.read_text(encoding="utf-8").splitlines():
            assert not line.lstrip().startswith(("import torchbook", "from torchbook")), name
            assert "booktools" not in line, name
    env = {"cwd": tmp_path, "pythonpath": ""}
    r = run_module("diffusion.train", "--help", **env)
    assert r.returncode == 0 and "--download" in r.stdout, r.stderr
    r = run_module("diffusion.train", "--dry-run", "--threads", "1", "--batch-size", "8", **env)
    assert r.returncode == 0 and "完了" in r.stdout, r.stderr
    assert not (tmp_path / "runs").exists()  # dry run は何も書かない
    r = run_module("diffusion.sample", "--dry-run", "--out", "g.png", **env)
    assert r.returncode == 0 and (tmp_path / "g.png").stat().st_size > 0, r.stderr
    r = run_module("diffusion.train", "--data-root", "nothing", "--steps", "1", **env)
    assert r.returncode == 1 and "--download" in r.stderr and "Traceback" not in r.stderr
    assert "python -m" not in r.stderr.splitlines()[-1] and "booktools" not in r.stderr
    r = run_module("diffusion.sample", "--checkpoint", "missing.pt", **env)
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sample_dry_run_builds_its_model_on_the_chosen_device(monkeypatch, tmp_path):
    """--dry-run の UNet も --device の装置へ移す (以前は CPU のままで、CUDA 機で失敗した)。"""
    moved = []

    class SpyUNet(sample.UNet):
        def to(self, *args, **kwargs):
            moved.extend(a for a in args if isinstance(a, torch.device))
            return super().to(*args, **kwargs)

    monkeypatch.setattr(sample, "UNet", SpyUNet)
    seen = {}
    real = sample.sample

    def spy(model, *args, **kwargs):
        seen["model"] = next(model.parameters()).device
        seen["device"] = torch.device(kwargs["device"])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sample, "sample", spy)
    sample.main(["--dry-run", "--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert moved == [torch.device("cpu")]
    assert seen["model"].type == seen["device"].type == "cpu"


@pytest.mark.slow
def test_provenance_records_the_module_as_run(tmp_path):
    dst = tmp_path / "mydiff"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    r = run_module("mydiff.train", "--data-root", str(fashion_root()), "--out", "run",
                   "--steps", "1", "--limit", "16", "--batch-size", "4", "--channels", "16,32",
                   "--export", "m.pt", "--threads", "1", cwd=tmp_path, pythonpath="")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "m.json").read_text())["train"]
    assert info["command"].startswith("python -m mydiff.train --data-root")


# ---------------------------------------------------------------- 同梱のファイルを守る


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_evaluate_writes_no_shipped_file_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = evaluate.parse_args(["--tasks", "reference"])
    assert Path(args.out).resolve() == (tmp_path / "runs" / "ddpm_eval.json").resolve()
    assert WEIGHTS not in Path(args.out).resolve().parents


@pytest.mark.slow
def test_classifier_dry_run_never_touches_shipped_weights(tmp_path):
    before = {p.name: _digest(p) for p in WEIGHTS.iterdir() if p.is_file()}
    info = classifier.main(["--data-root", str(fashion_root()), "--dry-run", "--batch-size",
                            "64", "--save", str(WEIGHTS / "fashion_classifier.pt")])
    assert info["dry_run"]
    assert {p.name: _digest(p) for p in WEIGHTS.iterdir() if p.is_file()} == before


def test_classifier_default_save_is_not_the_shipped_file():
    assert Path(classifier.parse_args([]).save).resolve().parent != WEIGHTS


# ---------------------------------------------------------------- evaluate


def _write_keys(path: str, prefix: str, n: int) -> None:
    for i in range(n):
        evaluation.add_entry(Path(path), f"{prefix}{i}", {"fid": float(i)})


@pytest.mark.slow
def test_evaluate_json_updates_from_parallel_processes_are_all_kept(tmp_path):
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


def test_evaluate_tasks_parse_and_reject_typos(capsys, tmp_path):
    out = ["--out", str(tmp_path / "e.json")]
    assert evaluation.parse_task("reference") == {"task": "reference"}
    d = evaluation.parse_task("ddim:20")
    assert (d["steps"], d["eta"], d["guidance_scale"], d["task"]) == (20, 1.0, 1.0, "ddim:20:1:1")
    assert evaluation.parse_task("ddim:50:0:2.5")["task"] == "ddim:50:0:2.5"
    assert evaluation.parse_task("ddpm")["method"] == "ddpm"
    for bad in ["ddim", "ddim:x", "ddpm:3:1", "ddim:1:2:3:4", "floors", "ddim:0"]:
        with pytest.raises(SystemExit):
            evaluate.parse_args([*out, "--tasks", "reference", bad])
        assert "ddim:<steps>[:<eta>[:<s>]]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # test では選んだもの以外を測れない
        evaluate.parse_args([*out, "--split", "test", "--tasks", "ddim:50"])
    assert "chosen" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 選ぶ前に chosen は使えない
        evaluate.parse_args([*out, "--split", "test", "--tasks", "chosen"])
    with pytest.raises(SystemExit):
        evaluate.parse_args([*out, "--n", "25"])


def test_choose_picks_the_lowest_val_fid_only(tmp_path):
    path = tmp_path / "e.json"
    rows = [("a", "val", "ddim:10:1:1", 3.0), ("b", "val", "ddim:50:1:1", 2.0),
            ("c", "test", "ddim:20:1:1", 0.5), ("d", "val", "reference", 0.9)]
    for key, split, task, fid in rows:
        evaluation.add_entry(path, key, {"split": split, "task": task, "fid": fid, "n": 100})
    sel = evaluation.choose(path, 100, "cmd")
    assert sel["chosen"] == "ddim:50:1:1" and set(sel["candidates"]) == {"ddim:10:1:1",
                                                                         "ddim:50:1:1"}
    args = evaluate.parse_args(["--out", str(path), "--n", "100", "--split", "test",
                                "--tasks", "reference", "chosen"])
    assert [k["task"] for k in args.parsed] == ["reference", "ddim:50:1:1"]


@pytest.mark.parametrize("text", ["25", "10", "2510", "0", "abc"])
def test_reference_counts_are_checked_by_one_argparse_type(text, tmp_path, capsys):
    """evaluate --n と classifier --reference は同じ規則 (10 の倍数で 20〜2500) で止まる。"""
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--out", str(tmp_path / "e.json"), "--n", text])
    assert e.value.code == 2 and "argument --n" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        classifier.parse_args(["--save", str(tmp_path / "c.pt"), "--reference", text])
    assert e.value.code == 2 and "argument --reference" in capsys.readouterr().err
    assert options.reference_count("2500") == 2500 and options.reference_count("20") == 20


def _refusal(capsys, fn, *args) -> tuple[int | str, str]:
    """fn(*args) が SystemExit で止まることを確かめ、(終了コード, 出力の最後の 1 行) を返します。"""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    out = capsys.readouterr()
    lines = (out.err or out.out).strip().splitlines()
    if isinstance(e.value.code, str):  # SystemExit("...") はメッセージそのもの
        lines = e.value.code.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in out.err
    return e.value.code, lines[-1]


def test_offline_download_says_the_download_failed(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, line = _refusal(capsys, train.main,
                          ["--data-root", str(tmp_path / "data"), "--download",
                           "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"])
    assert "ダウンロードできませんでした" in code and "壊れて" not in code
    assert "\n" not in code and "コピー" in code


def test_classifier_refuses_truncated_files_before_training(tmp_path, capsys):
    import shutil

    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(fashion_root() / "FashionMNIST" / "raw", raw)
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000])  # 途中で切れたファイル
    code, line = _refusal(capsys, classifier.main,
                          ["--data-root", str(tmp_path), "--save", str(tmp_path / "c.pt"),
                           "--device", "cpu"])
    assert isinstance(code, str) and "\n" not in code and "FashionMNIST" in code
    assert not (tmp_path / "c.pt").exists()


def test_sample_refuses_more_steps_than_the_schedule_has(capsys):
    code, line = _refusal(capsys, sample.parse_args, ["--steps", "2000", "--out",
                                                      "never_written.png"])
    assert code == 2 and "--steps" in line and "1000" in line


def test_running_a_cli_file_directly_says_to_use_dash_m():
    import subprocess
    import sys

    for name in sorted(CLIS):
        r = subprocess.run([sys.executable, str(SRC / f"{name}.py"), "--help"],
                           capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and f"-m torchbook.diffusion.{name}" in (
            lines[0]), r.stderr


def test_every_recorded_command_parses_with_its_cli(tmp_path):
    """同梱の来歴 JSON にある CLI のコマンドは、今の CLI の parser でそのまま読める。"""
    import shlex

    commands = []

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "command" and isinstance(v, str) and "torchbook.diffusion." in v:
                    commands.append(v)
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for path in WEIGHTS.glob("*.json"):
        walk(json.loads(path.read_text("utf-8")))
    assert len(commands) > 20
    for command in sorted(set(commands)):
        words = shlex.split(command)
        module = words[words.index("-m") + 1].rsplit(".", 1)[1]
        p = {"train": train, "sample": sample, "evaluate": evaluate,
             "classifier": classifier, "train_autoencoder": train_autoencoder,
             "make_pairs": make_pairs}[module]
        args = words[words.index("-m") + 2:]
        parser = p.build_parser()
        parser.parse_args(args)  # 使えない引数やタスク名は SystemExit で落ちる
        if module == "evaluate":
            for task in getattr(parser.parse_args(args), "tasks", []):
                evaluation.parse_task(task)
    # 古いタスク名 (eval_legacy のコマンド) は今の名前に直る
    assert evaluation.parse_task("floor") == {"task": "reference"}
    assert evaluation.parse_task("guidance:3:1")["task"] == "ddim:50:1:3"


def test_the_four_clis_share_their_conventions():
    """--help は既定値を示し、どの引数にも説明があり、--device の既定は自動。"""
    for module in (train, sample, evaluate, classifier, train_autoencoder):
        p = module.build_parser()
        assert issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
        assert not [a.option_strings for a in p._actions if not a.help], module.__name__
        device = next(a for a in p._actions if "--device" in a.option_strings)
        assert device.default is None, module.__name__  # None = get_device() が選ぶ


@pytest.mark.parametrize("cli", [train, train_autoencoder], ids=lambda m: m.__name__)
def test_both_training_clis_refuse_the_same_run_folder_mistakes(cli, tmp_path, capsys):
    """--out・--resume・--force・--export・--dry-run の確かめ方は 2 つの学習 CLI で同じ 1 行。"""
    out, export = tmp_path / "run", tmp_path / "m.pt"

    def refusal(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            cli.parse_args(["--out", str(out), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "Traceback" not in "\n".join(err), err
        return err[-1].split("error: ", 1)[1]

    messages = [refusal("--resume", "--force"),
                refusal("--dry-run", "--resume"),  # 以前は作業を始めてからトレースバック
                refusal("--resume")]
    export.with_suffix(".json").write_text("{}")
    messages.append(refusal("--export", str(export)))
    (out / "last.pt").write_bytes(b"x")
    messages.append(refusal("--export", str(export)))  # 前の学習の方を先に言う
    assert messages == [
        "--resume と --force は同時に使えません (続きから学習するか、最初からやり直すか)",
        "--dry-run は何も読み書きしない試しなので、--resume と一緒に使えません",
        f"--resume: {out / 'last.pt'} がないので再開できません "
        "(--resume を外すと最初から学習します)",
        f"--export: {export.with_suffix('.json')} がすでにあります。"
        "上書きするなら --force を付けてください",
        f"{out / 'last.pt'} に前の学習があります。続けるなら --resume、"
        "捨てて最初からやり直すなら --force を付けるか、別の --out を指定してください"]


def test_device_threads_and_bf16_flags_are_the_same_in_every_cli():
    """--device・--threads・--bf16/--no-bf16 は options.add_device_arguments が足します。"""
    for module in (train, sample, evaluate, classifier, train_autoencoder):
        p = module.build_parser()
        flags = {s for a in p._actions for s in a.option_strings}
        assert {"--device", "--threads", "--bf16", "--no-bf16"} <= flags, module.__name__


def test_help_shows_defaults_as_they_are_typed():
    """--help の既定値: None は説明の「既定: …」で言い、並びは打つ形、--width は 32。"""
    for module in (train, sample, evaluate, classifier, train_autoencoder):
        p = module.build_parser()
        text = " ".join(p.format_help().split())
        assert "(default: None)" not in text, module.__name__
        assert "(default: [" not in text and "(default: (" not in text, module.__name__
        for a in p._actions:
            if a.default is None and a.option_strings:
                assert "既定" in a.help or "省く" in a.help, (module.__name__, a.option_strings)
    help_ae = " ".join(train_autoencoder.build_parser().format_help().split())
    assert "(default: 32)" in help_ae and "(VAE) を Fashion-MNIST" in help_ae
    assert train_autoencoder.parse_args(["--dry-run", "--width", "16"]).width == 16
    assert "(default: reference ddim:50)" in " ".join(evaluate.build_parser().format_help().split())
