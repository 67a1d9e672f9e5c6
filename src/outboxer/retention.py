"""The retention sweep: a side task of ``outboxer run`` that deletes old rows.

Configured by ``[retention]`` (:class:`outboxer.settings.RetentionSettings`); it runs
only when an age is set. Every ``sweep_interval`` one process (whichever takes the
database's single-instance lock: a PostgreSQL advisory lock or MySQL ``GET_LOCK``;
on SQLite the single writer serialises sweeps batch by batch) deletes, through
:meth:`outboxer.admin.Admin.purge`, ``batch_size`` rows per short transaction with a
pause between batches, so claims and publishes are never held up for long.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence

from outboxer.admin import Admin, PurgeResult
from outboxer.aio import sleep_unless
from outboxer.database.locks import single_instance
from outboxer.hooks import Observer
from outboxer.settings import RetentionSettings

logger = logging.getLogger(__name__)

SWEEP_LOCK = "outboxer.sweep"
FIRST_SWEEP_DELAY = 5.0
"""Seconds after start before the first sweep (the loops settle first)."""


class Sweeper:
    """Deletes what the retention settings say, for ``services``, once per interval."""

    def __init__(
        self,
        admin: Admin,
        settings: RetentionSettings,
        services: Sequence[str],
        hooks: Observer,
    ) -> None:
        self.admin = admin
        self.settings = settings
        self.services = list(services)
        self.hooks = hooks

    def sweep_once(self, should_stop: Callable[[], bool] | None = None) -> PurgeResult | None:
        """One sweep (blocking); ``None`` when another process holds the sweep lock."""
        s = self.settings
        with single_instance(self.admin.storage.database, SWEEP_LOCK) as taken:
            if not taken:
                logger.debug("another process is sweeping; skipped")
                return None
            result = self.admin.purge(
                consumed_older_than=s.consumed_after,
                published_older_than=s.published_after,
                dead_older_than=s.dead_after,
                services=self.services,
                batch_size=s.batch_size,
                pause=s.batch_pause,
                should_stop=should_stop,
            )
        for (service, status), count in result.deleted.items():
            if count:
                self.hooks.rows_purged(service, status.value, count)
        if result.total:
            logger.info(
                "retention sweep deleted %d row(s)",
                result.total,
                extra={
                    "purged": {f"{svc}/{st.value}": n for (svc, st), n in result.deleted.items()}
                },
            )
        return result

    async def run(self, stopping: asyncio.Event) -> None:
        """Sweep every ``sweep_interval`` until ``stopping`` is set; a failed sweep is
        logged and reported (``loop_error``) and tried again at the next interval."""
        if await sleep_unless(stopping, min(FIRST_SWEEP_DELAY, self.settings.sweep_interval)):
            return
        while not stopping.is_set():
            try:
                await asyncio.to_thread(self.sweep_once, stopping.is_set)
            except Exception as exc:
                logger.exception("retention sweep failed")
                for service in self.services:
                    self.hooks.loop_error(service, "sweeper", exc)
            if await sleep_unless(stopping, self.settings.sweep_interval):
                return


def start_sweeper(
    admin: Admin,
    settings: RetentionSettings,
    services: Collection[str],
    hooks: Observer,
    stopping: asyncio.Event,
) -> list[asyncio.Task[None]]:
    """The sweep as a side task of the runtime (none when retention is off)."""
    if not settings.enabled or not services:
        return []
    sweeper = Sweeper(admin, settings, sorted(services), hooks)
    return [asyncio.create_task(sweeper.run(stopping), name="outboxer-retention-sweep")]
