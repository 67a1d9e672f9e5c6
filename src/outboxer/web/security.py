"""Who may use the console, by which name, and how a change is proven intended.

- Host: every request must name the console by one of its own names in ``Host``:
  the loopback names and addresses, and the names it was given (``allowed_hosts``;
  the command line adds the bind address and ``--allowed-host``). Anything else is
  refused (400) before any other rule, on every path: a page of another site whose
  name was made to resolve to the console's address (DNS rebinding) is same-origin
  with the console in the browser, but its requests still say the other site's name.
- Token: when the console has one (``--token`` / ``OUTBOXER_WEB_TOKEN``), every page
  needs it, either as ``Authorization: Bearer <token>`` or as the session cookie the
  login form sets (an HMAC of the token, HttpOnly, SameSite=Strict, Secure over HTTPS:
  the token itself is never stored in the browser). Compared in constant time.
- Guessing: wrong tokens (form or bearer) are counted per client address; after
  :attr:`Throttle.free` of them in a row the address gets 429 with ``Retry-After``
  for a time that doubles with every further failure (see :class:`Throttle`).
- Changes: every request but GET and HEAD must carry an ``Origin`` (or, without
  one, a ``Referer``) that is the console itself (403 otherwise), and every change
  the ``csrf`` field equal to the random HttpOnly SameSite=Strict cookie set on the
  first page (double submit; 403 without).
- Read-only: every POST but the login is refused (403) before its form is read.
- Proxies: ``X-Forwarded-Proto`` and ``X-Forwarded-For`` are believed only from the
  addresses of ``trusted_proxies``; from them they give the scheme (for the Secure
  cookies and the Origin check) and the client address (for the throttle).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from outboxer.errors import ConfigurationError
from outboxer.hooks import Observer

logger = logging.getLogger(__name__)

CSRF_COOKIE = "outboxer_csrf"
SESSION_COOKIE = "outboxer_session"
CSRF_FIELD = "csrf"
PUBLIC_PREFIXES = ("/static/", "/login")
SAFE_METHODS = ("GET", "HEAD")
MIN_TOKEN_LENGTH = 16
"""Off loopback a token must be at least this long (see :func:`check_token`)."""
GENERATE = "generate"
"""``--token generate``: start with a new random token, printed once."""

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
DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---------------------------------------------------------------------- names


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts local connections."""
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """A ``Host`` header's name (lower case, no brackets, no final dot) and port;
    None when it is not a host at all."""
    value = value.strip().lower()
    port: str | None = None
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name = value  # a name, an IPv4 address, or a bare IPv6 address
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
        return None
    name = name.rstrip(".")
    if not name:
        return None
    try:
        name = str(ipaddress.ip_address(name))
    except ValueError:
        if not all(_LABEL.match(label) for label in name.split(".")) or len(name) > 253:
            return None
    return name, int(port) if port is not None else None


def allowed_host_names(values: Iterable[str]) -> tuple[str, ...]:
    """Host names (or addresses) from ``--allowed-host`` / ``OUTBOXER_WEB_ALLOWED_HOSTS``:
    each value may hold several, separated by commas or spaces. A name that is not a
    host name or an address is refused (:class:`ConfigurationError`)."""
    names: list[str] = []
    for value in values:
        for item in re.split(r"[,\s]+", value):
            if not item:
                continue
            parsed = split_host(item)
            if item.strip() == "*" or parsed is None:
                raise ConfigurationError(
                    f"not a host name or address: {item!r} (give each name the console is "
                    "reached by, e.g. console.example.com; '*' is not accepted)"
                )
            if parsed[1] is not None:
                raise ConfigurationError(
                    f"give the host name without a port: {item!r} (any port is accepted)"
                )
            names.append(parsed[0])
    return tuple(dict.fromkeys(names))


def trusted_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or networks (``10.0.0.0/8``) of the proxies whose ``X-Forwarded-*``
    headers are believed; commas or spaces separate several in one value."""
    found: list[Network] = []
    for value in values:
        for item in re.split(r"[,\s]+", value):
            if not item:
                continue
            try:
                found.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                raise ConfigurationError(
                    f"not an address or network of a proxy: {item!r} (e.g. 127.0.0.1, 10.0.0.0/8)"
                ) from None
    return tuple(dict.fromkeys(found))


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


# ---------------------------------------------------------------------- tokens


def check_token(token: str | None, *, bind: str, reached_from_elsewhere: bool = False) -> None:
    """Refuse a token the console should not run with (:class:`ConfigurationError`).

    A token must not start or end with white space nor hold control characters (a
    browser or a header could not send it back as given). Off loopback (``bind`` is not
    a loopback address, or ``reached_from_elsewhere``: a proxy or another name leads
    to it) it must be at least :data:`MIN_TOKEN_LENGTH` characters: the throttle slows
    one address down, not many, so only a long random token is out of reach.
    """
    if token is None:
        return
    if token != token.strip() or any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise ConfigurationError(
            "the console's token has white space at an end or control characters: "
            "give it as printable text"
        )
    if (reached_from_elsewhere or not is_loopback(bind)) and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"refusing a token of {len(token)} characters off loopback: anyone who can "
            f"reach the console could guess it; use at least {MIN_TOKEN_LENGTH} random "
            "characters (--token generate makes one, or: openssl rand -hex 32)"
        )


def generate_token() -> str:
    """A new random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


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


def origin_matches(value: str, host: str, *, https: bool) -> bool:
    """Whether ``value`` (an ``Origin``, or a ``Referer`` URL) is the console reached
    as ``host`` (its ``Host`` header) over HTTPS or not: same scheme, name and port."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return False
    given = split_host(parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]")
    own = split_host(host)
    if given is None or own is None:
        return False
    own_scheme = "https" if https else "http"
    return (scheme, given[0], port or DEFAULT_PORTS[scheme]) == (
        own_scheme,
        own[0],
        own[1] or DEFAULT_PORTS[own_scheme],
    )


# ---------------------------------------------------------------------- throttle


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class Throttle:
    """Failed sign-ins per client address, and the lock-outs they earn.

    ``free`` failures in a row are answered as wrong; the last of them locks the
    address out for ``base`` seconds, and every failure after a lock-out ended locks
    it again for twice as long as the one before, up to ``cap``. While locked, every
    sign-in (form or bearer) from the address is answered 429, the right token too,
    and counts nothing. A success forgets the address; so does ``forget`` seconds
    without a failure. IPv6 addresses count per /64 network (one host usually has a
    whole one). The state is per process and holds at most ``max_clients`` addresses
    (the oldest forgotten first).
    """

    def __init__(
        self,
        *,
        free: int = 5,
        base: float = 10.0,
        cap: float = 900.0,
        forget: float = 3600.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if free < 1 or base <= 0 or cap < base or forget < cap or max_clients < 1:
            raise ConfigurationError(
                "throttle: need free >= 1, 0 < base <= cap <= forget and max_clients >= 1"
            )
        self.free = free
        self.base = base
        self.cap = cap
        self.forget = forget
        self.max_clients = max_clients
        self.clock = clock
        self._clients: dict[str, _Failures] = {}

    @staticmethod
    def key(client: str) -> str:
        address = _address(client)
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
        return client if address is None else str(address)

    def _current(self, key: str, now: float) -> _Failures | None:
        found = self._clients.get(key)
        if found is not None and now >= found.locked_until and now - found.last >= self.forget:
            del self._clients[key]
            return None
        return found

    def retry_after(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        now = self.clock()
        found = self._current(self.key(client), now)
        if found is None or now >= found.locked_until:
            return None
        return found.locked_until - now

    def failed(self, client: str) -> tuple[int, float | None]:
        """Count a failure: the failures in a row, and the lock-out it starts if any."""
        now = self.clock()
        key = self.key(client)
        found = self._current(key, now) or _Failures()
        self._clients.pop(key, None)
        self._clients[key] = found  # newest last: the oldest are dropped first
        found.count += 1
        found.last = now
        lock = None
        if found.count >= self.free:
            lock = min(self.base * 2 ** min(found.count - self.free, 32), self.cap)
            found.locked_until = now + lock
        self._prune(now)
        return found.count, lock

    def succeeded(self, client: str) -> None:
        self._clients.pop(self.key(client), None)

    def _prune(self, now: float) -> None:
        if len(self._clients) <= self.max_clients:
            return
        for key in list(self._clients):
            self._current(key, now)
        while len(self._clients) > self.max_clients:
            del self._clients[next(iter(self._clients))]


# ---------------------------------------------------------------------- the guard


def with_security_headers(response: Response, path: str) -> Response:
    """``response`` with the headers every answer of the console carries."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _csrf_cookie_ok(cookie: str | None) -> bool:
    return cookie is not None and len(cookie) >= 32


def _plain(status: int, text: str) -> Response:
    return PlainTextResponse(text, status_code=status)


class Guard:
    """The dispatch of the console's middleware (``Middleware(BaseHTTPMiddleware,
    dispatch=...)``): the host, the client behind trusted proxies, the Origin of
    changes, the token and its throttle, the CSRF cookie, read-only, security headers."""

    def __init__(
        self,
        *,
        token: str | None,
        read_only: bool,
        allowed_hosts: Iterable[str] = (),
        trusted_proxies: Iterable[str] = (),
        throttle: Throttle | None = None,
        hooks: Observer | None = None,
    ) -> None:
        self._token = token or None
        self._session = session_value(token) if token else None
        self._read_only = read_only
        self._hosts = frozenset({"localhost", *allowed_host_names(allowed_hosts)})
        self._proxies = trusted_networks(trusted_proxies)
        self.throttle = throttle or Throttle()
        self._hooks = hooks or Observer()

    # ------------------------------------------------------------ who is asking

    def host_allowed(self, host: str | None) -> bool:
        parsed = split_host(host) if host else None
        return parsed is not None and (parsed[0] in self._hosts or is_loopback(parsed[0]))

    def _trusted(self, address: str) -> bool:
        found = _address(address)
        return found is not None and any(found in net for net in self._proxies)

    def _client_and_https(self, request: Request) -> tuple[str, bool]:
        peer = request.client.host if request.client else ""
        https = request.url.scheme == "https"
        if not self._trusted(peer):
            return peer, https
        proto = request.headers.get("x-forwarded-proto")
        if proto:
            https = proto.split(",")[-1].strip().lower() == "https"
        client = peer
        # From the right: the first address that is not a trusted proxy is the client.
        for hop in reversed(request.headers.get("x-forwarded-for", "").split(",")):
            address = _address(hop)
            if address is None:
                break
            client = str(address)
            if not self._trusted(client):
                break
        return client, https

    # ------------------------------------------------------------ sign-in

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def locked_for(self, request: Request) -> int | None:
        """Whole seconds ``request``'s client must wait before signing in, or None."""
        wait = self.throttle.retry_after(request.state.client)
        return None if wait is None else max(1, math.ceil(wait))

    def verify(self, request: Request, given: str, method: str) -> bool:
        """Whether ``given`` is the token; a failure is counted, logged and reported,
        a success forgets the client's failures."""
        client: str = request.state.client
        if self._token is not None and same(given, self._token):
            self.throttle.succeeded(client)
            return True
        count, lock = self.throttle.failed(client)
        logger.warning(
            "console sign-in failed from %s (%s, %d in a row)",
            client,
            method,
            count,
            extra={"client": client, "method": method, "failures": count},
        )
        self._hooks.sign_in_failed(client, method)
        if lock is not None:
            logger.warning(
                "console sign-in from %s locked out for %d s after %d failures",
                client,
                math.ceil(lock),
                count,
                extra={"client": client, "locked_seconds": lock, "failures": count},
            )
            self._hooks.sign_in_locked(client, lock)
        return False

    def too_many(self, seconds: int) -> Response:
        response = _plain(
            429, f"too many failed sign-ins from this address: try again in {seconds} s"
        )
        response.headers["Retry-After"] = str(seconds)
        return response

    # ------------------------------------------------------------ the middleware

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        host = request.headers.get("host")
        if not self.host_allowed(host):
            logger.warning(
                "console refused a request for host %r (not one of its names)",
                host,
                extra={"host": host, "client": request.client.host if request.client else None},
            )
            return with_security_headers(
                _plain(
                    400,
                    "this console does not answer to that host name; if it is one of its "
                    "names, start it with --allowed-host NAME",
                ),
                request.url.path,
            )
        assert host is not None
        client, https = self._client_and_https(request)
        request.state.client = client
        request.state.https = https
        path = request.url.path
        public = path.startswith(PUBLIC_PREFIXES)
        cookie = request.cookies.get(CSRF_COOKIE)
        fresh = None if _csrf_cookie_ok(cookie) else secrets.token_urlsafe(32)
        request.state.csrf = fresh or cookie
        request.state.guard = self
        request.state.read_only = self._read_only
        response = await self._answer(request, host, https, public, call_next)
        if fresh is not None:
            response.set_cookie(
                CSRF_COOKIE, fresh, httponly=True, samesite="strict", secure=https, path="/"
            )
        return with_security_headers(response, path)

    async def _answer(
        self,
        request: Request,
        host: str,
        https: bool,
        public: bool,
        call_next: Callable[[Request], Awaitable[Response]],
    ) -> Response:
        path = request.url.path
        if request.method not in SAFE_METHODS:
            source = request.headers.get("origin") or request.headers.get("referer")
            if source is None or not origin_matches(source, host, https=https):
                logger.warning(
                    "console refused a %s %s from another origin: %r",
                    request.method,
                    path,
                    source,
                    extra={"client": request.state.client, "origin": source},
                )
                return _plain(
                    403,
                    "a change must come from the console's own pages (Origin or Referer "
                    "missing or another site's); behind a TLS proxy, see --trusted-proxy",
                )
        if not public and not await self._authenticated(request):
            wait = request.state.locked
            if wait is not None:
                return self.too_many(wait)
            if request.method == "GET" and not path.startswith("/api/"):
                return RedirectResponse(f"/login?next={path}", status_code=303)
            return _plain(401, "a token is required")
        if request.method not in SAFE_METHODS and self._read_only and path != "/login":
            return _plain(403, "read-only console: changes are refused")
        return await call_next(request)

    async def _authenticated(self, request: Request) -> bool:
        request.state.locked = None
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            request.state.locked = self.locked_for(request)
            if request.state.locked is not None:
                return False
            return self.verify(request, given.strip(), "bearer")
        assert self._session is not None
        return same(request.cookies.get(SESSION_COOKIE), self._session)


async def checked_form(request: Request) -> FormData:
    """The POSTed form, after its CSRF field was compared with the cookie (403 if not)."""
    if request.state.read_only and request.url.path != "/login":
        raise HTTPException(403, "read-only console: changes are refused")
    form = await request.form()
    given = form.get(CSRF_FIELD)
    cookie = request.cookies.get(CSRF_COOKIE)
    # A short cookie is none of ours (an empty one would equal an empty field).
    if not (
        isinstance(given, str)
        and cookie is not None
        and _csrf_cookie_ok(cookie)
        and same(given, cookie)
    ):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return form
