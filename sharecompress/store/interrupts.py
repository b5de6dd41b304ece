"""Ctrl-C held back while work handed to a thread is taken hold of, or waited out.

A KeyboardInterrupt lands between any two bytecodes of the main thread. Where it lands between
starting a thread's work and keeping hold of it (a future not yet stored), or in a wait for that
work (Python 3.11's interrupted ``Thread.join`` marks a thread that still runs as stopped), the
process can go on to exit under a thread inside torch: a C++ abort ("terminate called without
an active exception"), found by two reviews of the two-worker merge. Inside ``held_interrupts()``
a Ctrl-C is recorded instead, and handed to the handler it was meant for when the block ends.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT until the block ends, then deliver it once (nests; a no-op outside the main
    thread, which signals never reach, and where Python does not handle SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored, or left to the system: nothing of Python's to hold
        yield
        return
    held: list = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(signal.SIGINT, held[0])
