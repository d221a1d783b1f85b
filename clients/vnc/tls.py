"""TLS for the VNC service: credentials in QEMU's layout, the SSL contexts built from them (and rebuilt on a
reload), and the upgrade of a viewer's stream once VeNCrypt says so.

The cryptography is Python's ``ssl`` (OpenSSL) on the asyncio transport (``loop.start_tls``); nothing here
touches a record. The VeNCrypt messages in the clear are rfb/vencrypt.py's. See docs/vnc.md, "TLS".
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from rfb import vencrypt

log = logging.getLogger(__name__)

#: The files of QEMU's ``tls-creds-x509,dir=DIR`` (server endpoint) that vmfront reads.
CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
#: How long a viewer has for its TLS handshake once it was told to start it; then it is closed.
HANDSHAKE_TIMEOUT_S = 10.0
#: Closing a TLS connection waits this long for the viewer's close_notify.
SHUTDOWN_TIMEOUT_S = 2.0
#: What anonymous TLS needs from OpenSSL: cipher suites without authentication (aNULL) exist only up to TLS 1.2
#: and only at security level 0.
ANONYMOUS_CIPHERS = "aNULL:!eNULL:@SECLEVEL=0"


class TlsError(Exception):
    """The credentials cannot be used (missing file, key readable by others, not a certificate...)."""


@dataclass(frozen=True)
class TlsSettings:
    """What the operator asked for (``vmfront client --vnc-tls-*``)."""

    creds_dir: Path | None = None
    verify_peer: bool = False
    anonymous: bool = False
    #: Also offer the security types in the clear (None, VNC Authentication) next to VeNCrypt.
    plain_too: bool = False

    @property
    def enabled(self) -> bool:
        return self.creds_dir is not None or self.anonymous


def check_key_file(path: Path) -> None:
    """A private key that its group or everyone may read is refused, as ssh refuses such keys."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TlsError(f"cannot read the TLS key {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        raise TlsError(f"the TLS key {path} is readable by its group or by everyone (mode {stat.S_IMODE(mode):04o});"
                       f" chmod 0600 it")


def _base_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.3 has no renegotiation; for 1.2 a viewer's attempt is refused with an alert.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # No TLS 1.3 session tickets: nothing resumes a VNC session, and TigerVNC (1.12) stalls when the tickets and the
    # first RFB bytes after the handshake (the VNC challenge) reach its TLS library together.
    context.num_tickets = 0
    return context


def x509_context(creds_dir: Path, verify_peer: bool) -> ssl.SSLContext:
    """The server context of ``creds_dir``: its certificate and key, and with ``verify_peer`` a client certificate
    signed by its CA is required (QEMU's ``verify-peer=on``)."""
    files = {name: creds_dir / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY)}
    for name, path in files.items():
        if not path.is_file():
            raise TlsError(f"{path} is missing (a TLS credentials directory holds {CA_CERT}, {SERVER_CERT} and "
                           f"{SERVER_KEY}, as QEMU's tls-creds-x509); {name} not found")
    check_key_file(files[SERVER_KEY])
    context = _base_context()
    try:
        context.load_cert_chain(files[SERVER_CERT], files[SERVER_KEY])
        context.load_verify_locations(cafile=files[CA_CERT])
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the TLS credentials in {creds_dir}: {exc}") from exc
    if verify_peer:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def anonymous_context() -> ssl.SSLContext:
    """Anonymous TLS (VeNCrypt TLSNone/TLSVnc): encrypted, but nobody's identity is checked."""
    context = _base_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.set_ciphers(ANONYMOUS_CIPHERS)
    except ssl.SSLError as exc:
        raise TlsError(f"this OpenSSL has no anonymous cipher suites ({exc})") from exc
    return context


def server_certificate_subject(creds_dir: Path) -> str:
    from cryptography import x509  # only with TLS configured: not every client pays for the import

    try:
        cert = x509.load_pem_x509_certificate((creds_dir / SERVER_CERT).read_bytes())
    except (OSError, ValueError) as exc:
        return f"? ({exc})"
    return cert.subject.rfc4514_string()


def peer_dname(ssl_object: ssl.SSLObject | None) -> str | None:
    """The subject of the viewer's verified certificate, as QEMU's ``x509_dname`` (RFC 4514, e.g.
    ``CN=alice,O=Example``), or None without one."""
    if ssl_object is None or ssl_object.context.verify_mode != ssl.CERT_REQUIRED:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        return None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


class TlsCredentials:
    """The contexts handshakes use now. ``reload()`` builds new ones from the files and swaps them in: viewers
    already connected keep their session, every later handshake (VeNCrypt or WebSocket) gets the new ones."""

    def __init__(self, settings: TlsSettings, what: str = "VNC") -> None:
        """``what``: whose credentials these are, in log lines (the VNC service's, the web console's)."""
        self.settings = settings
        self.what = what
        self.x509: ssl.SSLContext | None = None
        self.anonymous: ssl.SSLContext | None = None

    def load(self) -> None:
        """Read the credentials; raises TlsError (at start, before anything listens)."""
        if self.settings.creds_dir is not None:
            context = x509_context(self.settings.creds_dir, self.settings.verify_peer)
            context.sni_callback = self._use_current
            self.x509 = context
            log.info("%s: TLS with the X.509 credentials in %s (server certificate %s)%s", self.what,
                     self.settings.creds_dir,
                     server_certificate_subject(self.settings.creds_dir),
                     "; viewers must present a certificate signed by its CA" if self.settings.verify_peer else "")
        if self.settings.anonymous and self.anonymous is None:
            self.anonymous = anonymous_context()
            log.warning("VNC: anonymous TLS (VeNCrypt TLSNone/TLSVnc) offered: encrypted, but nothing proves to a "
                        "viewer that it talks to this server (a man in the middle can read everything); it needs "
                        "OpenSSL's aNULL cipher suites at security level 0 and TLS 1.2")

    def reload(self) -> str | None:
        """Re-read the certificates: None if done, else why not (the old ones stay in use)."""
        if self.settings.creds_dir is None:
            return "no X.509 credentials are configured (--vnc-tls-creds)"
        try:
            self.load()
        except TlsError as exc:
            log.error("%s: TLS credentials not reloaded, the previous ones stay in use: %s", self.what, exc)
            return str(exc)
        return None

    def _use_current(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        """Called in each handshake (OpenSSL's servername callback, with or without SNI): a listener made with an
        earlier context (the WebSocket one) switches the connection to the current certificate and CA."""
        if self.x509 is not None and context is not self.x509:
            ssl_object.context = self.x509

    def subtypes(self, vnc_auth: bool) -> tuple[int, ...]:
        """The VeNCrypt subtypes to offer, best first: X.509 before anonymous; with VNC authentication the VNC
        Authentication ones only (the others would skip it)."""
        found: list[int] = []
        if self.x509 is not None:
            found.append(vencrypt.X509_VNC if vnc_auth else vencrypt.X509_NONE)
        if self.anonymous is not None:
            found.append(vencrypt.TLS_VNC if vnc_auth else vencrypt.TLS_NONE)
        return tuple(found)

    def context_for(self, subtype: int) -> ssl.SSLContext:
        context = self.anonymous if subtype in vencrypt.ANONYMOUS else self.x509
        if context is None:
            raise TlsError(f"no credentials for VeNCrypt {vencrypt.describe(subtype)}")
        return context


async def start_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    context: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The server side of a TLS handshake on the stream, within HANDSHAKE_TIMEOUT_S; returns the stream in TLS.

    The TLS layer gets a new reader: whatever the old one may still hold arrived in the clear and must never be
    read as if it came through TLS (rfb.server refuses bytes after the subtype, so it holds nothing)."""
    loop = asyncio.get_running_loop()
    tls_reader = asyncio.StreamReader(limit=2**16, loop=loop)
    protocol = asyncio.StreamReaderProtocol(tls_reader, loop=loop)
    await writer.drain()
    transport = await loop.start_tls(writer.transport, protocol, context, server_side=True,
                                     ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                                     ssl_shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    if transport is None:
        raise ConnectionResetError("the connection closed during the TLS handshake")
    return tls_reader, asyncio.StreamWriter(transport, protocol, tls_reader, loop)
