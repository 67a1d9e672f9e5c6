"""The console's pages: overview, messages, one message (with its audit trail and,
for a dead letter, the edit form), dead letters, the audit trail, login.

Every change is audited with the actor ``console:<client address>`` (the console
has one shared token, no user names; the address is the one behind trusted
proxies).

Every read and change goes through :class:`~outboxer.admin.Admin` (the same code as
``outboxer status`` / ``outboxer dead ...``), called on Starlette's thread pool.
Templates are Jinja2 with autoescaping on: payloads, keys and errors are data from
outside and are only ever rendered as text.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from outboxer.admin import AUDIT_ACTIONS, Admin, Search, parse_cursor
from outboxer.durations import format_duration, parse_duration
from outboxer.errors import ConfigurationError, MessageNotFoundError, OutboxError
from outboxer.models import OutboxMessage, Status
from outboxer.outbox import Outbox
from outboxer.web.security import (
    CSRF_FIELD,
    SESSION_COOKIE,
    Guard,
    Throttle,
    checked_form,
    safe_next,
    session_value,
    with_security_headers,
)

PAGE = 50
CACHE_SECONDS = 5.0
"""The overview's counts are read at most this often (COUNT by status reads a whole
index: cheap enough every few seconds, not on every refresh of many browsers)."""
CHART_CACHE_SECONDS = 30.0
"""The per-minute chart is read at most this often: it groups the last hour's rows
(0.5 to 3 s at 500,000 rows an hour, see docs/decisions.md) and changes per minute."""
SEARCH_FIELDS = ("key", "event_type", "event_id", "id")

T = TypeVar("T")


class TtlCache:
    """Values computed at most once per ``seconds`` (thread-safe)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, Any]] = {}

    def get(self, key: str, compute: Callable[[], T]) -> T:
        with self._lock:
            hit = self._values.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.seconds:
                value: T = hit[1]
                return value
            value = compute()
            self._values[key] = (time.monotonic(), value)
            return value


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    return format_duration(max(0.0, (datetime.now(UTC) - value).total_seconds())) + " ago"


def _stamp(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="milliseconds")


def _pretty_envelope(m: OutboxMessage) -> str:
    try:
        return json.dumps(m.envelope().to_dict(), indent=2, ensure_ascii=False)
    except OutboxError:
        try:
            return json.dumps(json.loads(m.payload), indent=2, ensure_ascii=False)
        except ValueError:
            return m.payload


def _pretty_payload(m: OutboxMessage) -> str:
    """The payload alone, as the edit form shows it."""
    try:
        return json.dumps(m.envelope().payload, indent=2, ensure_ascii=False)
    except OutboxError:
        return m.payload


def _quoted(value: str) -> str:
    return quote(value, safe="")


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("outboxer.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["ago"] = _ago
    env.filters["stamp"] = _stamp
    env.filters["first_line"] = _first_line
    env.filters["duration"] = format_duration
    return Jinja2Templates(env=env)


class Console:
    """The pages of one application's console."""

    def __init__(
        self, outbox: Outbox, *, read_only: bool, cache_seconds: float, chart_cache_seconds: float
    ) -> None:
        self.outbox = outbox
        self.admin: Admin = outbox.admin
        self.read_only = read_only
        self.cache = TtlCache(cache_seconds)
        self.chart_cache = TtlCache(chart_cache_seconds)
        self.templates = _templates()

    def services(self) -> list[str]:
        return sorted(r.service_name for r in self.outbox.routes.routes())

    @staticmethod
    def actor(request: Request) -> str:
        """Who the audit row names for a change made through this request."""
        return f"console:{request.state.client}"

    def render(
        self, request: Request, name: str, status_code: int = 200, **context: Any
    ) -> Response:
        base = {
            "read_only": self.read_only,
            "csrf": request.state.csrf,
            "csrf_field": CSRF_FIELD,
            "services": self.services(),
            "path": request.url.path,
        }
        return self.templates.TemplateResponse(
            request, name, {**base, **context}, status_code=status_code
        )

    # -------------------------------------------------------------- overview

    async def overview(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._status)
        return self.render(request, "overview.html", rows=rows)

    async def overview_services(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._status)
        return self.render(request, "_services.html", rows=rows)

    def _status(self) -> list[dict[str, Any]]:
        def compute() -> list[dict[str, Any]]:
            rows = []
            for route, st in self.admin.status():
                row: dict[str, Any] = {"service": route.service_name, "table": route.table_name}
                if st is not None:
                    row.update(
                        counts=st.counts,
                        due=st.due,
                        scheduled=st.scheduled,
                        oldest=format_duration(st.oldest_due_seconds),
                        dead=st.dead,
                    )
                rows.append(row)
            return rows

        return self.cache.get("status", compute)

    async def activity(self, request: Request) -> Response:
        doc = await run_in_threadpool(self._activity)
        return JSONResponse(doc)

    def _activity(self) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            act = self.admin.activity()
            if act is None:
                return {"t": [], "published": [], "consumed": [], "failed": []}
            return {
                "t": [round(m.timestamp()) for m in act.minutes],
                "published": act.published,
                "consumed": act.consumed,
                "failed": act.failed,
            }

        return self.chart_cache.get("activity", compute)

    # -------------------------------------------------------------- messages

    async def messages(self, request: Request) -> Response:
        q = request.query_params
        text = (q.get("q") or "").strip()
        by = q.get("by") or "key"
        if by not in SEARCH_FIELDS:
            by = "key"
        service = q.get("service") or None
        status_name = q.get("status") or None
        before = q.get("before") or None
        form = {"q": text, "by": by, "service": service or "", "status": status_name or ""}
        try:
            status = Status(status_name) if status_name else None
            search = _search(text, by, status)
            if service is not None and service not in self.services():
                raise ConfigurationError(f"no service named {service!r}")
            page = await run_in_threadpool(
                self.admin.search,
                search,
                services=[service] if service else None,
                limit=PAGE,
                before=before,
            )
        except (OutboxError, ValueError) as exc:
            return self.render(
                request, "messages.html", 400, form=form, page=None, error=str(exc), older=None
            )
        older = None
        if page.next_before:
            older = "/messages?" + urlencode({**form, "before": page.next_before})
        return self.render(request, "messages.html", form=form, page=page, error=None, older=older)

    async def message(self, request: Request) -> Response:
        service = request.path_params["service"]
        outbox_id = request.path_params["outbox_id"]
        if service not in self.services():
            raise HTTPException(404, f"no service named {service!r}")
        try:
            m = await run_in_threadpool(self.admin.message, outbox_id, service=service)
        except MessageNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        trail = await run_in_threadpool(
            lambda: self.admin.audit(services=[service], outbox_id=outbox_id, limit=PAGE)
        )
        return self.render(
            request,
            "message.html",
            m=m,
            envelope=_pretty_envelope(m),
            payload=_pretty_payload(m),
            headers=json.dumps(m.header_map(), indent=2) if m.headers else None,
            requeued=_int(request.query_params.get("requeued")),
            cancelled=_int(request.query_params.get("cancelled")),
            edited=_int(request.query_params.get("edited")),
            trail=trail.entries,
        )

    async def edit(self, request: Request) -> Response:
        form = await checked_form(request)
        service = _str(form.get("service"))
        raw_id = _str(form.get("id"))
        if service not in self.services() or not raw_id.isdigit():
            raise HTTPException(400, f"no dead letter {service!r}:{raw_id!r}")
        try:
            payload = json.loads(_str(form.get("payload")))
        except ValueError as exc:
            raise HTTPException(400, f"the new payload is not valid JSON: {exc}") from None
        try:
            await run_in_threadpool(
                lambda: self.admin.edit(
                    int(raw_id), payload, service=service, actor=self.actor(request)
                )
            )
        except OutboxError as exc:
            raise HTTPException(400, str(exc)) from None
        return RedirectResponse(
            f"/messages/{_quoted(service)}/{int(raw_id)}?edited=1", status_code=303
        )

    # -------------------------------------------------------------- blocked keys

    async def keys(self, request: Request) -> Response:
        q = request.query_params
        service = q.get("service") or None
        form = {"service": service or ""}
        ordered = sorted(r.service_name for r in self.outbox.routes.routes() if r.ordered)
        try:
            if service is not None and service not in ordered:
                raise ConfigurationError(f"no ordered service named {service!r}")
            found = await run_in_threadpool(
                lambda: self.admin.blocked_keys([service] if service else None, limit=PAGE)
            )
        except OutboxError as exc:
            return self.render(
                request,
                "keys.html",
                400,
                form=form,
                found=None,
                error=str(exc),
                ordered=ordered,
                done=None,
            )
        return self.render(
            request,
            "keys.html",
            form=form,
            found=found,
            error=None,
            ordered=ordered,
            done=q.get("done"),
        )

    async def key_action(self, request: Request) -> Response:
        form = await checked_form(request)
        service = _str(form.get("service"))
        key = _str(form.get("key"))
        action = _str(form.get("action"))
        reason = _str(form.get("reason")).strip()
        actor = self.actor(request)
        calls: dict[str, Callable[[], Any]] = {
            "retry": lambda: self.admin.retry_head(service, key, actor=actor),
            "skip": lambda: self.admin.skip_head(service, key, reason, actor=actor),
            "park": lambda: self.admin.park(service, key, reason=reason or None, actor=actor),
            "release": lambda: self.admin.release(service, key, actor=actor),
        }
        if service not in self.services() or action not in calls:
            raise HTTPException(400, f"no action {action!r} on service {service!r}")
        try:
            await run_in_threadpool(calls[action])
        except OutboxError as exc:
            raise HTTPException(400, str(exc)) from None
        return RedirectResponse(
            "/keys?" + urlencode({"service": service, "done": action}), status_code=303
        )

    # -------------------------------------------------------------- lineage

    async def trace(self, request: Request) -> Response:
        event_id = (request.query_params.get("event_id") or "").strip()
        steps = None
        error = None
        status = 200
        if event_id:
            try:
                steps = await run_in_threadpool(self.admin.trace, event_id)
            except OutboxError as exc:
                error, status = str(exc), 400
        return self.render(
            request, "trace.html", status, event_id=event_id, steps=steps, error=error
        )

    # -------------------------------------------------------------- audit

    async def audit(self, request: Request) -> Response:
        q = request.query_params
        service = q.get("service") or None
        action = q.get("action") or None
        form = {"service": service or "", "action": action or ""}
        try:
            if service is not None and service not in self.services():
                raise ConfigurationError(f"no service named {service!r}")
            before = q.get("before")
            page = await run_in_threadpool(
                lambda: self.admin.audit(
                    services=[service] if service else None,
                    action=action,
                    limit=PAGE,
                    before=int(before) if before and before.isdigit() else None,
                )
            )
        except OutboxError as exc:
            return self.render(
                request,
                "audit.html",
                400,
                form=form,
                page=None,
                error=str(exc),
                more=None,
                actions=AUDIT_ACTIONS,
            )
        more = None
        if page.next_before is not None:
            more = "/audit?" + urlencode({**form, "before": page.next_before})
        return self.render(
            request,
            "audit.html",
            form=form,
            page=page,
            error=None,
            more=more,
            actions=AUDIT_ACTIONS,
        )

    async def cancel(self, request: Request) -> Response:
        form = await checked_form(request)
        service = _str(form.get("service"))
        event_id = _str(form.get("event_id"))
        if service not in self.services():
            raise HTTPException(400, f"no service named {service!r}")
        try:
            done = await run_in_threadpool(
                lambda: self.admin.cancel(event_id, service=service, actor=self.actor(request))
            )
        except OutboxError as exc:
            raise HTTPException(400, str(exc)) from None
        return _back(form, "/messages", cancelled=int(done))

    # -------------------------------------------------------------- dead letters

    def _dead_filter(self, values: Any) -> tuple[list[str] | None, str | None]:
        service = values.get("service") or None
        if service is not None and service not in self.services():
            raise ConfigurationError(f"no service named {service!r}")
        event_type = (values.get("event_type") or "").strip() or None
        return ([service] if service else None), event_type

    async def dead(self, request: Request) -> Response:
        q = request.query_params
        form = {"service": q.get("service") or "", "event_type": q.get("event_type") or ""}
        try:
            services, event_type = self._dead_filter(q)
            page = await run_in_threadpool(
                lambda: self.admin.dead_letters(
                    services=services, event_type=event_type, limit=PAGE, after=q.get("after")
                )
            )
        except OutboxError as exc:
            return self.render(
                request, "dead.html", 400, form=form, page=None, error=str(exc), more=None
            )
        more = None
        if page.next_after:
            more = "/dead?" + urlencode({**form, "after": page.next_after})
        return self.render(
            request,
            "dead.html",
            form=form,
            page=page,
            error=None,
            more=more,
            requeued=_int(q.get("requeued")),
            purged=_int(q.get("purged")),
        )

    async def requeue(self, request: Request) -> Response:
        form = await checked_form(request)
        chosen = [v for v in form.getlist("ids") if isinstance(v, str)]
        one = form.get("one")
        if isinstance(one, str) and one:
            chosen = [one]
        by_service: dict[str, list[int]] = {}
        try:
            for value in chosen:
                parsed = parse_cursor(value)
                assert parsed is not None
                by_service.setdefault(parsed[0], []).append(parsed[1])
            if not by_service:
                raise ConfigurationError("no dead letter chosen: tick some first")
            total = 0
            for service, ids in by_service.items():
                done = await run_in_threadpool(
                    self.admin.requeue, ids, services=[service], actor=self.actor(request)
                )
                total += sum(done.values())
        except OutboxError as exc:
            raise HTTPException(400, str(exc)) from None
        return _back(form, "/dead", requeued=total)

    async def requeue_all(self, request: Request) -> Response:
        form = await checked_form(request)
        try:
            services, event_type = self._dead_filter(form)
            done = await run_in_threadpool(
                lambda: self.admin.requeue(
                    None,
                    services=services or self.services(),
                    event_type=event_type,
                    actor=self.actor(request),
                )
            )
        except OutboxError as exc:
            raise HTTPException(400, str(exc)) from None
        return _back(form, "/dead", requeued=sum(done.values()))

    async def purge(self, request: Request) -> Response:
        form = await checked_form(request)
        retention = self.outbox.settings.retention
        try:
            services, event_type = self._dead_filter(form)
            raw = form.get("older_than")
            age = parse_duration(raw if isinstance(raw, str) else "", what="older than")
            result = await run_in_threadpool(
                lambda: self.admin.purge(
                    dead_older_than=age,
                    services=services,
                    event_type=event_type,
                    batch_size=retention.batch_size,
                    pause=retention.batch_pause,
                    actor=self.actor(request),
                )
            )
        except OutboxError as exc:
            raise HTTPException(400, str(exc)) from None
        return _back(form, "/dead", purged=result.total)

    # -------------------------------------------------------------- login

    async def login(self, request: Request) -> Response:
        guard: Guard = request.state.guard
        target = safe_next(request.query_params.get("next"))
        if not guard.token_required:
            return RedirectResponse(target, status_code=303)
        if request.method == "GET":
            return self.render(request, "login.html", next=target, error=None)
        wait = guard.locked_for(request)
        if wait is not None:
            # Refused before the token is read: the right one too, or guessing goes on.
            page = self.render(
                request,
                "login.html",
                429,
                next=target,
                error=f"too many failed sign-ins from this address: try again in {wait} s",
            )
            page.headers["Retry-After"] = str(wait)
            return page
        form = await checked_form(request)
        target = safe_next(_str(form.get("next")))
        given = _str(form.get("token"))
        if not guard.verify(request, given, "form"):
            return self.render(request, "login.html", 401, next=target, error="wrong token")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session_value(given),
            httponly=True,
            samesite="strict",
            secure=request.state.https,
            path="/",
        )
        return response

    async def failed(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.render(request, "error.html", exc.status_code, detail=exc.detail)

    async def crashed(self, request: Request, exc: Exception) -> Response:
        # Answered outside the middleware (Starlette's error handler is the outermost
        # layer, and raises the exception again for the server to log with its
        # traceback): the security headers are added here.
        response = PlainTextResponse("internal error: see the console's log", status_code=500)
        return with_security_headers(response, request.url.path)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _search(text: str, by: str, status: Status | None) -> Search:
    if not text:
        return Search(status=status)
    if by == "id":
        if not text.isdigit() or len(text) > 18:
            raise ConfigurationError(f"an outbox id is a number, got {text!r}")
        return Search(outbox_id=int(text), status=status)
    if by == "event_id":
        return Search(event_id=text, status=status)
    if by == "event_type":
        return Search(event_type=text, status=status)
    return Search(key=text, status=status)


def _back(form: FormData, default: str, **notice: int) -> RedirectResponse:
    target = safe_next(_str(form.get("next")), default)
    path, _, query = target.partition("?")
    kept = "&".join(p for p in query.split("&") if p and p.split("=")[0] not in notice)
    query = "&".join(x for x in (kept, urlencode(notice)) if x)
    return RedirectResponse(f"{path}?{query}", status_code=303)


def create_app(
    outbox: Outbox,
    *,
    token: str | None = None,
    read_only: bool = False,
    allowed_hosts: Iterable[str] = (),
    trusted_proxies: Iterable[str] = (),
    throttle: Throttle | None = None,
    cache_seconds: float = CACHE_SECONDS,
    chart_cache_seconds: float = CHART_CACHE_SECONDS,
) -> Starlette:
    """The console of ``outbox``'s services as an ASGI application.

    ``token``: required from every visitor (login form or ``Authorization: Bearer``).
    ``read_only``: no change is offered and every POST is refused (403).
    ``allowed_hosts``: the names (or addresses) the console is reached by besides the
    loopback ones; a request naming any other host in ``Host`` is refused (400).
    ``trusted_proxies``: addresses or networks of reverse proxies whose
    ``X-Forwarded-Proto`` / ``X-Forwarded-For`` are believed.
    ``throttle``: the limits on failed sign-ins (default :class:`Throttle`).
    ``cache_seconds`` / ``chart_cache_seconds``: how long the overview's counts and
    its chart are reused.
    Failed sign-ins and lock-outs are reported to ``outbox``'s observers
    (:meth:`~outboxer.hooks.Observer.sign_in_failed`).
    """
    console = Console(
        outbox,
        read_only=read_only,
        cache_seconds=cache_seconds,
        chart_cache_seconds=chart_cache_seconds,
    )
    guard = Guard(
        token=token,
        read_only=read_only,
        allowed_hosts=allowed_hosts,
        trusted_proxies=trusted_proxies,
        throttle=throttle,
        hooks=outbox.hooks,
    )
    routes: Sequence[Route | Mount] = [
        Route("/", console.overview),
        Route("/overview/services", console.overview_services),
        Route("/api/activity", console.activity),
        Route("/messages", console.messages),
        Route("/messages/{service}/{outbox_id:int}", console.message),
        Route("/messages/cancel", console.cancel, methods=["POST"]),
        Route("/dead", console.dead),
        Route("/dead/requeue", console.requeue, methods=["POST"]),
        Route("/dead/requeue-all", console.requeue_all, methods=["POST"]),
        Route("/dead/purge", console.purge, methods=["POST"]),
        Route("/dead/edit", console.edit, methods=["POST"]),
        Route("/audit", console.audit),
        Route("/trace", console.trace),
        Route("/keys", console.keys),
        Route("/keys/action", console.key_action, methods=["POST"]),
        Route("/login", console.login, methods=["GET", "POST"]),
        Mount(
            "/static",
            StaticFiles(directory=str(files("outboxer.web") / "static")),
            name="static",
        ),
    ]
    return Starlette(
        routes=list(routes),
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard.dispatch)],
        exception_handlers={HTTPException: console.failed, Exception: console.crashed},
    )
