"""The guard's HTTP server: uvicorn (h11) and a small Starlette app in front of :class:`Guard`.

Every request gets an HTTP answer, and none can hold the guard: h11 parses the request and
answers 400 to a malformed one (a negative or non-numeric Content-Length, oversized headers);
the app answers 411 without a length, 413 to a length over the cap before reading a byte, and
reads the body with a deadline (408). A connection that stalls before its headers are complete
gets a 408 from :class:`_DeadlineH11` (uvicorn itself only times out idle keep-alive connections).
Too many open connections get 503 from uvicorn (``limit_concurrency``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from lifecycle.errors import AddressUnavailableError
from lifecycle.policies import load_policy
from lifecycle.registry.receiver import Guard, GuardSettings

log = logging.getLogger("lifecycle.registry.guard")

#: Answers after which the connection is closed: the request body may be unread (or a request
#: half sent), so the connection cannot carry another request.
_CLOSE = {"Connection": "close"}


def _reply(code: int, body: dict[str, Any], *, close: bool = False) -> JSONResponse:
    return JSONResponse(body, status_code=code, headers=_CLOSE if close else None)


async def _read_body(request: Request, cap: int, timeout: float) -> bytes | JSONResponse:
    """The request body, or the answer to give instead (411, 413, 408, 400)."""
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length is None and not chunked:
        return _reply(411, {"error": "Content-Length required"}, close=True)
    # h11 has already refused a Content-Length that is not plain digits (400); this is belt and braces.
    if length is not None and not length.isdigit():
        return _reply(400, {"error": "bad Content-Length"}, close=True)
    if length is not None and int(length) > cap:
        return _reply(413, {"error": f"payload too large (limit {cap} bytes)"}, close=True)

    async def collect() -> bytes | JSONResponse:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:  # a chunked body may say nothing up front
                return _reply(413, {"error": f"payload too large (limit {cap} bytes)"}, close=True)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        return _reply(408, {"error": f"request body not received within {timeout:g} s"}, close=True)


def make_app(guard: Guard) -> Starlette:
    """The ASGI app: POST any path for deliveries, GET /health."""
    settings = guard.settings

    async def health(request: Request) -> JSONResponse:
        alive = guard.alive()
        return _reply(200 if alive else 503, {"status": "ok" if alive else "worker stopped",
                                              "policy": guard.policy.path, "digest": guard.policy.digest,
                                              "queued": len(guard.jobs)})

    async def deliver(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, settings.max_body_bytes, settings.read_timeout_s)
        except ClientDisconnect:
            return _reply(400, {"error": "client disconnected"}, close=True)  # nobody reads it
        if isinstance(body, JSONResponse):
            log.warning("guard: refused a delivery: HTTP %d", body.status_code)
            return body
        code, reply = guard.handle(request.headers, body)
        return _reply(code, reply)

    async def not_found(request: Request) -> JSONResponse:
        return _reply(404, {"error": "not found"})

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/", health, methods=["GET"]),
        Route("/{path:path}", deliver, methods=["POST"]),
        Route("/{path:path}", not_found, methods=["GET"]),
    ])


class _DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers.

    uvicorn times out a keep-alive connection only while no byte arrives: a client that opens a
    connection and sends nothing, or half a request line, holds it forever (and counts against
    ``limit_concurrency``). Here each request's headers must be complete within
    ``header_timeout_s`` of its first byte (or of the connection, for the first request);
    otherwise the client gets a 408 and the connection is closed. The body has its own
    deadline in the app.
    """

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the first request's deadline with the connection."""
        super().connection_made(transport)
        self._request_cycle: Any = None
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        """A byte between requests starts the next request's deadline."""
        if self._between_requests():
            self._arm()
        super().data_received(data)

    def handle_events(self) -> None:
        """Stop the deadline once a request's headers are parsed."""
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._request_cycle:
            self._request_cycle = self.cycle
            self._disarm()

    def on_response_complete(self) -> None:
        """A finished exchange leaves the connection to uvicorn's keep-alive timer."""
        self._disarm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the deadline of a closed connection."""
        self._disarm()
        super().connection_lost(exc)

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self._between_requests():
            return
        body = json.dumps({"error": f"request headers not received within {self.header_timeout_s:g} s"}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


class Receiver:
    """The guard's HTTP server bound to a socket (``port`` 0 picks a free one)."""

    def __init__(self, guard: Guard, host: str, port: int) -> None:
        settings = guard.settings
        self.guard = guard
        self.host = host
        self.sock = _listen(host, port)
        self.port: int = self.sock.getsockname()[1]
        protocol = type("GuardH11", (_DeadlineH11,), {"header_timeout_s": settings.read_timeout_s})
        config = uvicorn.Config(
            make_app(guard), http=protocol, loop="asyncio", lifespan="off", log_config=None,
            limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=settings.max_header_bytes, timeout_graceful_shutdown=5,
            server_header=False)
        self.server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        """The base URL deliveries go to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or SIGINT/SIGTERM when run in the main thread)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def shutdown(self) -> None:
        """Ask a running server to stop (from another thread)."""
        self.server.should_exit = True


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        raise AddressUnavailableError(f"the guard cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def make_server(guard: Guard, host: str, port: int) -> Receiver:
    """An HTTP server that feeds ``guard``; POST any path for deliveries, GET /health."""
    return Receiver(guard, host, port)


class _Redact(logging.Filter):
    """Masks the webhook secret in every log record (MLflow or uvicorn might quote a request)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "***"), None
        return True


def serve(*, policy_path: str | None, host: str, port: int, secret: str | None,
          settings: GuardSettings | None = None) -> None:
    """Run the guard until interrupted (SIGINT / SIGTERM)."""
    policy = load_policy(policy_path)
    guard = Guard(policy, secret or "", settings=settings)
    redactor = _Redact(guard.secret)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
    receiver = make_server(guard, host, port)
    guard.start()
    print(f"lifecycle guard listening on {receiver.url}/webhook "
          f"(policy {policy.path}, digest {policy.digest})", flush=True)
    try:
        receiver.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        guard.stop()
