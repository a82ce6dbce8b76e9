"""Ctrl-C and SIGTERM without deadlocks.

A Python signal handler runs in the main thread between two bytecodes, possibly in the middle of
``Event.set()`` or a ``print`` of that same thread. A handler that takes a lock (setting an
Event, printing) then deadlocks when a second signal arrives while the first handler holds it,
which is what happened when a Ctrl-C reached a worker together with its parent's SIGTERM. Here
the handler only counts and writes one byte to a pipe (both lock-free); a helper thread reads
the byte and does the real work.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalRelay:
    """While active, each of ``signals`` calls ``on_signal(n)`` in a helper thread (``n``: how
    many of them arrived so far). With ``raise_after`` set, signal number ``raise_after + 1``
    raises KeyboardInterrupt in the main thread instead (an impatient second Ctrl-C)."""

    def __init__(self, on_signal: Callable[[int], None], signals: Sequence[int] = STOP_SIGNALS,
                 raise_after: Optional[int] = None) -> None:
        self.on_signal, self.raise_after, self.count = on_signal, raise_after, 0
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in signals}
        threading.Thread(target=self._relay, daemon=True, name="saesweep-signals").start()

    def _handler(self, signum, frame) -> None:
        self.count += 1
        if self.raise_after is not None and self.count > self.raise_after:
            raise KeyboardInterrupt
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):
            pass

    def _relay(self) -> None:
        seen = 0
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data:
                return
            for _ in data:
                seen += 1
                self.on_signal(seen)

    def restore(self) -> None:
        """Put the previous handlers back and end the helper thread."""
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        os.close(self._w)
