"""The Django application of ``outboxer.contrib.django``."""

from django.apps import AppConfig


class OutboxerConfig(AppConfig):  # type: ignore[misc]  # Django ships no types
    name = "outboxer.contrib.django"
    label = "outboxer"
    verbose_name = "outboxer"
    default_auto_field = (
        "django.db.models.AutoField"  # as in migrations/0001, whatever the project's
    )
