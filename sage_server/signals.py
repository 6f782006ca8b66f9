"""Waiting for the signals that stop a server (SIGTERM, SIGINT, and SIGBREAK on Windows), on every platform."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from types import FrameType, TracebackType
from typing import Any

import anyio

STOP_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    *([signal.Signals(signal.SIGBREAK)] if hasattr(signal, "SIGBREAK") else []),  # Ctrl-Break on Windows
)
Handler = Callable[[int, FrameType | None], Any] | int | None


class StopSignals:
    """The stop signals as something to await, caught from `__enter__` to `__exit__`::

        with StopSignals() as signals:
            signum = await signals.wait()

    Where the event loop can catch signals itself (`loop.add_signal_handler`, on Unix) anyio's receiver does; on
    Windows the loop has no such method (it raises NotImplementedError), so plain `signal.signal` handlers hand
    the signal to the loop thread-safely instead, and the previous handlers come back on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.fallback = False  # True when plain signal handlers stand in for the loop's
        self._receiver: AbstractContextManager[AsyncIterator[signal.Signals]] | None = None
        self._iterator: AsyncIterator[signal.Signals] | None = None
        self._received: list[signal.Signals] = []
        self._event: anyio.Event | None = None
        self._previous: dict[signal.Signals, Handler] = {}

    def __enter__(self) -> StopSignals:
        receiver = anyio.open_signal_receiver(*self.signals)
        try:
            self._iterator = receiver.__enter__()
        except NotImplementedError:
            self._install_fallback()
        else:
            self._receiver = receiver
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._receiver is not None:
            self._receiver.__exit__(exc_type, exc, tb)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    async def wait(self) -> signal.Signals:
        """The next stop signal received."""
        if self._iterator is not None:
            return await self._iterator.__anext__()
        assert self._event is not None, "use StopSignals as a context manager"
        while not self._received:
            await self._event.wait()
            self._event = anyio.Event()
        return self._received.pop(0)

    def _install_fallback(self) -> None:
        self.fallback = True
        loop = asyncio.get_running_loop()
        self._event = anyio.Event()

        def deliver(signum: int) -> None:
            self._received.append(signal.Signals(signum))
            assert self._event is not None
            self._event.set()

        def handler(signum: int, frame: FrameType | None) -> None:
            # A signal handler may run between any two bytecodes: only hand the signal over to the loop here.
            loop.call_soon_threadsafe(deliver, signum)

        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, handler)
