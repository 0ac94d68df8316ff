""".ci/build_pages.py: 章ごとのビルドの出力先は、このチェックアウトの _build/ の下です。"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_pages", ROOT / ".ci" / "build_pages.py")
build_pages = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_pages)


def test_output_is_inside_this_checkout():
    out = build_pages.output_dir(["book/05_mnist.md"])
    assert out == ROOT / "_build" / "pages" / "05_mnist"
    assert build_pages.output_dir(["book/06_diffusion.md", "book/01_tensors.md"]).name == (
        "01_tensors-06_diffusion"
    )


def test_usage_without_pages(capsys):
    assert build_pages.main([]) == 2
    assert "build_pages.py book/05_mnist.md" in capsys.readouterr().out
