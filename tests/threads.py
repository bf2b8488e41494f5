"""Requests from several threads at once, for the tests of the serving batchers (tests/test_batching.py,
tests/test_row_step.py): each thread's result in its own slot, the threads started STAGGER seconds apart so
later ones join a batch that is already decoding."""
from __future__ import annotations

import threading
import time


def concurrently(fn, n: int, stagger: float = 0.0, timeout: float = 300) -> list:
    """[fn(0), ..., fn(n - 1)], each called on its own thread."""
    out = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(timeout=timeout)
    return out
