"""CLI に共通の引数の型と確認 (作業を始める前に、悪い入力を 1 行の説明で止めます)。

argparse の ``type=`` に渡す関数は、受け付けない値に ``ArgumentTypeError`` を出します。
argparse はそれを ``error: argument --steps: ...`` の 1 行にして終了コード 2 で止めます。
CLI どうしで同じ引数 (``add_*_arguments``)、同じ確認 (``check_*``)、装置の準備
(``setup_device``) と学習画像の読み込み (``train_images``)、学習の CLI の再開の約束
(``config_differences``) と中断 (``deferred_ctrl_c``) もここに 1 つずつ置きます。
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .data import load_tensors
from .device import fast_formats, get_device


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help に既定値を示します (argparse の ArgumentDefaultsHelpFormatter と同じ)。ただし:

    - 既定が None の引数には「(default: None)」を足しません。None の意味 (「使える中で
      最も速いもの」など) は説明に「既定: …」として書きます。
    - 並びの既定値はコマンドラインに書く形 (空白区切り) で示します (「['a', 'b']」ではなく)。
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or "%(default)" in text
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


def positive_int(text: str) -> int:
    """1 以上の整数。"""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"整数にしてください (受け取ったのは {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"1 以上にしてください (受け取ったのは {value})")
    return value


def nonneg_float(text: str) -> float:
    """0 以上の有限の実数。"""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"数にしてください (受け取ったのは {text!r})") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"0 以上の有限の数にしてください (受け取ったのは {text})")
    return value


def positive_float(text: str) -> float:
    """0 より大きい有限の実数 (学習率など)。"""
    value = nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"0 より大きくしてください (受け取ったのは {text})")
    return value


def probability(text: str) -> float:
    """0 以上 1 未満の実数 (ラベルを落とす確率、EMA の減衰率)。"""
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"0 以上 1 未満にしてください (受け取ったのは {text})")
    return value


def reference_count(text: str) -> int:
    """本物と比べる枚数: 10 の倍数で 20〜2500。

    各 split は 1 クラス 500 枚で、本物どうしを比べるには重ならない組が 2 つ要るためです。
    """
    value = positive_int(text)
    if value % 10 or not 20 <= value <= 2500:
        raise argparse.ArgumentTypeError(
            f"10 の倍数で 20〜2500 にしてください (受け取ったのは {value}。"
            "各 split は 1 クラス 500 枚で、本物どうしを比べるのに重ならない 2 組が要ります)")
    return value


def channel_list(text: str) -> tuple[int, ...]:
    """"32,64,128" のようなチャンネル数の並び (各 8 の倍数: GroupNorm の 8 グループで割るため)。"""
    try:
        values = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"32,64,128 のようにカンマ区切りの整数にしてください (受け取ったのは {text!r})"
        ) from None
    if not values or any(c < 8 or c % 8 for c in values):
        raise argparse.ArgumentTypeError(
            f"チャンネル数はどれも 8 の倍数にしてください (受け取ったのは {text!r})")
    return values


def channel_count(text: str) -> int:
    """1 つのチャンネル数 (8 の倍数: GroupNorm の 8 グループで割るため)。"""
    values = channel_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"1 つの数にしてください (受け取ったのは {text!r})")
    return values[0]


def patch_size(text: str) -> int:
    """UNet の patch_size (1, 2, 4: 32×32 の画像を割り切り、縮めた後も 2 回半分にできる値)。"""
    value = positive_int(text)
    if value not in (1, 2, 4):
        raise argparse.ArgumentTypeError(f"1・2・4 のどれかにしてください (受け取ったのは {value})")
    return value


def device(text: str) -> torch.device:
    """--device の名前を確かめます (この計算機で使えないデバイスは作業の前に止めます)。"""
    try:
        return get_device(text)
    except (ValueError, RuntimeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-root と --download を足します (Fashion-MNIST を読む CLI で共通)。"""
    parser.add_argument("--data-root", default="data", help="Fashion-MNIST のあるフォルダー")
    parser.add_argument("--download", action="store_true",
                        help="Fashion-MNIST が無ければ torchvision でダウンロードする (約 30 MB)")


def add_device_arguments(parser: argparse.ArgumentParser, channels_last: bool = False,
                         auto_formats: bool = True) -> None:
    """--device、--threads、--bf16 (channels_last=True なら --channels-last も) を足します。

    --device を省くと cuda → mps → cpu の順に使えるもの。auto_formats=True なら、--bf16 と
    --channels-last を省いたときは ``device.fast_formats`` が装置に合わせて決めます (値は None)。
    False なら省くと使いません (分類器: 配布した重みを学習したときと同じ計算にするため)。
    """
    parser.add_argument("--device", type=device, default=None,
                        help="cpu, cuda, cuda:1, mps など (既定: 使える中で最も速いもの)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU のスレッド数 (既定: PyTorch が決める数)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                        default=None if auto_formats else False,
                        help="bf16 autocast" + (" (既定: 装置が bf16 を速く計算できるときだけ使う)"
                                                if auto_formats else ""))
    if channels_last:
        parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                            default=None if auto_formats else False,
                            help="channels_last メモリ形式"
                            + (" (既定: CPU と CUDA で使う)" if auto_formats else ""))


def setup_device(args: argparse.Namespace) -> tuple[torch.device, bool, bool]:
    """--threads を設定し、--device・--bf16・--channels-last から (装置, bf16, channels_last)
    を決めます (省いた項目は ``get_device`` と ``fast_formats`` が選びます)。"""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or get_device()
    return (device, *fast_formats(device, args.bf16, getattr(args, "channels_last", None)))


def train_images(args: argparse.Namespace, fake: int) -> tuple[torch.Tensor, torch.Tensor]:
    """学習画像 ([-1, 1]、N×1×32×32) とラベルを読みます (学習の CLI の --data-root・--download)。

    --dry-run ならデータを読まず、fake 枚の乱数の画像と乱数のラベルを返します。
    データが無い・壊れているときは、直し方を 1 行で示して止めます (トレースバックなし)。
    """
    if args.dry_run:
        return torch.rand(fake, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (fake,))
    try:
        return load_tensors(args.data_root, train=True, download=args.download)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


def add_run_arguments(parser: argparse.ArgumentParser, export_help: str) -> None:
    """学習の CLI に共通の、保存・再開・打ち切りの引数を足します (export_help: --export の説明)。"""
    parser.add_argument("--save-every", type=positive_int, default=500,
                        help="何ステップごとに out/last.pt を保存するか")
    parser.add_argument("--log-every", type=positive_int, default=100,
                        help="何ステップごとに損失を記録するか")
    parser.add_argument("--max-minutes", type=positive_float, default=None,
                        help="この時間で学習を打ち切る (既定: 打ち切らない)")
    parser.add_argument("--resume", action="store_true",
                        help="out/last.pt から再開する (学習の形を決める設定は保存したものと"
                        "同じに)")
    parser.add_argument("--force", action="store_true",
                        help="out/last.pt や --export のファイルがあっても上書きする")
    parser.add_argument("--export", default=None,
                        help=f"{export_help} (既定: 書き出さない)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="学習画像の枚数を制限する (試し用。既定: すべて)")
    parser.add_argument("--dry-run", action="store_true",
                        help="データを読まず何も保存せず、乱数の画像で 2 ステップだけ動かす")


def check_run_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path | None:
    """学習の CLI の --out・--resume・--force を作業の前に確かめ、out/last.pt を返します。

    前の学習 (out/last.pt) を黙って消しません: 続けるなら --resume、捨てるなら --force。
    --dry-run は何も書かないので、組み合わせだけ確かめて None を返します。
    """
    if args.resume and args.force:
        parser.error("--resume と --force は同時に使えません "
                     "(続きから学習するか、最初からやり直すか)")
    if args.dry_run:
        if args.resume:
            parser.error("--dry-run は何も読み書きしない試しなので、--resume と一緒に使えません")
        return None
    last = check_folder(parser, args.out, "--out") / "last.pt"
    if args.resume and not last.is_file():
        parser.error(f"--resume: {last} がないので再開できません "
                     "(--resume を外すと最初から学習します)")
    if last.is_file() and not (args.resume or args.force):
        parser.error(f"{last} に前の学習があります。続けるなら --resume、"
                     "捨てて最初からやり直すなら --force を付けるか、別の --out を指定してください")
    return last


def check_export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--export の .pt と隣の .json を作業の前に確かめます (--force なしでは上書きしない)。"""
    if not args.export or args.dry_run:
        return
    export = check_output(parser, args.export, "--export", (".pt",))
    for f in (export, export.with_suffix(".json")):
        if f.exists() and not args.force:
            parser.error(f"--export: {f} がすでにあります。上書きするなら --force を付けてください")


def check_output(parser: argparse.ArgumentParser, path: str | os.PathLike, option: str,
                 suffixes: tuple[str, ...]) -> Path:
    """書き出すファイルのパスを作業の前に確かめます (拡張子、フォルダー、書き込み権限)。

    足りない親フォルダーはここで作ります。作れない・書けないときは parser.error で止めます。
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        parser.error(f"{option} {path}: 拡張子を {' か '.join(suffixes)} にしてください")
    if path.is_dir():
        parser.error(f"{option} {path}: フォルダーではなくファイルの名前にしてください")
    check_folder(parser, path.parent, option)
    if path.exists() and not os.access(path, os.W_OK):
        parser.error(f"{option} {path}: 書き込めないファイルです。別の場所を指定してください")
    return path


def check_folder(parser: argparse.ArgumentParser, folder: str | os.PathLike,
                 option: str) -> Path:
    """書き込むフォルダーを確かめ、無ければ作ります。"""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        parser.error(f"{option} {folder}: フォルダーの場所にファイルがあります")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"{option} {folder}: フォルダーを作れません ({e.strerror})")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"{option} {folder}: 書き込めないフォルダーです。別の場所を指定してください")
    return folder



def config_differences(stored: dict, given: dict, extend: bool = False) -> list[str]:
    """保存した設定と今の設定の違いを「--lr 0.002 (保存) → 0.001 (指定)」の形で返します。

    学習の CLI は、学習の形を決める設定を last.pt の config に保存し、--resume のときに
    これで比べます。extend=True なら、--steps だけは保存した値より大きくてかまいません。
    """
    diffs = []
    for name in sorted(set(stored) | set(given)):
        old, new = stored.get(name), given.get(name)
        if name == "steps" and extend and old is not None and new is not None and new > old:
            continue
        if old != new:
            flag = "--" + name.replace("_", "-") if name != "max_grad_norm" else name
            diffs.append(f"{flag} {old} (保存) → {new} (指定)")
    return diffs


def check_resume(parser: argparse.ArgumentParser, last: Path, read: Callable[[Path], dict],
                 config: dict, extend: bool = False) -> dict:
    """--resume の前に last.pt を read で読み、保存した config と今の config を比べます。

    読めない、配布用 (再開の状態がない)、設定が違う、のどれも parser.error の 1 行で止めます。
    extend=True なら --steps は保存した値より大きくなければなりません (学習を延ばす)。
    """
    try:
        ckpt = read(last)
    except ValueError as e:
        parser.error(f"--resume: {e}")
    if "optimizer" not in ckpt or "config" not in ckpt:
        parser.error(f"--resume: {last} は配布用のファイルなので再開できません")
    diffs = config_differences(ckpt["config"], config, extend)
    if diffs:
        hint = "" if extend or "steps" not in ckpt["config"] else \
            "。学習を延ばすなら --extend と大きい --steps を"
        parser.error(f"--resume: {last} と設定が違います: {'、'.join(diffs)}。"
                     f"保存した設定で再開してください{hint}")
    if extend and config["steps"] <= ckpt["config"]["steps"]:
        parser.error(f"--extend: --steps を保存した {ckpt['config']['steps']} より"
                     "大きくしてください")
    return ckpt


@contextlib.contextmanager
def deferred_ctrl_c() -> Iterator[dict]:
    """学習のループの間、1 回目の Ctrl-C を「今のステップを終えたら止める」合図にします。

    返す辞書の ``pressed`` が True になったら、ループはステップの境目で保存して止めます
    (重みも乱数の状態も、止めなかった学習と同じところ)。2 回目の Ctrl-C はすぐに
    KeyboardInterrupt になります (ステップの途中なので、呼ぶ側は保存しません)。
    signal は主スレッドでしか設定できないので、ほかのスレッドでは何もしません。
    """
    state = {"pressed": False}
    previous = None

    def on_ctrl_c(signum, frame) -> None:
        state["pressed"] = True
        signal.signal(signal.SIGINT, previous)

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield state
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def end_of_step(step: int, args: argparse.Namespace, t_start: float, ctrl_c: dict,
                save: Callable[[], None], last: Path) -> bool:
    """学習の 1 ステップを終えたところで呼びます: 保存の時期なら保存し、止めるかを返します。

    --save-every の倍数、最後のステップ、--max-minutes の時間切れ、Ctrl-C (``deferred_ctrl_c``)
    のときに保存します。時間切れなら True (呼ぶ側はループを抜けます)、Ctrl-C なら保存の後に
    終了コード 130 で止めます (どちらもステップの境目なので、--resume で同じ続きになります)。
    """
    timeout = args.max_minutes is not None and time.time() - t_start > args.max_minutes * 60
    if step % args.save_every == 0 or step == args.steps or timeout or ctrl_c["pressed"]:
        save()
    if ctrl_c["pressed"]:
        print(f"\n中断しました。ステップ {step} までを {last} に保存しました "
              "(同じコマンドに --resume を付けると続きから学習します)")
        raise SystemExit(130)
    if timeout:
        print(f"--max-minutes {args.max_minutes} に達したのでステップ {step} で止めます")
    return timeout
