"""TLS helpers: real handshakes against a grpc.aio server on 127.0.0.1, plus config errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from certs import Pki, make_pki

from tandem.tls import TLSConfigError, channel_credentials, is_loopback, server_credentials

METHOD = "/test.Echo/Echo"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One PKI for the module: the certificates are read-only inputs."""
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


@asynccontextmanager
async def serving(creds: grpc.ServerCredentials) -> AsyncIterator[int]:
    """A TLS echo server on 127.0.0.1 with ``creds``; yields its port, always stops it."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def _call(target: str, creds: grpc.ChannelCredentials) -> bytes:
    """One echo call over a fresh secure channel."""
    async with grpc.aio.secure_channel(target, creds) as channel:
        result: bytes = await channel.unary_unary(METHOD)(b"ping", timeout=20)
        return result


def _run_call(server_creds: grpc.ServerCredentials, client_creds: grpc.ChannelCredentials) -> Any:
    """Serve with ``server_creds``, call with ``client_creds``: the reply or the RPC error."""

    async def main() -> Any:
        async with serving(server_creds) as port:
            try:
                return await _call(f"localhost:{port}", client_creds)
            except grpc.aio.AioRpcError as e:
                return e

    return asyncio.run(main())


def test_tls_with_the_right_ca(pki: Pki) -> None:
    async def main() -> list[bytes]:
        async with serving(server_credentials(pki.server_cert, pki.server_key)) as port:
            creds = channel_credentials(pki.ca_cert)
            # Both SANs of the server certificate are checked: its name and its IP.
            return [await _call(f"{host}:{port}", creds) for host in ("localhost", "127.0.0.1")]

    assert asyncio.run(main()) == [b"ping", b"ping"]


def test_tls_with_the_wrong_ca_fails(pki: Pki) -> None:
    result = _run_call(
        server_credentials(pki.server_cert, pki.server_key), channel_credentials(pki.other_ca_cert)
    )
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_a_client_signed_by_the_ca(pki: Pki) -> None:
    result = _run_call(
        server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert),
        channel_credentials(pki.ca_cert, pki.client_cert, pki.client_key),
    )
    assert result == b"ping"


@pytest.mark.parametrize("client", ["none", "rogue"])
def test_mtls_rejects_missing_and_foreign_client_certs(pki: Pki, client: str) -> None:
    if client == "none":
        creds = channel_credentials(pki.ca_cert)
    else:
        creds = channel_credentials(pki.ca_cert, pki.rogue_client_cert, pki.rogue_client_key)
    result = _run_call(
        server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert), creds
    )
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() == grpc.StatusCode.UNAVAILABLE


def test_missing_file(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="does not exist"):
        server_credentials(tmp_path / "nope.pem", pki.server_key)
    with pytest.raises(TLSConfigError, match=r"CA certificate .* does not exist"):
        channel_credentials(tmp_path / "nope.pem")
    with pytest.raises(TLSConfigError, match="client CA"):
        server_credentials(pki.server_cert, pki.server_key, client_ca=tmp_path / "nope.pem")


def test_not_pem(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(TLSConfigError, match="not a PEM file"):
        channel_credentials(junk)
    with pytest.raises(TLSConfigError, match=r"server key .* not a PEM file"):
        server_credentials(pki.server_cert, junk)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSConfigError, match="no valid PEM certificate"):
        channel_credentials(broken)
    with pytest.raises(TLSConfigError, match="not a PEM file"):
        server_credentials(pki.server_cert, pki.server_key, client_ca=junk)


def test_key_file_must_hold_a_private_key(pki: Pki) -> None:
    # A certificate given where the key belongs: PEM, but no private key.
    with pytest.raises(TLSConfigError, match=r"server key .* no PEM private key"):
        server_credentials(pki.server_cert, pki.server_cert)
    with pytest.raises(TLSConfigError, match=r"client key .* no PEM private key"):
        channel_credentials(pki.ca_cert, pki.client_cert, pki.client_cert)


def test_key_must_match_certificate(pki: Pki) -> None:
    with pytest.raises(TLSConfigError, match="does not match"):
        server_credentials(pki.server_cert, pki.client_key)
    with pytest.raises(TLSConfigError, match="does not match"):
        channel_credentials(pki.ca_cert, pki.client_cert, pki.rogue_client_key)


def test_encrypted_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted"):
        server_credentials(pki.server_cert, encrypted)


def test_cert_and_key_go_together(pki: Pki) -> None:
    with pytest.raises(ValueError, match="give both or neither"):
        channel_credentials(pki.ca_cert, cert=pki.client_cert)
    with pytest.raises(ValueError, match="give both or neither"):
        channel_credentials(pki.ca_cert, key=pki.client_key)


def test_config_errors_are_one_line(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError) as info:
        server_credentials(tmp_path / "missing.pem", pki.server_key)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"],
)
def test_is_loopback(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "[::]", "", "10.0.0.1", "192.168.1.5", "example.com", "128.0.0.1"]
)
def test_is_not_loopback(host: str) -> None:
    assert not is_loopback(host)
