"""The Django admin page of the outbox: each service's rows, read-only, filtered by
status and event type, searched by key and event id, with actions to requeue and
purge dead letters. Every read and change goes through
:class:`outboxer.admin.Admin` (``outbox.admin``) of ``settings.OUTBOXER_APP``."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse

from outboxer.admin import Search
from outboxer.contrib.django.models import OutboxMessage
from outboxer.contrib.django.outbox import load_outbox
from outboxer.errors import OutboxError
from outboxer.models import Status

PAGE = 100


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):  # type: ignore[misc]  # Django ships no types
    """One page over every service's outbox rows (newest first)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        outbox = load_outbox()
        if request.method == "POST":
            if not self.has_change_permission(request):
                return HttpResponse(status=403)
            self._act(request, outbox)
            return HttpResponseRedirect(request.get_full_path())
        services = sorted(r.service_name for r in outbox.routes.routes())
        service = request.GET.get("service") or None
        status_name = request.GET.get("status") or None
        event_type = request.GET.get("event_type") or None
        query = (request.GET.get("q") or "").strip() or None
        status = None
        if status_name is not None:
            try:
                status = Status(status_name)
            except ValueError:
                return HttpResponse(f"unknown status {status_name!r}", status=400)
        chosen = [service] if service in services else None
        searches = [Search(status=status, event_type=event_type)]
        if query is not None:
            searches = [
                Search(status=status, event_type=event_type, key=query),
                Search(status=status, event_type=event_type, event_id=query),
            ]
        found: dict[tuple[str, int], Any] = {}
        for search in searches:
            for message in outbox.admin.search(search, services=chosen, limit=PAGE).messages:
                found[(message.service_name, message.id)] = message
        rows = sorted(found.values(), key=lambda m: (m.id, m.service_name), reverse=True)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Outbox messages",
            "messages_found": rows[:PAGE],
            "services": services,
            "statuses": [s.value for s in Status],
            "chosen": {
                "service": service or "",
                "status": status_name or "",
                "event_type": event_type or "",
                "q": query or "",
            },
            "can_change": self.has_change_permission(request),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "outboxer/admin/outbox.html", context)

    def _act(self, request: HttpRequest, outbox: Any) -> None:
        action = request.POST.get("action")
        service = request.POST.get("service") or None
        services = [service] if service else None
        # The audit trail names the signed-in Django user.
        actor = f"django:{request.user.get_username()}"
        try:
            if action == "requeue":
                ids = [int(i) for i in request.POST.getlist("ids")]
                if not ids:
                    messages.warning(request, "choose the dead letters to requeue")
                    return
                done = outbox.admin.requeue(ids, services=services, actor=actor)
                messages.success(request, f"requeued {sum(done.values())} dead letter(s)")
            elif action == "purge_dead":
                result = outbox.admin.purge(dead_older_than=0.0, services=services, actor=actor)
                messages.success(request, f"purged {result.total} dead letter(s)")
            else:
                messages.error(request, f"unknown action {action!r}")
        except (OutboxError, ValueError) as exc:
            messages.error(request, str(exc))
