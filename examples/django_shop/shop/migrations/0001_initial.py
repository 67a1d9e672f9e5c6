from django.db import migrations, models

from outboxer.contrib.django.operations import MigrateOutbox


class Migration(migrations.Migration):
    initial = True
    dependencies = []  # noqa: RUF012 - Django's own migration layout

    operations = [  # noqa: RUF012
        migrations.CreateModel(
            name="Order",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("total", models.IntegerField()),
            ],
        ),
        migrations.CreateModel(
            name="Invoice",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("order_id", models.BigIntegerField()),
            ],
        ),
        # The outbox tables of every service of settings.OUTBOXER_APP.
        MigrateOutbox(),
    ]
