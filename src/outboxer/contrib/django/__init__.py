"""outboxer in a Django project: ``INSTALLED_APPS = [..., "outboxer.contrib.django"]``,
``OUTBOXER_APP = "shop.events:outbox"``, a :class:`DjangoOutbox` there, and
``python manage.py outboxer ...`` (the ``outboxer`` command line with that app).
Requires ``pip install 'outboxer[django]'``."""

from outboxer.contrib.django.connector import DjangoConnector, DjangoTransaction
from outboxer.contrib.django.outbox import (
    DjangoOutbox,
    database_url,
    django_database,
    load_outbox,
)

__all__ = [
    "DjangoConnector",
    "DjangoOutbox",
    "DjangoTransaction",
    "database_url",
    "django_database",
    "load_outbox",
]
