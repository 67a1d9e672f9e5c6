"""``python manage.py outboxer ...``: the ``outboxer`` command line, with the app
taken from ``settings.OUTBOXER_APP``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from outboxer.cli import app
from outboxer.contrib.django.outbox import load_outbox


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no types
    help = "outboxer's command line (migrate, run, status, dead, purge, web, ...)"

    def run_from_argv(self, argv: list[str]) -> None:
        # Typer parses everything after "outboxer"; Django's own options do not apply.
        args = argv[2:]
        load_outbox()  # a wrong OUTBOXER_APP is refused with Django's message
        spec = str(settings.OUTBOXER_APP)
        app(args=["--app", spec, *args], prog_name=f"{argv[0]} outboxer")

    def handle(self, *args: Any, **options: Any) -> None:
        """Not used: :meth:`run_from_argv` hands the arguments to the CLI."""
