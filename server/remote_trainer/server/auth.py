"""Bearer-token authentication: who is calling, and an interceptor that turns strangers away.

Tokens come from settings (``--tokens``, ``--tokens-file``), each ``token`` or ``name:token``. Every
RPC but the health service needs ``authorization: Bearer <token>`` metadata; a missing or unknown
token gets UNAUTHENTICATED. The caller's name (the token's name, or a digest of the token) owns the
sessions it creates. Without tokens, everyone is the anonymous caller "".
"""

from __future__ import annotations

import hashlib
import re
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from remote_trainer.server.settings import Settings
from remote_trainer.server.status import to_status

log = logging.getLogger(__name__)

# Method prefixes that need no token: health checks (load balancers, Docker, Kubernetes probes).
OPEN_METHODS = ("/grpc.health.v1.Health/",)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(lines: Sequence[str]) -> dict[bytes, str]:
    """Token digest -> caller name, from ``token`` or ``name:token`` entries."""
    tokens: dict[bytes, str] = {}
    for raw in lines:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, _, token = entry.rpartition(":")
        name, token = name.strip(), token.strip()
        if name and not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ValueError(f"token name {name!r} may hold only letters, digits and _ . -")
        if not token:  # "alice:" (an unset variable) would make the empty bearer token valid
            raise ValueError(f"the token of {name or 'an entry'!r} is empty")
        # A token without a name is known by a digest of it (never the token itself: names are logged).
        tokens[_digest(token)] = name or "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]
    return tokens


class TokenAuth:
    """The accepted tokens; ``caller`` names who sent a request."""

    def __init__(self, tokens: dict[bytes, str]) -> None:
        self._tokens = tokens

    @staticmethod
    def from_settings(settings: Settings) -> TokenAuth | None:
        """The tokens the settings name, or None when authentication is off (neither ``tokens`` nor
        ``tokens_file`` set). Fails closed: settings that ask for tokens but yield none, or an empty
        one, raise ``ValueError``, so a server never starts open by mistake."""
        if not settings.tokens and not settings.tokens_file:
            return None
        lines = settings.tokens.split(",")
        if settings.tokens_file:
            lines += Path(settings.tokens_file).read_text().splitlines()
        tokens = parse_tokens(lines)
        if not tokens:
            where = " and ".join(
                what for what, value in (("tokens", settings.tokens), ("tokens-file", settings.tokens_file)) if value
            )
            raise ValueError(f"{where} set but no token given: refusing to start without authentication")
        return TokenAuth(tokens)

    def identify(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The caller's name for a valid bearer token in ``metadata``, else None."""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                # Looked up by SHA-256 digest, so the comparison does not leak the token by timing.
                return self._tokens.get(_digest(value[len("Bearer "):].strip()))
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

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(status.code, status.details, status.trailing_metadata)

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if details.method.startswith(OPEN_METHODS) or self._auth.identify(details.invocation_metadata) is not None:
            return await continuation(details)
        log.info("rpc=%s status=UNAUTHENTICATED", details.method)
        return self._refuse
