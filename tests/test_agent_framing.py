"""The agent proxy reads and answers like qemu-ga: the same bytes sent to the proxy (real client, real core, the
host's qemu-ga behind them) and to a second real qemu-ga (``-m unix-listen``) give the same bytes back, for
every framing case (no newline, several values per write or line, values split across writes, 0xFF anywhere,
oversize input, garbage) and for random input. Clients that speak qemu-ga's protocol without newlines or
negotiation (qemu.qmp's ``QMPClient``, ``qmp-shell -N``) work through the proxy unchanged.

qemu-ga keeps its parser's state across connections, so after each case both get the same reset (``0xFF``,
a newline) and a marker ``guest-sync``; everything up to the marker's reply is compared.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from corelib import running_core, short_tmpdir, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol
from test_agent_client import FF_ERROR, Qga
from test_client import ClientProcess

MARKER = b'\xff\n{"execute":"guest-sync","arguments":{"id":987654321}}'
MARKER_REPLY = b'{"return": 987654321}\n'
PING = b'{"execute":"guest-ping"}'


class Pair(NamedTuple):
    proxy: Path      # the client's agent proxy, with a real qemu-ga behind the core
    reference: Path  # another real qemu-ga, on its own socket
    client_pid: int  # the client serving the proxy


@contextlib.contextmanager
def proxy_and_reference(name: str) -> Iterator[Pair]:
    """The proxy of a real client and core with the host's qemu-ga behind them, and a second real qemu-ga."""
    root = short_tmpdir()
    agent, reference = Qga(root / "agent"), Qga(root / "reference")
    for qga in (agent, reference):
        qga.root.mkdir()
        qga.start()
    try:
        with running_core(name, "--agent-socket", str(agent.sock), qemu_args=["-machine", "pc", "-m", "16"]) as core:
            client = ClientProcess(core, name)
            try:
                proxy = core.run_dir / "agent.sock"
                wait_for(proxy.exists, 15, "the client's agent proxy")
                # The first call synchronises the client with its agent.
                assert exchange(proxy, [PING]).startswith(b'{"return": {}}\n'), client.text()[-3000:]
                yield Pair(proxy, reference.sock, client.pid)
                assert client.proc.poll() is None, "the client died"
            finally:
                client.stop()
        for qga in (agent, reference):
            assert qga.proc is not None and qga.proc.poll() is None, "a qemu-ga exited"
    finally:
        for qga in (agent, reference):
            qga.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with proxy_and_reference("agf") as both:
        yield both


def exchange(path: Path, writes: list[bytes], *, pause: float = 0.0, timeout: float = 60.0) -> bytes:
    """Send each write on its own (``pause`` apart), then the marker; returns all replies up to the marker's."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        for data in writes:
            sock.sendall(data)
            if pause:
                time.sleep(pause)
        sock.sendall(MARKER)
        replies = bytearray()
        deadline = time.monotonic() + timeout
        while not replies.endswith(MARKER_REPLY):  # read all: qemu-ga exits if a peer leaves replies unread
            assert time.monotonic() < deadline, f"no marker reply from {path} after {replies[-500:]!r}"
            chunk = sock.recv(1 << 20)
            assert chunk, f"{path} closed the connection after {replies[-500:]!r}"
            replies += chunk
    return bytes(replies)


def assert_same(pair: Pair, writes: list[bytes], *, pause: float = 0.0) -> bytes:
    expected = exchange(pair.reference, writes, pause=pause)
    got = exchange(pair.proxy, writes, pause=pause)
    assert got == expected, (f"\nsent      {b''.join(writes)[:300]!r}\nqemu-ga   {expected[:1500]!r}"
                             f"\nproxy     {got[:1500]!r}")
    return got


FRAMING_CASES: dict[str, list[bytes]] = {
    # What the issue names.
    "no newline": [PING],
    "no newline, with an id": [b'{"execute":"guest-ping","id":5}'],
    "two objects in one write": [b'{"execute":"guest-ping","id":1}{"execute":"guest-ping","id":2}'],
    "two objects on one line": [b'{"execute":"guest-ping","id":1} {"execute":"guest-ping","id":2}\n'],
    "0xFF before": [b"\xff" + PING],
    "0xFF after a complete request": [PING + b"\xff"],
    "0xFF between tokens": [b'{"execute":\xff' + PING],
    "0xFF inside a string": [b'{"execute":"gue\xffst-ping"}' + PING],
    "0xFF twice": [b"\xff\xff" + PING + b"\n"],
    "guest-sync-delimited after 0xFF": [b'\xff{"execute":"guest-sync-delimited","arguments":{"id":1234}}\n'],
    "libvirt guest-sync, millisecond id": [b'{"execute":"guest-sync","arguments":{"id":1732998000123}}\n'],
    # Garbage and malformed values: qemu-ga's lexer and parser errors.
    "words": [b"hello world\n" + PING],
    "control bytes": [b"\x00\x01\x02" + PING],
    "stray closers": [b"}]" + PING],
    "bare values": [b'1 -2.5e3 "x" [1] true null {"a":1}\n'],
    "bad numbers": [b"01 -x 1.x 1ex 0e5\n", b"-x\n1ex\n1e+x\n"],
    "unknown keyword": [b"nul\n"],
    "missing colon": [b'{"execute" "guest-ping"}'],
    "trailing comma": [b'{"execute":"guest-ping",}'],
    "mismatched brackets": [b"[}]" + PING, b"[}" + PING + b"]"],
    "single quotes": [b"{'execute':'guest-ping','id':'a\\'b\"c'}"],
    "bad escapes": [b'{"execute":"guest-ping","id":"\\x"}', b'{"execute":"guest-ping","id":"\\u12g4"}'],
    "non-characters and surrogates": [b'{"execute":"guest-ping","id":"\\uFFFE"}',
                                      b'{"execute":"guest-ping","id":"\\ud800x"}',
                                      b'{"execute":"guest-ping","id":"\xef\xbf\xbe"}'],
    "invalid UTF-8": [b'{"execute":"guest-p\xc3ing"}', b'"\xc3\x01\n'],
    "control byte in a string": [b'{"execute":"guest\x01-ping"}' + PING],
    "nesting limit": [b"[" * 1030 + b"]" * 1030],
    "duplicate key": [b'{"execute":"guest-ping","execute":"guest-ping"}'],
    # Requests of the wrong shape (qmp_dispatch).
    "no execute": [b'{"id":1}'],
    "execute not a string": [b'{"execute":1,"id":"q"}'],
    "arguments not an object": [b'{"execute":"guest-ping","arguments":[1]}'],
    "unexpected members": [b'{"zz":1,"aa":2,"execute":"guest-ping"}'],
    "exec-oob": [b'{"exec-oob":"guest-ping"}'],
    "unknown command": [b'{"execute":"guest-no-such","id":[1,2]}'],
    "unexpected argument": [b'{"execute":"guest-ping","arguments":{"x":1}}'],
    "guest-sync without id": [b'{"execute":"guest-sync"}'],
    "guest-sync with a string id": [b'{"execute":"guest-sync","arguments":{"id":"1"}}'],
    "guest-sync id over int64": [b'{"execute":"guest-sync","arguments":{"id":18446744073709551615}}'],
    "guest-sync unexpected argument": [b'{"execute":"guest-sync","arguments":{"id":1,"x":2}}'],
    # Ids are echoed as qemu-ga prints them: QDict order, upper-case escapes, %.17g doubles, big integers.
    "ids": [b'{"execute":"guest-ping","id":{"b":1,"a":[1.5,0.1,1e400,-0,"\\u00e9\\ud83d\\ude00\\u007f",null]}}',
            b'{"execute":"guest-ping","id":18446744073709551615}{"execute":"guest-ping","id":18446744073709551616}',
            b'{"execute":"guest-ping","id":"a\\u0000b"}{"execute":"guest-ping","id":' + b"[" * 1000 + b"]" * 1000
            + b"}"],
}


@pytest.mark.parametrize("case", sorted(FRAMING_CASES))
def test_framing_case_answered_like_qemu_ga(pair: Pair, case: str) -> None:
    assert_same(pair, FRAMING_CASES[case])


def test_request_split_across_writes(pair: Pair) -> None:
    request = b'{"execute":"guest-sync-delimited","arguments":{"id":77},"id":"x"}{"execute":"guest-ping"}'
    pieces = [request[i:i + 5] for i in range(0, len(request), 5)]  # mid-token everywhere
    replies = assert_same(pair, pieces, pause=0.02)
    assert replies.startswith(b'\xff{"return": 77, "id": "x"}\n{"return": {}}\n')


def test_what_the_issue_reported(pair: Pair) -> None:
    """The three failures of the line-based proxy, spelled out."""
    assert assert_same(pair, [PING]) == b'{"return": {}}\n' + FF_ERROR + b"\n" + MARKER_REPLY
    two = assert_same(pair, [b'{"execute":"guest-ping","id":1}{"execute":"guest-ping","id":2}\n'])
    assert two.startswith(b'{"return": {}, "id": 1}\n{"return": {}, "id": 2}\n')
    ff_after = assert_same(pair, [b'{"execute":"guest-ping","id":3}\xff'])
    assert ff_after.startswith(b'{"return": {}, "id": 3}\n' + FF_ERROR + b"\n")


def test_oversize_request_refused_and_connection_kept(pair: Pair) -> None:
    """Over qemu-ga's 64 MiB (the proxy's limit too): the same error, then the same recovery."""
    huge = b'{"execute":"guest-ping","id":"' + b"QUFB" * (17 << 20) + b'"}' + PING
    replies = assert_same(pair, [huge])
    assert replies.startswith(b'{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}\n')
    assert b'{"return": {}}\n' in replies  # the ping after it was answered: the connection stayed


def test_a_request_just_under_qemu_gas_limit_is_run_alike(pair: Pair) -> None:
    """A 47 MiB guest-file-write (63 MiB of JSON, 64 control-channel frames): the same reply, the same file."""
    root = short_tmpdir()
    try:
        data = bytes(range(256)) * (47 << 12)
        replies = []
        for side, path in ((pair.reference, root / "reference.bin"), (pair.proxy, root / "proxy.bin")):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(120)
                sock.connect(str(side))
                opened = exchange_one(sock, b'{"execute":"guest-file-open","arguments":{"path":"%s","mode":"w"}}'
                                      % str(path).encode())
                handle = json.loads(opened)["return"]
                replies.append(exchange_one(sock, b'{"execute":"guest-file-write","arguments":{"handle":%d,'
                                            b'"buf-b64":"%s"}}' % (handle, base64.b64encode(data))))
                exchange_one(sock, b'{"execute":"guest-file-close","arguments":{"handle":%d}}' % handle)
        assert replies[0] == replies[1] == b'{"return": {"count": 49283072, "eof": false}}\n'
        assert (root / "proxy.bin").read_bytes() == (root / "reference.bin").read_bytes() == data
    finally:
        shutil.rmtree(root, ignore_errors=True)


def exchange_one(sock: socket.socket, request: bytes) -> bytes:
    """One request on an open connection, its one reply line."""
    sock.sendall(request)
    reply = bytearray()
    while not reply.endswith(b"\n"):
        chunk = sock.recv(1 << 20)
        assert chunk, f"closed after {reply[-300:]!r}"
        reply += chunk
    return bytes(reply)


_FRAGMENTS = [b"{", b"}", b"[", b"]", b":", b",", b'"execute"', b'"guest-ping"', b'"guest-sync"',
              b'"guest-sync-delimited"', b'"guest-no-such"', b'"arguments"', b'"id"', b"'x'", b"1", b"-2", b"0",
              b"1.5e3", b"1e", b"-", b"true", b"null", b"nul", b" ", b"\n", b"\xff", b"\xfe", b"\x01", b"\x00",
              b"\t", b'"\\u00e9"', b'"\\ud800"', b'"\xc3\xa9"', b'"\xc3"', b"\\", b'"', b"'", b"\\u", b"A", b"\x80",
              PING, b'{"execute":"guest-ping","id":', b'{"execute":"guest-sync","arguments":{"id":',
              b'{"execute":"guest-sync-delimited","arguments":{"id":3}}', b'"}', b"}}", b'{"id":{"b":1,"a":[2]}}']


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(_FRAGMENTS) | st.binary(min_size=1, max_size=4), max_size=24),
       st.integers(1, 4))
def test_random_input_answered_like_qemu_ga(pair: Pair, parts: list[bytes], writes: int) -> None:
    data = b"".join(parts)
    step = max(1, len(data) // writes)
    assert_same(pair, [data[i:i + step] for i in range(0, len(data), step)] or [b""])


def test_qmp_shell_skip_negotiation(pair: Pair) -> None:
    """``qmp-shell -N`` (qemu.qmp, negotiation off, JSON without newlines) run non-interactively."""
    shell = Path(sys.executable).with_name("qmp-shell")
    commands = "guest-ping\nguest-get-time\nguest-sync id=1732998000123\n"
    outputs = []
    for path in (pair.reference, pair.proxy):
        run = subprocess.run([str(shell), "-N", str(path)], input=commands, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout.split("(QEMU) ")[1:])
    for out in outputs:
        assert [json.loads(line) for line in out[:3]][0::2] == [{"return": {}}, {"return": 1732998000123}], out
        assert abs(json.loads(out[1])["return"] / 1e9 - time.time()) < 60, out


def test_qemu_qmp_client_negotiation_off(pair: Pair) -> None:
    """QMPClient as qemu-ga clients configure it (no greeting, no negotiation), and the legacy wrapper."""

    async def run() -> None:
        client = QMPClient("agent-proxy")
        client.await_greeting = False
        client.negotiate = False
        await client.connect(str(pair.proxy))
        try:
            assert await asyncio.wait_for(client.execute("guest-ping"), 30) == {}
            now = await asyncio.wait_for(client.execute("guest-get-time"), 30)
            assert isinstance(now, int) and abs(now / 1e9 - time.time()) < 60
            info = await asyncio.wait_for(client.execute("guest-info"), 30)
            assert isinstance(info, dict) and "version" in info
        finally:
            await client.disconnect()

    asyncio.run(run())
    legacy = QEMUMonitorProtocol(str(pair.proxy))
    legacy.connect(negotiate=False)
    try:
        assert legacy.cmd("guest-ping") == {}
        assert legacy.cmd("guest-sync", id=1732998000123) == 1732998000123
        assert legacy.cmd_obj({"execute": "guest-ping"}) == {"return": {}}  # the raw reply (no id sent)
    finally:
        legacy.close()
