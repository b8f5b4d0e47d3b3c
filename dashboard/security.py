"""Who may talk to the dashboard: a Host-header check against DNS rebinding, and a token.

- On loopback (`loopback_only=True`, the default) a request whose Host header names anything
  but localhost / 127.0.0.1 / [::1] is refused with 421: a page on evil.example whose name
  was re-pointed at 127.0.0.1 cannot read the API.
- With a token, every request must carry it: `Authorization: Bearer T`, `?token=T` (the
  page's EventSource cannot set headers) or the `tensortap_token` cookie that a request with
  a valid `?token=` sets (so the page's own scripts and styles load). Compared in constant time.
- Every answer gets a Content-Security-Policy that allows only this origin's scripts: even a
  name from the wire that slipped past escaping could not run code.
"""
from __future__ import annotations

import ipaddress
import secrets
from typing import Optional

from starlette.datastructures import Headers, QueryParams
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "tensortap_token"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'")
_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def host_name(host_header: str) -> str:
    """'127.0.0.1:8050' -> '127.0.0.1'; '[::1]:8050' -> '[::1]'; lower-cased."""
    h = host_header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end > 0 else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def loopback_name(host: str) -> bool:
    """A Host header's name that is this machine: localhost, 127.0.0.0/8, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_ok(expected: str, headers: Headers, query: QueryParams) -> tuple[bool, bool]:
    """(accepted, came from the query string)."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and secrets.compare_digest(auth[7:].strip().encode(), expected.encode()):
        return True, False
    q = query.get("token")
    if q is not None and secrets.compare_digest(q.encode(), expected.encode()):
        return True, True
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == COOKIE and secrets.compare_digest(v.encode(), expected.encode()):
            return True, False
    return False, False


class Guard:
    """ASGI middleware applying the Host check, the token and the security headers."""

    def __init__(self, app: ASGIApp, *, token: Optional[str], loopback_only: bool) -> None:
        self.app, self.token, self.loopback_only = app, token, loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.loopback_only and not loopback_name(host_name(headers.get("host", ""))):
            await PlainTextResponse("refused: Host header is not a loopback name "
                                    "(tensortap serves loopback only)", 421)(scope, receive, send)
            return
        set_cookie = False
        if self.token is not None:
            ok, from_query = token_ok(self.token, headers, QueryParams(scope.get("query_string", b"")))
            if not ok:
                await PlainTextResponse("unauthorized: pass the token as 'Authorization: Bearer T' "
                                        "or ?token=T", 401,
                                        headers={"www-authenticate": "Bearer"})(scope, receive, send)
                return
            set_cookie = from_query

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(_SECURITY_HEADERS)
                if set_cookie:
                    extra.append((b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; "
                                  "Path=/".encode()))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)
