"""執筆中の確認用: 指定した章だけを実行して本全体をビルドします。

    python .ci/build_pages.py book/05_mnist.md [book/07_ddpm.md ...]

他の章は実行せずに組版するので速く、本全体のビルド (_build/html) にも触れません。
出力先は、このチェックアウトの _build/pages/<章名>/_build/html です
(/tmp のような、ほかの利用者と共有する固定パスは使いません)。
指定した章の警告だけを表示し、警告やエラーがあれば終了コード 1 を返します。
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def output_dir(pages: list[str]) -> Path:
    """章ごとの出力先。チェックアウトの _build/ の下なので、利用者やクローンごとに別です。"""
    name = "-".join(sorted(Path(p).stem for p in pages))
    return ROOT / "_build" / "pages" / name


def main(pages: list[str]) -> int:
    if not pages:
        print(__doc__)
        return 2
    wanted = {Path(p).with_suffix("").as_posix() for p in pages}
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    others = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "book").glob("*.md"))]
    others = [p for p in others if p.removesuffix(".md") not in wanted]
    cfg["execute"]["exclude_patterns"] = others
    out = output_dir(pages)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "_config.yml"
    cfg["bibtex_bibfiles"] = [str(ROOT / b) for b in cfg["bibtex_bibfiles"]]
    local = cfg.get("sphinx", {}).get("local_extensions") or {}
    cfg["sphinx"]["local_extensions"] = {k: str(ROOT / v) for k, v in local.items()}
    cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    cmd = ["jupyter-book", "build", str(ROOT), "--config", str(cfg_path),
           "--path-output", str(out), "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out / "build.log").write_text(log, encoding="utf-8")
    problems = [
        line for line in log.splitlines()
        if ("WARNING" in line or "ERROR" in line) and "IPKernelApp" not in line
        and any(w in line for w in wanted)
    ]
    if proc.returncode and not problems:  # 章に結びつかない失敗 (設定や拡張の読み込みなど)
        problems = [line for line in log.splitlines()[-15:] if line.strip()]
    print("\n".join(problems) if problems else "警告なし")
    for w in sorted(wanted):
        report = out / "_build" / "html" / "reports" / f"{Path(w).name}.err.log"
        if report.exists():
            print(report.read_text(encoding="utf-8")[-4000:])
    print(f"HTML: {out}/_build/html/{sorted(wanted)[0]}.html  (全ログ: {out}/build.log)")
    return 1 if problems or proc.returncode else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
