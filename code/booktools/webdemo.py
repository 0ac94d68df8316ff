"""ブラウザーで動くデモのための書き出し: ONNX への変換、onnxruntime での照合、置き場所。

章のセルがビルドのときに呼びます。書き出したファイルは ``demo_dir()`` (既定は
``_build/webdemo/``、git の管理外) に置き、Sphinx 拡張 ``_ext/webdemo.py`` がビルドした
HTML の ``_static/webdemo/`` へ写します。ブラウザーは onnxruntime-web で同じグラフを動かします。

    path = export_onnx(model, (x,), demo_dir() / "mnist.onnx", ["input"], ["logits"])
    diff = verify_onnx(path, model, (x,))   # PyTorch との最大の差 (大きすぎれば例外)

保存はどれも同じフォルダーの一時ファイルに書いてから ``os.replace`` で置きます。
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from booktools.data import REPO_ROOT, atomic_path, atomic_write

ENV_DIR = "TORCHBOOK_WEBDEMO_DIR"  # 書き出し先を変える環境変数 (テスト用)
OPSET = 18  # onnxruntime-web 1.30 が扱える範囲で、dynamo の書き出しが標準とする版
TOLERANCE = 1e-4  # verify_onnx が許す PyTorch との最大の差 (float32 の計算順の違いの範囲)


# ブラウザーで使う onnxruntime-web (npm) の WebAssembly 版の最小の組。_ext/webdemo.py がサイトへ写す
RUNTIME_DIST = REPO_ROOT / "node_modules" / "onnxruntime-web" / "dist"
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


class ExportError(RuntimeError):
    """書き出したグラフが PyTorch と合わない・読めないときの例外。"""


def demo_dir() -> Path:
    """デモのファイルを書き出すフォルダー (無ければ作ります)。"""
    path = Path(os.environ.get(ENV_DIR) or REPO_ROOT / "_build" / "webdemo")
    path.mkdir(parents=True, exist_ok=True)
    return path


def runtime_bytes() -> int:
    """読者がデモを始めたときに読む実行環境のバイト数 (無ければ FileNotFoundError)。"""
    return sum((RUNTIME_DIST / name).stat().st_size for name in RUNTIME_FILES)


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = OPSET,
) -> Path:
    """model を評価モードで ONNX に書き出し、重みを埋め込んだ 1 つのファイルにして返します。

    dynamic_axes は ``{"input": {0: "batch"}}`` のように、大きさを固定しない次元の名前です。
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # 書き出しの途中経過の警告は本のページに出さない
            program = torch.onnx.export(
                model,
                tuple(example_inputs),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        program.save(tmp, external_data=False)
        _check_single_file(tmp)
    return path


def _check_single_file(path: Path) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(graph)
    external = [t.name for t in graph.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path.name}: 重みが別のファイルにあります ({external[:3]})")


def run_onnx(path: str | os.PathLike, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """onnxruntime (Python、CPU) でグラフを 1 回動かし、出力をテンソルのリストで返します。"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # ビルドの計算機の CPU を取り合わない・結果を決定的に
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ExportError(f"グラフの入力は {names} ですが、渡した入力は {len(inputs)} 個です")
    feed = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs, strict=True)}
    return [torch.from_numpy(y) for y in session.run(None, feed)]


@torch.no_grad()
def verify_onnx(
    path: str | os.PathLike,
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    tolerance: float = TOLERANCE,
) -> float:
    """同じ入力で onnxruntime と PyTorch を比べ、出力の最大の絶対差を返します。

    差が tolerance を超えれば ExportError にします (ページがその書き出しを使う前に止める)。
    """
    model = model.eval()
    expected = model(*inputs)
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    got = run_onnx(path, inputs)
    if len(got) != len(expected):
        raise ExportError(f"出力の数が違います (ONNX {len(got)}、PyTorch {len(expected)})")
    diff = 0.0
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            raise ExportError(
                f"出力の形が違います (ONNX {tuple(g.shape)}、PyTorch {tuple(e.shape)})")
        diff = max(diff, (g - e.detach().cpu().float()).abs().max().item())
    if not diff <= tolerance:  # NaN もここで止める
        raise ExportError(f"{Path(path).name}: onnxruntime と PyTorch の差 {diff:.3g} が "
                          f"許容値 {tolerance:g} を超えます")
    return diff


def save_json(path: str | os.PathLike, obj: object) -> Path:
    """JSON を原子的に書きます (デモのメタデータやテストの入力)。"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())
    return path


def save_state_dict(path: str | os.PathLike, model: torch.nn.Module) -> Path:
    """CI の照合が PyTorch の答えを作り直せるよう、重みを原子的に保存します。

    読むときは ``torch.load(path, weights_only=True)`` です。
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write(path, buf.getvalue())
    return path


def _area_weights(src: int, dst: int) -> torch.Tensor:
    """長さ src を dst に縮める行列 (dst, src)。各行は、出力 1 画素が覆う元の画素の面積の割合。"""
    f = src / dst
    a = torch.arange(dst, dtype=torch.float64).unsqueeze(1) * f  # 出力 i が覆う区間 [a, b)
    k = torch.arange(src, dtype=torch.float64).unsqueeze(0)  # 元の画素 k は区間 [k, k+1)
    overlap = (torch.minimum(a + f, k + 1) - torch.maximum(a, k)).clamp(min=0)
    return overlap / f


def mnist_preprocess(ink: torch.Tensor, size: int = 28, box: int = 20) -> torch.Tensor | None:
    """書いた数字の濃さ (H, W、0〜1) を、MNIST と同じ手順で 28×28 (0〜1) にします。

    _static/demo-mnist.js の preprocess と同じ計算です (CI がブラウザーの結果と照合します)。
    何も書いていなければ None を返します。
    """
    ys, xs = (ink > 0).nonzero(as_tuple=True)
    if len(ys) == 0:
        return None
    # 1. バウンディングボックスを切り出す
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].double()
    bh, bw = crop.shape
    # 2. 縦横比を保って、長いほうの辺を box 画素に (面積の平均で縮める)
    scale = box / max(bh, bw)
    oh, ow = max(1, round(bh * scale)), max(1, round(bw * scale))
    resized = _area_weights(bh, oh) @ crop @ _area_weights(bw, ow).T
    # 3. 重心 (画素の中心で測る) が中央に来るように置く (はみ出さないように制限)
    mass = resized.sum()
    my = (resized.sum(1) * (torch.arange(oh) + 0.5)).sum() / mass
    mx = (resized.sum(0) * (torch.arange(ow) + 0.5)).sum() / mass
    oy = min(max(_round_half_up(size / 2 - my.item()), 0), size - oh)
    ox = min(max(_round_half_up(size / 2 - mx.item()), 0), size - ow)
    out = torch.zeros(size, size, dtype=torch.float64)
    out[oy : oy + oh, ox : ox + ow] = resized
    return out.float()


def _round_half_up(v: float) -> int:
    """JavaScript の Math.round と同じ丸め (0.5 は大きいほうへ)。"""
    return math.floor(v + 0.5)
