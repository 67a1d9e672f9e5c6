"""HandlerThread: a consumer's sync batches on one long-lived daemon thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from outboxer import aio
from outboxer.aio import HandlerThread


def test_calls_run_in_turn_on_one_daemon_thread() -> None:
    runner = HandlerThread("test-handlers")
    seen: list[tuple[str, bool, int]] = []

    def work(n: int) -> int:
        me = threading.current_thread()
        seen.append((me.name, me.daemon, me.ident or 0))
        return n * 2

    async def main() -> list[int]:
        return [await runner.run(work, n) for n in range(5)]

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    assert {(name, daemon) for name, daemon, _ in seen} == {("test-handlers", True)}
    assert len({ident for _, _, ident in seen}) == 1
    assert threading.main_thread().ident not in {ident for _, _, ident in seen}


def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    runner = HandlerThread()

    def fail() -> None:
        raise ValueError("handler broke")

    async def main() -> str:
        with pytest.raises(ValueError, match="handler broke"):
            await runner.run(fail)
        return await runner.run(lambda: "still here")

    assert asyncio.run(main()) == "still here"


def test_an_idle_thread_ends_and_the_next_call_starts_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aio, "IDLE_SECONDS", 0.05)
    runner = HandlerThread("idle-test")

    def current() -> threading.Thread:
        return threading.current_thread()

    async def main() -> tuple[threading.Thread, threading.Thread]:
        first = await runner.run(current)
        await asyncio.to_thread(first.join, 5)  # it ends by itself once idle
        assert not first.is_alive(), "the idle thread did not end"
        return first, await runner.run(current)

    first, second = asyncio.run(main())
    assert first is not second
    assert second.name == "idle-test"
