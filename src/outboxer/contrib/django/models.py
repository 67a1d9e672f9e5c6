"""The admin's entry for outbox rows: a model without a table of its own.

Django's admin lists models; outbox rows live in one table per service, read and
changed only through :class:`outboxer.admin.Admin`. ``OutboxMessage`` is therefore
unmanaged and never queried: it gives the admin its place, name and permissions.
"""

from django.db import models


class OutboxMessage(models.Model):  # type: ignore[misc]  # Django ships no types
    class Meta:
        managed = False
        verbose_name = "outbox message"
        verbose_name_plural = "outbox messages"
        default_permissions = ("view", "change")
