"""A request-body limit for ``mlflow models serve``: HTTP 413 before a huge body is read.

MLflow's scoring server reads the whole body (``await request.body()``) and parses it in a
request thread, with no limit: one client posting a few hundred megabytes holds that memory and
a thread while it parses. :class:`BodyLimit` is a plain ASGI middleware in front of the app that
refuses a POST whose ``Content-Length`` (or, for a chunked body, whose bytes so far) pass the
limit, answering in MLflow's error format and naming the limit.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Set by ``mlflow models serve`` in the environment of its uvicorn workers (the model to load).
SCORING_SERVER_ENV = "__pyfunc_model_path__"


def too_large_message(size: int | None, limit: int) -> str:
    """The one-line refusal (size None: a chunked body that passed the limit while being read)."""
    got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return (f"request body is {got}; at most {limit} bytes are accepted (the server's max_body_bytes limit, "
            "LIFECYCLE_MAX_BODY_BYTES / lifecycle serve --max-body-bytes): send fewer or shorter prompts per request")


class BodyLimit:
    """ASGI middleware: POST bodies over ``max_bytes`` get 413 without being read whole."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            text = declared.decode("latin-1").strip()
            size = int(text) if text.isdigit() else None
            if size is None or size > self.max_bytes:
                await _refuse(send, 413 if size is not None else 400,
                              too_large_message(size, self.max_bytes) if size is not None
                              else f"bad Content-Length header {text[:20]!r}")
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await _refuse(send, 413, too_large_message(None if declared is None else total, self.max_bytes))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    code = "REQUEST_TOO_LARGE" if status == 413 else "BAD_REQUEST"
    payload = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def install(max_bytes: int, *, also: tuple[type, ...] = ()) -> bool:
    """Inside ``mlflow models serve``, put :class:`BodyLimit` in front of the app it is about to build.

    ``also``: further ASGI middleware classes (taking only the app) put just behind it (the
    canary router's :class:`~lifecycle.serving.router.RoutingKeyHeader`).

    The scoring server builds its app as ``scoring_server.init(load_model(...))``: ``init`` is
    looked up before the model loads, so it cannot be wrapped from here, but ``init`` imports
    ``FastAPI`` when it runs, after the model has loaded. The next ``FastAPI`` built in this
    process (the scoring server's) therefore gets the middleware, and ``fastapi.FastAPI`` is put
    back at once. Nothing changes outside the scoring server. True when installed.
    """
    if SCORING_SERVER_ENV not in os.environ:
        return False
    import fastapi

    current = fastapi.FastAPI
    if getattr(current, "_lifecycle_body_limit", None) is not None:
        current._lifecycle_body_limit[0] = max_bytes  # type: ignore[attr-defined]
        current._lifecycle_middleware.extend(m for m in also if m not in current._lifecycle_middleware)  # type: ignore[attr-defined]
        return True
    limit = [max_bytes]
    extra = list(also)

    class FastAPIWithBodyLimit(current):  # type: ignore[misc, valid-type]
        """The scoring server's app, with the body limit as its outermost middleware."""

        _lifecycle_body_limit = limit
        _lifecycle_middleware = extra

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            fastapi.FastAPI = current  # one app only: the scoring server's
            for middleware in extra:  # added first: inside the body limit
                self.add_middleware(middleware)
            self.add_middleware(BodyLimit, max_bytes=limit[0])
            log.info("scoring server: request bodies over %d bytes get HTTP 413", limit[0])

    fastapi.FastAPI = FastAPIWithBodyLimit
    return True
