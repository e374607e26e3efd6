"""ASGI middleware that checks every request before any route reads it: the Host and Origin
headers on a loopback server (against DNS rebinding), and the body's size and JSON nesting depth.

Each refusal is an OpenAI-shaped error sent without reading the rest of the body, so a huge or
hostile body costs the event loop (and the streams it serves) next to nothing.
"""

import re

import anyio
import numpy as np
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from relaxlm.server.completions import ApiError

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Deeper JSON is refused before it is parsed: Python's parser, pydantic and the chat template
# all recurse per level. 64 leaves room for deep JSON schemas (two levels per schema level).
MAX_JSON_DEPTH = 64
_SCAN_IN_THREAD_BYTES = 64 * 1024  # scan bigger bodies off the event loop

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]"}
_HOST_PORT = re.compile(r"^(\[[^\]]*\]|[^:]*)(?::\d+)?$")  # name or [v6], then an optional port
_ORIGIN = re.compile(r"^https?://(\[[^\]]*\]|[^:/]*)(?::\d+)?/?$")

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NESTING = np.zeros(256, np.int8)  # +1 for an opening bracket, -1 for a closing one
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1


def json_depth(body: bytes) -> int:
    """How deep `body`'s arrays and objects nest, brackets inside strings not counted."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b"", body), np.uint8)
    return int(np.cumsum(_NESTING[skeleton], dtype=np.int64).max(initial=0))


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


class RequestGuard:
    """Refuse a request whose Host/Origin is foreign to a loopback server (421/403), whose body
    exceeds `max_body_bytes` (413, by Content-Length or as it arrives) or nests JSON deeper than
    MAX_JSON_DEPTH (400); pass the rest on with the body already read.

    loopback_only: the server is bound to loopback, so only loopback names may reach it (a DNS
        rebinding page would send its own host name).
    """

    def __init__(self, app, *, max_body_bytes: int, loopback_only: bool):
        self.app, self.max_body_bytes, self.loopback_only = app, max_body_bytes, loopback_only

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = self._foreign(headers) or self._declared_too_large(headers)
        body = b""
        if error is None:
            body, error = await self._read_body(receive)
            if body is None:  # the client left before its body ended: nobody to answer
                return
        if error is not None:
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        if body:
            depth = (
                await anyio.to_thread.run_sync(json_depth, body)
                if len(body) > _SCAN_IN_THREAD_BYTES
                else json_depth(body)
            )
            if depth > MAX_JSON_DEPTH:
                error = ApiError(
                    400,
                    f"the body nests JSON {depth} levels deep; at most {MAX_JSON_DEPTH} are "
                    "allowed",
                    code="json_too_deep",
                )
                await JSONResponse(error.body(), status_code=400)(scope, receive, send)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:  # the body once, then the client's own messages (its disconnect)
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _foreign(self, headers: Headers) -> ApiError | None:
        if not self.loopback_only:
            return None
        host = _HOST_PORT.match(headers.get("host", ""))
        if host is None or host.group(1).lower() not in _LOOPBACK_NAMES:
            return ApiError(
                421,
                "this server listens on loopback only; send the Host header 127.0.0.1, "
                "localhost or [::1] (with the port)",
                code="invalid_host",
            )
        origin = headers.get("origin")
        if origin is not None:
            match = _ORIGIN.match(origin)
            if match is None or match.group(1).lower() not in _LOOPBACK_NAMES:
                return ApiError(
                    403,
                    f"requests from the web page at {origin[:100]!r} are refused: this server "
                    "listens on loopback only and takes pages it serves itself",
                    type="permission_error",
                    code="invalid_origin",
                )
        return None

    def _declared_too_large(self, headers: Headers) -> ApiError | None:
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large()
        return None

    async def _read_body(self, receive) -> tuple[bytes | None, ApiError | None]:
        """The whole body (None if the client left first), or an error once it passes the
        limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body exceeds this server's limit of {self.max_body_bytes} bytes "
            "(relaxlm serve --max-body-bytes)",
            code="request_too_large",
        )
