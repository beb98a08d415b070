"""Bearer-token authentication, one tenant per token.

The tokens file is a JSON object mapping each token to its tenant's name::

    {"s3cr3t-token-a": "acme", "s3cr3t-token-b": "globex"}

Clients send ``authorization: Bearer <token>`` as gRPC metadata. :class:`AuthInterceptor`
rejects calls without a valid token before any handler (or request deserialiser) runs;
handlers then ask :func:`tenant_of` who is calling and :func:`can_use` which adapters that
tenant may use. Tokens never appear in log lines or error messages.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 8
DEFAULT_EXEMPT: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class AuthConfigError(ValueError):
    """The tokens file is missing, unreadable or malformed."""


def _parse_tokens(path: Path) -> dict[str, str]:
    """Read and validate a tokens file; messages name the file and tenant, never a token."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuthConfigError(f"tokens file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AuthConfigError(f"tokens file {path} is unreadable: {e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise AuthConfigError(f"tokens file {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise AuthConfigError(
            f"tokens file {path} must hold a JSON object mapping token to tenant, "
            f"not {type(raw).__name__}"
        )
    tokens: dict[str, str] = {}
    for i, (token, tenant) in enumerate(raw.items()):
        # Entries are named by position and tenant: the token itself is a secret.
        where = f"tokens file {path}, entry {i + 1}"
        if not isinstance(tenant, str) or not tenant:
            raise AuthConfigError(f"{where}: the tenant must be a non-empty string")
        if len(token) < MIN_TOKEN_LENGTH:
            raise AuthConfigError(
                f"{where} (tenant {tenant!r}): tokens must be at least "
                f"{MIN_TOKEN_LENGTH} characters"
            )
        # gRPC metadata values are printable ASCII, and the header splits on whitespace:
        # any other token could never be presented, so it is a configuration mistake.
        if not all("!" <= c <= "~" for c in token):
            raise AuthConfigError(
                f"{where} (tenant {tenant!r}): tokens must be printable ASCII without spaces"
            )
        tokens[token] = tenant
    return tokens


class TokenStore:
    """The token -> tenant table, read from a JSON file; ``path=None`` turns authentication off.

    The file is read on construction, so a misconfigured server fails at start-up with an
    :class:`AuthConfigError`. :meth:`reload` re-reads it (the server calls it on SIGHUP);
    the table is replaced as a whole, so a call never sees half of an update.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._tokens: dict[str, str] = {}
        if path is not None:
            self.load()

    @property
    def enabled(self) -> bool:
        """Whether calls must present a token."""
        return self.path is not None

    @property
    def tenants(self) -> list[str]:
        """The distinct tenant names, sorted (for logs: tokens are never shown)."""
        return sorted(set(self._tokens.values()))

    def load(self) -> None:
        """Read the tokens file, replacing the table; raises :class:`AuthConfigError`."""
        if self.path is None:
            return
        tokens = _parse_tokens(self.path)
        if not tokens:
            log.warning("tokens file %s holds no tokens: every call will be rejected", self.path)
        self._tokens = tokens

    def reload(self) -> bool:
        """Re-read the tokens file; on failure keep the current tokens, log, return False."""
        try:
            self.load()
        except AuthConfigError as e:
            log.error("token reload failed, keeping the previous %d token(s): %s", len(self), e)
            return False
        log.info("tokens reloaded: %d token(s) for %d tenant(s)", len(self), len(self.tenants))
        return True

    def tenant_for(self, token: str) -> str | None:
        """The tenant owning ``token``, or None when the token is unknown."""
        return self._tokens.get(token)

    def __len__(self) -> int:
        return len(self._tokens)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` header, or None.

    Header names and the scheme are matched case-insensitively (HTTP/2 lower-cases names
    anyway); a header with another scheme or no token counts as absent.
    """
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
        return None
    return None


def authenticated_tenant(
    context: grpc.aio.ServicerContext[Any, Any], store: TokenStore
) -> str | None:
    """The tenant of the current call ("" when authentication is off), or None when its
    token is missing or no longer valid (a reload revoked it after the call began)."""
    if not store.enabled:
        return ""
    token = bearer_token(context.invocation_metadata())
    return None if token is None else store.tenant_for(token)


def tenant_of(context: grpc.aio.ServicerContext[Any, Any], store: TokenStore) -> str:
    """The tenant of the current call: "" when authentication is off.

    Also "" when the token is no longer valid (a reload revoked it after the interceptor
    let the call in): such a call sees only shared resources, never another tenant's.
    """
    return authenticated_tenant(context, store) or ""


def can_use(tenant: str, owner: str) -> bool:
    """Whether ``tenant`` may use an adapter owned by ``owner`` ("" = shared with everyone)."""
    return owner == "" or owner == tenant


def _denier(message: str) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
    """A handler behaviour that fails the call with UNAUTHENTICATED and ``message``."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # abort() raises: the call ends here, with this status.
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


def _replacement(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that rejects every call.

    It has no request deserialiser: bytes from an unauthenticated peer are never parsed.
    A plain coroutine serves the streaming-response kinds too: grpc.aio awaits a behaviour
    that is not an async generator, and the abort ends the call before any response.
    """
    deny = _denier(message)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED.

    Methods whose full name starts with one of ``exempt`` (health checks and reflection by
    default) pass without a token, as does everything when the store is disabled. The
    store is consulted on every call, so a :meth:`TokenStore.reload` takes effect at once.

    A refused call ends before any request is read; ``on_refused``, if given, is told its full
    method name (for the metrics). A bidirectional-streaming client that
    is still writing its requests at that moment may read INTERNAL ("Internal error from
    Core") instead of UNAUTHENTICATED: that is grpc's client losing the race with the
    server's status, seen without any interceptor too; the call is refused either way.
    """

    def __init__(
        self,
        store: TokenStore,
        exempt: Sequence[str] = DEFAULT_EXEMPT,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.exempt = tuple(exempt)
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass authorised or exempt calls on; answer the rest with a rejecting handler."""
        handler = await continuation(handler_call_details)
        # An unknown method (handler None) is left to gRPC, which answers UNIMPLEMENTED.
        if handler is None or not self.store.enabled:
            return handler
        method: str = getattr(handler_call_details, "method", "") or ""
        if method.startswith(self.exempt):
            return handler
        token = bearer_token(getattr(handler_call_details, "invocation_metadata", None))
        if token is not None and self.store.tenant_for(token) is not None:
            return handler
        if self.on_refused is not None:
            self.on_refused(method)
        return _replacement(
            handler, "missing bearer token" if token is None else "invalid bearer token"
        )
