"""A hostile qemu-ga **test double** (not an agent): a unix server that answers like a broken or malicious guest.

Modes (``python tests/hostile_agent.py SOCKET MODE`` or ``HostileAgent(path, mode)`` in a test):

- ``garbage``:  random bytes (no 0xFF), newline-split, to everything
- ``huge``:     one 100 MiB line without a newline, then a newline and a valid reply
- ``long-string``: a reply whose string never ends (100 MiB of base64-like bytes), then a newline
- ``tokens``:   a 60 MiB reply of tiny tokens (``[1,1,1,...``)
- ``silent``:   reads everything, never answers
- ``drip``:     answers correctly, but one byte a second
- ``wrong-id``: answers guest-sync-delimited with 0xFF and the wrong id, other commands with another ``id``
- ``ff-flood``: an endless stream of 0xFF bytes
- ``honest``:   a minimal correct agent (guest-sync-delimited, guest-ping), for comparison

It counts the bytes it sent (``sent``). With a third argument, a file holding the mode, the mode is re-read
for every request, so one core and client can meet every mode in turn (a flood or a drip stops once the mode
changes).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path

MODES = ("garbage", "huge", "long-string", "tokens", "silent", "drip", "wrong-id", "ff-flood", "honest")
HUGE = 100 << 20


class HostileAgent:
    def __init__(self, path: Path, mode: str, mode_file: Path | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.path = path
        self._mode = mode
        self.mode_file = mode_file
        self.sent = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    @property
    def mode(self) -> str:
        if self.mode_file is not None:
            try:
                mode = self.mode_file.read_text().strip()
            except OSError:
                return self._mode
            if mode in MODES:
                return mode
        return self._mode

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        self.sent += len(data)
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flood: asyncio.Task[None] | None = None
        try:
            buf = b""
            while data := await reader.read(65536):
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    self.requests.append(line[:200])
                    if self.mode == "ff-flood" and (flood is None or flood.done()):
                        flood = asyncio.get_running_loop().create_task(self._flood(writer))
                    await self._answer(writer, line.lstrip(b"\xff"))
        except (ConnectionError, OSError):
            pass
        finally:
            if flood is not None:
                flood.cancel()
            writer.close()

    async def _flood(self, writer: asyncio.StreamWriter) -> None:
        block = b"\xff" * 65536
        while self.mode == "ff-flood":
            await self._send(writer, block)
            await asyncio.sleep(0.005)

    async def _answer(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            return
        command = request.get("execute") if isinstance(request, dict) else None
        sync_id = (request.get("arguments") or {}).get("id") if isinstance(request, dict) else None
        honest = (b"\xff" if command == "guest-sync-delimited" else b"") + json.dumps(
            {"return": sync_id if command in ("guest-sync", "guest-sync-delimited") else {}}).encode() + b"\n"
        if self.mode == "honest":
            await self._send(writer, honest)
        elif self.mode == "garbage":
            for _ in range(20):
                junk = bytes(random.randrange(0, 255) for _ in range(random.randrange(1, 2000)))
                await self._send(writer, junk + b"\n")
        elif (mode := self.mode) in ("huge", "long-string", "tokens"):
            block = {"huge": b"x", "long-string": b"QUFB", "tokens": b"1,"}[mode] * (1 << 18)
            await self._send(writer, {"huge": b"", "long-string": b'{"return": "', "tokens": b'{"return": ['}[mode])
            for _ in range((HUGE if mode != "tokens" else 60 << 20) // len(block)):
                if self.mode != mode:  # (the test is over)
                    break
                await self._send(writer, block)
            await self._send(writer, b"\n" + honest)
        elif self.mode == "drip":
            asyncio.get_running_loop().create_task(self._drip(writer, honest))
        elif self.mode == "wrong-id":
            if command == "guest-sync-delimited":
                await self._send(writer, b"\xff" + json.dumps({"return": (sync_id or 0) + 1}).encode() + b"\n")
            else:
                await self._send(writer, json.dumps({"return": {}, "id": f"not-{request.get('id')}"}).encode()
                                 + b"\n")
        # silent, ff-flood: never answer

    async def _drip(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        for byte in data:
            if self.mode != "drip":
                return
            await self._send(writer, bytes([byte]))
            await asyncio.sleep(1.0)


async def _main(path: str, mode: str, mode_file: str | None) -> None:
    agent = HostileAgent(Path(path), mode, Path(mode_file) if mode_file else None)
    await agent.start()
    print(f"hostile agent double ({mode}) on {path}, pid {os.getpid()}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
