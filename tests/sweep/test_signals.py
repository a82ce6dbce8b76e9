"""Signals never deadlock a process: a burst of them is relayed to a thread, each one counted."""

import os
import signal
import threading
import time

import pytest

from saesweep.sweep.signals import SignalRelay


def test_a_burst_of_signals_is_relayed_in_order_without_deadlock():
    seen, done = [], threading.Event()

    def on_signal(n):
        seen.append(n)
        if n == 50:
            done.set()

    relay = SignalRelay(on_signal, signals=(signal.SIGUSR1,))
    try:
        for _ in range(50):  # far faster than a handler that took a lock could survive
            os.kill(os.getpid(), signal.SIGUSR1)
        assert done.wait(10)
    finally:
        relay.restore()
    assert seen == list(range(1, 51))
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_second_signal_can_raise_in_the_main_thread():
    relay = SignalRelay(lambda n: None, signals=(signal.SIGUSR1,), raise_after=1)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.5)
    finally:
        relay.restore()
