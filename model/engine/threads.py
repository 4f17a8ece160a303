"""OS-level thread names, so `top -H`, py-spy and /proc show which thread is which.

Python's `threading.Thread(name=...)` names the thread for Python only; the kernel keeps the
process name. The load benchmark (benchmarks/loadtest.py) reads per-thread CPU from /proc by
these names.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15


def name_this_thread(name: str) -> None:
    """Set the calling thread's kernel name (Linux; at most 15 bytes; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass  # no libc to call: names are a diagnostic, not a feature
