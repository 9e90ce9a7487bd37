"""Bearer-token authentication: who is calling, and an interceptor that turns strangers away.

Tokens come from ``--tokens`` and ``--tokens-file`` (parsed in server/tokens.py). Every
RPC but the health service needs ``authorization: Bearer <token>`` metadata; a missing or unknown
token gets UNAUTHENTICATED. The caller's name (the token's name, or a digest of the token) owns the
sessions it creates. Without tokens, everyone is the anonymous caller "".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from remote_trainer.server.status import to_status
from remote_trainer.server.tokens import digest, load_tokens

log = logging.getLogger(__name__)

# Method prefixes that need no token: health checks (load balancers, Docker, Kubernetes probes).
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class TokenAuth:
    """The accepted tokens; ``caller`` names who sent a request."""

    def __init__(self, tokens: dict[bytes, str]) -> None:
        self._tokens = tokens

    @staticmethod
    def load(tokens: str, tokens_file: str) -> TokenAuth | None:
        """The tokens of ``--tokens`` and ``--tokens-file``, or None when authentication is off;
        ``ValueError`` for flags that ask for tokens but yield none (``tokens.load_tokens``)."""
        loaded = load_tokens(tokens, tokens_file)
        return None if loaded is None else TokenAuth(loaded)

    def identify(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The caller's name for a valid bearer token in ``metadata``, else None."""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                # Looked up by SHA-256 digest, so the comparison does not leak the token by timing.
                return self._tokens.get(digest(value[len("Bearer "):].strip()))
        return None


def caller(auth: TokenAuth | None, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Who is calling: the token's name, or "" when authentication is off."""
    if auth is None:
        return ""
    return auth.identify(tuple(context.invocation_metadata() or ())) or ""


if TYPE_CHECKING:  # the stubs make ServerInterceptor generic; at run time it is not
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Refuses every call without a valid token, except the open methods, with UNAUTHENTICATED."""

    def __init__(self, auth: TokenAuth) -> None:
        self._auth = auth
        status = to_status(grpc.StatusCode.UNAUTHENTICATED, "a valid 'authorization: Bearer <token>' header is required", "UNAUTHENTICATED")

        async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(status.code, status.details, status.trailing_metadata)

        # Served as a client-streaming call whose requests are never read: refused at its headers, so
        # a stranger's request body is never taken in (a unary handler would receive it whole first).
        self._refuse = grpc.stream_unary_rpc_method_handler(refuse)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if details.method.startswith(OPEN_METHODS) or self._auth.identify(details.invocation_metadata) is not None:
            return await continuation(details)
        log.info("rpc=%s status=UNAUTHENTICATED", details.method)
        return self._refuse
