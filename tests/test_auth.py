"""Bearer-token auth: the interceptor in a real grpc.aio server, and the token store."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from tandem.cloud.auth import (
    AuthConfigError,
    AuthInterceptor,
    TokenStore,
    bearer_token,
    can_use,
    tenant_of,
)

TOKENS = {"token-acme-0001": "acme", "token-globex-02": "globex"}
ACME, GLOBEX = "token-acme-0001", "token-globex-02"
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _write(path: Path, tokens: Any) -> Path:
    path.write_text(json.dumps(tokens))
    return path


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(_write(tmp_path / "tokens.json", TOKENS))


def _handlers(store: TokenStore) -> grpc.GenericRpcHandler:
    """Raw-bytes methods of every kind; each replies with the caller's tenant."""

    async def unary_unary(request: bytes, context: Context) -> bytes:
        return tenant_of(context, store).encode()

    async def unary_stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield tenant_of(context, store).encode()

    async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> bytes:
        async for _ in requests:
            pass
        return tenant_of(context, store).encode()

    async def stream_stream(
        requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request + b":" + tenant_of(context, store).encode()

    return grpc.method_handlers_generic_handler(
        "test.Svc",
        {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )


@asynccontextmanager
async def serving(store: TokenStore) -> AsyncIterator[grpc.aio.Channel]:
    """An authenticated server on 127.0.0.1:0 and a channel to it; both always closed."""
    server = grpc.aio.server(interceptors=[AuthInterceptor(store)])
    server.add_generic_rpc_handlers((_handlers(store),))
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def _metadata(token: str | None, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"{scheme} {token}"),)


async def _unary(channel: grpc.aio.Channel, metadata: Any) -> bytes | grpc.StatusCode:
    """The reply of UnaryUnary, or the status code it failed with."""
    try:
        reply: bytes = await channel.unary_unary("/test.Svc/UnaryUnary")(
            b"x", metadata=metadata, timeout=20
        )
        return reply
    except grpc.aio.AioRpcError as e:
        return e.code()


def run(store: TokenStore, body: Callable[[grpc.aio.Channel], Awaitable[Any]]) -> Any:
    """Serve with ``store`` and run ``body`` against a channel to the server."""

    async def main() -> Any:
        async with serving(store) as channel:
            return await body(channel)

    return asyncio.run(main())


def test_no_token_is_rejected(store: TokenStore) -> None:
    async def body(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Svc/UnaryUnary")(b"x", timeout=20)
        return info.value

    error = run(store, body)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "missing bearer token"


def test_wrong_token_is_rejected(store: TokenStore) -> None:
    async def body(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Svc/UnaryUnary")(
                b"x", metadata=_metadata("not-a-real-token"), timeout=20
            )
        return info.value

    error = run(store, body)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "invalid bearer token"


def test_other_scheme_counts_as_missing(store: TokenStore) -> None:
    result = run(store, lambda ch: _unary(ch, _metadata(ACME, scheme="Basic")))
    assert result == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_passes_and_names_the_tenant(store: TokenStore) -> None:
    async def body(channel: grpc.aio.Channel) -> list[Any]:
        return [await _unary(channel, _metadata(t)) for t in (ACME, GLOBEX)]

    assert run(store, body) == [b"acme", b"globex"]


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_scheme_is_case_insensitive(store: TokenStore, scheme: str) -> None:
    assert run(store, lambda ch: _unary(ch, _metadata(ACME, scheme))) == b"acme"


def test_every_handler_kind_is_guarded(store: TokenStore) -> None:
    """Rejection works whatever the method's kind, and accepted calls stream normally."""

    async def refusals(channel: grpc.aio.Channel, metadata: Any) -> list[Any]:
        # Streaming-request calls are opened without writing: a client still writing when
        # the server ends a bidi call can read INTERNAL instead of the status (a grpc race,
        # see AuthInterceptor's docstring), and this test is about the status.
        calls = [
            channel.unary_unary("/test.Svc/UnaryUnary")(b"x", metadata=metadata, timeout=20),
            channel.unary_stream("/test.Svc/UnaryStream")(b"x", metadata=metadata, timeout=20),
            channel.stream_unary("/test.Svc/StreamUnary")(metadata=metadata, timeout=20),
            channel.stream_stream("/test.Svc/StreamStream")(metadata=metadata, timeout=20),
        ]
        return [(await call.code(), await call.details()) for call in calls]

    async def accepted(channel: grpc.aio.Channel, metadata: Any) -> list[Any]:
        async def requests() -> AsyncIterator[bytes]:
            for r in (b"a", b"b"):
                yield r

        return [
            await channel.unary_unary("/test.Svc/UnaryUnary")(b"x", metadata=metadata, timeout=20),
            [
                r
                async for r in channel.unary_stream("/test.Svc/UnaryStream")(
                    b"x", metadata=metadata, timeout=20
                )
            ],
            await channel.stream_unary("/test.Svc/StreamUnary")(
                requests(), metadata=metadata, timeout=20
            ),
            [
                r
                async for r in channel.stream_stream("/test.Svc/StreamStream")(
                    requests(), metadata=metadata, timeout=20
                )
            ],
        ]

    async def body(channel: grpc.aio.Channel) -> tuple[list[Any], list[Any], list[Any]]:
        return (
            await refusals(channel, None),
            await refusals(channel, _metadata("wrong-token-123")),
            await accepted(channel, _metadata(GLOBEX)),
        )

    missing, invalid, ok = run(store, body)
    assert missing == [(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")] * 4
    assert invalid == [(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")] * 4
    assert ok == [b"globex", [b"globex"], b"globex", [b"a:globex", b"b:globex"]]


def test_health_is_exempt(store: TokenStore) -> None:
    async def body(channel: grpc.aio.Channel) -> Any:
        stub = health_pb2_grpc.HealthStub(channel)
        return await stub.Check(health_pb2.HealthCheckRequest(), timeout=20)

    assert run(store, body).status == health_pb2.HealthCheckResponse.SERVING


def test_exempt_prefixes_are_configurable(store: TokenStore) -> None:
    async def main() -> Any:
        server = grpc.aio.server(interceptors=[AuthInterceptor(store, exempt=["/test.Svc/Unary"])])
        server.add_generic_rpc_handlers((_handlers(store),))
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary = await _unary(channel, None)
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=20
                    )
                    health: Any = "ok"
                except grpc.aio.AioRpcError as e:
                    health = e.code()
                return unary, health
        finally:
            await server.stop(None)

    # Exempt, but no token: the handler runs and sees no tenant.
    assert asyncio.run(main()) == (b"", grpc.StatusCode.UNAUTHENTICATED)


def test_unknown_method_stays_unimplemented(store: TokenStore) -> None:
    async def body(channel: grpc.aio.Channel) -> grpc.StatusCode:
        try:
            await channel.unary_unary("/test.Svc/Nope")(b"x", timeout=20)
        except grpc.aio.AioRpcError as e:
            return e.code()
        raise AssertionError("call succeeded")

    assert run(store, body) == grpc.StatusCode.UNIMPLEMENTED


def test_disabled_store_passes_everything() -> None:
    store = TokenStore(None)
    assert not store.enabled

    async def body(channel: grpc.aio.Channel) -> list[Any]:
        return [await _unary(channel, m) for m in (None, _metadata("whatever-token"))]

    assert run(store, body) == [b"", b""]


def test_reload_after_file_change(tmp_path: Path) -> None:
    path = _write(tmp_path / "tokens.json", TOKENS)
    store = TokenStore(path)
    fresh = "token-initech-3"

    async def body(channel: grpc.aio.Channel) -> list[Any]:
        before = [await _unary(channel, _metadata(t)) for t in (ACME, fresh)]
        _write(path, {GLOBEX: "globex", fresh: "initech"})
        assert store.reload()
        after = [await _unary(channel, _metadata(t)) for t in (ACME, fresh, GLOBEX)]
        return before + after

    assert run(store, body) == [
        b"acme",
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNAUTHENTICATED,  # removed by the reload
        b"initech",  # added by the reload
        b"globex",
    ]


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"token-acme-0001": ""}', '{"token-acme-0001": 7}', '{"short": "acme"}'],
)
def test_reload_with_a_broken_file_keeps_old_tokens(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "tokens.json", TOKENS)
    store = TokenStore(path)
    path.write_text(content)
    with caplog.at_level(logging.ERROR, logger="tandem.cloud.auth"):
        assert not store.reload()
    assert store.tenant_for(ACME) == "acme"
    assert store.tenant_for(GLOBEX) == "globex"
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    # Tokens are secrets: they must not end up in the logs.
    assert all(token not in caplog.text for token in TOKENS)

    assert run(store, lambda ch: _unary(ch, _metadata(ACME))) == b"acme"


def test_reload_with_the_file_gone_keeps_old_tokens(tmp_path: Path) -> None:
    path = _write(tmp_path / "tokens.json", TOKENS)
    store = TokenStore(path)
    path.unlink()
    assert not store.reload()
    assert store.tenant_for(ACME) == "acme"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{oops", "not valid JSON"),
        ('["token-acme-0001"]', "must hold a JSON object"),
        ('{"token-acme-0001": null}', "non-empty string"),
        ('{"token-acme-0001": ""}', "non-empty string"),
        ('{"1234567": "acme"}', "at least 8 characters"),
        ('{"token with space": "acme"}', "printable ASCII"),
    ],
)
def test_load_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "tokens.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AuthConfigError, match=message) as info:
        TokenStore(path)
    # The path holds the test's parameters: look at the rest, which must not show a token.
    message_text = str(info.value).replace(str(path), "<path>")
    assert "\n" not in message_text
    assert "1234567" not in message_text
    assert "token-acme-0001" not in message_text
    assert "token with space" not in message_text


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory where the file should be: reading it fails with an OSError.
    with pytest.raises(AuthConfigError, match="unreadable"):
        TokenStore(tmp_path)


def test_empty_object_rejects_everyone(tmp_path: Path) -> None:
    store = TokenStore(_write(tmp_path / "tokens.json", {}))
    assert store.enabled and len(store) == 0
    assert run(store, lambda ch: _unary(ch, _metadata(ACME))) == grpc.StatusCode.UNAUTHENTICATED


def test_store_lookup(store: TokenStore) -> None:
    assert store.enabled
    assert store.tenant_for(ACME) == "acme"
    assert store.tenant_for("nope-nope-nope") is None
    assert store.tenants == ["acme", "globex"]


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("Authorization", "bearer   abc  "),), "abc"),
        ((("x-other", "1"), ("authorization", "BEARER abc")), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer"),), None),
        ((("authorization", "Bearer "),), None),
        ((("authorization-bin", b"Bearer abc"),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token(metadata: Any, token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_can_use() -> None:
    assert can_use("acme", "")  # shared
    assert can_use("", "")  # auth off, shared
    assert can_use("acme", "acme")
    assert not can_use("globex", "acme")
    assert not can_use("", "acme")  # no tenant never reaches a tenant's adapter
