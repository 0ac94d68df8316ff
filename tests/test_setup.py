"""準備 (scripts/setup.sh と requirements): 入っているものは入れ直さず、テスト用は分ける。"""

import importlib.util
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "requirements_status", ROOT / "scripts" / "requirements_status.py"
)
status = importlib.util.module_from_spec(spec)
spec.loader.exec_module(status)

TEST_ONLY = {"pytest", "ruff", "diffusers", "playwright", "axe-playwright-python", "pillow"}


def names(lines: list[str]) -> set[str]:
    return {status.Requirement(line).name.lower() for line in lines}


def test_test_only_packages_are_split_from_the_book_requirements():
    book = names(status.requirement_lines(ROOT / "requirements.txt"))
    dev = names(status.requirement_lines(ROOT / "requirements-dev.txt"))
    assert {"torch", "jupyter-book"} <= book and not book & TEST_ONLY
    assert dev == book | TEST_ONLY  # dev は本の要件をすべて含む (-r requirements.txt)


def test_unmet_requirements_are_listed(tmp_path):
    pytest_version = metadata.version("pytest")
    lines = [
        "pytest>=1",  # 入っている
        f"pytest<{pytest_version}",  # 版が合わない
        "torchbook-no-such-package>=1",  # 入っていない
        "pytest>=1; python_version < '3'",  # この環境には要らない
    ]
    assert status.unmet(lines) == lines[1:3]
    (tmp_path / "base.txt").write_text("# コメント\npytest>=1  # 説明\n")
    (tmp_path / "dev.txt").write_text("-r base.txt\nruff\n")
    assert status.requirement_lines(tmp_path / "dev.txt") == ["pytest>=1", "ruff"]
    (tmp_path / "bad.txt").write_text("--index-url https://example.org\n")
    with pytest.raises(ValueError, match="読まない行"):
        status.requirement_lines(tmp_path / "bad.txt")


def test_editable_install_must_come_from_this_checkout(tmp_path, monkeypatch):
    class Dist:
        def __init__(self, info):
            self.info = info

        def read_text(self, name):
            return json.dumps(self.info) if name == "direct_url.json" else None

    repo = tmp_path / "my repo"
    repo.mkdir()
    url = repo.as_uri()  # 空白は %20 になる
    for info, expected in [
        ({"url": url, "dir_info": {"editable": True}}, True),
        ({"url": (tmp_path / "other").as_uri(), "dir_info": {"editable": True}}, False),
        ({"url": url, "dir_info": {}}, False),  # 編集可能モードでない
    ]:
        monkeypatch.setattr(status.metadata, "distribution", lambda name, i=info: Dist(i))
        assert status.editable_from("torchbook", repo) is expected


@pytest.mark.slow
def test_status_cli_exit_codes(tmp_path):
    (tmp_path / "ok.txt").write_text("pytest>=1\n")
    run = [sys.executable, str(ROOT / "scripts" / "requirements_status.py")]
    result = subprocess.run([*run, str(tmp_path / "ok.txt")], capture_output=True, text=True)
    # torchbook がこのチェックアウトから入っているかどうかで 0 か 1。どちらでも -e 以外は出ない
    assert result.returncode in (0, 1)
    assert all(line.startswith("-e ") for line in result.stdout.split("\n") if line)
    (tmp_path / "missing.txt").write_text("torchbook-no-such-package\n")
    result = subprocess.run([*run, str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert result.returncode == 1 and "torchbook-no-such-package" in result.stdout


@pytest.mark.slow
def test_commands_of_packages_seen_through_system_site_packages_are_linked(tmp_path):
    """venv の bin にない要件のコマンドを作り、それが venv の Python で動くこと。"""
    made = status.link_scripts(["pytest>=7", "torchbook-no-such-package"], tmp_path)
    assert "pytest" in made
    script = tmp_path / "pytest"
    assert script.read_text().startswith(f"#!{sys.executable}\n")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "pytest" in (result.stdout + result.stderr)
    assert status.link_scripts(["pytest>=7"], tmp_path) == []  # あるものは作り直さない


@pytest.mark.skipif(shutil.which("git") is None, reason="git がない")
def test_venv_is_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("git のチェックアウトではない")
    result = subprocess.run(
        ["git", "check-ignore", "-q", ".venv/bin/python"], cwd=ROOT, capture_output=True
    )
    assert result.returncode == 0


def test_setup_script_is_valid_bash_and_never_uses_a_fixed_tmp_path():
    text = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert "/tmp" not in text
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")]).returncode == 0
