"""The unmanaged ``OutboxMessage`` (no table: the admin reads rows through outboxer)."""

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no types
    initial = True
    dependencies: ClassVar[list[Any]] = []
    operations: ClassVar[list[Any]] = [
        migrations.CreateModel(
            name="OutboxMessage",
            fields=[("id", models.AutoField(primary_key=True, serialize=False))],
            options={
                "managed": False,
                "verbose_name": "outbox message",
                "verbose_name_plural": "outbox messages",
                "default_permissions": ("view", "change"),
            },
        ),
    ]
