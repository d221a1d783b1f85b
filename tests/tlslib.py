"""Test CAs and certificates made with the ``openssl`` command, in QEMU's tls-creds-x509 layout
(``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``; a client's ``client-cert.pem``, ``client-key.pem``), and
a VeNCrypt handshake for the peers no real viewer can play (a hostile one, a certificate check by hash).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, timeout=60, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass(frozen=True)
class Ca:
    """A CA's directory: ``ca-cert.pem`` and ``ca-key.pem``."""

    dir: Path

    @property
    def cert(self) -> Path:
        return self.dir / "ca-cert.pem"

    @property
    def key(self) -> Path:
        return self.dir / "ca-key.pem"


def make_ca(directory: Path, name: str = "vmfront test CA") -> Ca:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", f"/O=vmfront tests/CN={name}", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory)
    return Ca(directory)


def issue(ca: Ca, directory: Path, prefix: str, subject: str, *, server: bool) -> tuple[Path, Path]:
    """A certificate and key signed by ``ca``: ``PREFIX-cert.pem``, ``PREFIX-key.pem`` (mode 0600)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    key, csr, cert = f"{prefix}-key.pem", f"{prefix}-req.pem", f"{prefix}-cert.pem"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", subject,
            "-keyout", key, "-out", csr, cwd=directory)
    extensions = directory / f"{prefix}.ext"
    usage = "serverAuth" if server else "clientAuth"
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else ""
    extensions.write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                          f"extendedKeyUsage={usage}\n{san}")
    openssl("x509", "-req", "-in", csr, "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
            "-days", "2", "-extfile", str(extensions), "-out", cert, cwd=directory)
    (directory / key).chmod(0o600)
    return directory / cert, directory / key


def server_creds(ca: Ca, directory: Path, cn: str = "vmfront test server") -> Path:
    """A QEMU-layout credentials directory for a server."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(ca.cert.read_bytes())
    issue(ca, directory, "server", f"/O=vmfront tests/CN={cn}", server=True)
    return directory


def spki_hash(cert: Path) -> str:
    """base64 SHA-256 of the certificate's public key: what Chromium's --ignore-certificate-errors-spki-list takes."""
    public = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    return base64.b64encode(hashlib.sha256(public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
                            .digest()).decode()


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(cert: Path) -> str:
    return fingerprint(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER))


# --- a VeNCrypt handshake (a double for checks no real viewer exposes) ------------------------------------------


async def vencrypt_to_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """RFB 3.8 up to the accept byte of VeNCrypt's first subtype; returns that subtype."""
    assert (await reader.readexactly(12)).startswith(b"RFB 003.008")
    writer.write(b"RFB 003.008\n")
    types = await reader.readexactly((await reader.readexactly(1))[0])
    assert 19 in types, types
    writer.write(b"\x13")
    assert await reader.readexactly(2) == b"\x00\x02"
    writer.write(b"\x00\x02")
    assert await reader.readexactly(1) == b"\x00"
    count = (await reader.readexactly(1))[0]
    subtypes = struct.unpack(f">{count}I", await reader.readexactly(4 * count))
    writer.write(struct.pack(">I", subtypes[0]))
    assert await reader.readexactly(1) == b"\x01"
    return subtypes[0]


async def vencrypt_server_certificate(port: int, context: ssl.SSLContext | None = None) -> bytes:
    """The DER certificate the server presents to a new VeNCrypt connection (then it is closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.wait_for(vencrypt_to_tls(reader, writer), 10)
        if context is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        await asyncio.wait_for(writer.start_tls(context, server_hostname="localhost"), 10)
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.transport.abort()
