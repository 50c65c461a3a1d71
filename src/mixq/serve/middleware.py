"""ASGI guards in front of the routes, each answering in OpenAI's error shape before any route runs.

    HostGuard   a keyless server answers only requests addressed to it by a loopback name (DNS rebinding),
                and every POST must say `Content-Type: application/json` (a web page cannot send that
                cross-site without a CORS preflight, which this server never grants)
    BearerAuth  `Authorization: Bearer KEY` (or Anthropic's `x-api-key`) on /v1 routes
    BodyLimit   the whole body, at most max_bytes, within a deadline, read up front and replayed
    JsonH11Protocol  uvicorn's h11 protocol whose own 400s (a malformed request line or header) are JSON too
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from typing import Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

from mixq.serve.errors import error_body


async def send_json(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _header(scope, name: bytes) -> Optional[bytes]:
    for k, v in scope.get("headers") or []:
        if k == name:
            return v
    return None


def host_name(host: str) -> str:
    """`Host` header -> host name: the port and IPv6 brackets dropped, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostGuard:
    """allowed_hosts: None (any host) or names besides the loopback ones; `*` in it allows any."""

    def __init__(self, app, allowed_hosts: Optional[tuple] = ()):
        self.app = app
        self.any = allowed_hosts is None or "*" in allowed_hosts
        self.allowed = {host_name(h) for h in allowed_hosts or ()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if not self.any and host is not None:
            name = host_name(host.decode("latin-1"))
            if not (is_loopback_name(name) or name in self.allowed):
                return await send_json(send, 403, error_body(
                    f"Host {name[:80]!r} is not served here (a keyless server answers loopback names only; "
                    "see --allowed-host)", code="host_not_allowed"), close=True)
        if scope.get("method") == "POST":
            ctype = (_header(scope, b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await send_json(send, 415, error_body(
                    f"Content-Type must be application/json, not {ctype[:80]!r}" if ctype else
                    "Content-Type must be application/json", code="unsupported_media_type"), close=True)
        return await self.app(scope, receive, send)


class BearerAuth:
    """`Authorization: Bearer KEY` or `x-api-key: KEY` on every /v1 route (constant-time compare); /health
    stays open."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1"):
            scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
            bearer = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
            x_key = _header(scope, b"x-api-key")
            if not bearer and not (x_key is not None and hmac.compare_digest(x_key.strip(), self.key)):
                return await send_json(send, 401, error_body("invalid or missing API key", code="invalid_api_key"))
        return await self.app(scope, receive, send)


class BodyLimit:
    """Reads the whole body up front (at most max_bytes, else 413; within timeout_s, else 408: a client that
    sends less than its Content-Length does not hold a connection forever) and replays it to the app."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def _read(self, scope, receive, send) -> Optional[bytes]:
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_json(send, 413, error_body(f"request body of {int(length)} bytes exceeds the limit of "
                                                  f"{self.max_bytes}", code="request_too_large"), close=True)
            return None
        body, more = bytearray(), True
        deadline = time.monotonic() + self.timeout_s
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await send_json(send, 408, error_body(f"the request body did not arrive within {self.timeout_s:g} s",
                                                      code="request_timeout"), close=True)
                return None
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            if len(body) > self.max_bytes:
                await send_json(send, 413, error_body(f"request body exceeds the limit of {self.max_bytes} bytes",
                                                      code="request_too_large"), close=True)
                return None
            more = msg.get("more_body", False)
        return bytes(body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = await self._read(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class JsonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol (passed as `http=`), whose own 400 for a request it cannot parse (`Content-Length:
    abc`, a broken request line) is an OpenAI-shaped JSON error like every other."""

    def send_400_response(self, msg: str) -> None:
        import h11

        data = json.dumps(error_body(f"malformed HTTP request: {msg}", code="bad_request")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=data),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
