"""TLS for the gRPC service: server and channel credentials from PEM files.

Both sides share these helpers. Files are checked before gRPC sees them, because gRPC
reports a missing or malformed file only as a failed handshake or an opaque bind error;
here the mistake is named in one line (:class:`TLSConfigError`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

PEM_BEGIN = b"-----BEGIN"


class TLSConfigError(ValueError):
    """A certificate or key file is missing, unreadable, not PEM, or does not fit its pair."""


def _read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file, or a TLSConfigError naming ``what`` and the path."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise TLSConfigError(f"{what} {path} is unreadable: {e.strerror or e}") from None
    if PEM_BEGIN not in data:
        raise TLSConfigError(f"{what} {path} is not a PEM file (no '-----BEGIN' marker)")
    return data


def _read_certs(path: Path, what: str) -> tuple[bytes, list[x509.Certificate]]:
    """The bytes of a PEM file of one or more certificates, and the parsed certificates."""
    data = _read_pem(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"{what} {path} holds no valid PEM certificate") from None
    return data, certs


def _read_key(path: Path, what: str) -> tuple[bytes, PrivateKeyTypes]:
    """The bytes of an unencrypted PEM private key file, and the parsed key."""
    data = _read_pem(path, what)
    if b"PRIVATE KEY-----" not in data:
        raise TLSConfigError(f"{what} {path} holds no PEM private key")
    if b"ENCRYPTED PRIVATE KEY-----" in data:
        # gRPC takes the key as bytes and has no way to ask for a passphrase.
        raise TLSConfigError(f"{what} {path} is encrypted; gRPC needs an unencrypted key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{what} {path} holds no valid private key: {e}") from None
    except UnsupportedAlgorithm as e:
        raise TLSConfigError(f"{what} {path} holds an unsupported key: {e}") from None
    return data, key


def _key_pair(cert: Path, key: Path, side: str) -> tuple[bytes, bytes]:
    """(key bytes, certificate chain bytes), checked to belong together."""
    cert_data, certs = _read_certs(cert, f"{side} certificate")
    key_data, private = _read_key(key, f"{side} key")
    # A mismatched pair is accepted by gRPC at start-up and fails every handshake later.
    leaf = (
        certs[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    own = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if leaf != own:
        raise TLSConfigError(f"{side} key {key} does not match certificate {cert}")
    return key_data, cert_data


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``.

    With ``client_ca`` the server does mutual TLS: clients must present a certificate
    signed by that CA, and are refused otherwise.
    """
    key_data, cert_data = _key_pair(cert, key, "server")
    if client_ca is None:
        return grpc.ssl_server_credentials([(key_data, cert_data)])
    ca_data, _ = _read_certs(client_ca, "client CA")
    return grpc.ssl_server_credentials(
        [(key_data, cert_data)], root_certificates=ca_data, require_client_auth=True
    )


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials for ``grpc.aio.secure_channel``.

    ``ca`` is the CA that signed the server's certificate (None: the system's roots).
    ``cert`` and ``key`` are the client's own pair for mutual TLS, given both or neither.
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate and its key go together: give both or neither")
    ca_data = None if ca is None else _read_certs(ca, "CA certificate")[0]
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_data)
    key_data, cert_data = _key_pair(cert, key, "client")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_data, private_key=key_data, certificate_chain=cert_data
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: 127.0.0.0/8, ::1 or "localhost".

    Accepts bracketed IPv6 (``[::1]``) and IPv4-mapped IPv6. Wildcards (``0.0.0.0``,
    ``::``, "") are not loopback: they listen on every interface.
    """
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name.lower().rstrip(".") == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback
