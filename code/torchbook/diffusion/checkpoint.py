"""チェックポイントの保存と読み込み (この章のファイル形式はここだけで決めます)。

形式はモデルの種類ごとに 1 つです。

拡散モデルは ``torch.save`` した辞書です。ε を予測する DDPM は
``kind == "torchbook-ddpm-v1"``、速度 v を予測するフローマッチングのモデルは
``kind == "torchbook-flow-v1"`` (``"schedule"`` は ``"flow"``) で、中身の形は同じです::

    {"kind": "torchbook-ddpm-v1",
     "unet": UNet の構成 (UNet.config),  "schedule": "cosine" など,  "T": 1000,
     "step": 学習ステップ数,  "ema": EMA の state_dict,  "ema_step": EMA の更新回数,
     "extra": 来歴 (学習の記録など),
     "previews": {ステップ: 同じノイズから作った見本の画像 (uint8)},
     # 以下は学習を再開するためのもの。配布用 (ema_only) のファイルにはありません
     "model": 学習中の重み (学習する部分だけ: trained_part), "optimizer": ..., "lr_scheduler": ...,
     "rng": torch の乱数の状態, "generator": データを選ぶ乱数の状態,
     "config": 学習の形を決める設定 (再開のときに比べる。train.RUN_SETTINGS)}

潜在空間のフローマッチングのモデル (``latent.LatentFlow``) は ``kind == "torchbook-latent-flow-v1"``
で、形は同じです (``"unet"`` は LatentFlow.config: 潜在 UNet と自己符号化器の構成。
``"ema"`` にはデコーダーを含む自己符号化器の重みも入るので、このファイルだけで画像まで作れます。
固定した自己符号化器の重みは ``"ema"`` の中の 1 回だけで、再開用の ``"model"`` は
LatentUNet だけです)。

自己符号化器 (``autoencoder.Autoencoder``) は ``kind == "torchbook-autoencoder-v1"`` の辞書で、
``"autoencoder"`` (構成)、``"model"`` (重み。latent_scale を含む)、``"step"``、``"extra"`` と、
再開用の ``"optimizer"``・``"rng"``・``"generator"`` を持ちます。

分類器 (``fashion_classifier.FashionClassifier``) は ``state_dict`` そのものです。
どちらも隣に同じ名前の ``.json`` (来歴: 実行したコマンド、コミット、測定値) を置きます。

保存は必ず ``atomic_save``: 同じフォルダーの一時ファイルに書いてから ``os.replace`` で
置き換えるので、保存の途中で止まっても前のファイルは壊れません。
読み込みは必ず ``torch.load(..., weights_only=True)`` です。
"""

from __future__ import annotations

import os
import pickle
import secrets
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from .autoencoder import Autoencoder
from .latent import LatentFlow
from .schedule import NoiseSchedule
from .unet import UNet

DDPM_KIND = "torchbook-ddpm-v1"
FLOW_KIND = "torchbook-flow-v1"
LATENT_FLOW_KIND = "torchbook-latent-flow-v1"
AUTOENCODER_KIND = "torchbook-autoencoder-v1"
KINDS = {"eps": DDPM_KIND, "flow": FLOW_KIND}  # 学習の目的 (objective) → 形式の名前
DIFFUSION_KINDS = (DDPM_KIND, FLOW_KIND, LATENT_FLOW_KIND)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "ddpm_fashion.pt"


# ---------------------------------------------------------------- 書き込み (いつも原子的に)


def atomic_write(path: str | os.PathLike, write) -> None:
    """write(一時ファイルのパス) で書いてから path へ os.replace します (画像などにも使えます)。

    一時ファイルは普通のファイルと同じ権限 (0o666 から umask を除いたもの) で作ります。
    書けなかったとき (ディスクが一杯、ファイルの大きさの上限など) は、前のファイルを
    そのまま残し、そう述べる 1 行の OSError にします。
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 権限は umask に従う
    try:
        write(tmp)
        os.replace(tmp, path)  # 書き終えたファイルとの入れ替えは一瞬 (途中の状態がない)
    except (OSError, RuntimeError) as e:  # torch.save の書き込みの失敗は RuntimeError で来る
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and not any(
                w in str(e) for w in ("inline_container", "PytorchStreamWriter")):
            raise  # 書き込みではない失敗 (保存できない中身など) はそのまま
        kept = "前のファイルはそのまま残っています" if path.exists() else "何も書いていません"
        reason = (e.strerror or str(e)) if isinstance(e, OSError) else str(e).splitlines()[0]
        raise OSError(f"{path} を保存できませんでした ({reason[:120]})。{kept}。"
                      "ディスクの空きと書き込める大きさを確かめてください") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` を原子的に行います。"""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """テキストファイル (来歴 JSON など) を原子的に書きます。"""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------- 読み込み


def read_checkpoint(path: str | os.PathLike) -> object:
    """``torch.load(weights_only=True)`` で読みます。読めないファイルは理由つきで止めます。"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"チェックポイント {path} がありません")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, IndexError, KeyError,
            RuntimeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(
            f"{path} は PyTorch のチェックポイントとして読めません (テキストファイルや、"
            f"途中までしか書かれていないファイルではありませんか): {type(e).__name__}") from e


def read_diffusion(path: str | os.PathLike) -> dict:
    """拡散モデル (DDPM・フロー・潜在フロー) のチェックポイントを読み、形式を確かめます。"""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in DIFFUSION_KINDS:
        found = f" ({ckpt['kind']})" if isinstance(ckpt, dict) and "kind" in ckpt else ""
        raise ValueError(f"{path}{found} はこのモジュールの拡散モデルのチェックポイント "
                         f"({'・'.join(DIFFUSION_KINDS)}) ではありません")
    return ckpt


def read_autoencoder(path: str | os.PathLike) -> dict:
    """自己符号化器のチェックポイントを読み、形式を確かめて返します。"""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != AUTOENCODER_KIND:
        found = f" ({ckpt['kind']})" if isinstance(ckpt, dict) and "kind" in ckpt else ""
        raise ValueError(f"{path}{found} は自己符号化器のチェックポイント ({AUTOENCODER_KIND}) "
                         "ではありません。train_autoencoder で作ったファイルを指定してください")
    return ckpt


def save_autoencoder(path: str | os.PathLike, model: Autoencoder, step: int = 0,
                     extra: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                     generator: torch.Generator | None = None, export: bool = False,
                     config: dict | None = None) -> None:
    """自己符号化器を保存します。export=True なら再開用の状態を除いた配布用です。

    再開用には、学習の形を決める設定 config (--resume のときに比べる) も入れます。
    """
    ckpt = {"kind": AUTOENCODER_KIND, "autoencoder": model.config, "step": step,
            "model": model.state_dict(), "extra": extra or {}}
    if not export:
        ckpt["config"] = config or {}
        ckpt["optimizer"] = optimizer.state_dict() if optimizer else None
        ckpt["rng"] = torch.get_rng_state()
        ckpt["generator"] = generator.get_state() if generator else None
    atomic_save(ckpt, path)


def load_autoencoder(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> tuple[Autoencoder, dict]:
    """自己符号化器を読み込み、評価モードで (モデル, チェックポイント) を返します。"""
    ckpt = read_autoencoder(path)
    model = Autoencoder(**ckpt["autoencoder"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path} の重みが Autoencoder({ckpt['autoencoder']}) の構造と合いません"
                         ) from e
    return model.to(device).eval(), ckpt


def objective_of(ckpt: dict) -> str:
    """チェックポイントの学習の目的: ε 予測なら "eps"、フローマッチング (潜在も) なら "flow"。"""
    return "eps" if ckpt["kind"] == DDPM_KIND else "flow"


def trained_part(model: nn.Module) -> nn.Module:
    """学習で重みが変わる部分 (LatentFlow なら LatentUNet。固定した自己符号化器は除く)。"""
    return model.unet if isinstance(model, LatentFlow) else model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, ema, schedule_name: str,
                    T: int, extra: dict | None = None, ema_only: bool = False,
                    optimizer: torch.optim.Optimizer | None = None,
                    lr_scheduler=None, step: int = 0,
                    generator: torch.Generator | None = None, objective: str = "eps",
                    previews: dict[int, torch.Tensor] | None = None,
                    config: dict | None = None) -> None:
    """拡散モデルのチェックポイントを保存します。ema_only=True なら EMA の重みだけ (配布用)。

    ema は ``.model`` (EMA の重みを持つ UNet) と ``.step`` を持つオブジェクトです。
    再開用には最適化器・学習率・乱数の状態も保存し、続きが中断なしと同じになるようにします。
    objective は "eps" (DDPM) か "flow" (フローマッチング)、previews は学習途中の見本、
    config は再開のときに比べる学習の設定です (再開用のファイルだけに保存)。
    """
    kind = LATENT_FLOW_KIND if isinstance(model, LatentFlow) else KINDS[objective]
    ckpt = {"kind": kind, "unet": model.config, "schedule": schedule_name, "T": T,
            "step": step, "ema": ema.model.state_dict(), "ema_step": ema.step,
            "extra": extra or {}, "previews": previews or {}}
    if not ema_only:
        if optimizer is None or lr_scheduler is None or generator is None:
            raise ValueError("再開用の保存には optimizer・lr_scheduler・generator を渡してください "
                             "(配布用なら ema_only=True)")
        ckpt["model"] = trained_part(model).state_dict()  # 固定した部分は ema の中の 1 回だけ
        ckpt["optimizer"] = optimizer.state_dict()
        ckpt["lr_scheduler"] = lr_scheduler.state_dict()
        ckpt["rng"] = torch.get_rng_state()
        ckpt["generator"] = generator.get_state()
        ckpt["config"] = config or {}
    atomic_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    channels_last: bool = False
                    ) -> tuple[UNet | LatentFlow, NoiseSchedule | None, dict]:
    """チェックポイントから EMA の UNet (評価モード) とスケジュールを作って返します。

    UNet の ``objective`` はチェックポイントの種類から決まります ("eps" か "flow")。
    フローマッチングのモデルにはノイズスケジュールがないので、スケジュールは None です。
    潜在フローのチェックポイントなら、デコーダーまで入った ``LatentFlow`` を返します。
    """
    ckpt = read_diffusion(path)
    if ckpt["kind"] == LATENT_FLOW_KIND:
        model = LatentFlow.from_config(ckpt["unet"])
    else:
        model = UNet(**ckpt["unet"], objective=objective_of(ckpt))
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError as e:
        raise ValueError(f"{path} の重みが {type(model).__name__}({ckpt['unet']}) の構造と"
                         f"合いません: {e}") from e
    model = model.float().to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if objective_of(ckpt) == "flow":
        return model, None, ckpt
    return model, NoiseSchedule.from_name(ckpt["schedule"], ckpt["T"]), ckpt


def restore_training(ckpt: dict, model: nn.Module, ema, optimizer: torch.optim.Optimizer,
                     lr_scheduler, generator: torch.Generator) -> int:
    """再開用のチェックポイント (ema_only でないもの) の状態を戻し、ステップ数を返します。"""
    if "model" not in ckpt:
        raise ValueError("配布用 (EMA だけ) のチェックポイントなので再開できません")
    if ckpt["unet"] != model.config:
        raise ValueError(f"チェックポイントは別の構造のモデル ({ckpt['unet']}) のものです")
    try:
        trained_part(model).load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
    except RuntimeError as e:
        raise ValueError(f"重みが {type(model).__name__} の構造と合いません "
                         f"({str(e).splitlines()[0]})") from e
    ema.step = ckpt["ema_step"]
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    torch.set_rng_state(ckpt["rng"])
    generator.set_state(ckpt["generator"])
    return ckpt["step"]


# ---------------------------------------------------------------- 来歴


def command_line(module: str, argv: list[str] | None) -> str:
    """実際に実行したコマンドを 1 行で返します (来歴 JSON に書きます)。

    module は呼び出し側の ``__spec__.name`` など (コピー先ではパッケージ名が変わるため、
    決め打ちしません)。argv が None ならコマンドラインの引数 ``sys.argv[1:]`` を使います。
    """
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *args])


def provenance(command: str, device: torch.device, bf16: bool, **settings) -> dict:
    """学習の来歴の共通部分: コマンド、コミット、装置と計算の設定、計算機、版、終わった時刻。"""
    import platform
    import time

    from .device import cpu_model

    return {"command": command, "commit": git_commit(), "device": str(device), "bf16": bf16,
            **settings, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(), "torch": str(torch.__version__)}


def write_provenance(weights: str | os.PathLike, info: dict) -> None:
    """来歴 ``{"train": info}`` を重みの隣の .json へ (atomic に) 書きます。"""
    import json

    atomic_write_text(Path(weights).with_suffix(".json"),
                      json.dumps({"train": info}, ensure_ascii=False, indent=1) + "\n")


def git_commit() -> str | None:
    """このファイルがある git リポジトリのコミット (なければ None)。"""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
