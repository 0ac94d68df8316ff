"""Chromium を DevTools Protocol (CDP) で操作する、標準ライブラリだけの小さなクライアント。

Debian の ``chromium`` を headless で起動し、WebSocket で命令を送ります。
外部パッケージ (selenium、playwright など) は使いません。ブラウザーをダウンロードしないので、
オフラインの CI でも動きます。
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from urllib.parse import urlparse


class CDPError(RuntimeError):
    pass


class WebSocket:
    """RFC 6455 のクライアント側 (テキストフレームだけ)。"""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise CDPError("WebSocket の接続が閉じられました")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n")[0]:
            raise CDPError(f"WebSocket の接続に失敗しました: {status[:80]!r}")
        self.buf = rest

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise CDPError("WebSocket の接続が閉じられました")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def readable(self, timeout: float) -> bool:
        if self.buf:
            return True
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r)

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise CDPError("WebSocket の接続が閉じられました")
            if opcode in (0x9, 0xA):  # ping / pong は無視
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()


class Browser:
    """headless Chromium を 1 つ起動し、1 つのタブ (セッション) を操作します。"""

    def __init__(self, executable: str, extra_env: dict[str, str] | None = None) -> None:
        self.profile = tempfile.mkdtemp(prefix="cdp-profile-")
        args = [
            executable,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--mute-audio",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "about:blank",
        ]
        env = dict(os.environ, **(extra_env or {}))
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
        )
        url = None
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            self.close()
            raise CDPError("Chromium が起動しませんでした (DevTools の URL が出ません)")
        self.ws = WebSocket(url)
        self.next_id = 0
        self.events: list[dict] = []
        self.listeners: list[Callable[[dict], None]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self.session = attached["sessionId"]

    def _dispatch(self, msg: dict) -> None:
        for fn in self.listeners:
            fn(msg)

    def call(
        self, method: str, params: dict | None = None, session: bool = True, timeout: float = 60
    ) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.time() + timeout
        while True:
            if time.time() > deadline:
                raise CDPError(f"{method} が {timeout} 秒で応答しません")
            if not self.ws.readable(0.5):
                continue
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self._dispatch(reply)

    def pump(self, seconds: float) -> None:
        """seconds 秒のあいだ、届いたイベントを処理します。"""
        deadline = time.time() + seconds
        while (left := deadline - time.time()) > 0:
            if self.ws.readable(min(left, 0.1)):
                reply = json.loads(self.ws.recv())
                if "method" in reply:
                    self._dispatch(reply)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return True
            self.pump(0.05)
        return predicate()

    def eval(self, expression: str, timeout: float = 60):
        """ページで JavaScript の式を評価し、値 (JSON にできるもの) を返します。"""
        res = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout=timeout,
        )
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
            raise CDPError(f"JavaScript の例外: {text}")
        return res["result"].get("value")

    def close(self) -> None:
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
