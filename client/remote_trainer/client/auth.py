"""The bearer token on every call of a channel: interceptors for the sync and the asyncio faces.

They sit on the channel, so every call on it carries ``authorization: Bearer <token>``: the SDK's
own and those made through the raw generated stub (``client.stub``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


if TYPE_CHECKING:  # the stubs make the interceptor classes generic; at run time they are not
    _UnaryInterceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _StreamInterceptor = grpc.UnaryStreamClientInterceptor[Any, Any]
    _AsyncUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _AsyncStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _UnaryInterceptor = grpc.UnaryUnaryClientInterceptor
    _StreamInterceptor = grpc.UnaryStreamClientInterceptor
    _AsyncUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _AsyncStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor


def _header(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


class BearerToken(_UnaryInterceptor, _StreamInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on a sync channel (``grpc.intercept_channel``)."""

    def __init__(self, token: str) -> None:
        self._header = _header(token)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, (*(details.metadata or ()), self._header))

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)


class _AsyncToken:
    def __init__(self, token: str) -> None:
        self._header = _header(token)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class _AsyncUnaryToken(_AsyncToken, _AsyncUnaryInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AsyncStreamToken(_AsyncToken, _AsyncStreamInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)


def async_bearer_token(token: str) -> list[Any]:
    """The ``interceptors`` of a ``grpc.aio`` channel that add ``authorization: Bearer <token>`` to
    every unary and server-streaming call: one of each, as ``grpc.aio`` files each interceptor under
    one kind of call only."""
    return [_AsyncUnaryToken(token), _AsyncStreamToken(token)]
