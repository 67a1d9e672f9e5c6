"""Who may use the console and how a change is proven intended.

- Token: when the console has one (``--token`` / ``OUTBOXER_WEB_TOKEN``), every page
  needs it, either as ``Authorization: Bearer <token>`` or as the session cookie the
  login form sets (an HMAC of the token, HttpOnly, SameSite=Strict: the token itself
  is never stored in the browser). Compared in constant time.
- CSRF: every change is a POST carrying the ``csrf`` field, equal to the random
  HttpOnly SameSite=Strict cookie set on the first page (double submit); a POST
  without it is refused (403).
- Read-only: every POST but the login is refused (403) before its form is read.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, Mapping

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

CSRF_COOKIE = "outboxer_csrf"
SESSION_COOKIE = "outboxer_session"
CSRF_FIELD = "csrf"
PUBLIC_PREFIXES = ("/static/", "/login")

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts local connections."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def session_value(token: str) -> str:
    """The session cookie's value for ``token``: proves the token without holding it."""
    return hmac.new(token.encode(), b"outboxer-web-session", hashlib.sha256).hexdigest()


def same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go back to (never another site: no scheme, no ``//``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


class Guard:
    """The dispatch of the console's middleware: the token, the CSRF cookie,
    read-only, security headers (``Middleware(BaseHTTPMiddleware, dispatch=...)``)."""

    def __init__(self, *, token: str | None, read_only: bool) -> None:
        self._token = token or None
        self._session = session_value(token) if token else None
        self._read_only = read_only

    def authenticated(self, request: Request) -> bool:
        if self._token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and same(given.strip(), self._token):
            return True
        assert self._session is not None
        return same(request.cookies.get(SESSION_COOKIE), self._session)

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def check_token(self, given: str) -> bool:
        return self._token is not None and same(given, self._token)

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        public = path.startswith(PUBLIC_PREFIXES)
        cookie = request.cookies.get(CSRF_COOKIE)
        fresh = None if cookie and len(cookie) >= 32 else secrets.token_urlsafe(32)
        request.state.csrf = fresh or cookie
        request.state.guard = self
        request.state.read_only = self._read_only
        response: Response
        if not public and not self.authenticated(request):
            if request.method == "GET" and not path.startswith("/api/"):
                response = RedirectResponse(f"/login?next={request.url.path}", status_code=303)
            else:
                response = PlainTextResponse("a token is required", status_code=401)
        elif request.method not in ("GET", "HEAD") and self._read_only and path != "/login":
            response = PlainTextResponse("read-only console: changes are refused", 403)
        else:
            response = await call_next(request)
        if fresh is not None:
            response.set_cookie(CSRF_COOKIE, fresh, httponly=True, samesite="strict", path="/")
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


async def checked_form(request: Request) -> FormData:
    """The POSTed form, after its CSRF field was compared with the cookie (403 if not)."""
    if request.state.read_only and request.url.path != "/login":
        raise HTTPException(403, "read-only console: changes are refused")
    form = await request.form()
    given = form.get(CSRF_FIELD)
    cookie = request.cookies.get(CSRF_COOKIE)
    if not isinstance(given, str) or cookie is None or not same(given, cookie):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return form
