"""The ``outboxer`` command line: migrate, run, status, dead letters, cancel, purge,
the demo.

``--app module:attribute`` (or ``OUTBOXER_APP``) names the application's
:class:`~outboxer.Outbox`, the way uvicorn names an ASGI app; the current directory
is put first on ``sys.path`` so a project's modules import as they would from its
root. ``--config FILE`` is read by ``Outbox()`` while the app is imported (as
``OUTBOXER_CONFIG``), unless the app passes its own ``settings=``.

Errors from outboxer are printed as one red line (with ``--json``: a JSON object on
stdout) and exit with status 1; usage mistakes exit with status 2. ``status`` also
exits 3 when outbox tables are missing and 4 when a ``--fail-on`` condition holds.
Durations read like ``30s``, ``15m``, ``12h``, ``7d``.
"""

# Each module registers its commands on `app` when imported, in the order of --help.
# isort: off
from outboxer.cli import run, status, dead, keys, audit, trace, schemas, web, demo  # noqa: F401

# isort: on
from outboxer.cli.common import app, load_app
from outboxer.cli.dead import message_json
from outboxer.cli.status import status_table

__all__ = ["app", "load_app", "main", "message_json", "status_table"]


def main() -> None:
    """Entry point of the ``outboxer`` console script."""
    app(prog_name="outboxer")
