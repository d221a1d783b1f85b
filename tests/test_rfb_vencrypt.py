"""VeNCrypt (security type 19) in the sans-IO RFB server: the bytes before TLS, written out from rfbproto and
QEMU's ui/vnc-auth-vencrypt.c, what may follow them, and no downgrade to types in the clear.

The TLS handshake itself is the owner's (clients/vnc/tls.py); tests/test_vnc_tls.py runs it with real viewers.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rfb import auth, vencrypt
from rfb.errors import LocalProtocolError, ProtocolError
from rfb.events import ClientInitReceived, SecurityNegotiated, TlsRequested
from rfb.server import RfbServerConnection, State

CHALLENGE = bytes(range(16))


def server(password: str | None = None, subtypes: tuple[int, ...] = (vencrypt.X509_NONE,),
           plain_too: bool = False) -> RfbServerConnection:
    conn = RfbServerConnection(width=64, height=32, name="t", password=password, challenge=CHALLENGE,
                               vencrypt_subtypes=subtypes, plain_too=plain_too)
    assert conn.data_to_send() == b"RFB 003.008\n"
    return conn


def to_tls(conn: RfbServerConnection, subtype: int, version: bytes = b"RFB 003.008\n") -> None:
    conn.receive_data(version)
    assert conn.data_to_send()[1:2] == b"\x13"  # type 19 offered
    assert conn.receive_data(b"\x13") == []
    assert conn.data_to_send() == b"\x00\x02"  # VeNCrypt 0.2
    assert conn.receive_data(b"\x00\x02") == []
    assert conn.data_to_send()[:2] == b"\x00\x01"  # ack, one subtype
    assert conn.receive_data(struct.pack(">I", subtype)) == [TlsRequested(subtype, subtype in vencrypt.ANONYMOUS)]
    assert conn.data_to_send() == b"\x01"
    assert conn.state is State.TLS_HANDSHAKE


def test_x509none_as_qemu_sends_it() -> None:
    conn = server()
    conn.receive_data(b"RFB 003.008\n")
    assert conn.data_to_send() == b"\x01\x13"  # only VeNCrypt: no downgrade to None
    conn.receive_data(b"\x13")
    assert conn.data_to_send() == b"\x00\x02"
    conn.receive_data(b"\x00\x02")
    assert conn.data_to_send() == b"\x00\x01" + struct.pack(">I", 260)
    assert conn.receive_data(struct.pack(">I", 260)) == [TlsRequested(260, anonymous=False)]
    assert conn.data_to_send() == b"\x01"
    assert conn.tls_established() == [SecurityNegotiated((3, 8), (3, 8), 19)]
    assert conn.data_to_send() == b"\x00\x00\x00\x00"
    assert conn.receive_data(b"\x01") == [ClientInitReceived(True)]
    assert conn.state is State.NORMAL and conn.vencrypt_subtype == 260


@pytest.mark.parametrize("version", [b"RFB 003.007\n", b"RFB 003.008\n"])
def test_x509vnc_runs_vnc_auth_inside(version: bytes) -> None:
    conn = server("pw", (vencrypt.X509_VNC,))
    to_tls(conn, vencrypt.X509_VNC, version)
    assert conn.tls_established() == []
    assert conn.data_to_send() == CHALLENGE
    minor = int(version[8:11])
    assert conn.receive_data(auth.response_for("pw", CHALLENGE)) == [SecurityNegotiated((3, minor), (3, minor), 19)]
    assert conn.data_to_send() == b"\x00\x00\x00\x00"


def test_wrong_password_inside_tls_fails() -> None:
    conn = server("pw", (vencrypt.X509_VNC,))
    to_tls(conn, vencrypt.X509_VNC)
    conn.tls_established()
    conn.data_to_send()
    conn.receive_data(auth.response_for("nope", CHALLENGE))
    assert conn.closed and conn.data_to_send().startswith(b"\x00\x00\x00\x01")


def test_anonymous_subtypes_and_preference_order() -> None:
    conn = server(None, (vencrypt.X509_NONE, vencrypt.TLS_NONE))
    conn.receive_data(b"RFB 003.008\n\x13\x00\x02")
    assert conn.data_to_send() == b"\x01\x13\x00\x02" + b"\x00\x02" + struct.pack(">II", 260, 257)
    assert conn.receive_data(struct.pack(">I", 257)) == [TlsRequested(257, anonymous=True)]


def test_plain_too_offers_the_clear_type_after_vencrypt() -> None:
    conn = server("pw", (vencrypt.X509_VNC,), plain_too=True)
    conn.receive_data(b"RFB 003.008\n")
    assert conn.data_to_send() == b"\x02\x13\x02"
    assert conn.receive_data(b"\x02") == []
    assert conn.data_to_send() == CHALLENGE


def test_33_viewer_is_refused_without_plain_and_gets_plain_with_it() -> None:
    conn = server()
    with pytest.raises(ProtocolError, match="VeNCrypt"):
        conn.receive_data(b"RFB 003.003\n")
    assert conn.data_to_send().startswith(b"\x00\x00\x00\x00")  # 3.3 failure with a reason
    conn = server(plain_too=True)
    assert conn.receive_data(b"RFB 003.003\n") == [SecurityNegotiated((3, 3), (3, 3), 1)]


def test_clear_types_are_refused_when_not_offered() -> None:
    for choice in (b"\x01", b"\x02"):
        conn = server()
        with pytest.raises(ProtocolError, match="not offered"):
            conn.receive_data(b"RFB 003.008\n" + choice)


def test_other_vencrypt_version_is_refused() -> None:
    conn = server()
    conn.receive_data(b"RFB 003.008\n\x13")
    conn.data_to_send()
    with pytest.raises(ProtocolError, match=r"0\.1"):
        conn.receive_data(b"\x00\x01")
    assert conn.data_to_send() == b"\x01"


def test_subtype_not_offered_is_refused() -> None:
    conn = server()
    conn.receive_data(b"RFB 003.008\n\x13\x00\x02")
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="x509-vnc"):
        conn.receive_data(struct.pack(">I", vencrypt.X509_VNC))
    assert conn.data_to_send() == b"\x00"


def test_bytes_before_tls_are_a_protocol_error() -> None:
    """A viewer waits for the accept byte before its ClientHello: bytes already there would be plaintext that
    the owner might take as coming through TLS (the STARTTLS injection)."""
    conn = server()
    with pytest.raises(ProtocolError, match="before the TLS handshake") as caught:
        conn.receive_data(b"RFB 003.008\n\x13\x00\x02" + struct.pack(">I", 260) + b"\x16\x03\x01")
    assert caught.value.events == (TlsRequested(260, False),)
    conn = server()
    to_tls(conn, 260)
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\x01")


def test_tls_established_out_of_turn_is_local_misuse() -> None:
    conn = server()
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


def test_subtypes_must_match_the_password() -> None:
    with pytest.raises(ValueError, match="needs a password"):
        server(None, (vencrypt.X509_VNC,))
    with pytest.raises(ValueError, match="skip the password"):
        server("pw", (vencrypt.X509_NONE,))
    with pytest.raises(ValueError, match="not supported"):
        server(None, (262,))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=8), max_size=8), st.sampled_from([None, "pw"]))
def test_random_bytes_after_type_19(chunks: list[bytes], password: str | None) -> None:
    subtypes = (vencrypt.X509_VNC, vencrypt.TLS_VNC) if password else (vencrypt.X509_NONE, vencrypt.TLS_NONE)
    conn = server(password, subtypes)
    conn.receive_data(b"RFB 003.008\n\x13")
    for chunk in chunks:
        try:
            for event in conn.receive_data(chunk):
                if isinstance(event, TlsRequested):
                    conn.tls_established()
        except ProtocolError:
            assert conn.closed
            return
